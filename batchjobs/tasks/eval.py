"""``task: eval``: a prompt or conversation per row, its output scored against a reference.

A row becomes a generate or chat request (``eval.input_task``) and its output is scored by
each of ``eval.scorers`` (``batchjobs.scorers``) against the row's reference, in the engine
stage, so that every output file carries its scores. ``loglikelihood`` generates nothing:
the row becomes one request per choice (the prompt's tokens followed by the choice's), each
asking the engine for the log-probabilities of its prompt tokens; the choice's tokens are
summed and the likeliest choice is the answer.

Columns (``eval_columns``): the generate/chat columns (``text`` …) or, for loglikelihood,
``choice_logprobs``, ``choice_tokens``, ``answer``, ``answer_norm``; then ``reference``
(as text), the ``eval.group_by`` column, and per scorer ``correct`` and ``score`` (and
``extracted`` where the scorer extracts an answer), prefixed ``<name>_`` when the job has
several scorers. Error rows are never correct. The sums per output file (``summarize``)
go to the manifest per shard; ``report`` writes the job's ``_eval.json``.
"""

from __future__ import annotations

import asyncio
import json
import math
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from batchjobs import scorers as sc
from batchjobs.engines.base import Request, Result
from batchjobs.tasks.base import CHECKS, Prepared, RowError, Task, common_columns
from batchjobs.tasks.chat import ChatTask, load_tokenizer
from batchjobs.tasks.generate import GenerateTask

if TYPE_CHECKING:  # pragma: no cover
    from batchjobs.spec import JobSpec

LETTERS = string.ascii_uppercase
LL_FIELDS: dict[str, pa.DataType] = {
    "choice_logprobs": pa.list_(pa.float64()),
    "choice_tokens": pa.list_(pa.int32()),
    "answer": pa.int32(),
    "answer_norm": pa.int32(),
    "prompt_tokens": pa.int32(),
    "completion_tokens": pa.int32(),
    "latency_s": pa.float32(),
    "error": pa.string(),
}
EXTRACTS = ("regex", "numeric", "choice")  # scorers that write what they extracted


@dataclass(frozen=True)
class Metric:
    """One reported figure of a scorer and the output columns that hold it per row."""

    name: str
    kind: str
    correct: str  # bool column
    score: str  # float column


def metrics(spec: JobSpec) -> list[Metric]:
    """The metrics of an eval job, in spec order (loglikelihood: raw, then _norm)."""
    out = []
    several = len(spec.eval.scorers) > 1
    for s in spec.eval.scorers:
        name = s.metric_name()
        pre = f"{name}_" if several else ""
        out.append(Metric(name, s.kind, f"{pre}correct", f"{pre}score"))
        if s.kind == "loglikelihood":
            out.append(
                Metric(
                    f"{name}_norm", "loglikelihood_norm", f"{pre}correct_norm", f"{pre}score_norm"
                )
            )
    return out


def eval_columns(spec: JobSpec, group: bool = True) -> dict[str, pa.DataType]:
    """The output columns an eval job adds after the generate/chat or loglikelihood ones
    (``group``: with the ``eval.group_by`` column)."""
    cols: dict[str, pa.DataType] = {"reference": pa.string()}
    if spec.eval.group_by and group:
        cols[spec.eval.group_by] = pa.string()
    several = len(spec.eval.scorers) > 1
    for m in metrics(spec):
        cols[m.correct] = pa.bool_()
        cols[m.score] = pa.float64()
        if m.kind in EXTRACTS:
            cols[f"{m.name}_extracted" if several else "extracted"] = pa.string()
    return cols


# ---------------------------------------------------------------- engine requests


@dataclass(frozen=True)
class ChoicesRequest(Request):
    """A loglikelihood row: one engine request per choice (``parts``), each the prompt's
    tokens followed by the choice's ``cont_lens[i]`` tokens."""

    parts: tuple[Request, ...] = ()
    cont_lens: tuple[int, ...] = ()


@dataclass
class ChoicesResult(Result):
    """The results of a row's choice requests as one: summed counts, the slowest latency,
    the first error, and each choice's summed log-probability."""

    choice_logprobs: list[float] | None = None
    choice_tokens: list[int] = field(default_factory=list)


def merge_choices(results: Sequence[Result], cont_lens: Sequence[int]) -> ChoicesResult:
    error = next((f"choice {i}: {r.error}" for i, r in enumerate(results) if r.error), None)
    logprobs: list[float] = []
    for i, (r, n) in enumerate(zip(results, cont_lens)):
        if error:
            break
        tail = (r.prompt_logprobs or [])[-n:]
        if len(tail) != n or any(x is None for x in tail):
            error = f"choice {i}: the engine returned no prompt log-probabilities"
            break
        logprobs.append(math.fsum(tail))
    return ChoicesResult(
        finish_reason="error" if error else "stop",
        prompt_tokens=sum(r.prompt_tokens for r in results),
        completion_tokens=sum(r.completion_tokens for r in results),
        latency_s=max((r.latency_s for r in results), default=0.0),
        cached_tokens=sum(r.cached_tokens for r in results),
        error=error,
        choice_logprobs=None if error else logprobs,
        choice_tokens=list(cont_lens),
    )


# ---------------------------------------------------------------- the task


class EvalTask(Task):
    name = "eval"
    call = "generate"

    def __init__(self, spec: JobSpec):
        super().__init__(spec)
        self.ev = spec.eval
        self.ll = self.ev.loglikelihood()
        self.inner: Task = ChatTask(spec) if spec.prompt_task() == "chat" else GenerateTask(spec)
        self.inner.lock = self.lock  # one tokenizer, one lock
        self.metrics = metrics(spec)
        self.several = len(self.ev.scorers) > 1
        self.patterns = {
            s.metric_name(): s.compiled() for s in self.ev.scorers if s.kind == "regex"
        }
        self.tokenizer = None

    # -- reading -------------------------------------------------------------------------

    def columns(self) -> dict[str, str]:
        cols = dict(self.inner.columns())
        cols["reference"] = self.ev.reference_column
        if self.ev.choices_column:
            cols["choices"] = self.ev.choices_column
        if self.ev.group_by:
            cols["group"] = self.ev.group_by
        return cols

    def check_type(self, role: str, dtype: pa.DataType) -> str | None:
        if role == "reference":
            scalar = (
                pa.types.is_string(dtype)
                or pa.types.is_large_string(dtype)
                or pa.types.is_integer(dtype)
                or pa.types.is_floating(dtype)
            )
            listed = (pa.types.is_list(dtype) or pa.types.is_large_list(dtype)) and (
                pa.types.is_string(dtype.value_type)
            )
            return None if scalar or listed else "expected string, number or list<string>"
        if role == "choices":
            ok = (pa.types.is_list(dtype) or pa.types.is_large_list(dtype)) and (
                pa.types.is_string(dtype.value_type) or pa.types.is_large_string(dtype.value_type)
            )
            return None if ok else "expected list<string>"
        if role == "group":
            ok = (
                pa.types.is_string(dtype)
                or pa.types.is_large_string(dtype)
                or pa.types.is_integer(dtype)
                or pa.types.is_boolean(dtype)
                or (pa.types.is_dictionary(dtype) and pa.types.is_string(dtype.value_type))
            )
            return None if ok else "expected string, integer or boolean"
        return self.inner.check_type(role, dtype)

    def check_row(self, values: dict[str, Any]) -> str | None:
        cols = self.columns()
        for role in self.inner.columns():
            problem = CHECKS[role](values.get(role))
            if problem:
                return f"{cols[role]!r} {problem}"
        choices = values.get("choices")
        if "choices" in cols:
            problem = check_choices(choices, need=self.ll)
            if problem:
                return f"{cols['choices']!r} {problem}"
        problem = self.check_reference(values.get("reference"), choices)
        return f"{cols['reference']!r} {problem}" if problem else None

    def check_reference(self, ref: Any, choices: list | None) -> str | None:
        if ref is None:
            return "is null (every eval row needs a reference)"
        if isinstance(ref, list):
            if not ref or not all(isinstance(r, str) for r in ref):
                return "is a list, expected a non-empty list of strings"
        elif not isinstance(ref, (str, int, float)) or isinstance(ref, bool):
            return f"is {type(ref).__name__}, expected a string, a number or a list of strings"
        for s in self.ev.scorers:
            if s.kind in ("choice", "loglikelihood"):
                letters = s.letters if s.kind == "choice" else LETTERS
                if sc.choice_index(ref, choices, letters) is None:
                    n = len(choices) if choices is not None else len(letters)
                    return (
                        f"is {ref!r}, not one of the {n} options (a 0-based index, a letter "
                        "or an option's text)"
                    )
        return None

    # -- in the engine's process ---------------------------------------------------------

    async def setup(self, engine) -> None:
        await self.inner.setup(engine)
        if self.ll:
            self.tokenizer = getattr(self.inner, "tokenizer", None) or load_tokenizer(self.spec)

    def prepare(self, request_id: str, values: dict[str, Any], params: dict | None) -> Prepared:
        extra = {
            "reference": values.get("reference"),
            "choices": values.get("choices"),
            "group": values.get("group"),
        }
        if not self.ll:
            prepared = self.inner.prepare(request_id, values, params)
            prepared.extra.update(extra)
            return prepared
        context, conts = self.choice_tokens(values)
        parts = tuple(
            Request(
                f"{request_id}/{i}",
                token_ids=[*context, *cont],
                params={"max_tokens": 1, "min_tokens": 0},
                prompt_logprobs=0,
            )
            for i, cont in enumerate(conts)
        )
        request = ChoicesRequest(
            request_id, token_ids=context, parts=parts, cont_lens=tuple(len(c) for c in conts)
        )
        return Prepared(request, extra)

    def choice_tokens(self, values: dict[str, Any]) -> tuple[list[int], list[list[int]]]:
        """The prompt's token ids and each choice's token ids after it.

        A text prompt is encoded as lm-eval-harness encodes a (context, continuation) pair:
        whitespace at the end of the prompt moves to the front of the continuation, the
        prompt is encoded alone and together with each continuation, and the continuation's
        tokens are those past the prompt's. A conversation is rendered with the chat
        template, and each choice encoded alone after it."""
        delimiter = next(s.delimiter for s in self.ev.scorers if s.kind == "loglikelihood")
        choices = values["choices"]
        if "messages" in values:
            try:
                context = self.inner.render(values["messages"])
            except Exception as exc:  # noqa: BLE001 - any template failure is this row's error
                raise RowError(f"chat template failed: {type(exc).__name__}: {exc}") from None
            with self.lock:
                conts = self.tokenizer([delimiter + c for c in choices], add_special_tokens=False)[
                    "input_ids"
                ]
        else:
            prompt = values["prompt"]
            pairs = [lm_eval_pair(prompt, delimiter + c) for c in choices]
            with self.lock:
                enc = self.tokenizer(
                    [pairs[0][0]] + [ctx + cont for ctx, cont in pairs], add_special_tokens=True
                )["input_ids"]
            context = list(enc[0])
            conts = [list(whole[len(context) :]) for whole in enc[1:]]
        for i, cont in enumerate(conts):
            if not cont:
                raise RowError(f"choice {i} ({choices[i]!r}) has no tokens after the prompt")
        return list(context), [list(c) for c in conts]

    async def run(self, engine, request: Request) -> Result:
        if not isinstance(request, ChoicesRequest):
            return await engine.generate(request)
        results = await asyncio.gather(*(engine.generate(p) for p in request.parts))
        return merge_choices(results, request.cont_lens)

    # -- output --------------------------------------------------------------------------

    def output_fields(self) -> dict[str, pa.DataType]:
        # generate/chat: the inner task's columns, with the job's generation controls
        # (structured output, logprobs, LoRA) as they are for that task
        head = LL_FIELDS if self.ll else self.inner.output_fields()
        return {**head, **eval_columns(self.spec)}

    def to_columns(self, results, extras) -> dict[str, pa.Array]:
        if self.ll:
            cols = self._ll_columns(results, extras)
        else:
            cols = self.inner.to_columns(results, extras)
        cols["reference"] = pa.array(
            [reference_text(e.get("reference")) for e in extras], pa.string()
        )
        if self.ev.group_by:
            cols[self.ev.group_by] = pa.array(
                [None if e.get("group") is None else str(e["group"]) for e in extras], pa.string()
            )
        if self.ll:
            for m in self.metrics:
                answers = cols["answer_norm" if m.kind == "loglikelihood_norm" else "answer"]
                ok = [
                    a is not None
                    and a == sc.choice_index(e.get("reference"), e.get("choices"), LETTERS)
                    for a, e in zip(answers.to_pylist(), extras)
                ]
                cols[m.correct] = pa.array(ok, pa.bool_())
                cols[m.score] = pa.array([float(x) for x in ok], pa.float64())
            return cols
        # The output as written: an output the task refused afterwards (structured output
        # that does not satisfy its constraint) is an error row, and never correct.
        outputs = [
            text if error is None else None
            for text, error in zip(cols["text"].to_pylist(), cols["error"].to_pylist())
        ]
        for s, m in zip(self.ev.scorers, self.metrics):
            scores = [self.score(s, out, e) if e else sc.WRONG for out, e in zip(outputs, extras)]
            cols[m.correct] = pa.array([x.correct for x in scores], pa.bool_())
            cols[m.score] = pa.array([x.score for x in scores], pa.float64())
            if s.kind in EXTRACTS:
                name = f"{m.name}_extracted" if self.several else "extracted"
                cols[name] = pa.array([x.extracted for x in scores], pa.string())
        return cols

    def score(self, s, output: str | None, extra: dict) -> sc.Score:
        """One row's output scored by scorer ``s`` (a spec scorer model)."""
        ref = extra.get("reference")
        match s.kind:
            case "exact":
                return sc.exact(output, ref, s.strip, s.case_sensitive)
            case "normalized":
                return sc.normalized(output, ref)
            case "contains":
                return sc.contains(output, ref, s.case_sensitive)
            case "regex":
                return sc.regex(
                    output,
                    ref,
                    self.patterns[s.metric_name()],
                    s.group,
                    s.occurrence,
                    s.compare,
                    s.extract_reference,
                    s.abs_tol,
                    s.rel_tol,
                )
            case "numeric":
                return sc.numeric(output, ref, s.occurrence, s.abs_tol, s.rel_tol)
            case "choice":
                return sc.choice(output, ref, extra.get("choices"), s.letters)
        raise ValueError(f"unknown scorer kind {s.kind!r}")  # pragma: no cover - spec forbids

    def _ll_columns(self, results, extras) -> dict[str, pa.Array]:
        picks = [
            sc.loglikelihood_pick(r.choice_logprobs, e["choices"])
            if getattr(r, "choice_logprobs", None) is not None
            else (None, None)
            for r, e in zip(results, extras)
        ]
        common = common_columns(results)
        return {
            "choice_logprobs": pa.array(
                [getattr(r, "choice_logprobs", None) for r in results], pa.list_(pa.float64())
            ),
            "choice_tokens": pa.array(
                [getattr(r, "choice_tokens", None) or None for r in results], pa.list_(pa.int32())
            ),
            "answer": pa.array([p[0] for p in picks], pa.int32()),
            "answer_norm": pa.array([p[1] for p in picks], pa.int32()),
            "prompt_tokens": common["prompt_tokens"],
            "completion_tokens": pa.array([r.completion_tokens for r in results], pa.int32()),
            "latency_s": common["latency_s"],
            "error": common["error"],
        }

    # -- aggregates ----------------------------------------------------------------------

    def summarize(self, table: pa.Table) -> dict[str, float]:
        """Sums over an output file's rows, which add up per shard: rows, and per metric
        the rows correct and the scores' sum."""
        sums: dict[str, float] = {} if self.ll else dict(self.inner.summarize(table))
        sums["rows"] = table.num_rows
        for m in self.metrics:
            sums[f"{m.name}.correct"] = (
                pc.sum(table.column(m.correct).cast(pa.int64())).as_py() or 0
            )
            sums[f"{m.name}.score"] = math.fsum(
                x for x in table.column(m.score).to_pylist() if x is not None
            )
        return sums

    def shard_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """A shard's summed metrics with each metric's accuracy (error rows count as wrong)."""
        rows = sums.get("rows", 0)
        out = dict(sums if self.ll else self.inner.shard_metrics(sums))
        for m in self.metrics:
            out[f"{m.name}.accuracy"] = sums.get(f"{m.name}.correct", 0) / rows if rows else None
        return out

    def report(self, out, records) -> dict | None:
        """Aggregate the job's committed output into ``_eval.json`` and return it."""
        from batchjobs.evalreport import write_report

        report = write_report(self.spec, self.metrics, out, records)
        inner = None if self.ll else self.inner.report(out, records)
        return {**report, **(inner or {})}


def check_choices(value: Any, need: bool) -> str | None:
    if value is None:
        return "is null" if need else None
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        return "is not a list of strings"
    if len(value) < 2:
        return f"has {len(value)} option(s), expected 2 or more"
    if need and any(not c.strip() for c in value):
        return "has an empty option"
    return None


def reference_text(ref: Any) -> str | None:
    """A reference as the ``reference`` column shows it: text as is, anything else as JSON."""
    if ref is None or isinstance(ref, str):
        return ref
    return json.dumps(ref, ensure_ascii=False)


def lm_eval_pair(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval-harness's split of a (context, continuation) pair before encoding: trailing
    whitespace of the context moves to the continuation."""
    n = len(context) - len(context.rstrip())
    if n:
        continuation, context = context[-n:] + continuation, context[:-n]
    return context, continuation
