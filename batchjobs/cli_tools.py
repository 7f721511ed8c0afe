"""The commands that run no job: manifest, report and compare read output roots; schema
prints the spec's schema; make-model writes a local model. ``batchjobs.cli`` registers
them on its app."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from batchjobs.cli_print import _fail
from batchjobs.errors import BatchJobError
from batchjobs.layout import PILOT_JSON


def manifest(
    output: Annotated[str, typer.Argument(help="A job's output root (directory or fsspec URL).")],
    wide: Annotated[
        bool, typer.Option("--wide", help="All columns (status, $/1M output, source, ...).")
    ] = False,
) -> None:
    """Print the per-shard table of an output root's manifest."""
    from rich.console import Console

    from batchjobs.display import manifest_tables
    from batchjobs.manifest import Manifest
    from batchjobs.report import read_runs
    from batchjobs.sink import OutputRoot

    try:
        root = OutputRoot(output)
        records = Manifest(root).records.values()
        runs = read_runs(root)
    except BatchJobError as exc:
        _fail(exc)
    if not records:
        typer.echo(f"no manifest records under {output}", err=True)
        raise typer.Exit(1)
    tty = sys.stdout.isatty()
    console = Console(width=None if tty else (250 if wide else 100), highlight=False)
    for part in manifest_tables(records, runs, output, wide=wide):
        console.print(part)
    from batchjobs.pilot import load_decision
    from batchjobs.projection import format_table

    try:
        decision = load_decision(OutputRoot(output))
    except (BatchJobError, OSError):
        decision = None
    if decision is not None:
        typer.echo(f"engine chosen by pilot ({output.rstrip('/')}/{PILOT_JSON}):")
        for line in format_table(decision):
            typer.echo(line)
        from batchjobs.pilotview import shards_by_config

        by = shards_by_config(list(records))
        typer.echo(
            "shards by engine configuration: " + ", ".join(f"{k} {n}" for k, n in by.items())
        )


def report(
    output: Annotated[str, typer.Argument(help="A job's output root (directory or fsspec URL).")],
) -> None:
    """Write <output>/_report.html: the job's spec, runs, cost and plots, in one file.

    Reads only the output root (manifest, run records, progress samples, _eval.json,
    _pilot.json, a sample of the output rows), so it works on a copy of the root too."""
    from batchjobs.report import write_report

    try:
        where = write_report(output)
    except BatchJobError as exc:
        _fail(exc)
    typer.echo(f"report: {where}")


def compare(
    output_a: Annotated[str, typer.Argument(help="The first eval output root (the baseline).")],
    output_b: Annotated[str, typer.Argument(help="The second eval output root.")],
    metric: Annotated[
        Optional[str],  # noqa: UP045 - typer needs Optional here on 3.10
        typer.Option(help="Compare this metric only (default: every metric both have)."),
    ] = None,
    show: Annotated[int, typer.Option(help="Flipped rows to print per metric.")] = 20,
    json_out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--json", help="Also write the comparison, every flipped row, here."),
    ] = None,
    fail_if_worse: Annotated[
        bool,
        typer.Option(
            "--fail-if-worse",
            help="Exit 6 when B is worse than A on a metric: the 95% interval of B - A is "
            "below zero.",
        ),
    ] = False,
) -> None:
    """Compare two eval outputs row by row: accuracy of each, the paired difference B - A
    with its 95% interval and McNemar's test, and the rows that flipped."""
    from batchjobs.evalreport import compare as compare_outputs
    from batchjobs.evalreport import compare_lines, worse

    try:
        result = compare_outputs(output_a, output_b, metric)
    except BatchJobError as exc:
        _fail(exc)
    typer.echo("\n".join(compare_lines(result, show)))
    if json_out:
        json_out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    regressed = worse(result)
    if fail_if_worse and regressed:
        typer.echo(f"B is worse than A on: {', '.join(regressed)}", err=True)
        raise typer.Exit(6)


def schema(
    markdown: Annotated[
        bool, typer.Option("--markdown", help="Print the markdown reference (docs/spec.md).")
    ] = False,
) -> None:
    """Print the JSON Schema of a job spec, for editor completion and checks."""
    from batchjobs.specdoc import json_schema, render_markdown

    if markdown:
        typer.echo(render_markdown(), nl=False)
    else:
        typer.echo(json.dumps(json_schema(), indent=2))


def make_model(
    out: Annotated[Path, typer.Argument(help="Directory to write the model to.")],
    shape: Annotated[
        str,
        typer.Option(
            help="tiny (real random weights), or config only for load_format: dummy: "
            "llama-7b, llama3-8b, llama3-70b, qwen3-0.6b."
        ),
    ] = "tiny",
    lora: Annotated[
        Path | None,
        typer.Option(
            help="Write a random LoRA adapter (PEFT format) for this local model instead "
            "of a model, e.g. --lora models/tiny-llama."
        ),
    ] = None,
    rank: Annotated[int, typer.Option(help="--lora: the adapter's rank.")] = 8,
    seed: Annotated[int, typer.Option(help="--lora: seeds the weights; one per adapter.")] = 1,
) -> None:
    """Build a local model (tokenizer with a chat template + config, weights for tiny) that
    needs no hub access, or with --lora a random LoRA adapter for one."""
    from batchjobs.tools.models import build_model

    try:
        if lora is not None:
            from batchjobs.tools.lora import build_lora

            build_lora(out, lora, rank=rank, seed=seed)
            typer.echo(f"wrote rank-{rank} LoRA adapter for {lora} to {out}")
            return
        build_model(out, shape)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {shape} model to {out}")


def register(app: typer.Typer) -> None:
    """Add the commands to ``app`` (the ``batchjobs`` command)."""
    app.command()(manifest)
    app.command()(report)
    app.command()(compare)
    app.command()(schema)
    app.command("make-model")(make_model)
