"""``task: eval``: a prompt or conversation per row, its output scored against a reference.

A row becomes a generate or chat request (``eval.input_task``) and its output is scored by
each of ``eval.scorers`` (``batchjobs.scorers``) against the row's reference, in the engine
stage, so that every output file carries its scores. ``loglikelihood`` generates nothing:
the likeliest of the row's choices is its answer (``batchjobs.tasks.loglikelihood``).

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from batchjobs import scorers as sc
from batchjobs.engines.base import Request, Result
from batchjobs.tasks.base import CHECKS, Prepared, Task
from batchjobs.tasks.chat import ChatTask, load_tokenizer
from batchjobs.tasks.generate import GenerateTask
from batchjobs.tasks.loglikelihood import (
    LL_FIELDS,
    ChoicesRequest,
    choice_requests,
    choice_tokens,
    ll_columns,
    merge_choices,
)

if TYPE_CHECKING:  # pragma: no cover
    from batchjobs.spec import JobSpec

LETTERS = string.ascii_uppercase
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
        self.max_len = None if self.ll else getattr(self.inner, "max_len", None)
        if self.ll:
            self.tokenizer = getattr(self.inner, "tokenizer", None) or load_tokenizer(self.spec)

    def pretokenize(self, values: list[dict | None]) -> list[str | None]:
        return [None] * len(values) if self.ll else self.inner.pretokenize(values)

    def prompt_label(self) -> str:
        return self.inner.prompt_label()

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
        delimiter = next(s.delimiter for s in self.ev.scorers if s.kind == "loglikelihood")
        render = self.inner.render if "messages" in values else None
        context, conts = choice_tokens(self.tokenizer, self.lock, values, delimiter, render)
        return Prepared(choice_requests(request_id, context, conts), extra)

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
        cols = ll_columns(results, extras) if self.ll else self.inner.to_columns(results, extras)
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
