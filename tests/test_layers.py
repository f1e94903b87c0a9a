"""The house's layers, checked on every import (``docs/architecture.md`` draws them).

Rooms, and whom each may import (its own room always, third-party packages always):

- core (``assist/`` except ``assist/cli/`` and ``assist/server/``): only itself;
- ``strategies``: the core;
- ``evals``: the core and ``strategies``;
- ``training``: the core and ``evals``, never ``strategies``;
- front doors (``assist/cli/``, ``assist/server/``): anything; nothing imports them,
  except the CLI, which starts the server.

Across top-level packages only public modules and names are imported: never
``strategies._base`` from ``evals``, never ``from assist import _x`` from ``training``.
Within a package private modules are fine. Every import counts, those inside functions
and under ``TYPE_CHECKING`` too. The core also names no other room in code (a string such
as ``importlib.import_module("strategies")``); docstrings and comments may.
"""

from __future__ import annotations

import ast
import builtins
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("assist", "strategies", "evals", "training")
FRONT_DOORS = ("assist.cli", "assist.server")

# Which rooms each room may import, besides itself. Front doors may import anything.
ALLOWED = {
    "core": {"core"},
    "strategies": {"core", "strategies"},
    "evals": {"core", "strategies", "evals"},
    "training": {"core", "evals", "training"},
}


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def room(module: str) -> str:
    """The room a dotted module name lives in."""
    if any(_under(module, f) for f in FRONT_DOORS):
        return "front"
    top = module.split(".")[0]
    return "core" if top == "assist" else top


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, names imported from it) for every import in the file,
    relative ones resolved, those inside functions and ``if`` blocks included."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target, [alias.name for alias in node.names]))
    return found


def violations(path: Path) -> list[str]:
    me = module_name(path)
    mine = room(me)
    where = path.relative_to(ROOT)
    out = []
    for line, target, names in imports(path):
        if target.split(".")[0] not in PACKAGES:
            continue  # the standard library or a third-party package
        theirs = room(target)
        if theirs == "front" and mine != "front":
            out.append(f"{where}:{line}: {mine} imports the front door {target}")
        elif mine == "front" and theirs == "front" and me.startswith("assist.server") \
                and not _under(target, "assist.server"):
            out.append(f"{where}:{line}: the server imports the front door {target}")
        elif mine != "front" and theirs not in ALLOWED[mine] and theirs != "front":
            out.append(f"{where}:{line}: {mine} may not import {theirs} ({target})")
        if target.split(".")[0] != me.split(".")[0]:  # across packages: public only
            private = [p for p in target.split(".") if p.startswith("_")]
            private += [n for n in names if n.startswith("_") and n != "__version__"]
            if private:
                out.append(f"{where}:{line}: imports another package's private {target} "
                           f"({', '.join(private)})")
    return out


_OTHER_ROOM = re.compile(r"(strategies|evals|training)(\.[A-Za-z_][\w.]*)?")


def core_names_other_rooms(path: Path) -> list[str]:
    """Imports and module-name strings naming another room, in a core file; docstrings
    (and comments, which ``ast`` drops) may."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    where = path.relative_to(ROOT)
    out = [f"{where}:{line}: imports {target}" for line, target, _ in imports(path)
           if target.split(".")[0] in ("strategies", "evals", "training")]
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                and _OTHER_ROOM.fullmatch(node.value.strip())):
            out.append(f"{where}:{node.lineno}: names {node.value.strip()!r}")
    return out


def test_the_walk_sees_every_room():
    seen = {room(module_name(p)) for p in sources()}
    assert {"core", "strategies", "evals", "training", "front"} <= seen


def test_imports_keep_the_layers():
    found = [v for path in sources() for v in violations(path)]
    assert not found, "layer violations:\n" + "\n".join(found)


def test_the_core_names_no_other_room():
    core = [p for p in sources() if room(module_name(p)) == "core"]
    assert any(p.parent.name == "engine" for p in core)
    found = [v for path in core for v in core_names_other_rooms(path)]
    assert not found, "the core names another room:\n" + "\n".join(found)


# -- the checker itself ---------------------------------------------------------------------
@pytest.mark.parametrize("rel, code, bad", [
    ("strategies/x.py", "from assist._chat_format import render\n", True),
    ("strategies/x.py", "from assist.chat_format import render\n", False),
    ("strategies/x.py", "def f():\n    from evals import harness\n", True),
    ("evals/x.py", "from strategies._base import nodes\n", True),
    ("evals/x.py", "from strategies import nodes\n", False),
    ("evals/x.py", "from strategies import _base\n", True),
    ("training/x.py", "import strategies\n", True),
    ("training/x.py", "from evals.tasks import ArithTask\n", False),
    ("assist/x.py", "import evals\n", True),
    ("assist/x.py", "from assist.server import serve\n", True),
    ("assist/x.py", "from . import _remote\n", False),
    ("assist/engine/x.py", "from .._remote import RemoteChatModel\n", False),
    ("assist/server/x.py", "from strategies._policy import Policy\n", True),
    ("assist/server/x.py", "from strategies import Policy\n", False),
    ("assist/server/x.py", "from assist.cli import main\n", True),
    ("assist/cli/x.py", "from assist.server import serve\n", False),
    ("assist/cli/x.py", "from training.pipeline import run\n", False),
])
def test_the_checker_catches(tmp_path, monkeypatch, rel, code, bad):
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(code)
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert bool(violations(path)) == bad, violations(path)


def test_the_core_check_reads_strings_not_docstrings(tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    path = tmp_path / "assist" / "x.py"
    path.parent.mkdir()
    path.write_text('"""Built for strategies and training."""\n'
                    'import importlib\n'
                    'def f():\n    """evals"""\n    return importlib.import_module("strategies")\n')
    assert core_names_other_rooms(path) == ["assist/x.py:5: names 'strategies'"]


# -- one error tree -------------------------------------------------------------------------
_BUILTIN_ERRORS = {name for name, obj in vars(builtins).items()
                   if isinstance(obj, type) and issubclass(obj, BaseException)}
# Not errors a user sees: control flow and private signals, caught where they are raised.
NOT_USER_ERRORS = {
    "AssistError",  # the root itself
    "BudgetExhausted",  # strategies: the token budget is spent, the strategy answers with what it has
    "ClientGone",  # server: the client left, its work is cancelled
    "_Retry",  # the remote client's retry signal
    "_Usage",  # a front door's own signal
}


def test_every_error_class_is_in_the_one_tree():
    """A class that derives only from built-in exceptions is a new root; every error the
    project raises on purpose hangs under ``assist.errors.AssistError`` instead."""
    roots = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and node.bases and node.name not in NOT_USER_ERRORS and all(
                    isinstance(b, ast.Name) and b.id in _BUILTIN_ERRORS for b in node.bases):
                roots.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.name}")
    assert not roots, "error roots outside AssistError:\n" + "\n".join(roots)


def test_the_tree_carries_http_and_exit_statuses():
    from assist.engine._vllm import VLLMStartError
    from assist.errors import AssistError, BadRequest, NotFound, Unavailable
    from evals._config import EvalError
    from evals.tasks import JsonlError
    from strategies import (
        EmbedderError,
        IngestError,
        LimitError,
        OptionError,
        PolicyError,
        SpecError,
        StoreError,
        ToolError,
        UnknownTool,
    )
    from strategies._calculator import CalculatorError
    from training._loop import CheckpointError
    from training.config import ConfigError
    from training.pipeline import RunError

    expected = {
        BadRequest: (ConfigError, RunError, CheckpointError, EvalError, JsonlError, SpecError, LimitError,
                     OptionError, PolicyError, StoreError, IngestError, ToolError, CalculatorError),
        NotFound: (UnknownTool,),
        Unavailable: (EmbedderError, VLLMStartError),
    }
    for branch, errors in expected.items():
        for error in errors:
            assert issubclass(error, branch), error
            assert error.status == branch.status and error.exit_status == 2, error
    assert (BadRequest.status, NotFound.status, Unavailable.status, AssistError.exit_status) == (400, 404, 503, 2)
    assert issubclass(SpecError, ValueError) and issubclass(RunError, RuntimeError)
    assert SpecError("unknown strategy 'x'", param="strategy", unknown=True).status == 404
