"""The output columns of tasks generate and chat, with the generation controls a job asks
for (``batchjobs.controls``), and the per-row inputs that steer them.

Columns, in order:

- ``sampling.n`` = 1: ``text``, ``finish_reason``; above 1: ``texts`` (list<string>),
  ``finish_reasons`` (list<string>), ``sample_tokens`` (list<int32>) and ``finish_reason``
  for the row (``length`` if any sample was cut, ``stop`` if all ended by themselves,
  ``error`` on an error row);
- ``prompt_tokens``, ``completion_tokens`` (all samples together), ``latency_s``, ``error``;
- with structured output: ``parsed``, the output as JSON text (``json.loads`` gives the
  object for a JSON Schema, the text for regex, choice and grammar), null where the output
  does not satisfy its constraint (the row's ``error`` says why);
- with LoRA: ``adapter``, the adapter that served the row (null: the base model, or a
  row refused before it reached the engine);
- with ``sampling.logprobs``: ``cumulative_logprob`` (float64) and ``logprobs``
  (list<struct<token_id, token, logprob, top: list<struct<token_id, token, logprob>>>>);
- with ``sampling.prompt_logprobs``: ``prompt_logprobs``, the same per prompt token (null
  at the first position, which has no context).

With n > 1, ``parsed``, ``cumulative_logprob`` and ``logprobs`` hold one entry per sample.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from batchjobs.controls import BASE
from batchjobs.engines.base import Result, TokenLogprob
from batchjobs.structured import check_output, row_constraint
from batchjobs.tasks.base import Prepared, common_columns

if TYPE_CHECKING:  # pragma: no cover
    from batchjobs.spec import JobSpec

ALTERNATIVE = pa.struct(
    [("token_id", pa.int32()), ("token", pa.string()), ("logprob", pa.float32())]
)
TOKEN = pa.struct(
    [
        ("token_id", pa.int32()),
        ("token", pa.string()),
        ("logprob", pa.float32()),
        ("top", pa.list_(ALTERNATIVE)),
    ]
)
TOKENS = pa.list_(TOKEN)
# Where the controls keep a row's values between prepare and to_columns (Prepared.extra).
CONSTRAINT, MAX_TOKENS = "_constraint", "_max_tokens"


def structured(spec: JobSpec) -> bool:
    return spec.sampling.structured is not None or bool(spec.input.schema_column)


def output_fields(spec: JobSpec) -> dict[str, pa.DataType]:
    """The result columns of a generate or chat job, by its generation controls."""
    s = spec.sampling
    several = s.n > 1
    if several:
        fields: dict[str, pa.DataType] = {
            "texts": pa.list_(pa.string()),
            "finish_reasons": pa.list_(pa.string()),
            "sample_tokens": pa.list_(pa.int32()),
            "finish_reason": pa.string(),
        }
    else:
        fields = {"text": pa.string(), "finish_reason": pa.string()}
    fields.update(
        {
            "prompt_tokens": pa.int32(),
            "completion_tokens": pa.int32(),
            "latency_s": pa.float32(),
            "error": pa.string(),
        }
    )
    per_sample = pa.list_ if several else (lambda t: t)
    if structured(spec):
        fields["parsed"] = per_sample(pa.string())
    if spec.engine.lora is not None:
        fields["adapter"] = pa.string()
    if s.logprobs is not None:
        fields["cumulative_logprob"] = per_sample(pa.float64())
        fields["logprobs"] = per_sample(TOKENS)
    if s.prompt_logprobs is not None:
        fields["prompt_logprobs"] = TOKENS
    return fields


# ------------------------------------------------------------------ per-row inputs


def control_columns(spec: JobSpec) -> dict[str, str]:
    """The optional input columns the controls read, by role (null: the job's setting)."""
    cols = {}
    if spec.input.adapter_column:
        cols["adapter"] = spec.input.adapter_column
    if spec.input.schema_column:
        cols["schema"] = spec.input.schema_column
    return cols


def check_controls_row(spec: JobSpec, values: dict[str, Any]) -> str | None:
    """Why a row's adapter or constraint cannot run (naming the column), or None."""
    adapter = values.get("adapter")
    if adapter is not None:
        known = spec.engine.lora.adapters if spec.engine.lora else {}
        if not isinstance(adapter, str) or adapter not in known:
            return (
                f"{spec.input.adapter_column!r} names adapter {adapter!r}, which "
                f"engine.lora.adapters does not list (known: {', '.join(known)}; null: the "
                "base model)"
            )
    if values.get("schema") is not None:
        try:
            row_constraint(values["schema"])
        except ValueError as exc:
            return f"{spec.input.schema_column!r} {exc}"
    return None


def check_control_type(role: str, dtype: pa.DataType) -> str | None:
    """Why a Parquet column cannot hold a control role, or None."""
    if role == "adapter" and not (pa.types.is_string(dtype) or pa.types.is_large_string(dtype)):
        return "expected string (an adapter name)"
    if role == "schema" and not (
        pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_null(dtype)
    ):
        return "expected string (JSON text of a JSON Schema or a constraint)"
    return None


def attach(spec: JobSpec, prepared: Prepared, values: dict[str, Any]) -> Prepared:
    """A prepared row with its adapter and constraint on the request, and the constraint
    its output is checked against (the row's, else the job's) in its extras."""
    row = row_constraint(values.get("schema"))  # checked where read: cannot fail here
    job = spec.sampling.structured.constraint() if spec.sampling.structured else None
    adapter = values.get("adapter")
    request = prepared.request
    if row is not None or adapter is not None:
        request = dataclasses.replace(request, structured=row, adapter=adapter)
    budget = (request.params or {}).get("max_tokens") or spec.sampling.max_tokens
    extra = {**prepared.extra, CONSTRAINT: row or job, MAX_TOKENS: budget}
    return Prepared(request, extra)


# ------------------------------------------------------------------ output columns


def output_columns(
    spec: JobSpec, results: Sequence[Result], extras: Sequence[dict]
) -> dict[str, pa.Array]:
    """The result columns of one batch, typed as ``output_fields`` says."""
    s = spec.sampling
    several = s.n > 1
    rows = [_row(spec, r, e or {}) for r, e in zip(results, extras)]
    common = common_columns(results)
    cols: dict[str, pa.Array] = {}
    if several:
        samples = [r.samples if r.error is None and r.samples else None for r in results]
        cols["texts"] = pa.array(
            [[x.text for x in ss] if ss else None for ss in samples], pa.list_(pa.string())
        )
        cols["finish_reasons"] = pa.array(
            [[x.finish_reason for x in ss] if ss else None for ss in samples],
            pa.list_(pa.string()),
        )
        cols["sample_tokens"] = pa.array(
            [[x.completion_tokens for x in ss] if ss else None for ss in samples],
            pa.list_(pa.int32()),
        )
    else:
        cols["text"] = pa.array([r.text for r in results], pa.string())
    cols["finish_reason"] = pa.array([row["finish_reason"] for row in rows], pa.string())
    cols["prompt_tokens"] = common["prompt_tokens"]
    cols["completion_tokens"] = pa.array([r.completion_tokens for r in results], pa.int32())
    cols["latency_s"] = common["latency_s"]
    cols["error"] = pa.array([row["error"] for row in rows], pa.string())
    fields = output_fields(spec)
    if "parsed" in fields:
        cols["parsed"] = pa.array([row["parsed"] for row in rows], fields["parsed"])
    if "adapter" in fields:
        cols["adapter"] = pa.array([r.adapter for r in results], pa.string())
    if "logprobs" in fields:
        if several:
            cum = [
                [x.cumulative_logprob for x in r.samples] if r.samples else None for r in results
            ]
            lps = [[_tokens(x.logprobs) for x in r.samples] if r.samples else None for r in results]
        else:
            cum = [r.cumulative_logprob for r in results]
            lps = [_tokens(r.logprobs) for r in results]
        cols["cumulative_logprob"] = pa.array(cum, fields["cumulative_logprob"])
        cols["logprobs"] = pa.array(lps, fields["logprobs"])
    if "prompt_logprobs" in fields:
        cols["prompt_logprobs"] = pa.array(
            [_tokens(r.prompt_token_logprobs) for r in results], TOKENS
        )
    return {name: cols[name] for name in fields}


def _row(spec: JobSpec, r: Result, extra: dict) -> dict[str, Any]:
    """A row's finish reason, error and parsed value(s), its outputs checked against its
    constraint: an output that does not satisfy it makes the row an error row."""
    several = spec.sampling.n > 1
    constraint = extra.get(CONSTRAINT)
    if r.error is not None:
        return {"finish_reason": r.finish_reason, "error": r.error, "parsed": None}
    outputs = (
        [(x.text, x.finish_reason) for x in r.samples]
        if several and r.samples
        else [(r.text, r.finish_reason)]
    )
    reasons = [reason for _, reason in outputs]
    finish = r.finish_reason
    if several:
        finish = next((x for x in ("error", "length", "abort") if x in reasons), "stop")
    errors: list[str] = []
    if several and "error" in reasons:
        errors.append(f"sample {reasons.index('error')}: unknown finish reason")
    parsed: list[str | None] = []
    for i, (text, reason) in enumerate(outputs):
        value, problem = (None, None)
        if constraint is not None:
            budget = extra.get(MAX_TOKENS, spec.sampling.max_tokens)
            value, problem = check_output(constraint, text, reason, budget)
        parsed.append(value)
        if problem:
            errors.append(f"sample {i}: {problem}" if several else problem)
    return {
        "finish_reason": finish,
        "error": "; ".join(errors) or None,
        "parsed": parsed if several else parsed[0],
    }


def _tokens(tokens: Sequence[TokenLogprob | None] | None) -> list | None:
    if tokens is None:
        return None
    return [
        None
        if t is None
        else {
            "token_id": t.token_id,
            "token": t.token,
            "logprob": t.logprob,
            "top": [
                {"token_id": a.token_id, "token": a.token, "logprob": a.logprob} for a in t.top
            ],
        }
        for t in tokens
    ]


# ------------------------------------------------------------------ cost per adapter


def adapter_sums(table: pa.Table) -> dict[str, float]:
    """Per adapter (``base``: the base model), the rows and tokens of an output file:
    ``adapter.<name>.rows`` / ``.prompt_tokens`` / ``.completion_tokens``. The manifest
    charges each adapter its tokens at the shard's weights (``ShardRecord.finalise``). A
    row refused before it reached the engine (an unknown adapter, a bad input) is no
    adapter's: it used no engine time."""
    sums: dict[str, float] = {}
    names = table.column("adapter").to_pylist()
    prompt = table.column("prompt_tokens").to_pylist()
    completion = table.column("completion_tokens").to_pylist()
    errors = table.column("error").to_pylist()
    for name, p, c, error in zip(names, prompt, completion, errors):
        if error is not None and name is None and not p:
            continue
        key = f"adapter.{name or BASE}."
        sums[key + "rows"] = sums.get(key + "rows", 0) + 1
        sums[key + "prompt_tokens"] = sums.get(key + "prompt_tokens", 0) + (p or 0)
        sums[key + "completion_tokens"] = sums.get(key + "completion_tokens", 0) + (c or 0)
    return sums


def adapter_report(records) -> dict[str, dict[str, float]]:
    """The job's rows, tokens, engine seconds and $ per adapter, summed over its shards'
    manifest records."""
    out: dict[str, dict[str, float]] = {}
    for rec in records.values() if isinstance(records, dict) else records:
        for key, value in (rec.metrics or {}).items():
            if not key.startswith("adapter.") or value is None:
                continue
            name, _, figure = key[len("adapter.") :].rpartition(".")
            entry = out.setdefault(name, {})
            entry[figure] = entry.get(figure, 0) + value
    for entry in out.values():
        tokens = entry.get("prompt_tokens", 0) + entry.get("completion_tokens", 0)
        cost = entry.get("cost_usd")
        entry["usd_per_1m_tokens"] = cost / (tokens / 1e6) if cost and tokens else None
    return dict(sorted(out.items()))


def adapter_lines(report: dict[str, dict[str, float]]) -> list[str]:
    """The run summary's lines per adapter: rows, tokens and $."""
    lines = ["per adapter (base: the base model):"]
    for name, e in report.items():
        per_m = e.get("usd_per_1m_tokens")
        lines.append(
            f"  {name}: {int(e.get('rows', 0))} rows, {int(e.get('prompt_tokens', 0)):,} in, "
            f"{int(e.get('completion_tokens', 0)):,} out, ${e.get('cost_usd', 0):,.6f}"
            + (f" (${per_m:.4f} per 1M tokens)" if per_m else "")
        )
    return lines
