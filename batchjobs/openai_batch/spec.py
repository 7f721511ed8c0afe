"""What a job on OpenAI Batch files may ask for, and ``input.format: auto`` resolved.

Each line's body carries its own sampling parameters, number of choices, log-probabilities
and response format, so the job-wide keys for them do not apply; the ``sampling`` section
gives the values of the fields a line leaves out.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from batchjobs.spec import JobSpec

ID_COLUMN = "custom_id"


def check_spec(spec: JobSpec) -> None:
    """Raise ValueError naming the key when a job on OpenAI Batch files asks for something
    that does not apply to it."""
    inp, s = spec.input, spec.sampling
    if spec.output.format == "openai_batch" and inp.format not in ("openai_batch", "auto"):
        raise ValueError(
            f"output.format openai_batch needs OpenAI Batch request files as input "
            f"(input.format openai_batch or auto), not input.format {inp.format}"
        )
    if inp.format != "openai_batch":
        return
    if spec.task not in ("generate", "embed"):
        raise ValueError(
            f"task {spec.task}: with input.format openai_batch each line's url says what it "
            "asks for; use task: generate (serves /v1/chat/completions and /v1/completions) "
            "or task: embed (serves /v1/embeddings)"
        )
    if spec.engine.kind != "vllm":
        raise ValueError(
            f"input.format openai_batch runs on engine.kind vllm, not {spec.engine.kind!r}"
        )
    if inp.id_column != ID_COLUMN:
        raise ValueError(
            f"input.id_column {inp.id_column!r}: an OpenAI Batch file's rows are named by "
            f"{ID_COLUMN}; remove input.id_column"
        )
    per_line = {
        "input.sampling_columns": bool(inp.sampling_columns),
        "input.schema_column": bool(inp.schema_column),
        "input.adapter_column": bool(inp.adapter_column),
        "input.token_ids_column": bool(inp.token_ids_column),
        "sampling.n": s.n != 1,
        "sampling.logprobs": s.logprobs is not None,
        "sampling.prompt_logprobs": s.prompt_logprobs is not None,
        "sampling.structured": s.structured is not None,
        "embed.dimensions": spec.embed.dimensions is not None,
    }
    set_keys = [k for k, v in per_line.items() if v]
    if set_keys:
        raise ValueError(
            f"{', '.join(set_keys)}: with input.format openai_batch each line's body sets "
            "these (n, logprobs, top_logprobs, response_format, dimensions); remove "
            f"{'it' if len(set_keys) == 1 else 'them'}"
        )
    if spec.engine.lora is not None:
        raise ValueError("engine.lora: LoRA adapters are not served to OpenAI Batch files yet")
    if spec.pilot is not None:
        raise ValueError("pilot: does not apply to OpenAI Batch input; remove it")


def served_name(spec: JobSpec) -> str:
    """The model name responses carry: ``engine.served_model_name``, else the model
    directory's name."""
    if spec.engine.served_model_name:
        return spec.engine.served_model_name
    return PurePosixPath(spec.engine.model.rstrip("/")).name or spec.engine.model


def accepted_names(spec: JobSpec) -> set[str]:
    """The names a request's ``model`` may give: the served name; without
    ``engine.served_model_name`` also ``engine.model`` as written (what vLLM serves it as)."""
    names = {served_name(spec)}
    if not spec.engine.served_model_name:
        names.add(spec.engine.model)
    return names


def writes_files(spec: JobSpec) -> bool:
    """Whether the job writes the OpenAI batch output files."""
    return spec.input.format == "openai_batch" and spec.output.format in ("auto", "openai_batch")


def is_request_line(obj: object) -> bool:
    return isinstance(obj, dict) and "custom_id" in obj and "body" in obj


def resolve(spec: JobSpec) -> JobSpec:
    """``input.format: auto`` decided: ``openai_batch`` when the input's first JSON Lines
    file's first line is an OpenAI Batch request (``custom_id`` and ``body``), checked as
    such a job is; else the spec as it is. An input that cannot be read here is left to
    the reading (its error names it)."""
    if spec.input.format != "auto":
        return spec
    from batchjobs.errors import SpecError

    if not _looks_like_requests(spec):
        if spec.output.format == "openai_batch":
            raise SpecError(
                "output.format openai_batch: the input is not OpenAI Batch request lines "
                "(custom_id, method, url, body)"
            )
        return spec
    data = spec.model_dump()
    data["input"]["format"] = "openai_batch"
    data["input"]["id_column"] = data["input"]["id_column"] or ID_COLUMN
    from batchjobs.spec import parse_spec

    # Checked again as an OpenAI Batch job; the model paths were checked as the spec was
    # loaded (or are left to the cluster).
    return parse_spec(data, source="the spec (its input is OpenAI Batch requests)", offline=True)


def _looks_like_requests(spec: JobSpec) -> bool:
    import json

    from batchjobs.readers import filesystem, list_shards

    try:
        shards = list_shards(spec.input.path, "auto", spec.input.storage_options)
    except Exception:  # noqa: BLE001 - not readable here: the reading says why
        return False
    first = next((s for s in shards if s.format == "jsonl"), None)
    if first is None:
        return False
    fs, path = filesystem(first.url, spec.input.storage_options)
    try:
        with fs.open(path, "rb", compression="infer") as fh:
            for line in fh:
                if line.strip():
                    return is_request_line(json.loads(line))
    except (OSError, ValueError):
        return False
    return False
