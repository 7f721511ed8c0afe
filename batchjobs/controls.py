"""Generation controls: structured output, log-probabilities, several samples, LoRA
adapters per row. What a job asks for, whether its engine and task can give it, checked
when the spec is validated.

Each control is a feature an engine adapter declares in the registry
(``batchjobs.engines.ENGINES[kind].features``); a job that asks its engine for one it
lacks is refused with the key that asks for it and the engines that have it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from batchjobs.engines import ENGINES

if TYPE_CHECKING:  # pragma: no cover
    from batchjobs.spec import JobSpec

# What each feature means, for the messages.
FEATURES = {
    "structured": "structured output (guided decoding)",
    "compact_json": "whitespace-free JSON",
    "logprobs": "the generated tokens' log-probabilities",
    "prompt_logprobs": "the prompt tokens' log-probabilities",
    "n": "several samples per request",
    "lora": "LoRA adapters",
}
BASE = "base"  # the name per-adapter figures give the base model


def asked(spec: JobSpec) -> dict[str, str]:
    """The features a job asks for, each with the spec key that asks for it."""
    s, inp = spec.sampling, spec.input
    out: dict[str, str] = {}
    if s.structured is not None and s.structured.constraint() is not None:
        out["structured"] = "sampling.structured"
    elif inp.schema_column:
        out["structured"] = "input.schema_column"
    if s.structured is not None and s.structured.compact:
        out["compact_json"] = "sampling.structured.compact"
    if s.logprobs is not None:
        out["logprobs"] = "sampling.logprobs"
    if s.prompt_logprobs is not None:
        out["prompt_logprobs"] = "sampling.prompt_logprobs"
    if s.n > 1:
        out["n"] = "sampling.n"
    if spec.engine.lora is not None:
        out["lora"] = "engine.lora"
    elif inp.adapter_column:
        out["lora"] = "input.adapter_column"
    return out


def check_controls(spec: JobSpec, offline: bool = False) -> None:
    """Raise ValueError naming the key when a job's generation controls cannot run:
    an engine without the feature, a task they do not apply to, a LoRA setup that is
    incomplete or whose adapter directories are missing (unless ``offline``)."""
    wanted = asked(spec)
    if not wanted:
        return
    kind = ENGINES[spec.engine.kind]
    for feature, key in wanted.items():
        if feature not in kind.features:
            able = ", ".join(k for k, e in ENGINES.items() if feature in e.features)
            raise ValueError(
                f"{key} asks for {FEATURES[feature]}, which engine.kind {spec.engine.kind!r} "
                f"does not provide (use engine.kind: {able})"
            )
    if spec.task not in ("generate", "chat"):
        raise ValueError(
            f"{', '.join(sorted(wanted.values()))}: only tasks generate and chat take "
            f"generation controls, not task {spec.task}; remove "
            f"{'it' if len(wanted) == 1 else 'them'}"
        )
    s = spec.sampling
    if s.n > 1 and s.temperature == 0:
        raise ValueError(
            f"sampling.n {s.n} with temperature 0: greedy decoding gives one answer (vLLM "
            "refuses it); set sampling.temperature above 0 (and a seed to reproduce them)"
        )
    if (
        s.structured is not None
        and s.structured.constraint() is None
        and not spec.input.schema_column
    ):
        raise ValueError(
            "sampling.structured sets no constraint: set one of json_schema, regex, "
            "choice, grammar (or give each row its own with input.schema_column)"
        )
    _check_lora(spec, offline)
    if spec.pilot is not None and (spec.input.adapter_column or spec.input.schema_column):
        raise ValueError(
            "pilot: the pilot's sample of the input carries the prompt columns only; run a "
            "job with input.adapter_column or input.schema_column without pilot:"
        )
    _check_column_names(spec)


def _check_lora(spec: JobSpec, offline: bool) -> None:
    lora, column = spec.engine.lora, spec.input.adapter_column
    if column and lora is None:
        raise ValueError(
            "input.adapter_column names adapters, but engine.lora lists none; add "
            "engine.lora.adapters: {name: adapter directory}"
        )
    if lora is None:
        return
    if not column:
        raise ValueError(
            "engine.lora: set input.adapter_column, the column that names each row's adapter "
            "(null: the base model)"
        )
    if BASE in lora.adapters:
        raise ValueError(f"engine.lora.adapters: {BASE!r} names the base model; rename it")
    if offline:
        return
    for name, path in lora.adapters.items():
        where = Path(path).expanduser()
        if not (where / "adapter_config.json").is_file():
            what = "is not a directory" if not where.is_dir() else "has no adapter_config.json"
            raise ValueError(
                f"engine.lora.adapters.{name}: {path!r} {what} (relative paths resolve "
                f"against the current directory {Path.cwd()})"
            )
        rank = adapter_rank(where)
        if rank is not None and lora.max_lora_rank is not None and rank > lora.max_lora_rank:
            raise ValueError(
                f"engine.lora.adapters.{name}: rank {rank} is above engine.lora.max_lora_rank "
                f"{lora.max_lora_rank}; raise it or leave it unset"
            )


def _check_column_names(spec: JobSpec) -> None:
    from batchjobs.records import RESERVED
    from batchjobs.tasks.generated import output_fields

    taken = set(output_fields(spec)) | set(RESERVED)
    if spec.input.id_column and spec.input.id_column in taken:
        raise ValueError(
            f"id_column {spec.input.id_column!r} clashes with an output column of this job; "
            "rename it"
        )


def adapter_rank(path: str | Path) -> int | None:
    """The rank ``r`` an adapter directory's ``adapter_config.json`` declares, or None."""
    config = Path(path).expanduser() / "adapter_config.json"
    try:
        rank = json.loads(config.read_text()).get("r")
    except (OSError, ValueError, AttributeError):
        return None
    return rank if isinstance(rank, int) and not isinstance(rank, bool) else None


# The ranks vLLM reserves for (its max_lora_rank takes one of these).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_limits(spec: JobSpec) -> tuple[int, int]:
    """(max_loras, max_lora_rank) for the engine: the spec's, else every adapter at once
    and the largest adapter's rank rounded up to one vLLM reserves for."""
    lora = spec.engine.lora
    assert lora is not None
    max_loras = lora.max_loras or len(lora.adapters)
    rank = lora.max_lora_rank
    if rank is None:
        ranks = [adapter_rank(p) for p in lora.adapters.values()]
        top = max((r for r in ranks if r), default=16)
        rank = next((r for r in VLLM_RANKS if r >= top), top)
    return max_loras, rank
