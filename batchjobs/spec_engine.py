"""The job spec's engine sections: the engine and its LoRA adapters, the replicas and their
resources, prices, and the pilot's candidate engines."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator

from batchjobs.engines import ENGINES
from batchjobs.spec_io import _Model


class LoraSpec(_Model):
    adapters: dict[str, str] = Field(
        min_length=1,
        description="LoRA adapters by name: name -> local adapter directory (PEFT format: "
        "adapter_config.json + weights). A row picks one by name in input.adapter_column.",
    )
    max_loras: int | None = Field(
        default=None,
        ge=1,
        description="Adapters the engine serves in one batch. Default: all of them.",
    )
    max_lora_rank: int | None = Field(
        default=None,
        ge=1,
        description="The largest adapter rank the engine reserves for. Default: the largest "
        "rank among the adapters (read from their adapter_config.json).",
    )
    max_cpu_loras: int | None = Field(
        default=None,
        ge=1,
        description="Adapters kept in host memory for swapping in. Default: the engine's.",
    )

    @field_validator("adapters")
    @classmethod
    def _names(cls, adapters: dict[str, str]) -> dict[str, str]:
        for name in adapters:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
                raise ValueError(
                    f"adapter name {name!r}: use letters, digits, '_', '.' and '-' (at most 64)"
                )
        return adapters


class EngineSpec(_Model):
    kind: Literal[tuple(ENGINES)] = Field(  # type: ignore[valid-type]
        default="vllm", description="The inference engine (batchjobs.engines.ENGINES)."
    )
    model: str = Field(
        description="Local model directory (or a hub name where a hub is reachable)."
    )
    tokenizer: str | None = Field(
        default=None, description="Tokenizer directory, if not the model's own."
    )
    served_model_name: str | None = Field(
        default=None,
        description="OpenAI Batch input: the model name a request's body.model must give "
        "(another is an error line) and responses carry. Default: the model directory's name "
        "(engine.model as written is accepted too).",
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        default="auto", description="auto: cuda when the cluster has GPUs, else cpu."
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, description="GPUs per replica that split each layer (one node's)."
    )
    pipeline_parallel_size: int = Field(
        default=1, ge=1, description="Pipeline stages per replica (GPUs = TP × PP, one node)."
    )
    dtype: str = Field(default="auto", description="Weights' dtype: auto, bfloat16, float16 …")
    max_model_len: int | None = Field(
        default=None,
        ge=1,
        description="Longest prompt plus output, in tokens; longer prompts are error rows "
        "(embed: cut or refused, embed.truncate). Default: the model's.",
    )
    max_num_seqs: int | None = Field(
        default=None,
        ge=1,
        description="Requests the engine runs at once. Default: the engine's for offline "
        "use on the device.",
    )
    gpu_memory_utilization: float | None = Field(
        default=None, gt=0, le=1, description="Share of GPU memory the engine may take."
    )
    enable_prefix_caching: bool | None = Field(
        default=None, description="Reuse the KV cache of shared prompt prefixes."
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Let the model directory's own Python code run (off unless set).",
    )
    args: dict[str, Any] = Field(
        default_factory=dict, description="Passed through to the engine's arguments as they are."
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment variables for the engine actors."
    )
    lora: LoraSpec | None = Field(
        default=None,
        description="Serve LoRA adapters on the model; each row names its adapter in "
        "input.adapter_column (null: the base model).",
    )

    @field_validator("args")
    @classmethod
    def _args_name_no_code(cls, args: dict[str, Any]) -> dict[str, Any]:
        from batchjobs.safety import check_args

        return check_args(args)

    @field_validator("env")
    @classmethod
    def _env_loads_no_code(cls, env: dict[str, str]) -> dict[str, str]:
        from batchjobs.safety import check_env

        return check_env(env)


class ResourcesSpec(_Model):
    replicas: int = Field(default=1, ge=1, description="Engine replicas (data parallel).")
    min_replicas: int | None = Field(
        default=None,
        ge=1,
        description="Autoscaling: start with this many replicas and grow to `replicas` as "
        "the cluster frees or adds GPUs. Default: exactly `replicas`.",
    )
    batch_size: int = Field(default=32, ge=1, description="Rows per Ray Data batch.")
    max_inflight_requests: int | None = Field(
        default=None,
        ge=1,
        description="Requests one replica keeps in its engine at once; the rest of the rows "
        "it holds wait in the replica and go in, in order, as requests finish. Default: twice "
        "the engine's own limit (vLLM's max_num_seqs as it resolves it for the device).",
    )
    max_inflight_batches: int | None = Field(
        default=None,
        ge=1,
        description="Batches Ray Data hands one replica at once. A batch goes back only when "
        "its slowest row is done, so a replica must hold many more rows than it keeps in the "
        "engine, or the engine runs dry while batches wait on their longest request. Default: "
        "enough for 4 × max_inflight_requests rows, at most 512 batches. In a job too small "
        "to give every replica that many, each holds at most its share, "
        "ceil(batches / replicas), at a time.",
    )
    num_cpus_per_replica: float = Field(
        default=1.0, ge=0, description="CPUs Ray reserves for each engine replica."
    )
    max_restarts: int = Field(
        default=8,
        ge=0,
        description="Times Ray may restart a dead engine actor (its batch is retried).",
    )
    stall_timeout_s: float = Field(
        default=600.0,
        ge=0,
        description="A replica whose engine holds requests but makes no progress for this "
        "many seconds (finishes no request and, with vLLM, runs no step) is treated as dead: "
        "its engine's processes are killed, Ray restarts the replica (counted in "
        "`max_restarts`) and its rows run again. 0: never.",
    )
    rows_per_file: int = Field(default=1000, ge=1, description="Rows per staged output file.")
    scale_up_timeout_s: int = Field(
        default=900,
        ge=0,
        description="With engine.device: cuda on a cluster joined through RAY_ADDRESS (KubeRay, "
        "`ray up`) that has too few GPUs for the first replicas (e.g. GPU nodes scaled to "
        "zero): ask Ray's autoscaler for them and wait this long for the nodes to join "
        "before refusing the job. 0: refuse at once. A local cluster never waits.",
    )
    start_timeout_s: int = Field(
        default=0,
        ge=0,
        description="With more than one replica: feed none until the first `min_replicas` "
        "(default: all) have started, waiting at most this long. 0 (the default): feed each "
        "replica as soon as it is up; in a small job no replica holds more than its share at "
        "once, so the first one up cannot take it all. Ray Data holds back the reads too "
        "while it waits, so replicas then idle for a few seconds after start-up.",
    )

    @field_validator("min_replicas")
    @classmethod
    def _min_not_above_max(cls, value: int | None, info) -> int | None:
        replicas = info.data.get("replicas")
        if value is not None and replicas is not None and value > replicas:
            raise ValueError(
                f"min_replicas ({value}) is above replicas ({replicas}), the autoscaling maximum"
            )
        return value


class CostSpec(_Model):
    usd_per_gpu_hour: float = Field(
        default=0.0, ge=0, description="Price of one GPU (or one CPU replica) per hour."
    )
    accelerator: str | None = Field(default=None, description="Key into `prices`, e.g. H100.")
    prices: dict[str, float] = Field(
        default_factory=dict, description="$ per GPU-hour by accelerator type."
    )

    def price_per_gpu_hour(self) -> float:
        if self.accelerator and self.accelerator in self.prices:
            return self.prices[self.accelerator]
        return self.usd_per_gpu_hour


class CandidateSpec(EngineSpec):
    """One engine configuration for the pilot: a name plus the `engine` keys it changes.

    Only the keys a candidate sets replace the job's `engine` section (`args` and `env`
    merge into the job's); the result is a complete engine section like any other.
    """

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="Names the candidate in the pilot table and its pilot output directory.",
    )
    model: str | None = Field(default=None, description="Default: the job's engine.model.")
    reference: bool = Field(
        default=False,
        description="The candidate whose outputs the others are compared with (agreement in "
        "the pilot table; pilot.min_agreement). Default: the first candidate.",
    )


class PilotSpec(_Model):
    candidates: list[CandidateSpec] = Field(
        min_length=2,
        description="Engine configurations to compare (`engine: auto`): each is the job's "
        "engine section with these keys replaced. Candidates whose engine package is not "
        "installed are skipped.",
    )
    rows: int = Field(
        default=200,
        ge=1,
        description="Rows of the job's first shards that each candidate runs before the "
        "cheapest ($ per 1M tokens, start-up amortised over the job) runs the job.",
    )
    min_agreement: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Rule out candidates whose outputs agree less with the reference "
        "candidate's on the pilot rows (mean token agreement, 0-1). Default: agreement is "
        "reported, not enforced.",
    )

    @field_validator("candidates")
    @classmethod
    def _unique_names(cls, candidates: list[CandidateSpec]) -> list[CandidateSpec]:
        names = [c.name for c in candidates]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"candidate names must be unique ({', '.join(dupes)} repeated)")
        refs = [c.name for c in candidates if c.reference]
        if len(refs) > 1:
            raise ValueError(f"at most one candidate may be the reference ({', '.join(refs)})")
        return candidates

    def reference(self) -> CandidateSpec:
        """The candidate the others' outputs are compared with: the one marked, else the first."""
        return next((c for c in self.candidates if c.reference), self.candidates[0])
