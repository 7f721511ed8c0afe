"""The commands that operate jobs on a Ray cluster: submit, status, logs, stop, list.

``batchjobs.cli`` registers them on its app; Ray's job client is imported only when a
command runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from batchjobs.errors import BatchJobError

AddressOpt = Annotated[
    Optional[str],  # noqa: UP045 - typer needs Optional here on 3.10
    typer.Option(
        "--address",
        help="The head's job API, http://HEAD:8265. Default: RAY_API_SERVER_ADDRESS, an "
        "http:// RAY_ADDRESS, else http://127.0.0.1:8265.",
        show_default=False,
    ),
]
IdArg = Annotated[
    str, typer.Argument(help="The submission id (batchjobs submit prints it).", show_default=False)
]


def _fail(exc: BatchJobError) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(exc.exit_code)


def _err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _log(line: str) -> None:
    from batchjobs.ops.jobs import SUMMARY_PREFIX

    if not line.startswith(SUMMARY_PREFIX):  # machine-readable: read by wait, not shown
        print(line, flush=True)


def submit(
    spec: Annotated[Path, typer.Argument(help="The job spec, a YAML file.", show_default=False)],
    address: AddressOpt = None,
    set_: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--set", "-s", help="Override a spec key (repeatable); the job gets it too."),
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            help="Follow the job's logs and exit with its exit code; Ctrl-C or SIGTERM stops "
            "the job.",
        ),
    ] = False,
    timeout: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(help="With --wait: stop the job after this many seconds (exit 124)."),
    ] = None,
    run_key: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="Part of the submission id: the same spec and run key re-attach to one job "
            "(e.g. the scheduler's logical date)."
        ),
    ] = None,
    working_dir: Annotated[
        Path, typer.Option(help="The directory the job gets (its spec must be inside).")
    ] = Path("."),
    runtime_env_json: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="A Ray runtime_env as JSON, merged over the one built here (its own "
            "working_dir replaces the upload)."
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Submit a new attempt even if this one already succeeded."),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="With --wait: no job logs.")] = False,
) -> None:
    """Submit a job to a Ray cluster (deterministic id: re-attaches to a running one)."""
    from batchjobs.ops import jobs

    try:
        runtime_env = json.loads(runtime_env_json) if runtime_env_json else None
    except ValueError as exc:
        typer.echo(f"error: --runtime-env-json is not JSON: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        sub = jobs.submit(
            spec,
            address=address,
            overrides=set_,
            run_key=run_key,
            working_dir=working_dir,
            runtime_env=runtime_env,
            force=force,
            say=_err,
        )
        if not wait:
            typer.echo(sub.submission_id)
            _err(
                f"follow it: batchjobs logs {sub.submission_id} --follow; "
                f"stop it: batchjobs stop {sub.submission_id}"
            )
            return
        outcome = jobs.wait(
            sub.submission_id,
            address=sub.address,
            timeout=timeout,
            on_log=None if quiet else _log,
        )
    except BatchJobError as exc:
        _fail(exc)
    _print_outcome(outcome)
    raise typer.Exit(outcome.exit_code or 0)


def _print_outcome(outcome) -> None:
    d = outcome.to_dict()
    line = f"{outcome.submission_id}: {outcome.status}"
    if outcome.exit_code is not None:
        line += f", exit {outcome.exit_code}"
    if outcome.reason:
        line += f": {outcome.reason}"
    if "rows" in d:
        usd = d.get("usd_per_1m_tokens")
        line += (
            f"; {d['rows']} rows ({d['error_rows']} errors), {d['tokens']} tokens, "
            f"${d['cost_usd']:.4f}"
            + ("" if usd is None else f" (${usd:.4f}/1M tokens)")
            + f", output {d['output']}"
        )
    elif outcome.progress:
        p = outcome.progress
        line += f"; {p['rows']} rows so far ({p['errors']} errors), {p['done']}/{p['total']} shards"
    _err(line)


def status(
    submission_id: IdArg,
    address: AddressOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print it as JSON.")] = False,
) -> None:
    """A submitted job's state: rows, errors, $ and exit code when the driver has reported them."""
    from batchjobs.ops import jobs

    try:
        outcome = jobs.status(submission_id, address=address)
    except BatchJobError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(outcome.to_dict(), indent=2))
    else:
        _print_outcome(outcome)


def logs(
    submission_id: IdArg,
    address: AddressOpt = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")
    ] = False,
) -> None:
    """Print a submitted job's logs (the driver's output)."""
    from batchjobs.ops import jobs

    try:
        if follow:
            # Ctrl-C leaves the job running: following is not owning.
            jobs.wait(submission_id, address=address, on_log=_log, stop_on_signals=False)
        else:
            head = jobs.Head(address)
            if head.info(submission_id) is None:
                raise jobs.ClusterError(f"no job {submission_id} on {head.address}")
            for line in head.logs(submission_id).splitlines():
                _log(line)
    except BatchJobError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def stop(submission_id: IdArg, address: AddressOpt = None) -> None:
    """Stop a submitted job (committed shards are kept; submitting it again resumes)."""
    from batchjobs.ops import jobs

    try:
        outcome = jobs.stop(submission_id, address=address)
    except BatchJobError as exc:
        _fail(exc)
    _print_outcome(outcome)


def list_(
    address: AddressOpt = None,
    limit: Annotated[int, typer.Option(help="Newest jobs to show.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print them as JSON lines.")] = False,
) -> None:
    """batchjobs' jobs on the cluster, newest first: state, rows, errors and $."""
    from batchjobs.ops import jobs

    try:
        found = jobs.list_jobs(address=address, limit=limit)
    except BatchJobError as exc:
        _fail(exc)
    if as_json:
        for info, outcome in found:
            typer.echo(json.dumps({**outcome.to_dict(), "job": (info.metadata or {}).get("job")}))
        return
    if not found:
        _err("no batchjobs jobs on this cluster")
        return
    typer.echo(f"{'submission id':<60} {'state':<10} {'rows':>8} {'errors':>7} {'$':>9}")
    for _info, outcome in found:
        d = outcome.to_dict()
        rows = d.get("rows", (outcome.progress or {}).get("rows"))
        errors = d.get("error_rows", (outcome.progress or {}).get("errors"))
        cost = d.get("cost_usd")
        typer.echo(
            f"{outcome.submission_id:<60} {outcome.status:<10} "
            f"{'-' if rows is None else rows:>8} {'-' if errors is None else errors:>7} "
            f"{'-' if cost is None else format(cost, '.4f'):>9}"
        )


def register(app: typer.Typer) -> None:
    """Add the commands to ``app`` (the ``batchjobs`` command)."""
    app.command()(submit)
    app.command()(status)
    app.command()(logs)
    app.command()(stop)
    app.command("list")(list_)
