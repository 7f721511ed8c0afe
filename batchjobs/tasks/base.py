"""What every task shares: the contract, and the checks of the values a row may carry.

A task is the one place that knows how an input row becomes an engine request and how a
result becomes typed output columns. It names the input columns it reads (``columns``),
checks a row's values where they are read (``check_row``: cheap, no model), turns a row
into a ``Request`` in the engine's process (``prepare``, which may tokenize or render a
chat template), picks the engine call (``call``), and writes the result columns
(``output_fields`` / ``to_columns``). Readers, actors, the sink, resume and the manifest
know nothing about tasks.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa

if TYPE_CHECKING:  # pragma: no cover
    from batchjobs.engines.base import Engine, Request, Result
    from batchjobs.readers import Columns
    from batchjobs.spec import JobSpec


def request_id(row_id: str) -> str:
    """An engine request id for a row: unique even when a retried batch sends it again."""
    return f"{row_id}#{uuid.uuid4().hex[:8]}"


class RowError(Exception):
    """A row that cannot become a request: its message becomes the row's ``error``."""


@dataclass
class Prepared:
    """A row ready for the engine, plus output values the task knew before running it."""

    request: Request
    extra: dict[str, Any] = field(default_factory=dict)


class Task:
    name: ClassVar[str]
    call: ClassVar[str]  # the engine call that serves it: "generate" | "embed"

    def __init__(self, spec: JobSpec):
        self.spec = spec
        # Ray Data calls a replica from several threads; a fast tokenizer must not be used
        # by two at once ("Already borrowed"), so tasks hold this lock around it.
        self.lock = threading.Lock()

    def input_columns(self) -> Columns:
        """What the readers read for this task, and the checks they apply."""
        from batchjobs.readers import Columns
        from batchjobs.rowcheck import sampling_check
        from batchjobs.tasks.generated import control_columns

        inp = self.spec.input
        controls = control_columns(self.spec)  # a row's adapter and output constraint
        return Columns(
            fields=self.columns(),
            id_column=inp.id_column,
            sampling=dict(inp.sampling_columns),
            check_row=self.check_input if controls else self.check_row,
            check_type=self.check_input_type if controls else self.check_type,
            optional=controls,
            check_params=sampling_check(self.spec),
        )

    def check_input(self, values: dict[str, Any]) -> str | None:
        """``check_row`` and the checks of the generation controls' columns."""
        from batchjobs.tasks.generated import check_controls_row

        return self.check_row(values) or check_controls_row(self.spec, values)

    def check_input_type(self, role: str, dtype: pa.DataType) -> str | None:
        from batchjobs.tasks.generated import check_control_type, control_columns

        if role in control_columns(self.spec):
            return check_control_type(role, dtype)
        return self.check_type(role, dtype)

    # -- planning and reading (driver and read tasks; no engine, no model files) --------

    def columns(self) -> dict[str, str]:
        """The input columns this task reads, by role (``prompt``, ``messages``,
        ``token_ids``): the spec's column names."""
        inp = self.spec.input
        if inp.token_ids_column:
            return {"token_ids": inp.token_ids_column}
        return {"prompt": inp.prompt_column}

    def check_type(self, role: str, dtype: pa.DataType) -> str | None:
        """Why a Parquet column of this type cannot serve ``role``, or None."""
        if role == "prompt" and not (pa.types.is_string(dtype) or pa.types.is_large_string(dtype)):
            return "expected string"
        if role == "token_ids" and not (
            (pa.types.is_list(dtype) or pa.types.is_large_list(dtype))
            and pa.types.is_integer(dtype.value_type)
        ):
            return "expected list<int>"
        return None

    def check_row(self, values: dict[str, Any]) -> str | None:
        """Why this row's values cannot run (naming the column), or None."""
        for role, column in self.columns().items():
            problem = CHECKS[role](values.get(role))
            if problem:
                return f"{column!r} {problem}"
        return None

    # -- in the engine's process ---------------------------------------------------------

    async def setup(self, engine: Engine) -> None:
        """Load what ``prepare`` needs (a tokenizer), once per engine replica, on the
        engine's event loop once the engine is up."""

    def prepare(self, request_id: str, values: dict[str, Any], params: dict | None) -> Prepared:
        """One checked row as an engine request; raise ``RowError`` for a row that cannot run."""
        from batchjobs.engines.base import Request

        if "token_ids" in values:
            return Prepared(Request(request_id, token_ids=values["token_ids"], params=params))
        return Prepared(Request(request_id, prompt=values["prompt"], params=params))

    def prepare_batch(
        self,
        ids: list[str],
        payloads: list,
        input_errors: list,
        params: list,
        wheres: list | None = None,
    ) -> list[Prepared | str]:
        """Each row of a read batch prepared, or the reason it fails (its input error, the
        ``RowError`` that ``prepare`` raised, a prompt too long for the engine, or whatever
        else went wrong with that row alone), prefixed with the row's place (``wheres``,
        else its id)."""
        from batchjobs.rowcheck import exception_text, located, text
        from batchjobs.tasks.generated import attach, control_columns

        controls = self.spec.task in ("generate", "chat") and (
            control_columns(self.spec) or self.spec.sampling.structured is not None
        )
        wheres = wheres or [None] * len(ids)
        values = [_loads(p) if e is None else None for p, e in zip(payloads, input_errors)]
        problems = self.pretokenize(values)
        out: list[Prepared | str] = []
        rows = zip(ids, values, input_errors, params, wheres, problems)
        for row_id, row_values, error, row_params, where, problem in rows:
            place = where or f"row {row_id}"
            if error is not None:
                out.append(error)
                continue
            try:
                if problem:
                    raise RowError(problem)
                prepared = self.prepare(request_id(row_id), row_values, row_params)
                prepared = attach(self.spec, prepared, row_values) if controls else prepared
                problem = self.length_problem(prepared.request)
                if problem:
                    raise RowError(problem)
                out.append(prepared)
            except RowError as exc:
                out.append(located(place, text(exc)))
            except Exception as exc:  # noqa: BLE001 - one row's failure is that row's error
                out.append(located(place, f"cannot be prepared ({exception_text(exc)})"))
        return out

    def pretokenize(self, values: list[dict | None]) -> list[str | None]:
        """Tokenize a batch's text prompts at once where the task checks their length
        (``GenerateTask``), adding ``token_ids`` to each row's values; per row, why it is
        too long, or None. Rows without values (input errors) are None."""
        return [None] * len(values)

    def length_problem(self, request: Any) -> str | None:
        """Why a prepared request's tokens do not fit the engine, or None (the limit is
        ``max_len``, set in ``setup`` where the engine states it)."""
        limit = getattr(self, "max_len", None)
        token_ids = getattr(request, "token_ids", None)
        if not limit or token_ids is None:
            return None
        from batchjobs.rowcheck import too_long

        return too_long(len(token_ids), limit, self.prompt_label())

    def prompt_label(self) -> str:
        """The input column a prompt's tokens come from, for a length error."""
        return next(iter(self.columns().values()))

    async def run(self, engine: Engine, request: Request) -> Result:
        return await getattr(engine, self.call)(request)

    # -- output --------------------------------------------------------------------------

    def output_fields(self) -> dict[str, pa.DataType]:
        """The task's result columns, after the id column and the shard bookkeeping."""
        raise NotImplementedError

    def to_columns(self, results: Sequence[Result], extras: Sequence[dict]) -> dict[str, pa.Array]:
        """The result columns of one batch, typed as ``output_fields`` says."""
        raise NotImplementedError

    def schema_metadata(self) -> dict[str, str]:
        """Key-value metadata written into every output file's Parquet schema."""
        return {"batchjobs.task": self.name}

    # -- the task's own figures (eval: accuracy) -----------------------------------------

    def summarize(self, table: pa.Table) -> dict[str, float]:
        """Sums over the rows of one output file that add up per shard (the sink calls it
        on each file it stages); the tracker sums them into the shard's ``metrics``."""
        return {}

    def shard_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """A shard's ``metrics`` in the manifest, from its summed ``summarize`` figures."""
        return sums

    def begin(self, out) -> None:
        """Once a run has planned, before any engine starts: a task may note what its
        output root needs to keep across runs (``out``, an ``OutputRoot``)."""

    def report(self, out, records) -> dict | None:
        """The job's figures over its committed shards (``records``), at the end of a run;
        a task may write them beside the results under ``out``. None: nothing to report."""
        return None


def _loads(payload: str | None) -> dict | None:
    try:
        return json.loads(payload) if payload is not None else {}
    except Exception:  # noqa: BLE001 - prepare names it as this row's error
        return None


def check_text(value: Any) -> str | None:
    if value is None:
        return "is null"
    if not isinstance(value, str):
        return f"is {type(value).__name__}, expected string"
    if not value.strip():
        return "is empty"
    return None


def check_token_ids(value: Any) -> str | None:
    if value is None:
        return "is null"
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value
    ):
        return "is not a list of non-negative integer token ids"
    if not value:
        return "is an empty list"
    return None


CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


def check_messages(value: Any) -> str | None:
    if value is None:
        return "is null"
    if not isinstance(value, list):
        return f"is {type(value).__name__}, expected a list of {{role, content}} messages"
    if not value:
        return "is an empty list of messages"
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            return f"message {i} is {type(msg).__name__}, expected {{role, content}}"
        role = msg.get("role")
        if role not in CHAT_ROLES:
            return f"message {i} has role {role!r} (allowed: {', '.join(CHAT_ROLES)})"
        content = msg.get("content")
        if isinstance(content, list):
            try:
                joined_text(content)
            except NotTextPart as exc:
                return (
                    f"message {i} ({role}) content part {exc.index} is {exc.kind!r}; "
                    "only text parts ({type: text, text}) are supported"
                )
        elif not isinstance(content, str):
            what = "no content" if content is None else f"content of type {type(content).__name__}"
            return f"message {i} ({role}) has {what}, expected a string or a list of text parts"
    return None


class NotTextPart(ValueError):
    def __init__(self, index: int, kind: Any):
        super().__init__(f"content part {index} is {kind!r}, not text")
        self.index, self.kind = index, kind


def joined_text(parts: list) -> str:
    """The text of OpenAI-style content parts (``[{"type": "text", "text": ...}]``), joined
    by newlines as vLLM's OpenAI server joins them; ``NotTextPart`` names the first part
    that is not text (an image, say)."""
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise NotTextPart(j, kind)
        texts.append(part["text"])
    return "\n".join(texts)


CHECKS = {"prompt": check_text, "token_ids": check_token_ids, "messages": check_messages}
# The Arrow type of each role's column, for a column built from Python values.
ROLE_TYPES: dict[str, pa.DataType] = {
    "prompt": pa.string(),
    "token_ids": pa.list_(pa.int64()),
    "messages": pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])),
}


def common_columns(results: Sequence[Result]) -> dict[str, pa.Array]:
    """``prompt_tokens``, ``latency_s`` and ``error``: the columns every task writes."""
    return {
        "prompt_tokens": pa.array([r.prompt_tokens for r in results], pa.int32()),
        "latency_s": pa.array([r.latency_s for r in results], pa.float32()),
        "error": pa.array([r.error for r in results], pa.string()),
    }
