"""Checks of a job spec where it is written (a laptop, an Airflow worker) and first thing
where it runs (the job's driver on the cluster).

Where it is written, everything this machine can see is checked as ``batchjobs run`` would
check it; what lives only on the cluster (an absolute model path, an input bucket this
machine has no credentials for, the engine's installation) is named in a note instead of
failing. The driver checks those first thing on the cluster, with the same errors.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from batchjobs.errors import BatchJobError, SpecError
from batchjobs.spec import JobSpec, load_spec

# What `batchjobs submit` tells the job's driver about where it was submitted from.
SUBMIT_HOST = "BATCHJOBS_SUBMIT_HOST"
SUBMIT_DIR = "BATCHJOBS_SUBMIT_DIR"
SUBMIT_SPEC = "BATCHJOBS_SUBMIT_SPEC"  # the spec's path relative to the working directory
SUBMIT_SPEC_SHA = "BATCHJOBS_SUBMIT_SPEC_SHA256"
RAY_JOB_CONFIG = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray for the driver of a Ray job

ON_CLUSTER = "it is checked on the cluster, first thing when the job starts"


@dataclass
class LocalCheck:
    """What ``check_here`` found: the spec, its shards (None where the input was not
    reachable here) and what is left to the cluster."""

    spec: JobSpec
    shards: int | None
    notes: list[str] = field(default_factory=list)


def is_url(value: str) -> bool:
    return "://" in value or "::" in value


def model_paths(job: JobSpec) -> list[tuple[str, str]]:
    """(spec key, value) of every model, tokenizer and LoRA adapter the job may load."""
    found = [("engine.model", job.engine.model), ("engine.tokenizer", job.engine.tokenizer)]
    for i, cand in enumerate(job.pilot.candidates if job.pilot else []):
        found += [
            (f"pilot.candidates[{i}].model", cand.model),
            (f"pilot.candidates[{i}].tokenizer", cand.tokenizer),
        ]
    lora = job.engine.lora.adapters if job.engine.lora else {}
    found += [(f"engine.lora.adapters.{name}", path) for name, path in lora.items()]
    return [(k, v) for k, v in found if v]


def check_here(
    path: str | Path, overrides: list[str] | None = None, *, for_cluster: bool = False
) -> LocalCheck:
    """Check a spec on this machine; raise ``BatchJobError`` for what is wrong here, note
    what only the cluster can tell: a model at an absolute path that is not here, an input
    URL this machine cannot read (no filesystem package, no credentials), and with
    ``for_cluster`` (``batchjobs submit``) an input at an absolute path that is not here."""
    job = load_spec(path, overrides, offline=True)
    notes: list[str] = []
    relative_missing = False
    for key, value in model_paths(job):
        local = Path(value).expanduser()
        if is_url(value) or local.exists():
            continue
        if local.is_absolute():
            notes.append(f"{key} {value} is not on this machine: {ON_CLUSTER}")
        else:
            relative_missing = True
    if relative_missing:
        # A relative path travels with the working directory, so it must be here: the full
        # check gives the usual error (a hub name such as org/model passes).
        load_spec(path, overrides)
    from batchjobs.openai_batch.spec import resolve

    job = resolve(job)  # input.format auto: OpenAI Batch requests or not
    return LocalCheck(job, _check_input(job, notes, for_cluster), notes)


def _check_input(job: JobSpec, notes: list[str], for_cluster: bool) -> int | None:
    from batchjobs.planning import list_shards, preflight_shards
    from batchjobs.safety import check_roots

    check_roots(job)  # an output root inside the input, or around it
    value = job.input.path
    if not is_url(value):
        base = Path(_glob_base(value)).expanduser()
        if for_cluster and base.is_absolute() and not base.exists():
            notes.append(f"input.path {value} is not on this machine: {ON_CLUSTER}")
            return None
        shards = list_shards(value, job.input.format, job.input.storage_options)
        preflight_shards(job, shards)
        return len(shards)
    try:
        shards = list_shards(value, job.input.format, job.input.storage_options)
        preflight_shards(job, shards)
    except BatchJobError:
        raise
    except Exception as exc:  # noqa: BLE001 - no filesystem package, no credentials here
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        notes.append(f"input.path {value} is not readable here ({reason[:200]}): {ON_CLUSTER}")
        return None
    return len(shards)


def _glob_base(value: str) -> str:
    cut = min((value.find(c) for c in "*?[" if c in value), default=-1)
    return value if cut < 0 else value[:cut].rpartition("/")[0] or "."


def spec_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- first thing on the cluster ---------------------------------------------------------


def ray_job_working_dir() -> bool:
    """Whether this process is the driver of a Ray job that was given a working directory
    (its current directory is then a copy, not the submitter's directory)."""
    raw = os.environ.get(RAY_JOB_CONFIG)
    if not raw:
        return False
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return False
    return bool(runtime_env.get("working_dir"))


def submitted_from_here() -> Path | None:
    """The submitter's working directory when this node is the machine that ran
    ``batchjobs submit`` (same host name, and the spec there is the one the job runs)."""
    host, wd, rel, sha = (
        os.environ.get(k) for k in (SUBMIT_HOST, SUBMIT_DIR, SUBMIT_SPEC, SUBMIT_SPEC_SHA)
    )
    if not (host and wd and rel and sha) or host != socket.gethostname():
        return None
    spec = Path(wd) / rel
    try:
        return Path(wd) if spec.is_file() and spec_sha256(spec) == sha else None
    except OSError:
        return None


def on_cluster(job: JobSpec) -> JobSpec:
    """The driver's checks before anything starts, where the job runs. Outside a Ray job
    with a working directory the spec is returned as it is.

    In a Ray job the current directory is the uploaded copy of the working directory, on
    this node only. A relative ``output.path`` there would scatter the results over
    temporary copies, so it resolves against the submitter's directory when this node is
    the submitting machine (a local head), and is refused anywhere else. A relative model
    path that the upload left out (git-ignored) is refused with what to do, instead of
    being taken for a hub name.
    """
    if not ray_job_working_dir():
        return job
    here = submitted_from_here()
    out = job.output.path
    if not is_url(out) and not Path(out).expanduser().is_absolute():
        if here is None:
            raise SpecError(
                f"output.path {out!r} is relative: in a Ray job it would land in the job's "
                f"temporary copy of the working directory ({Path.cwd()}) on each node that "
                "writes. Set output.path to a path every node shares or to a URL "
                "(--set output.path=s3://bucket/prefix)"
            )
        job = job.model_copy(
            update={"output": job.output.model_copy(update={"path": str(here / out)})}
        )
    for key, value in model_paths(job):
        if is_url(value) or Path(value).expanduser().is_absolute() or Path(value).exists():
            continue
        ignored = _gitignored(Path.cwd(), value)
        if ignored:
            raise SpecError(
                f"{key} {value!r} does not exist in the job's working directory "
                f"({Path.cwd()}): the upload leaves out what .gitignore lists ({ignored}). "
                "Submit with `batchjobs submit`, which ships a small local model "
                f"directory, or put the model on every node and --set {key}=/path/on/nodes"
            )
    return job


def _gitignored(root: Path, rel: str) -> str | None:
    """The line of ``root/.gitignore`` that leaves ``rel`` out, if one does (plain names and
    anchored paths; enough to explain a missing directory, not a full gitignore matcher)."""
    import fnmatch

    try:
        lines = (root / ".gitignore").read_text().splitlines()
    except OSError:
        return None
    parts = Path(rel).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for line in lines:
        pattern = line.strip()
        if not pattern or pattern.startswith(("#", "!")):
            continue
        bare = pattern.strip("/")
        if "/" in bare:
            hit = any(fnmatch.fnmatch(p, bare) for p in prefixes)
        else:
            hit = any(fnmatch.fnmatch(p, bare) for p in parts)
        if hit:
            return pattern
    return None
