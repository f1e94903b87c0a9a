"""The built-in calculator's evaluator: arithmetic by walking the ``ast``, never ``eval``.

Accepted: int and float literals, ``+ - * / // % **``, unary ``-``/``+`` and parentheses
(plus a trailing ``=``, ``×``/``÷`` and ``1,000``-style thousands, which models write).
Refused with a message the model can read: names, calls, attribute access, any other
syntax, and results beyond ``MAX_BITS`` bits (checked before a power is computed, so
``2**10**10`` costs nothing). Results print the way the tool-use training data writes them:
``27``, not ``27.0``.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable

from assist.errors import BadRequest

__all__ = ["MAX_BITS", "CalculatorError", "evaluate", "format_number"]

MAX_BITS = 4096  # about 1,233 decimal digits: far beyond any word problem, cheap to compute
_MAX_CHARS = 500
Number = int | float

_BINARY: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Number], Number]] = {ast.USub: operator.neg,
                                                               ast.UAdd: operator.pos}
_SYMBOLS = {ast.BitXor: "^ (use ** for powers)", ast.BitAnd: "&", ast.BitOr: "|",
            ast.LShift: "<<", ast.RShift: ">>", ast.MatMult: "@", ast.Invert: "~", ast.Not: "not"}
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


class CalculatorError(BadRequest):
    """An expression the calculator refuses or cannot evaluate; the message says why."""


def evaluate(expression: str) -> Number:
    text = _THOUSANDS.sub("", expression.strip().rstrip("=").strip())
    text = text.replace("×", "*").replace("÷", "/")
    if not text:
        raise CalculatorError("empty expression")
    if len(text) > _MAX_CHARS:
        raise CalculatorError(f"expression longer than {_MAX_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise CalculatorError(f"not an arithmetic expression: {expression!r}") from None
    except (ValueError, RecursionError, MemoryError):
        raise CalculatorError("expression too complex") from None
    return _eval(tree.body)


def format_number(value: Number) -> str:
    """``27`` for integral values (also ``54/2``), else up to 12 significant digits."""
    if isinstance(value, int):
        return str(value)
    if value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return f"{value:.12g}"


def _eval(node: ast.AST) -> Number:
    value = node.value if isinstance(node, ast.Constant) else None
    if isinstance(value, int | float) and not isinstance(value, bool):  # True is an int, not a number
        return value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        a, b = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and isinstance(a, int) and isinstance(b, int):
            if abs(a) > 1 and abs(a).bit_length() * abs(b) > MAX_BITS:
                raise CalculatorError("result too large")
        try:
            value = _BINARY[type(node.op)](a, b)
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("result too large") from None
        if isinstance(value, complex):
            raise CalculatorError("the result is not a real number")
        if isinstance(value, int) and value.bit_length() > MAX_BITS:
            raise CalculatorError("result too large")
        if isinstance(value, float) and not math.isfinite(value):
            raise CalculatorError("result too large")
        return value
    raise CalculatorError(_refusal(node))


def _refusal(node: ast.AST) -> str:
    only = "only numbers and + - * / // % ** are allowed"
    if isinstance(node, ast.Name):
        return f"names are not allowed ({node.id}); {only}"
    if isinstance(node, ast.Call):
        return f"function calls are not allowed; {only}"
    if isinstance(node, ast.Attribute):
        return f"attribute access is not allowed; {only}"
    if isinstance(node, ast.BinOp | ast.UnaryOp) and type(node.op) in _SYMBOLS:
        return f"operator {_SYMBOLS[type(node.op)]} is not allowed; {only}"
    if isinstance(node, ast.Constant):
        return f"{node.value!r} is not a number; {only}"
    return f"{type(node).__name__} is not allowed; {only}"
