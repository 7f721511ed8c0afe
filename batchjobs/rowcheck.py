"""Row-level damage made harmless: whatever one input row holds, it becomes that row's
error, never the job's.

Readers and the engine replica call these on one row at a time:

- ``python_rows`` / ``row_values``: a read row's values, id, sampling overrides and error,
  whatever it holds; nothing one row does can fail its batch;
- ``text``: a string Arrow can store (a lone surrogate from a JSON ``\\ud800`` escape
  cannot be written as UTF-8 and would fail the whole batch);
- ``located``: an error message that starts with where the row is (file, line or row);
- ``sampling_check``: a row's own sampling values (``input.sampling_columns``) checked
  against the same rules as the spec's ``sampling:`` section, where the row is read;
- ``too_many_chars`` / ``too_long``: a prompt that cannot fit ``max_model_len``, found in the
  replica where the tokenizer is, before the engine sees it;
- ``safe_columns``: a batch's output columns, every error naming the row's place, and a
  row whose result cannot be converted made that row's error instead of failing the batch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from batchjobs.engines.base import Result
    from batchjobs.spec import JobSpec


def text(value: Any) -> str:
    """``str(value)`` as valid UTF-8: lone surrogates written as ``\\udXXX`` escapes."""
    s = value if isinstance(value, str) else _str(value)
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    return s


def _str(value: Any) -> str:
    try:
        return str(value)
    except Exception as exc:  # noqa: BLE001 - a value whose str() fails (deep nesting)
        return f"<{type(value).__name__}: {type(exc).__name__}>"


def unicode_problem(payload: str) -> str | None:
    """Why a row's JSON payload cannot be stored as UTF-8 (a lone surrogate), or None."""
    try:
        payload.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"holds a lone surrogate {payload[exc.start]!r}, which is not valid Unicode "
            "(a broken \\ud800-\\udfff escape); fix the text"
        )
    return None


def located(where: str | None, error: str) -> str:
    """``error`` prefixed with the row's place, unless it names it already."""
    if not where or error.startswith(where):
        return error
    return f"{where}: {error}"


def exception_text(exc: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    first = (text(exc).strip().splitlines() or [""])[0][:500]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


# ------------------------------------------------------------------ reading a row


def python_rows(batch: Any, columns: list[str], url: str, start: int):
    """A Parquet batch's rows as dicts; a value Python cannot hold (a timestamp past year
    9999, say) makes its row an error row, not the batch's."""
    n = batch.num_rows
    values: dict[str, list] = {}
    errors: list[str | None] = [None] * n
    for c in columns:
        col = batch.column(c)
        try:
            values[c] = col.to_pylist()
            continue
        except Exception:  # noqa: BLE001 - convert value by value to find the bad ones
            pass
        values[c] = [None] * n
        for i in range(n):
            try:
                values[c][i] = col[i].as_py()
            except Exception as exc:  # noqa: BLE001
                errors[i] = errors[i] or (
                    f"{url} row {start + i}: column {c!r} holds a value that cannot be read "
                    f"({exception_text(exc)})"
                )
    return [{c: values[c][i] for c in columns} for i in range(n)], errors


def row_values(
    row: dict,
    error: str | None,
    row_id: str,
    where: str,
    cols: Any,
    location: tuple[str, int] | None = None,
):
    """(payload, params, id, error) of one read row: its task values as JSON, its sampling
    overrides as JSON, its id, and why it cannot run (naming its place and column). With
    ``cols.locate``, the payload also carries ``location`` (file, line) as "_source" and
    "_line"."""
    value = row.get(cols.id_column) if cols.id_column else None
    if isinstance(value, (dict, list, tuple)):
        kind = "an object" if isinstance(value, dict) else "a list"
        error = error or (
            f"{where}: id column {cols.id_column!r} holds {kind}; an id is a string or a number"
        )
    elif value is not None:
        row_id = text(value)
    if error is not None:
        return None, None, row_id, error
    if cols.id_column and row.get(cols.id_column) is None:
        return None, None, row_id, f"{where}: id column {cols.id_column!r} is null or missing"
    values = {role: row.get(col) for role, col in {**cols.fields, **cols.optional}.items()}
    try:
        problem = cols.check_row(values) if cols.check_row else None
    except Exception as exc:  # noqa: BLE001 - a value the task's check cannot look at
        problem = f"cannot be checked ({exception_text(exc)})"
    if problem:
        return None, None, row_id, located(where, problem)
    if getattr(cols, "locate", False) and location is not None:
        values["_source"], values["_line"] = location
    payload = json.dumps(values, ensure_ascii=False)
    problem = unicode_problem(payload)
    if problem:
        named = {**cols.fields, **cols.optional}
        column = next(
            (
                named[r]
                for r, v in values.items()
                if unicode_problem(json.dumps(v, ensure_ascii=False))
            ),
            next(iter(named.values())),
        )
        return None, None, row_id, f"{where}: {column!r} {problem}"
    overrides = {p: row[c] for p, c in cols.sampling.items() if row.get(c) is not None}
    if overrides and cols.check_params is not None:
        overrides, problem = cols.check_params(overrides, cols.sampling)
        if problem:
            return None, None, row_id, located(where, problem)
    return payload, json.dumps(overrides) if overrides else None, row_id, None


# ------------------------------------------------------------------ per-row sampling values


def sampling_check(spec: JobSpec) -> Callable[[dict[str, Any], dict[str, str]], Any] | None:
    """A check of a row's sampling overrides, or None when the job has no sampling columns.

    The check takes ``{parameter: value}`` and ``{parameter: column}`` and returns
    ``(params, None)`` with the values as the spec's rules parse them (``3.0`` tokens is
    3), or ``(None, why)`` naming the column and the rule it breaks."""
    if not spec.input.sampling_columns:
        return None
    from pydantic import ValidationError

    from batchjobs.spec import SamplingSpec

    base = spec.sampling.model_dump()

    def check(overrides: dict[str, Any], columns: dict[str, str]):
        try:
            parsed = SamplingSpec.model_validate({**base, **overrides})
        except ValidationError as exc:
            err = exc.errors()[0]
            param = str(err["loc"][0]) if err["loc"] else next(iter(overrides))
            column = columns.get(param, param)
            got = overrides.get(param)
            shown = text(repr(got))[:80]
            return None, f"column {column!r} (sampling.{param}) is {shown}: {err['msg']}"
        except Exception as exc:  # noqa: BLE001 - a value pydantic cannot even look at
            return None, f"sampling columns cannot be read: {exception_text(exc)}"
        params = {p: getattr(parsed, p) for p in overrides}
        if parsed.min_tokens > parsed.max_tokens:
            cols = ", ".join(repr(columns.get(p, p)) for p in ("min_tokens", "max_tokens"))
            return None, (
                f"sampling columns ({cols}): min_tokens {parsed.min_tokens} is above "
                f"max_tokens {parsed.max_tokens}"
            )
        return json.loads(json.dumps(params, default=str)), None

    return check


# ------------------------------------------------------------------ prompt length


def engine_limit(engine: Any) -> int | None:
    """The engine's ``max_model_len`` as it resolved it, or None where it states none."""
    return engine.max_model_len() if engine is not None else None


def max_chars_per_token(tokenizer: Any) -> int:
    """The most characters one token of the tokenizer's vocabulary spans (as vLLM bounds
    a text prompt before tokenizing it)."""
    try:
        vocab = tokenizer.get_vocab()
        return max((len(t) for t in vocab), default=1) or 1
    except Exception:  # noqa: BLE001 - a tokenizer without a vocabulary listing
        return 64


def too_long(tokens: int, limit: int | None, column: str = "prompt") -> str | None:
    """Why a prompt of ``tokens`` tokens cannot run on an engine of ``limit`` tokens
    (vLLM refuses a prompt that leaves no room for one output token), or None."""
    if not limit or tokens < limit:
        return None
    return (
        f"{column!r} has {tokens} tokens; engine.max_model_len is {limit} and a prompt must "
        f"leave room for at least one output token: shorten it or raise engine.max_model_len"
    )


def too_many_chars(chars: int, limit: int | None, per_token: int, column: str) -> str | None:
    """Why a text of ``chars`` characters certainly has more tokens than ``limit``
    (more characters than ``limit`` tokens of the vocabulary can span), or None."""
    if not limit or chars <= limit * per_token:
        return None
    return (
        f"{column!r} has {chars:,} characters, more than engine.max_model_len {limit} tokens "
        f"can hold (at most {limit * per_token:,}): shorten it or raise engine.max_model_len"
    )


# ------------------------------------------------------------------ output columns


def safe_columns(
    task: Any, results: list[Result], extras: list[dict], wheres: Sequence[str | None]
) -> dict[str, Any]:
    """``task.to_columns`` of a batch, each error prefixed with its row's place (``wheres``:
    the engine's own refusals and a failed output check then name the file and line too).
    A row whose result cannot be converted becomes an error row (its cause in ``error``) and
    the others are kept."""
    try:
        cols = task.to_columns(results, extras)
    except Exception:  # noqa: BLE001 - find the row(s) that fail, keep the rest
        cols = task.to_columns(*_without_failing(task, results, extras))
    if "error" in cols:
        import pyarrow as pa

        errors = cols["error"].to_pylist()
        if any(e is not None for e in errors):
            cols["error"] = pa.array(
                [None if e is None else text(located(w, e)) for e, w in zip(errors, wheres)],
                pa.string(),
            )
    return cols


def _without_failing(task: Any, results: list[Result], extras: list[dict]):
    from batchjobs.engines.base import Result

    fixed_results, fixed_extras = list(results), list(extras)
    for i, (res, extra) in enumerate(zip(results, extras)):
        try:
            task.to_columns([res], [extra])
        except Exception as exc:  # noqa: BLE001
            fixed_results[i] = Result.failed(
                f"its result could not be written: {exception_text(exc)}",
                res.latency_s,
                res.prompt_tokens,
            )
            fixed_extras[i] = {}
    return fixed_results, fixed_extras
