"""Structured output: the constraints a job or a row may put on generated text, their
checks, and the check of an output against its constraint.

A constraint is engine-neutral: a one-key mapping ``{kind: value}`` with kind one of
``json_schema`` (a JSON Schema object), ``regex`` (a pattern the whole output matches),
``choice`` (a list of strings, the output is one of them) or ``grammar`` (an EBNF grammar
in the engine's dialect). Each engine adapter maps it onto its own guided decoding.

The engine guarantees the form while it generates; an output it stopped early (at
``max_tokens`` or a stop string) can still be incomplete, so every output is checked
again here, and one that does not satisfy its constraint is an error row naming why.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

KINDS = ("json_schema", "regex", "choice", "grammar")


# ------------------------------------------------------------------ the constraints


def load_json_schema(value: Any) -> dict[str, Any]:
    """A JSON Schema from the spec: a mapping as it is, JSON text, or the path of a
    ``.json`` file holding one. Raises ValueError saying what is wrong."""
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith("{"):
            path = Path(value).expanduser()
            try:
                text = path.read_text()
            except OSError as exc:
                raise ValueError(
                    f"{value!r} is neither a JSON Schema nor a readable file "
                    f"({exc.strerror or exc})"
                ) from None
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"is {type(value).__name__}, expected a JSON Schema object")
    check_json_schema(value)
    return value


def check_json_schema(schema: dict[str, Any]) -> None:
    """Raise ValueError when ``schema`` is not a valid JSON Schema (draft 2020-12, the
    ``$schema`` it names if another), naming where in it the problem is."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise ValueError(f"is not a valid JSON Schema at {where}: {exc.message}") from None


def check_regex(pattern: Any) -> str:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("a regex is a non-empty string")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from None
    return pattern


def check_choice(choices: Any) -> list[str]:
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise ValueError("choice is a list of strings")
    if not choices:
        raise ValueError("choice lists no options")
    if any(not c for c in choices):
        raise ValueError("choice has an empty option")
    dupes = sorted({c for c in choices if choices.count(c) > 1})
    if dupes:
        raise ValueError(f"choice repeats {', '.join(map(repr, dupes))}")
    return choices


def load_grammar(value: Any) -> str:
    """An EBNF grammar, or the path of a file holding one (a value without a newline or
    ``::=`` that names an existing file)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("a grammar is a non-empty string")
    if "\n" not in value and "::=" not in value:
        path = Path(value).expanduser()
        try:
            return path.read_text()
        except OSError as exc:
            raise ValueError(
                f"{value!r} is neither a grammar (it has no '::=' rule) nor a readable file "
                f"({exc.strerror or exc})"
            ) from None
    return value


def checked(kind: str, value: Any) -> dict[str, Any]:
    """One constraint ``{kind: value}`` with its value checked (and loaded from a file)."""
    match kind:
        case "json_schema":
            return {kind: load_json_schema(value)}
        case "regex":
            return {kind: check_regex(value)}
        case "choice":
            return {kind: check_choice(value)}
        case "grammar":
            return {kind: load_grammar(value)}
    raise ValueError(f"unknown constraint {kind!r} (known: {', '.join(KINDS)})")


def row_constraint(value: Any) -> dict[str, Any] | None:
    """A row's ``input.schema_column`` value as a constraint; None: the job's own.

    The value is a mapping, or JSON text of one: either ``{kind: value}`` with one of the
    kinds, or a JSON Schema itself. A row gives no file paths: only inline values.
    Raises ValueError naming what is wrong."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(
            f"is {type(value).__name__}, expected a JSON Schema or one of "
            f"{{{', '.join(KINDS)}: ...}}"
        )
    kinds = [k for k in KINDS if k in value]
    if not kinds:
        check_json_schema(value)
        return {"json_schema": value}
    if len(kinds) > 1 or len(value) > 1:
        raise ValueError(
            f"names {', '.join(sorted(value))}: give exactly one of {', '.join(KINDS)}"
        )
    kind = kinds[0]
    if kind == "json_schema":
        if not isinstance(value[kind], dict):
            raise ValueError("json_schema is not a JSON object")
        check_json_schema(value[kind])
        return {kind: value[kind]}
    if kind == "grammar" and not (isinstance(value[kind], str) and "::=" in value[kind]):
        raise ValueError("grammar is not an EBNF grammar (it has no '::=' rule)")
    return checked(kind, value[kind])


def describe(constraint: dict[str, Any]) -> str:
    kind, value = next(iter(constraint.items()))
    return {"json_schema": "the JSON Schema", "regex": f"regex {value!r}"}.get(kind, kind)


# ------------------------------------------------------------------ outputs


def check_output(
    constraint: dict[str, Any], text: str | None, finish_reason: str | None, max_tokens: int
) -> tuple[str | None, str | None]:
    """An output against its constraint: (``parsed``, ``error``).

    ``parsed`` is the value as JSON text (the object for a JSON Schema; the text as a JSON
    string for the other kinds), or None; ``error`` names why the output does not satisfy
    its constraint (an output cut at ``max_tokens`` says so), or None."""
    if text is None:
        return None, None
    kind, value = next(iter(constraint.items()))
    problem: str | None = None
    parsed: str | None = None
    match kind:
        case "json_schema":
            try:
                obj = json.loads(text)
            except ValueError as exc:
                problem = f"is not valid JSON ({exc})"
            else:
                problem = schema_problem(value, obj)
                if problem is None:
                    parsed = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        case "regex":
            if re.fullmatch(value, text, flags=re.DOTALL) is None:
                problem = f"does not match regex {value!r}"
        case "choice":
            if text not in value:
                problem = f"is not one of the choices {value}"
        case "grammar":
            # No grammar parser here: the engine guaranteed the form while it generated,
            # so an output that ended by itself is taken as it is.
            pass
    if kind == "grammar" and finish_reason == "length":
        problem = "may be incomplete"
    if problem is None:
        return parsed if kind == "json_schema" else json.dumps(text, ensure_ascii=False), None
    if finish_reason == "length":
        detail = f" ({problem})" if problem else ""
        return None, (
            f"structured output cut at max_tokens ({max_tokens}) before it satisfied "
            f"{describe(constraint)}{detail}; raise sampling.max_tokens"
        )
    return None, f"structured output {problem}"


def schema_problem(schema: dict[str, Any], obj: Any) -> str | None:
    """Why ``obj`` does not validate against ``schema`` (the first error, with its path),
    or None."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    error = jsonschema.exceptions.best_match(cls(schema).iter_errors(obj))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
    return f"does not validate against the JSON Schema at {where}: {error.message}"


# ------------------------------------------------------------------ engines


def vllm_fields(constraint: dict[str, Any]) -> dict[str, Any]:
    """vLLM's ``StructuredOutputsParams`` (or ``GuidedDecodingParams``) keywords."""
    kind, value = next(iter(constraint.items()))
    return {"json" if kind == "json_schema" else kind: value}


def choice_regex(choices: list[str]) -> str:
    """A regex that matches exactly one of ``choices`` (for engines without ``choice``)."""
    return "(" + "|".join(re.escape(c) for c in choices) + ")"


def trtllm_fields(constraint: dict[str, Any]) -> dict[str, Any]:
    """TensorRT-LLM's ``GuidedDecodingParams`` keywords (no ``choice``: a regex of them)."""
    kind, value = next(iter(constraint.items()))
    if kind == "choice":
        return {"regex": choice_regex(value)}
    return {"json" if kind == "json_schema" else kind: value}
