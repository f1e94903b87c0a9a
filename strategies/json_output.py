"""``json``: structured output — a reply that parses and validates against a schema.

The schema (a pydantic model class or a JSON-schema dict; default: any JSON object) goes to
the backend as ``response_format``, which our torch engine and vLLM enforce by constrained
decoding. Backends that only hope (or ignore it) are still covered: the reply is parsed and
validated here, and on failure the model is shown the error and asked again, up to
``retries`` times. The answer is the validated JSON (compact), or one ``field`` of it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

from assist.types import Message
from strategies._base import (
    Bound,
    BudgetExhausted,
    OptionError,
    Recorder,
    Result,
    StrategyBase,
    check_common,
    need_int,
)
from strategies._spec import register
from strategies.extract import normalize

__all__ = ["MAX_SCHEMA_BYTES", "JsonOutput", "read_schema", "schema_of"]

MAX_SCHEMA_BYTES = 1 << 20


def schema_of(schema: Any) -> tuple[dict[str, Any], str]:
    """(JSON schema, name) of a pydantic model class, a schema dict, a path to a .json file,
    or a schema loaded beforehand (an object with ``json_schema`` and ``name``, as the
    server's resources are)."""
    if schema is None:
        return {"type": "object"}, "object"
    if isinstance(getattr(schema, "json_schema", None), dict):
        return schema.json_schema, str(getattr(schema, "name", "output"))
    if isinstance(schema, (str, Path)):
        path = Path(schema)
        try:
            return read_schema(path), path.stem
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read a JSON schema from {path}: {exc}") from exc
    if isinstance(schema, dict):
        return schema, str(schema.get("title", "output"))
    if hasattr(schema, "model_json_schema"):
        return schema.model_json_schema(), schema.__name__
    raise ValueError(f"schema must be a pydantic model, a dict or a .json path, not {type(schema).__name__}")


def read_schema(path: Path, limit: int = MAX_SCHEMA_BYTES) -> Any:
    """The JSON in the regular file ``path``, of at most ``limit`` bytes (a device or a pipe
    is refused before it is opened, so it can neither stream forever nor block)."""
    if not path.is_file():
        raise ValueError("not a regular file")
    with path.open("rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than {limit} bytes")
    return json.loads(data)


@register("json", resources={"schema": "schema"})
@dataclass(repr=False)
class JsonOutput(StrategyBase):
    schema: Any = None
    field: str | None = None
    retries: int = 2
    temperature: float = 0.0
    max_tokens: int | None = None
    budget: int | None = None

    def __post_init__(self) -> None:
        check_common(self)
        need_int(self.retries, "retries", lo=0)
        if isinstance(self.field, int | float) and not isinstance(self.field, bool):
            self.field = str(self.field)  # the spec parser reads "field=1" as a number
        if self.field is not None and not isinstance(self.field, str):
            raise OptionError("field", f"must be a field name, not {type(self.field).__name__}")
        try:
            self.json_schema, self.name = schema_of(self.schema)
        except ValueError as exc:
            raise OptionError("schema", str(exc)) from exc
        checked = getattr(self.schema, "validator", None)  # checked once, when it was loaded
        if isinstance(checked, jsonschema.Draft202012Validator):
            self.validator = checked
            return
        try:
            jsonschema.Draft202012Validator.check_schema(self.json_schema)
        except jsonschema.SchemaError as exc:
            raise OptionError("schema", f"invalid JSON schema: {exc.message}") from exc
        self.validator = jsonschema.Draft202012Validator(self.json_schema)

    def bound(self, max_tokens: int) -> Bound:
        """The first reply and one per retry."""
        return super().bound(max_tokens) * (self.retries + 1)

    def response_format(self) -> dict[str, Any]:
        if self.schema is None:
            return {"type": "json_object"}
        return {"type": "json_schema", "json_schema": {"name": self.name, "schema": self.json_schema, "strict": True}}

    def check(self, text: str) -> tuple[Any, str | None]:
        """(parsed value, None) or (None, what is wrong)."""
        try:
            value = json.loads(text)
        except ValueError as exc:
            return None, f"not valid JSON: {exc}"
        errors = sorted(self.validator.iter_errors(value), key=lambda e: list(e.path))
        if errors:
            where = "/".join(map(str, errors[0].path)) or "the top level"
            return None, f"does not match the schema at {where}: {errors[0].message}"
        if self.field is not None and (not isinstance(value, dict) or self.field not in value):
            return None, f"has no field {self.field!r}"
        return value, None

    async def solve(self, model: Recorder, messages: list[dict[str, Any]]) -> Result:
        convo = list(messages)
        message = Message(role="assistant", content="")
        for attempt in range(self.retries + 1):
            try:
                completion = await model.chat(convo, temperature=self.temperature, max_tokens=self.max_tokens,
                                              response_format=self.response_format())
            except BudgetExhausted:
                break
            message = completion.choices[0].message
            text = message.content or ""
            value, problem = self.check(text)
            model.note(step="validate", attempt=attempt + 1, ok=problem is None, problem=problem)
            if problem is None:
                picked = value[self.field] if self.field is not None else value
                answer = picked if isinstance(picked, str) else json.dumps(picked, separators=(",", ":"))
                return model.result(message, normalize(answer) if self.field is not None else answer)
            convo = [*convo, {"role": "assistant", "content": text},
                     {"role": "user", "content": f"That reply {problem}. Answer again with JSON only."}]
        return model.result(message, None)
