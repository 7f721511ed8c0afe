"""What the ``batchjobs`` commands print: an error (credentials masked), and the summary
of a finished run (rows, tokens and their rates, cost, replicas)."""

from __future__ import annotations

import typer

from batchjobs.errors import BatchJobError
from batchjobs.layout import MANIFEST


def _fail(exc: BatchJobError, job=None) -> None:
    typer.echo(f"error: {_masked(str(exc), job)}", err=True)
    raise typer.Exit(exc.exit_code)


def _masked(text: str, job=None) -> str:
    """``text`` with the job's credentials (or, without a job, those of the environment)
    and anything shaped like one masked (``secrets.redact``)."""
    from batchjobs.secrets import redact, secrets_of, spec_secrets

    return redact(text, spec_secrets(job) if job is not None else secrets_of(()))


def _num(v: float | None, fmt: str = ".4f") -> str:
    return "-" if v is None else format(v, fmt)


def usd(v: float | None) -> str:
    from batchjobs.display import usd as fmt

    return fmt(v)


def _print_summary(s) -> None:
    typer.echo(
        f"done: {s.name}: {s.rows} rows ({s.error_rows} errors) in {s.wall_s:.1f}s "
        f"(start-up included); "
        f"shards: {s.shards_run} run, {s.shards_skipped} skipped (already committed)\n"
        + _tokens_line(s)
        + _cost_line(s)
        + _replica_line(s.replicas)
        + (f"{TRUST_REMOTE_CODE}\n" if getattr(s, "trust_remote_code", False) else "")
        + f"output: {s.output} (manifest: {s.output.rstrip('/')}/{MANIFEST})"
    )


TRUST_REMOTE_CODE = (
    "trust_remote_code: on: the model directory's own Python code runs in the engine "
    "processes (engine.trust_remote_code)"
)


def _tokens_line(s) -> str:
    """Tokens and the rates, each saying what time it covers: the whole run (Ray and the
    engines' start-up included), and from the first engine ready to the last result."""
    line = (
        f"tokens: {s.prompt_tokens:,} in, {s.completion_tokens:,} out; over the whole run "
        f"{s.tokens_per_s:,.0f} tok/s in+out, {s.output_tokens_per_s:,.0f} output tok/s"
    )
    reps = [r for r in (s.replicas or {}).values() if r.get("ready_at")]
    if reps:
        first = min(r["ready_at"] for r in reps)
        last = max(r["ready_at"] + r.get("busy_s", 0.0) + r.get("idle_s", 0.0) for r in reps)
        span = last - first
        if span > 0:
            line += (
                f"; engines ready to last result ({span:.1f}s): "
                f"{(s.prompt_tokens + s.completion_tokens) / span:,.0f} tok/s in+out, "
                f"{s.completion_tokens / span:,.0f} output tok/s"
            )
    return line + "\n"


def _unit(s) -> str:
    """What the run's device-seconds are: GPU-seconds, or CPU-seconds on a CPU run."""
    return "CPU-s" if getattr(s, "device", "") == "cpu" else "GPU-s"


def _cost_line(s) -> str:
    """GPU-seconds and $, split into the rows' work, start-up and idle, and under-fill; and
    how the rows' work was weighed (cost.py)."""
    w = s.cost_weights or {}
    unit = _unit(s)
    gpus = s.gpu_s - s.overhead_s  # the rows' work, in GPU-seconds
    weighed = (
        f"; rows charged {w['prefill_s'] * 1e3:.3g} ms per prefill token, "
        f"{w['decode_s'] * 1e3:.3g} ms per decode token ({w['method']})"
        if w
        else ""
    )
    return (
        f"cost of this run: {s.gpu_s:.1f} {unit} = {usd(s.cost_usd)}: rows' work {gpus:.1f}, "
        f"start-up and idle {s.overhead_s - s.underfill_s:.1f}, under-fill "
        f"{s.underfill_s:.1f}{weighed}\n"
    )


def _replica_line(replicas: dict) -> str:
    """Start-up and how full the engines were kept: the first things to look at when a job
    runs slower than expected."""
    from batchjobs.tracker import busy_share

    if not replicas:
        return ""
    reps = list(replicas.values())
    start = max(r["startup_s"] for r in reps)
    mean = sum(r.get("mean_inflight", 0.0) for r in reps) / len(reps)
    caps = sorted({r.get("inflight_limit", 0) for r in reps})
    cap = "no cap" if caps == [0] else "cap " + "/".join(str(c) for c in caps)
    prompt = sum(r.get("prompt_tokens", 0) for r in reps)
    cached = sum(r.get("cached_tokens", 0) for r in reps)
    hits = f"; prefix cache served {cached / prompt:.0%} of prompt tokens" if prompt else ""
    share = busy_share(reps)
    busy = f"engines had work {share:.0%} of the time after start-up; " if share is not None else ""
    return (
        f"replicas: {len(reps)}, ready after {start:.1f}s; {busy}"
        f"{mean:.0f} requests in each engine on average ({cap}){hits}\n"
    )
