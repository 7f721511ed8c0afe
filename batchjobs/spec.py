"""The job spec: a YAML file validated by pydantic before anything starts.

Every model forbids unknown keys, so a typo (``tensor_parallel_sise``) fails at once with
the key's path and a suggestion instead of being ignored. Relative paths in a spec are
resolved against the current working directory (the ``--working-dir`` of
``ray job submit``), not against the spec file.

The sections' models live in ``spec_io`` (input, output), ``spec_tasks`` (sampling, chat,
embed), ``spec_eval`` (eval and its scorers) and ``spec_engine`` (engine, resources, cost,
pilot); every one is importable from here.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from batchjobs.engines import ENGINES
from batchjobs.errors import SpecError
from batchjobs.secrets import raw_spec_secrets, redact
from batchjobs.spec_engine import CandidateSpec as CandidateSpec
from batchjobs.spec_engine import CostSpec as CostSpec
from batchjobs.spec_engine import EngineSpec as EngineSpec
from batchjobs.spec_engine import LoraSpec as LoraSpec
from batchjobs.spec_engine import PilotSpec as PilotSpec
from batchjobs.spec_engine import ResourcesSpec as ResourcesSpec
from batchjobs.spec_eval import ChoiceScorer as ChoiceScorer
from batchjobs.spec_eval import ContainsScorer as ContainsScorer
from batchjobs.spec_eval import EvalSpec as EvalSpec
from batchjobs.spec_eval import ExactScorer as ExactScorer
from batchjobs.spec_eval import LoglikelihoodScorer as LoglikelihoodScorer
from batchjobs.spec_eval import NormalizedScorer as NormalizedScorer
from batchjobs.spec_eval import NumericScorer as NumericScorer
from batchjobs.spec_eval import RegexScorer as RegexScorer
from batchjobs.spec_eval import ScorerKind as ScorerKind
from batchjobs.spec_eval import ScorerSpec as ScorerSpec
from batchjobs.spec_eval import check_eval
from batchjobs.spec_eval import scorer_metrics as scorer_metrics
from batchjobs.spec_io import InputSpec as InputSpec
from batchjobs.spec_io import OutputSpec as OutputSpec
from batchjobs.spec_io import _Model
from batchjobs.spec_tasks import OUTPUT_SHAPING as OUTPUT_SHAPING
from batchjobs.spec_tasks import ChatSpec as ChatSpec
from batchjobs.spec_tasks import EmbedSpec as EmbedSpec
from batchjobs.spec_tasks import SamplingSpec as SamplingSpec
from batchjobs.spec_tasks import StructuredSpec as StructuredSpec


class JobSpec(_Model):
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$",
        description="The job's name, in logs and records.",
    )
    task: Literal["generate", "chat", "embed", "eval"] = Field(
        default="generate",
        description="generate: text from a prompt; chat: a reply to a conversation; embed: "
        "one vector per document; eval: a prompt or conversation per row, scored against a "
        "reference (section eval).",
    )
    input: InputSpec = Field(description="Where the rows come from and which columns to read.")
    output: OutputSpec = Field(description="Where the results go.")
    engine: EngineSpec = Field(description="The inference engine and its model.")
    sampling: SamplingSpec = Field(
        default_factory=SamplingSpec, description="Tasks generate and chat."
    )
    chat: ChatSpec = Field(default_factory=ChatSpec, description="Task chat.")
    embed: EmbedSpec = Field(default_factory=EmbedSpec, description="Task embed.")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Task eval.")
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, description="Replicas, batching and retries."
    )
    cost: CostSpec = Field(default_factory=CostSpec, description="Prices, for $ per token.")
    pilot: PilotSpec | None = Field(
        default=None,
        description="Choose the engine by measured cost: run the first rows with each "
        "candidate, then the job with the cheapest. Absent: run `engine` as it is.",
    )

    @field_validator("input")
    @classmethod
    def _id_not_reserved(cls, inp: InputSpec) -> InputSpec:
        from batchjobs.records import RESERVED

        if inp.id_column in RESERVED:
            raise ValueError(
                f"id_column {inp.id_column!r} clashes with an output column; rename it"
            )
        return inp

    @field_validator("engine")
    @classmethod
    def _model_exists(cls, engine: EngineSpec, info: ValidationInfo) -> EngineSpec:
        if not _offline(info):
            _check_model_paths(engine, "")
        return engine

    @field_validator("pilot")
    @classmethod
    def _candidate_models_exist(
        cls, pilot: PilotSpec | None, info: ValidationInfo
    ) -> PilotSpec | None:
        for i, cand in enumerate(pilot.candidates if pilot and not _offline(info) else []):
            _check_model_paths(cand, f"candidates[{i}].")
        return pilot

    @model_validator(mode="after")
    def _task_fits(self, info: ValidationInfo) -> JobSpec:
        from batchjobs.tasks import TASKS

        kind = ENGINES[self.engine.kind]
        call = TASKS[self.task].call
        if call not in kind.calls:
            raise ValueError(
                f"task {self.task!r} needs an engine that can {call}, and engine.kind "
                f"{self.engine.kind!r} cannot (use engine.kind: "
                f"{', '.join(k for k, e in ENGINES.items() if call in e.calls)})"
            )
        if self.task == "eval":
            check_eval(self)
        if self.input.format == "openai_batch" or self.output.format == "openai_batch":
            from batchjobs.openai_batch.spec import check_spec

            check_spec(self)
        if self.prompt_task() == "chat" and self.input.token_ids_column:
            raise ValueError(
                "input.token_ids_column does not apply to task chat (its prompt is rendered "
                "from input.messages_column); remove it"
            )
        if self.task == "embed" and self.input.sampling_columns:
            raise ValueError("input.sampling_columns does not apply to task embed; remove it")
        if self.prompt_task() == "chat" and self.chat.template is None:
            from batchjobs.tasks.chat import has_chat_template

            where = self.engine.tokenizer or self.engine.model
            if has_chat_template(where) is False:
                raise ValueError(
                    f"task chat: the tokenizer in {where} has no chat template; set "
                    "chat.template (a Jinja template or a file holding one)"
                )
        if self.task == "embed" and self.embed.dimensions is not None:
            _check_matryoshka(self.engine.model, self.embed.dimensions)
        from batchjobs.controls import check_controls

        check_controls(self, offline=_offline(info))
        return self

    def gpus_per_replica(self) -> int:
        return self.engine.tensor_parallel_size * self.engine.pipeline_parallel_size

    def prompt_task(self) -> str:
        """How a row becomes a prompt: the task itself, or for eval ``eval.input_task``
        resolved (``generate`` or ``chat``)."""
        return self.eval.prompt_task(self.input) if self.task == "eval" else self.task

    def fingerprint(self) -> str:
        """A short hash of everything that changes results: a different one must not mix outputs."""
        engine = self.engine.model_dump(
            include={"kind", "model", "tokenizer", "dtype", "max_model_len", "trust_remote_code"}
        )
        engine["args"] = {
            k: v for k, v in self.engine.args.items() if k not in PERF_ONLY_ENGINE_ARGS
        }
        payload: dict[str, Any] = {
            "task": self.task,
            "prompt_column": self.input.prompt_column,
            "sampling_columns": self.input.sampling_columns,
            "id_column": self.input.id_column,
            "engine": engine,
            # The generation controls join only where set (fingerprints of jobs without
            # them stay what they were before the controls existed).
            "sampling": self.sampling.model_dump(exclude_defaults=True, include=OUTPUT_SHAPING)
            | self.sampling.model_dump(exclude=OUTPUT_SHAPING),
        }
        if self.engine.lora is not None:
            engine["lora"] = self.engine.lora.adapters  # the rest: memory, not tokens
        for key in ("adapter_column", "schema_column"):
            if getattr(self.input, key):
                payload[key] = getattr(self.input, key)
        # Keys that only some tasks read join the hash only where set, so a generate job's
        # fingerprint stays what it was before chat and embed existed.
        if self.input.token_ids_column:
            payload["token_ids_column"] = self.input.token_ids_column
        if self.input.format == "openai_batch":  # each line's body decides its request
            payload["input_format"] = "openai_batch"
            engine["served_model_name"] = self.engine.served_model_name
        if self.prompt_task() == "chat":
            payload["messages_column"] = self.input.messages_column
            payload["chat"] = self.chat.model_dump()
        if self.task == "embed":
            payload["embed"] = self.embed.model_dump()
            payload.pop("sampling")
        if self.task == "eval":
            payload["eval"] = {**self.eval.model_dump(), "input_task": self.prompt_task()}
            if self.eval.loglikelihood():
                payload.pop("sampling")  # no text is generated
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def redacted(self) -> dict[str, Any]:
        """The spec as a dict with storage options and engine env (credentials) hidden."""
        data = self.model_dump()
        for section in ("input", "output"):
            data[section]["storage_options"] = {k: "***" for k in data[section]["storage_options"]}
        data["engine"]["env"] = {k: "***" for k in data["engine"]["env"]}
        for cand in (data.get("pilot") or {}).get("candidates", []):
            cand["env"] = {k: "***" for k in cand["env"]}
        return data


# Engine arguments that change speed or memory but not the tokens produced.
PERF_ONLY_ENGINE_ARGS = frozenset(
    {
        "enforce_eager",
        "max_num_batched_tokens",
        "enable_chunked_prefill",
        "block_size",
        "swap_space",
        "disable_log_stats",
        "kv_cache_memory_bytes",
        "distributed_executor_backend",
        "compilation_config",
    }
)


def _may_be_hub_name(value: str) -> bool:
    """``org/name`` may be a hub id (resolved by the engine), unless the hub is off."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        return False
    return "://" in value or (value.count("/") == 1 and not value.startswith((".", "/", "~")))


def load_spec(
    path: str | Path, overrides: list[str] | None = None, offline: bool = False
) -> JobSpec:
    """Read, override (``key.sub=value``) and validate a job spec, or raise ``SpecError``.
    ``offline``: for a spec that runs elsewhere, do not look for its model paths here."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"cannot read job spec {path}: {exc.strerror or exc}") from None
    from batchjobs.safety import load_yaml

    raw = load_yaml(text, str(path))  # data only: a tag that builds objects is refused
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a job spec is a YAML mapping (name:, input:, output:, engine:)")
    for item in overrides or []:
        apply_override(raw, item)
    return parse_spec(raw, source=str(path), offline=offline)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in a raw spec dict; the value is parsed as YAML (``8``, ``true``, ``[a]``)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise SpecError(f"--set {item!r}: expected KEY=VALUE, e.g. --set resources.replicas=2")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SpecError(f"--set {item!r}: {part} is not a section")
    from batchjobs.safety import load_yaml

    node[parts[-1]] = load_yaml(value, f"--set {item!r}: value", lines=False)


def parse_spec(raw: dict[str, Any], source: str = "spec", offline: bool = False) -> JobSpec:
    try:
        return JobSpec.model_validate(raw, context={"offline": offline})
    except ValidationError as exc:
        lines = [_describe(err) for err in exc.errors()]
        text = f"{source} is not a valid job spec:\n" + "\n".join(f"  - {line}" for line in lines)
        raise SpecError(redact(text, raw_spec_secrets(raw))) from None


def _describe(err: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    where = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc).lstrip(".")
    where = where or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        choices = sorted(parent.model_fields) if parent else []
        hint = difflib.get_close_matches(loc[-1], choices, n=1)
        fix = f"did you mean {hint[0]!r}?" if hint else f"allowed keys: {', '.join(choices)}"
        return f"{where}: unknown key ({fix})"
    if kind == "missing":
        return f"{where}: required key is missing"
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    return f"{where}: {err['msg'][:1].lower()}{err['msg'][1:]}{shown}"


def _model_at(loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = JobSpec
    for part in loc:
        if part.isdigit():  # a list index: the item is the list's model
            continue
        field = model.model_fields.get(part)
        ann = _section_model(getattr(field, "annotation", None))
        if ann is None:
            return None
        model = ann
    return model


def _section_model(ann: Any) -> type[BaseModel] | None:
    """The model of a section annotated ``Model``, ``Model | None`` or ``list[Model]``."""
    for arg in (ann, *typing.get_args(ann)):
        if typing.get_origin(arg) is None and isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _check_matryoshka(model: str, dimensions: int) -> None:
    """``embed.dimensions`` only for a model whose config says it was trained for it."""
    config = Path(model).expanduser() / "config.json"
    if not config.is_file():
        return  # a hub name: the engine checks it when it starts
    try:
        cfg = json.loads(config.read_text())
    except ValueError:
        return
    dims = cfg.get("matryoshka_dimensions")
    if not (cfg.get("is_matryoshka") or dims):
        raise ValueError(
            f"embed.dimensions: the model in {model} does not support Matryoshka dimensions "
            "(its config.json sets neither is_matryoshka nor matryoshka_dimensions); remove it"
        )
    if dims and dimensions not in dims:
        raise ValueError(f"embed.dimensions {dimensions} is not one the model supports ({dims})")


def _offline(info: ValidationInfo) -> bool:
    return bool((info.context or {}).get("offline"))


def _check_model_paths(engine: Any, where: str) -> None:
    """Refuse a model or tokenizer that is neither a local path nor a hub name."""
    for key in ("model", "tokenizer"):
        value = getattr(engine, key)
        if value and not Path(value).expanduser().exists() and not _may_be_hub_name(value):
            raise ValueError(
                f"{where}{key} {value!r} does not exist (relative paths resolve against the "
                f"current directory {Path.cwd()})"
            )
