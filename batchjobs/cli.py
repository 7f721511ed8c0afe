"""The ``batchjobs`` command. Exit codes: 0 success; 2 bad spec; 3 bad input; 4 engine;
5 output; 7 more error rows than output.max_error_rate; 130 / 143 stopped by SIGINT /
SIGTERM; 1 anything else. The reason goes to stderr, without a traceback."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from batchjobs.cli_print import TRUST_REMOTE_CODE, _fail, _masked, _print_summary
from batchjobs.cli_tools import register as register_tool_commands
from batchjobs.errors import BatchJobError
from batchjobs.openai_batch.runbatch import run_batch
from batchjobs.ops.cli import register as register_cluster_commands
from batchjobs.stopping import DEFAULT_GRACE_S

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Offline batch LLM inference jobs."
)

SetOpt = Annotated[
    Optional[list[str]],  # noqa: UP045 - typer needs Optional here on 3.10
    typer.Option(
        "--set", "-s", help="Override a spec key: --set resources.replicas=2 (repeatable)."
    ),
]


SpecArg = Annotated[Path, typer.Argument(help="The job spec, a YAML file.", show_default=False)]


@app.command()
def validate(
    spec: SpecArg,
    set_: SetOpt = None,
    offline: Annotated[
        bool,
        typer.Option(
            "--offline",
            help="Check the spec alone, for a job that runs elsewhere: input and output "
            "locations by their form, no file, bucket or model reached, no engine looked for.",
        ),
    ] = False,
) -> None:
    """Check a job spec and its inputs (files, columns) without starting an engine.

    What only the cluster has (a model directory that is not on this machine) is noted, and
    checked there first thing when the job starts."""
    from batchjobs.ops.checks import check_here
    from batchjobs.spec import load_spec

    notes: list[str] = []
    try:
        if offline:
            job = load_spec(spec, set_, offline=True)
            _check_location_form(job)
        else:
            checked = check_here(spec, set_)
            job, shards, notes = checked.spec, checked.shards, checked.notes
            _check_engines_installed(job)
    except BatchJobError as exc:
        _fail(exc)
    if offline:
        found = "offline (input, output and model not reached)"
    else:
        found = "input not read here" if shards is None else f"{shards} shard(s)"
    typer.echo(
        f"ok: {job.name}: {found}, engine {job.engine.kind} {job.engine.model}, fingerprint {job.fingerprint()}"
    )
    for note in notes:
        typer.echo(f"note: {note}")
    if job.engine.trust_remote_code:
        typer.echo(f"note: {TRUST_REMOTE_CODE}")
    if job.pilot is not None:
        from batchjobs.pilot import apply_candidate, installed

        for cand in job.pilot.candidates:
            cj = apply_candidate(job, cand)
            state = "" if installed(cj.engine.kind) else " (not installed: skipped)"
            typer.echo(
                f"pilot candidate {cand.name}: engine {cj.engine.kind}, "
                f"fingerprint {cj.fingerprint()}{state}"
            )


@app.command()
def run(
    spec: SpecArg,
    set_: SetOpt = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Delete earlier results in the output root first.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress display (warnings and errors only).")
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="Also show Ray's and the engines' output (always in <output>/_logs/).",
        ),
    ] = False,
    skip_report: Annotated[
        bool,
        typer.Option(
            "--skip-report", help="Do not write <output>/_report.html when the job is done."
        ),
    ] = False,
    summary_json: Annotated[
        Path | None,
        typer.Option(help="Also write the summary here as JSON ('-': one line on stdout)."),
    ] = None,  # noqa: UP045
    stop_grace: Annotated[
        float,
        typer.Option(
            "--stop-grace",
            envvar="BATCHJOBS_STOP_GRACE_S",
            min=1.0,
            help="On SIGTERM or Ctrl-C: seconds to record the run and stop the engines "
            "before exiting anyway (exit 143 or 130).",
        ),
    ] = DEFAULT_GRACE_S,
) -> None:
    """Run a job: read shards, generate with the engine, write Parquet and the manifest.

    On a terminal a live panel shows the job; elsewhere (ray job submit, Airflow, a pipe)
    a plain progress line every 5 s. Ray's and the engines' output goes to
    <output>/_logs/. SIGTERM or Ctrl-C stops it: committed shards are kept, the run is
    recorded, and a rerun finishes the rest."""
    from batchjobs import stopping

    live: list = []  # the Watch while its panel owns the terminal

    def say(line: str) -> None:
        (live[0].message if live else _progress)(line)

    with stopping.handling(stop_grace, say):
        try:
            _run(spec, set_, fresh, quiet, verbose, skip_report, summary_json, live)
        except (KeyboardInterrupt, SystemExit) as exc:
            stop = stopping.classify(exc)
            if not isinstance(stop, stopping.Stopped):
                raise
            typer.echo(f"{stop}", err=True)
            raise typer.Exit(stop.exit_code) from None


def _run(spec, set_, fresh, quiet, verbose, skip_report, summary_json, live: list) -> None:
    from batchjobs.display import watching
    from batchjobs.openai_batch.spec import resolve as resolve_format
    from batchjobs.ops.checks import on_cluster
    from batchjobs.pipeline import run as run_job
    from batchjobs.spec import load_spec

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    watch = job = None
    try:
        job = load_spec(spec, set_)
        job = on_cluster(job)  # where a Ray job runs it: paths the upload left out
        job = resolve_format(job)  # input.format auto: OpenAI Batch requests or not
        _check_engines_installed(job)
        with watching(job, quiet=quiet, verbose=verbose) as watch:
            live.append(watch)
            pilot = None
            if job.pilot is not None:
                from batchjobs.pilot import prepare

                prepared = prepare(job, fresh=fresh, progress=watch.message)
                job, fresh, pilot = prepared.spec, prepared.fresh, prepared.report
            summary = run_job(
                job,
                fresh=fresh,
                progress=watch.message,
                on_progress=watch.update,
                progress_every=watch.every_s,
            )
    except BatchJobError as exc:
        if watch is not None:
            if getattr(exc, "summary", None) is not None:  # every readable row is written
                _print_summary(exc.summary)
                if not skip_report:
                    _write_report(job.output.path, job.output.storage_options)
                _write_summary_json(summary_json, exc.summary.to_dict())
            typer.echo(f"error: {_masked(str(exc), job)}", err=True)
            typer.echo(f"logs of Ray and the engines: {watch.logs}", err=True)
            raise typer.Exit(exc.exit_code) from None
        _fail(exc, job)
    except Exception as exc:
        if watch is None:
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        typer.echo(f"error: {_masked(f'{type(exc).__name__}: {first}', job)}", err=True)
        typer.echo(f"the traceback is in the log: {watch.logs}", err=True)
        raise typer.Exit(1) from None
    finally:
        live.clear()
    _print_summary(summary)
    if summary.task == "eval" and summary.metrics:
        from batchjobs.evalreport import summary_lines

        typer.echo("\n".join(summary_lines(summary.metrics)))
    if summary.metrics.get("openai_batch"):
        from batchjobs.openai_batch.files import summary_line

        typer.echo(summary_line(summary.metrics["openai_batch"]))
    if summary.metrics.get("adapters"):
        from batchjobs.tasks.generated import adapter_lines

        typer.echo("\n".join(adapter_lines(summary.metrics["adapters"])))
    result = summary.to_dict()
    if pilot is not None:
        from batchjobs.projection import summary_line

        typer.echo(summary_line(pilot))
        result["pilot"] = pilot
        result["engine_chosen"] = pilot["chosen"]
    typer.echo(f"logs: {watch.logs} (Ray's and the engines' output)")
    if not skip_report:
        _write_report(job.output.path, job.output.storage_options)
    _write_summary_json(summary_json, result)


def _write_summary_json(summary_json: Path | None, result: dict) -> None:
    """``--summary-json``: the run's summary to a file, or ("-") one line on stdout."""
    from batchjobs.ops.jobs import SUMMARY_PREFIX

    if summary_json is not None and str(summary_json) == "-":  # read by batchjobs wait
        typer.echo(SUMMARY_PREFIX + json.dumps(result, sort_keys=True, default=str))
    elif summary_json:
        summary_json.write_text(json.dumps(result, indent=2, default=str) + "\n")


# URL schemes whose first path segment names a bucket, container or host.
_LOCAL_SCHEMES = {"file", "local", "memory"}


def _check_location_form(job) -> None:
    """``validate --offline``: input.path and output.path as written, without reaching them.
    A URL needs a scheme that fsspec knows and a bucket or host; an output root is no glob."""
    from fsspec.registry import known_implementations, registry

    from batchjobs.errors import SpecError

    problems = []
    for key, value in (("input.path", job.input.path), ("output.path", job.output.path)):
        for url in value.split("::"):  # chained URLs: simplecache::s3://...
            scheme, sep, rest = url.partition("://")
            if not sep:
                continue
            if scheme not in known_implementations and scheme not in registry:
                problems.append(f"{key} {value!r}: unknown URL scheme {scheme!r}")
            elif scheme not in _LOCAL_SCHEMES and not rest.split("/")[0].strip():
                problems.append(f"{key} {value!r}: no bucket or host after {scheme}://")
        if key == "output.path" and any(c in value for c in "*?["):
            problems.append(f"{key} {value!r}: an output root cannot be a glob")
    if problems:
        raise SpecError("malformed location:\n" + "\n".join(f"  - {p}" for p in problems))


def _check_engines_installed(job) -> None:
    """The job's engine must be installed; with a pilot, at least one candidate's."""
    if job.pilot is None:
        _check_engine_installed(job.engine.kind)
        return
    from batchjobs.pilot import apply_candidate

    kinds = [apply_candidate(job, c).engine.kind for c in job.pilot.candidates]
    errors = []
    for kind in dict.fromkeys(kinds):
        try:
            _check_engine_installed(kind)
            return
        except BatchJobError as exc:
            errors.append(str(exc))
    from batchjobs.errors import EngineError

    raise EngineError("no pilot candidate's engine is installed: " + "; ".join(errors))


def _check_engine_installed(kind: str) -> None:
    from batchjobs.engines import engine_kind
    from batchjobs.errors import EngineError

    engine = engine_kind(kind)
    if not engine.installed():
        raise EngineError(f"engine.kind {kind!r} needs {engine.install_hint}")


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _write_report(output: str, storage_options: dict | None = None) -> None:
    """Write the report at the end of a run; a report that fails is a warning, not a
    failed job."""
    from batchjobs.report import write_report

    try:
        where = write_report(output, storage_options)
    except Exception as exc:  # noqa: BLE001 - the job's results are in; only the report is not
        typer.echo(f"warning: no report written: {type(exc).__name__}: {exc}", err=True)
        return
    typer.echo(f"report: {where}")


register_tool_commands(app)  # manifest, report, compare, schema, make-model
register_cluster_commands(app)  # submit, status, logs, stop, list
app.command("run-batch")(run_batch)  # OpenAI Batch files, vLLM's run-batch flags

if __name__ == "__main__":  # pragma: no cover
    app()
