"""Planning a job before any engine starts: list the shards, check their columns, open
the output root, and decide which shards are already committed (resume) or superseded."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from batchjobs.errors import OutputError
from batchjobs.manifest import SUPERSEDED, Manifest, ShardRecord
from batchjobs.readers import Shard, list_shards
from batchjobs.retries import RetryPolicy
from batchjobs.sink import OutputRoot
from batchjobs.spec import JobSpec
from batchjobs.tasks import task_for

log = logging.getLogger("batchjobs")
PREFLIGHT_ALL_UP_TO = 64  # shards; past that only the first is opened before the run


@dataclass
class Plan:
    spec: JobSpec
    shards: list[Shard]
    todo: list[Shard]
    skipped: list[ShardRecord]
    out: OutputRoot
    manifest: Manifest
    fingerprint: str
    # Shards that failed their preflight, by id, with why: not run (shard_errors.py).
    failed: dict[str, str] = field(default_factory=dict)


def preflight_shards(spec: JobSpec, shards: list[Shard], strict: bool = True) -> dict[str, str]:
    """Check that the columns the task reads exist in each shard and have a type it can
    use (footer or first lines only). Returns the shards that fail, with why; ``strict``
    raises for any, otherwise only when every shard checked fails
    (``shard_errors.preflight_all``). OpenAI Batch request files are read whole: every line
    needs a custom_id, and no custom_id may repeat (a preflight error otherwise)."""
    from batchjobs.shard_errors import preflight_all

    if spec.input.format == "openai_batch":
        from batchjobs.openai_batch.requests import preflight as preflight_requests

        preflight_requests(shards, spec.input.storage_options)
        return {}
    cols = task_for(spec).input_columns()
    return preflight_all(shards, cols, spec.input.storage_options, strict)


def open_output(spec: JobSpec, fresh: bool = False) -> OutputRoot:
    """The output root, emptied first for --fresh or mode overwrite; mode error refuses a
    non-empty one."""
    out = OutputRoot(
        spec.output.path,
        spec.output.storage_options,
        RetryPolicy.of(spec.output),
        compact_bytes=spec.output.compact_mb << 20,
    )
    if fresh or spec.output.mode == "overwrite":
        out.wipe()
    elif spec.output.mode == "error" and not out.is_empty():
        raise OutputError(
            f"output.path {spec.output.path!r} is not empty and output.mode is 'error'"
        )
    return out


def plan_job(spec: JobSpec, fresh: bool = False) -> Plan:
    """List shards, check their columns, and decide what to skip; starts no engine."""
    from batchjobs.safety import check_roots

    shards = list_shards(spec.input.path, spec.input.format, spec.input.storage_options)
    check_roots(spec)
    failed = preflight_shards(spec, shards[:PREFLIGHT_ALL_UP_TO], strict=False)
    out = open_output(spec, fresh)
    manifest = Manifest(out)
    fp = spec.fingerprint()
    other = manifest.fingerprints() - {fp}
    if other:
        raise OutputError(
            f"{spec.output.path} holds results of another job configuration (fingerprint "
            f"{', '.join(sorted(other))}; this spec is {fp}): the model, sampling, prompt mapping "
            "or task changed. Rerun with --fresh to delete the old results, or set output.path "
            "to a new location."
        )
    committed = manifest.committed()
    todo = [s for s in shards if s.shard_id not in committed and s.shard_id not in failed]
    skipped = [committed[s.shard_id] for s in shards if s.shard_id in committed]
    failed = {sid: why for sid, why in failed.items() if sid not in committed}
    task_for(spec).begin(out)
    return Plan(spec, shards, todo, skipped, out, manifest, fp, failed)


def retire_superseded(plan: Plan) -> None:
    """Remove the output of committed shards whose input file changed or vanished.

    A changed file is a new shard (its id hashes size and mtime/ETag), so the old shard's
    rows would otherwise sit beside the new ones: readers would see both versions.
    """
    current = {s.shard_id for s in plan.shards}
    gone = [r for sid, r in plan.manifest.committed().items() if sid not in current]
    for rec in gone:
        plan.out.clear_shard(rec.shard_id)
        rec.status = SUPERSEDED
        rec.files = []
        log.warning(
            "shard %s: its input %s changed or is gone; old output removed",
            rec.shard_id,
            rec.source,
        )
    if gone:
        plan.manifest.save()
