"""``batchjobs run-batch``: vLLM's ``run-batch`` command line, run as batchjobs jobs.

It takes the flags of vLLM's ``run-batch`` that batchjobs has (``-i``, ``-o``,
``--model``, ``--served-model-name``, ``--tensor-parallel-size``/``-tp``, …), so switching
is changing the command's name; ``--replicas`` adds data parallelism. The request file is
checked whole and cut into shards (``split``); the chat and completions lines run in one
pass on a generate engine, the embeddings lines in a pass on a pooling engine of the same
model (each pass a job with its own output root in the state directory); every line,
result or error, is then written to ``-o`` in input order. Rerun the same command after a
crash and the passes skip what they committed.

Defaults as vLLM's server has them: a field a line leaves out takes the model's
``generation_config.json`` (temperature, top_p, top_k), else OpenAI's (temperature 1,
top_p 1); a chat line without ``max_tokens`` may generate up to the model's context.
"""

from __future__ import annotations

import json
import logging
import posixpath
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

OptStr = Optional[str]  # noqa: UP045 - typer needs Optional here on 3.10
OptInt = Optional[int]  # noqa: UP045
OptFloat = Optional[float]  # noqa: UP045


def run_batch(
    input_file: Annotated[
        str,
        typer.Option(
            "-i", "--input-file", help="The requests: an OpenAI Batch file (path or fsspec URL)."
        ),
    ],
    output_file: Annotated[
        str,
        typer.Option(
            "-o", "--output-file", help="Where every line, result or error, goes (path or URL)."
        ),
    ],
    model: Annotated[str, typer.Option("--model", help="The model: a local directory.")],
    served_model_name: Annotated[
        OptStr,
        typer.Option(
            help="The name requests must give as body.model and responses carry. Default: "
            "the model directory's name (--model as written is accepted too)."
        ),
    ] = None,
    tokenizer: Annotated[OptStr, typer.Option(help="Tokenizer directory.")] = None,
    tensor_parallel_size: Annotated[
        int, typer.Option("--tensor-parallel-size", "-tp", "--tp", help="GPUs per replica.")
    ] = 1,
    replicas: Annotated[int, typer.Option(help="Engine replicas (data parallel).")] = 1,
    max_model_len: Annotated[OptInt, typer.Option(help="Context length in tokens.")] = None,
    dtype: Annotated[str, typer.Option(help="Weights' dtype.")] = "auto",
    max_num_seqs: Annotated[OptInt, typer.Option(help="Requests an engine runs at once.")] = None,
    gpu_memory_utilization: Annotated[
        OptFloat, typer.Option(help="Share of GPU memory an engine may take.")
    ] = None,
    enable_prefix_caching: Annotated[
        Optional[bool],  # noqa: UP045
        typer.Option(
            "--enable-prefix-caching/--no-enable-prefix-caching", help="Reuse shared prefixes."
        ),
    ] = None,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Run the model directory's own code.")
    ] = False,
    enforce_eager: Annotated[
        bool, typer.Option("--enforce-eager", help="No CUDA graphs / compilation.")
    ] = False,
    chat_template: Annotated[
        OptStr, typer.Option(help="A Jinja chat template, or a file holding one.")
    ] = None,
    shard_rows: Annotated[
        int, typer.Option(min=1, help="Request lines per shard: the unit of resume.")
    ] = 1000,
    state_dir: Annotated[
        OptStr,
        typer.Option(help="Where shards, manifests and logs stay. Default: <output>.batchjobs"),
    ] = None,
    set_: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--set", "-s", help="Override a key of the passes' job spec (repeatable)."),
    ] = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Delete the state directory first: redo everything.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Also show Ray's and the engines' output.")
    ] = False,
) -> None:
    """Run an OpenAI Batch file, as vLLM's run-batch does, on batchjobs' shards, resume and
    replicas: every line, result or error, to -o. Rerun after a crash to finish the work."""
    from batchjobs.errors import BatchJobError
    from batchjobs.openai_batch.split import assemble, split_input
    from batchjobs.readers import filesystem

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    state = state_dir or f"{output_file}.batchjobs"
    engine = {
        "model": model,
        "tokenizer": tokenizer,
        "served_model_name": served_model_name,
        "tensor_parallel_size": tensor_parallel_size,
        "max_model_len": max_model_len,
        "dtype": dtype,
        "max_num_seqs": max_num_seqs,
        "gpu_memory_utilization": gpu_memory_utilization,
        "enable_prefix_caching": enable_prefix_caching,
        "trust_remote_code": trust_remote_code,
        "args": {"enforce_eager": True} if enforce_eager else {},
    }
    try:
        if fresh:
            fs, root = filesystem(state)
            if fs.exists(root):
                fs.rm(root, recursive=True)
        split = split_input(input_file, state, shard_rows)
        specs = [
            pass_spec(kind, state, engine, replicas, chat_template, set_ or [])
            for kind in split.passes
        ]
    except BatchJobError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    for i, job in enumerate(specs, start=1):
        what = "chat and completions" if job.task == "generate" else "embeddings"
        engine_kind = "generating" if job.task == "generate" else "pooling (embedding)"
        others = sum(split.lines.values()) - split.lines[job.task]
        typer.echo(
            f"[run-batch] pass {i} of {len(specs)}: {split.lines[job.task]} {what} lines on a "
            f"{engine_kind} engine, {len(split.chunks)} shards"
            + (
                f"; its {others} other lines are error rows here, served by the other pass"
                if others and len(specs) > 1
                else ""
            ),
            err=True,
        )
        _run_pass(job, quiet, verbose)
    try:
        counts = assemble(split, state, output_file)
    except BatchJobError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    typer.echo(
        f"run-batch: {counts['lines']} lines ({counts.get('errors', 0)} errors) written to "
        f"{output_file}; shards, manifests and logs: {state}"
    )


def pass_spec(kind: str, state: str, engine: dict, replicas: int, template, overrides):
    """The job spec of one pass (``generate`` or ``embed``) over the cut input."""
    from batchjobs.openai_batch.split import INPUT_DIR
    from batchjobs.spec import apply_override, parse_spec

    raw: dict[str, Any] = {
        "name": f"run-batch-{kind}",
        "task": kind,
        "input": {"path": posixpath.join(state, INPUT_DIR), "format": "openai_batch"},
        "output": {"path": posixpath.join(state, kind), "format": "parquet"},
        "engine": {k: v for k, v in engine.items() if v is not None},
        "sampling": model_defaults(engine["model"], engine.get("max_model_len")),
        "embed": {"truncate": "error"},  # as vLLM's server: a long input is refused
        "resources": {"replicas": replicas},
    }
    if template is not None:
        raw["chat"] = {"template": template}
    for item in overrides:
        apply_override(raw, item)
    return parse_spec(raw, source=f"run-batch's {kind} pass")


def model_defaults(model: str, max_model_len: int | None) -> dict[str, Any]:
    """The sampling values of fields a line leaves out, as vLLM's server takes them: the
    model's ``generation_config.json``, else OpenAI's defaults; ``max_tokens`` the model's
    context (the task cuts it to the room the prompt leaves)."""
    out: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0}
    root = Path(model).expanduser()
    try:
        cfg = json.loads((root / "generation_config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    for key in ("temperature", "top_p", "top_k"):
        if isinstance(cfg.get(key), (int, float)) and not isinstance(cfg.get(key), bool):
            out[key] = cfg[key]
    context = max_model_len
    if context is None:
        try:
            context = json.loads((root / "config.json").read_text()).get("max_position_embeddings")
        except (OSError, ValueError):
            context = None
    out["max_tokens"] = context if isinstance(context, int) and context > 0 else 4096
    return out


def _run_pass(job, quiet: bool, verbose: bool) -> None:
    """One pass as ``batchjobs run`` runs a job: the live display, the log, the summary."""
    from batchjobs.cli import _print_summary
    from batchjobs.display import watching
    from batchjobs.errors import BatchJobError
    from batchjobs.pipeline import run as run_job

    watch = None
    try:
        with watching(job, quiet=quiet, verbose=verbose) as watch:
            summary = run_job(
                job,
                progress=watch.message,
                on_progress=watch.update,
                progress_every=watch.every_s,
            )
    except BatchJobError as exc:
        typer.echo(f"error: {exc}", err=True)
        if watch is not None:
            typer.echo(f"logs of Ray and the engines: {watch.logs}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: committed shards are kept; rerun to finish the rest", err=True)
        raise typer.Exit(130) from None
    except Exception as exc:
        if watch is None:
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        typer.echo(f"error: {type(exc).__name__}: {first}", err=True)
        typer.echo(f"the traceback is in the log: {watch.logs}", err=True)
        raise typer.Exit(1) from None
    _print_summary(summary)
