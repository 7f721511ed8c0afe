"""Engine choice by measured cost: the ``pilot:`` section of a job spec (``engine: auto``).

Each candidate is the job's ``engine`` section with the candidate's keys replaced (``args``
and ``env`` merge into the job's). Before the job, every candidate whose engine package is
installed runs the same first ``pilot.rows`` rows through the ordinary pipeline
(``pipeline.run``, one replica, output under ``<output>/_pilot/<name>/``). From what each
pilot measured, the job's cost is projected::

    rows_job      = rows still to run (Parquet footers; JSON Lines: non-empty lines)
    tokens_job    = pilot tokens / pilot rows × rows_job          (prompt + completion)
    gpu_s_job     = gpus_per_replica × ((start-up_s + drain_s) × replicas
                                        + engine_s × rows_job / pilot rows)
    $/1M tokens   = gpu_s_job / 3600 × usd_per_gpu_hour / tokens_job × 1e6

``engine_s`` is what the pilot's rows were charged (their work, see cost.py); ``drain_s``
is the replica's idle and under-fill (ramp-up, the draining tail of the longest rows), which
like start-up is paid once per replica of the job and amortised over its size, not over the
pilot. With no price set, candidates are ranked by GPU-seconds (CPU-seconds on CPU) per 1M
tokens (the same order). Candidates whose outputs agree less than ``pilot.min_agreement``
with the reference candidate's are ruled out (agreement.py). The cheapest left runs the
job; the table and the decision go to ``<output>/_pilot.json`` (names only: no env values,
no storage options), and a rerun that resumes the same output reuses that decision, so
every shard of the job is produced by one engine configuration (recorded per shard).
"""

from __future__ import annotations

import json
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchjobs.agreement import guard, load_encoder, read_outputs
from batchjobs.engineconfig import engine_digest
from batchjobs.engines import engine_kind
from batchjobs.errors import BatchJobError, EngineError, InputError, OutputError
from batchjobs.layout import PILOT_DIR, PILOT_JSON, stamped, unstamped
from batchjobs.manifest import Manifest
from batchjobs.projection import (
    FAILED,
    NOT_INSTALLED,
    OK,
    decision_reason,
    format_table,
    metric_for,
    project,
    rank,
    replica_unit,
)
from batchjobs.readers import (
    PARAMS,
    PAYLOAD,
    ROW_ID,
    Shard,
    count_rows,
    list_shards,
    read_shard,
)
from batchjobs.sink import OutputRoot
from batchjobs.spec import CandidateSpec, JobSpec
from batchjobs.tasks import task_for
from batchjobs.tasks.base import ROLE_TYPES

Progress = Callable[[str], None] | None


# --------------------------------------------------------------------------- candidates


def overrides(cand: CandidateSpec) -> dict[str, Any]:
    """The engine keys a candidate sets (its name aside)."""
    return {k: getattr(cand, k) for k in sorted(cand.model_fields_set - {"name", "reference"})}


def apply_candidate(spec: JobSpec, cand: CandidateSpec) -> JobSpec:
    """The job with the candidate's engine: no pilot section, validated like any spec."""
    raw = spec.model_dump()
    engine = raw["engine"]
    for key, value in overrides(cand).items():
        engine[key] = {**engine[key], **value} if key in ("args", "env") else value
    raw["pilot"] = None
    return JobSpec.model_validate(raw)


def installed(kind: str) -> bool:
    """Whether the engine package is importable, without importing it."""
    return engine_kind(kind).installed()


def shown_overrides(cand: CandidateSpec) -> dict[str, Any]:
    """A candidate's overrides for tables and logs: env values hidden."""
    shown = overrides(cand)
    if "env" in shown:
        shown["env"] = {k: "***" for k in shown["env"]}
    return shown


# --------------------------------------------------------------------------- the pilot


@dataclass
class Prepared:
    """What ``prepare`` hands the run: the spec to run, ``fresh`` for it, the pilot report."""

    spec: JobSpec
    fresh: bool
    report: dict[str, Any] | None


def prepare(spec: JobSpec, fresh: bool = False, progress: Progress = None) -> Prepared:
    """Settle the engine of a job with a ``pilot`` section: reuse a recorded decision, or pilot.

    The output mode is applied here (``overwrite``/``--fresh`` wipe the root, ``error``
    refuses a non-empty one) because the pilot writes under the root before the job runs;
    the returned spec therefore resumes.
    """
    if spec.pilot is None:
        return Prepared(spec, fresh, None)
    say = progress or (lambda line: None)
    from batchjobs.planning import open_output

    wiped = fresh or spec.output.mode == "overwrite"
    out = open_output(spec, fresh)
    if not wiped:
        recorded = load_decision(out)
        if recorded is not None:
            chosen, why = reuse(spec, recorded)
            if chosen is not None:
                say(
                    f"pilot: reusing the decision in {_at(spec, PILOT_JSON)}: engine "
                    f"{recorded['chosen']!r} (delete that file or run with --fresh to pilot again)"
                )
                return Prepared(_resuming(chosen), False, {**recorded, "reused": True})
            say(f"pilot: not reusing {_at(spec, PILOT_JSON)} ({why}); piloting again")

    from batchjobs.planning import PREFLIGHT_ALL_UP_TO, preflight_shards

    inp = spec.input
    shards = list_shards(inp.path, inp.format, inp.storage_options)
    failed = preflight_shards(spec, shards[:PREFLIGHT_ALL_UP_TO], strict=False)
    shards = [s for s in shards if s.shard_id not in failed]  # the job reports them
    manifest = Manifest(out)
    committed = manifest.committed()
    candidates = list(spec.pilot.candidates)
    done_fps = manifest.fingerprints()
    if done_fps:
        # Shards already committed fix the engine's fingerprint: only candidates that
        # produce the same results may finish the job.
        candidates = [c for c in candidates if apply_candidate(spec, c).fingerprint() in done_fps]
        if not candidates:
            raise OutputError(
                f"{spec.output.path} holds results of another job configuration (fingerprint "
                f"{', '.join(sorted(done_fps))}) and no pilot candidate matches it. Rerun with "
                "--fresh to delete the old results, or set output.path to a new location."
            )
    todo = [s for s in shards if s.shard_id not in committed]
    if not todo or len(candidates) == 1:
        chosen = apply_candidate(spec, candidates[0])
        say(
            f"pilot: skipped ({'nothing left to run' if not todo else 'one candidate fits'}); "
            f"engine {candidates[0].name!r}"
        )
        return Prepared(_resuming(chosen), False, None)
    expected_rows, estimated = count_rows(todo, inp.storage_options)
    if expected_rows == 0:
        say(f"pilot: skipped (the input has no rows); engine {candidates[0].name!r}")
        return Prepared(_resuming(apply_candidate(spec, candidates[0])), False, None)
    chosen, report = choose_engine(spec, todo, expected_rows, estimated, candidates, say)
    record = json.dumps(stamped(PILOT_JSON, report), indent=2, sort_keys=True) + "\n"
    out.write_atomic(PILOT_JSON, record.encode())
    say(f"pilot: decision recorded in {_at(spec, PILOT_JSON)}")
    return Prepared(_resuming(chosen), False, report)


def choose_engine(
    spec: JobSpec,
    shards: list[Shard],
    expected_rows: int,
    estimated: bool,
    candidates: list[CandidateSpec] | None = None,
    progress: Progress = None,
) -> tuple[JobSpec, dict[str, Any]]:
    """Pilot each installed candidate on the first rows of ``shards``; return the cheapest.

    Returns the job spec with the chosen engine and the report (table and decision). A
    candidate that fails is a row of the table; only when every one fails is it an error.
    """
    from batchjobs.cluster import resolve_device
    from batchjobs.pipeline import run as run_job

    say = progress or (lambda line: None)
    candidates = candidates or list(spec.pilot.candidates)
    price = spec.cost.price_per_gpu_hour()
    replicas = spec.resources.replicas
    metric = metric_for(price)
    pilot_input, pilot_rows = write_pilot_input(spec, shards)
    say(
        f"pilot: {pilot_rows} rows × {len(candidates)} candidates "
        f"({', '.join(c.name for c in candidates)}); job: {expected_rows} rows"
        f"{' (estimated from bytes)' if estimated else ''}, {replicas} replica(s)"
    )
    table: list[dict[str, Any]] = []
    errors: list[BatchJobError] = []
    specs: dict[str, JobSpec] = {}
    for cand in candidates:
        job = specs[cand.name] = apply_candidate(spec, cand)
        row: dict[str, Any] = {
            "name": cand.name,
            "kind": job.engine.kind,
            "overrides": shown_overrides(cand),
            "fingerprint": job.fingerprint(),
        }
        table.append(row)
        if not installed(job.engine.kind):
            row.update(
                status=NOT_INSTALLED,
                error=f"{engine_kind(job.engine.kind).package} is not importable",
            )
            say(f"pilot: {cand.name}: skipped, engine {job.engine.kind} is not installed")
            continue
        say(f"pilot: {cand.name}: running {pilot_rows} rows")
        pilot = pilot_spec(job, cand.name, pilot_input)
        try:
            summary = run_job(pilot, progress=progress)
        except BatchJobError as exc:
            errors.append(exc)
            row.update(status=FAILED, error=str(exc).splitlines()[0][:500])
            say(f"pilot: {cand.name}: failed: {row['error']}")
            continue
        device = row["device"] = resolve_device(job)
        gpus = job.gpus_per_replica() if device == "cuda" else 1
        reps = list(summary.replicas.values()) or [{}]
        measured = {
            "rows": summary.rows,
            "error_rows": summary.error_rows,
            "prompt_tokens": summary.prompt_tokens,
            "completion_tokens": summary.completion_tokens,
            "startup_s": _per_replica(reps, "startup_s"),
            "drain_s": _per_replica(reps, "idle_s", "underfill_s"),
            "engine_s": summary.engine_s,
            "gpus_per_replica": gpus,
            "pilot_wall_s": summary.wall_s,
            "pilot_gpu_s": summary.gpu_s,
        }
        row.update(status=OK, **measured, **project(measured, expected_rows, replicas, price))
    if not any(r["status"] == OK for r in table):
        if not errors:
            raise EngineError(
                "pilot: no candidate's engine is installed ("
                + ", ".join(f"{r['name']}: {r['kind']}" for r in table)
                + ")"
            )
        kinds = {type(e) for e in errors}
        cls = kinds.pop() if len(kinds) == 1 else EngineError
        raise cls(
            "pilot: every candidate failed: "
            + "; ".join(f"{r['name']}: {r.get('error', '')}" for r in table)
        )
    ref = spec.pilot.reference().name
    quality = guard(
        table,
        ref,
        lambda name: read_outputs(_at(spec, PILOT_DIR, name), spec.output.storage_options),
        lambda: load_encoder(specs[ref]),
        spec.pilot.min_agreement,
    )
    chosen = rank(table, metric)
    unit = replica_unit(next(r["device"] for r in table if r["status"] == OK))
    report = {
        "version": 1,
        "job": spec.name,
        "created_at": time.time(),
        "pilot_rows": pilot_rows,
        "expected_rows": expected_rows,
        "expected_rows_estimated": estimated,
        "replicas": replicas,
        "usd_per_gpu_hour": price,
        "metric": metric,
        "candidates": table,
        "device": next(r["device"] for r in table if r["status"] == OK),
        **quality,
        "chosen": chosen,
        "reason": decision_reason(table, chosen, metric, price, unit),
        "chosen_fingerprint": specs[chosen].fingerprint(),
        "chosen_engine_digest": engine_digest(specs[chosen]),
        # What the pilot itself held (start-up included): paid once, on top of the job.
        "pilot_gpu_s": sum(r.get("pilot_gpu_s", 0.0) for r in table),
        "pilot_usd": sum(r.get("pilot_gpu_s", 0.0) for r in table) / 3600 * price,
        "reused": False,
    }
    for line in format_table(report):
        say(line)
    return specs[chosen], report


def pilot_spec(job: JobSpec, name: str, pilot_input: str) -> JobSpec:
    """The pilot run of one candidate: the pilot rows, one replica, its own output root."""
    raw = job.model_dump()
    raw["name"] = f"{job.name}.pilot.{name}"[:100]
    raw["input"].update(path=pilot_input, format="parquet")
    raw["input"]["storage_options"] = dict(job.output.storage_options)
    raw["output"].update(path=_at(job, PILOT_DIR, name), mode="overwrite")
    raw["resources"].update(replicas=1, min_replicas=None)
    return JobSpec.model_validate(raw)


def write_pilot_input(spec: JobSpec, shards: list[Shard]) -> tuple[str, int]:
    """The first ``pilot.rows`` rows of the shards as one Parquet file under the output
    root, with the columns the job's task reads, its id and sampling columns (read by the
    job's own reader, so a row the job would refuse is refused in the pilot too). Returns
    (its directory, rows)."""
    inp = spec.input
    read = task_for(spec).input_columns()
    want = spec.pilot.rows
    parts: list[pa.Table] = []
    have = 0
    for shard in shards:
        try:
            for batch in read_shard(shard, read, min(want, 4096), inp.storage_options):
                parts.append(batch.slice(0, want - have))
                have += parts[-1].num_rows
                if have >= want:
                    break
        except InputError:
            continue  # a shard that cannot be read fails in the job, alone
        if have >= want:
            break
    rows = pa.concat_tables(parts).to_pylist() if parts else []
    values = [json.loads(r[PAYLOAD]) if r[PAYLOAD] else {} for r in rows]
    cols: dict[str, list] = {
        col: [v.get(role) for v in values] for role, col in read.fields.items()
    }
    if inp.id_column:
        cols[inp.id_column] = [r[ROW_ID] for r in rows]
    params = [json.loads(r[PARAMS]) if r[PARAMS] else {} for r in rows]
    for param, col in inp.sampling_columns.items():
        got = [p.get(param) for p in params]
        if col not in cols:
            cols[col] = got
        elif col not in (*read.fields.values(), inp.id_column):  # one column, two parameters
            cols[col] = [a if a is not None else b for a, b in zip(cols[col], got)]
    table = pa.table(cols)
    for role, col in read.fields.items():
        # All null when every pilot row is bad: give the column its role's type anyway.
        if pa.types.is_null(table.column(col).type) or role == "prompt":
            table = table.set_column(
                table.schema.get_field_index(col), col, table.column(col).cast(ROLE_TYPES[role])
            )
    directory = _at(spec, PILOT_DIR, "input")
    out = OutputRoot(directory, spec.output.storage_options)
    out.wipe()
    out.fs.makedirs(out.root, exist_ok=True)
    with out.fs.open(out.path("pilot.parquet"), "wb") as fh:
        pq.write_table(table, fh)
    return directory, table.num_rows


# --------------------------------------------------------------------------- reuse


def load_decision(out: OutputRoot) -> dict[str, Any] | None:
    raw = out.read(PILOT_JSON)
    if not raw:
        return None
    try:
        report = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(report, dict) or "chosen" not in report:
        return None
    return unstamped(PILOT_JSON, report, f"{out.url}/{PILOT_JSON}")


def reuse(spec: JobSpec, recorded: dict[str, Any]) -> tuple[JobSpec | None, str]:
    """The job with the recorded choice, if that candidate is still in the spec unchanged."""
    by_name = {c.name: c for c in spec.pilot.candidates}
    cand = by_name.get(recorded.get("chosen"))
    if cand is None:
        return None, f"its choice {recorded.get('chosen')!r} is no longer a candidate"
    chosen = apply_candidate(spec, cand)
    if engine_digest(chosen) != recorded.get("chosen_engine_digest"):
        return None, f"candidate {cand.name!r} or the job's engine section changed"
    return chosen, ""


def _per_replica(reps: list[dict], *keys: str) -> float:
    return sum(r.get(k, 0.0) for r in reps for k in keys) / len(reps)


def _at(spec: JobSpec, *parts: str) -> str:
    return posixpath.join(spec.output.path.rstrip("/"), *parts)


def _resuming(spec: JobSpec) -> JobSpec:
    """The spec with output.mode resume: the root was already wiped or checked, and holds
    the pilot's files now."""
    if spec.output.mode == "resume":
        return spec
    raw = spec.model_dump()
    raw["output"]["mode"] = "resume"
    return JobSpec.model_validate(raw)
