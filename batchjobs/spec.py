"""The job spec: a YAML file validated by pydantic before anything starts.

Every model forbids unknown keys, so a typo (``tensor_parallel_sise``) fails at once with
the key's path and a suggestion instead of being ignored. Relative paths in a spec are
resolved against the current working directory (the ``--working-dir`` of
``ray job submit``), not against the spec file.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from batchjobs.engines import ENGINES
from batchjobs.errors import SpecError
from batchjobs.retries import RETRIES, RETRY_WAIT_S
from batchjobs.secrets import lift_section, raw_spec_secrets, redact


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Model):
    path: str = Field(description="File, directory, glob or fsspec URL of the input shards.")
    format: Literal["auto", "parquet", "jsonl", "openai_batch"] = Field(
        default="auto",
        description="auto: by file extension (.parquet/.pq, .jsonl/.ndjson/.json), and "
        "openai_batch where a JSON Lines file's lines carry custom_id and body. openai_batch: "
        "OpenAI Batch API request lines (custom_id, method, url, body); custom_id is the id.",
    )
    prompt_column: str = Field(
        default="prompt",
        description="The text a row sends: the prompt (task generate) or the document "
        "(task embed).",
    )
    messages_column: str = Field(
        default="messages",
        description="task chat: the column holding each row's conversation, a list of "
        "{role, content} (Parquet list<struct>, or a JSON array in JSON Lines).",
    )
    token_ids_column: str | None = Field(
        default=None,
        description="Pre-tokenized input (list<int>) used instead of prompt_column, for "
        "tasks generate and embed: the engine skips tokenization.",
    )
    id_column: str | None = Field(
        default=None, description="Column that identifies a row; default: shard id + row index."
    )
    sampling_columns: dict[str, str] = Field(
        default_factory=dict,
        description="Per-row sampling overrides: sampling parameter -> input column, "
        "e.g. {max_tokens: max_tokens}. A null value keeps the job's setting.",
    )
    adapter_column: str | None = Field(
        default=None,
        description="The column naming each row's LoRA adapter (a name in "
        "engine.lora.adapters; null: the base model). An unknown name makes an error row.",
    )
    schema_column: str | None = Field(
        default=None,
        description="The column with each row's own structured-output constraint, overriding "
        "sampling.structured: a JSON Schema, or one of {json_schema | regex | choice | grammar: "
        "...}, as a JSON object (JSON Lines) or JSON text; null: the job's.",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options (credentials stay out of logs)."
    )
    order: Literal["prefix", "input"] = Field(
        default="prefix",
        description="prefix: sort rows by prompt before batching, so rows that share a "
        "prefix reach the engine together and hit its prefix cache; the sort spans each read "
        "group of shards (prefix_group_mb). input: keep file order. Output rows carry "
        "row_index either way.",
    )
    prefix_group_mb: int = Field(
        default=64,
        ge=0,
        description="With order: prefix, consecutive shards of up to this many MB (as "
        "stored) are read by one task and sorted as one, so rows sharing a prefix meet even "
        "when the input spreads them over shards. The shards of a group finish (and commit) "
        "at about the same time. 0: sort each shard alone.",
    )
    prefix_group_shards: int = Field(
        default=8,
        ge=1,
        description="With order: prefix, at most this many shards in one read group. "
        "Sorting mixes a group's rows, so each shard is written as about this many files, "
        "and a group's shards commit together. 1: sort each shard alone.",
    )

    @model_validator(mode="before")
    @classmethod
    def _openai_batch_id(cls, data: Any) -> Any:
        # An OpenAI Batch file's rows are named by their custom_id.
        if isinstance(data, dict) and data.get("format") == "openai_batch":
            data = {"id_column": "custom_id", **{k: v for k, v in data.items() if v is not None}}
        return data

    @field_validator("sampling_columns")
    @classmethod
    def _known_params(cls, cols: dict[str, str]) -> dict[str, str]:
        # Not the keys that change a job's output columns (n, logprobs, structured).
        allowed = set(SamplingSpec.model_fields) - {"args", *OUTPUT_SHAPING}
        for param in cols:
            if param not in allowed:
                raise ValueError(
                    f"{param!r} is not a sampling parameter (allowed: {', '.join(sorted(allowed))})"
                )
        return cols

    @model_validator(mode="before")
    @classmethod
    def _url_credentials(cls, data: Any) -> Any:
        return lift_section(data, "input")  # s3://KEY:SECRET@... -> storage_options


class OutputSpec(_Model):
    path: str = Field(description="Output root directory or fsspec URL.")
    format: Literal["auto", "parquet", "openai_batch"] = Field(
        default="auto",
        description="parquet: the Parquet shards. openai_batch: also _openai/batch_output.jsonl "
        "and _openai/batch_errors.jsonl in OpenAI's batch output format, assembled from the "
        "committed shards. auto: openai_batch for OpenAI Batch input, else parquet.",
    )
    mode: Literal["resume", "overwrite", "error"] = Field(
        default="resume",
        description="resume: skip committed shards; overwrite: delete the root first; "
        "error: refuse a non-empty root.",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options (credentials stay out of logs)."
    )
    max_error_rate: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Most error rows allowed, as a share of the output's rows (0.01: 1%), over "
        "every committed shard of the output root. Above it the run exits 7 once every row "
        "is written. null: no limit.",
    )
    retries: int = Field(
        default=RETRIES,
        ge=0,
        le=20,
        description="Retries of a write, read or listing of the output root that failed for "
        "a reason that may pass (connection lost, timeout, throttling, a 5xx from the store), "
        "after the storage client's own retries, with waits that double from retry_wait_s "
        "up to 30 s. What retrying cannot fix (access denied, a bucket that does not exist, "
        "a full disk) fails the job at once.",
    )
    retry_wait_s: float = Field(
        default=RETRY_WAIT_S, gt=0, le=60, description="The wait before the first retry."
    )

    @model_validator(mode="before")
    @classmethod
    def _url_credentials(cls, data: Any) -> Any:
        return lift_section(data, "output")  # s3://KEY:SECRET@... -> storage_options


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


class StructuredSpec(_Model):
    """Constrain every row's output (the engine's guided decoding): set one of json_schema,
    regex, choice or grammar. Rows may carry their own in input.schema_column."""

    json_schema: dict[str, Any] | str | None = Field(
        default=None,
        description="A JSON Schema the output is an instance of: inline, or the path of a "
        ".json file holding it. Checked when the spec is validated.",
    )
    regex: str | None = Field(
        default=None, description="A regular expression the whole output matches."
    )
    choice: list[str] | None = Field(
        default=None, description="The output is exactly one of these strings."
    )
    grammar: str | None = Field(
        default=None,
        description="An EBNF grammar (the engine's dialect: GBNF for vLLM and TensorRT-LLM's "
        "xgrammar), or the path of a file holding one.",
    )
    compact: bool = Field(
        default=False,
        description="JSON without whitespace between its tokens (vLLM: "
        "disable_any_whitespace, applied to the whole job): stops a model that loops on "
        "whitespace from running into max_tokens.",
    )

    @field_validator("json_schema", "regex", "choice", "grammar")
    @classmethod
    def _checked(cls, value: Any, info: ValidationInfo) -> Any:
        from batchjobs.structured import checked

        # Loads a file it names; a ValueError names the problem (the key is in its path).
        return None if value is None else checked(info.field_name, value)[info.field_name]

    @model_validator(mode="after")
    def _one_kind(self) -> StructuredSpec:
        from batchjobs.structured import KINDS

        kinds = [k for k in KINDS if getattr(self, k) is not None]
        if len(kinds) > 1:
            raise ValueError(f"set one of {', '.join(KINDS)}, not {' and '.join(kinds)}")
        return self

    def constraint(self) -> dict[str, Any] | None:
        """The job's constraint ``{kind: value}``, or None (rows bring their own)."""
        from batchjobs.structured import KINDS

        return next(({k: getattr(self, k)} for k in KINDS if getattr(self, k) is not None), None)


class SamplingSpec(_Model):
    max_tokens: int = Field(default=256, ge=1, description="Most tokens generated per row.")
    min_tokens: int = Field(default=0, ge=0, description="Fewest tokens generated per row.")
    temperature: float = Field(default=0.0, ge=0, description="0: greedy decoding.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int | None = Field(default=None, ge=1, description="Sample from the k likeliest.")
    seed: int | None = Field(default=None, description="Seed for reproducible sampling.")
    stop: list[str] = Field(
        default_factory=list, description="Strings that end a row's generation."
    )
    ignore_eos: bool = Field(
        default=False, description="Generate max_tokens even past end-of-sequence."
    )
    n: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Samples per row. Above 1 a row's output is the list texts (with "
        "finish_reasons and sample_tokens) instead of text; still one output row per input "
        "row. Needs temperature > 0; set seed to reproduce the samples.",
    )
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=20,
        description="Write each generated token's log-probability and the N likeliest "
        "alternatives per position (column logprobs) and their sum (cumulative_logprob). "
        "0: the chosen tokens only. Grows the output by about 25 bytes × (N + 1) per token.",
    )
    prompt_logprobs: int | None = Field(
        default=None,
        ge=0,
        le=20,
        description="Write each prompt token's log-probability and the N likeliest "
        "alternatives (column prompt_logprobs; null at the first position). Grows the output "
        "by about 25 bytes × (N + 1) per prompt token.",
    )
    structured: StructuredSpec | None = Field(
        default=None,
        description="Structured output: constrain the generated text to a JSON Schema, a "
        "regex, a list of choices or a grammar; writes the column parsed.",
    )
    args: dict[str, Any] = Field(default_factory=dict, description="Extra sampling parameters.")

    @field_validator("args")
    @classmethod
    def _args_name_no_code(cls, args: dict[str, Any]) -> dict[str, Any]:
        from batchjobs.safety import check_args

        return check_args(args)


class ChatSpec(_Model):
    system_prompt: str | None = Field(
        default=None,
        description="A system message put first in every conversation that has none of its own.",
    )
    template: str | None = Field(
        default=None,
        description="A Jinja chat template, or the path of a file holding one, used instead "
        "of the tokenizer's. It renders in a sandbox: it cannot run code or read files.",
    )
    add_generation_prompt: bool = Field(
        default=True, description="End the prompt with the assistant's turn opener."
    )
    template_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra variables for the template, e.g. {enable_thinking: false}.",
    )

    @field_validator("template")
    @classmethod
    def _load_template(cls, value: str | None) -> str | None:
        from batchjobs.tasks.chat import check_template

        if value is None:
            return None
        if "{" not in value:  # not a template: a path to one
            path = Path(value).expanduser()
            try:
                value = path.read_text()
            except OSError as exc:
                raise ValueError(
                    f"{path} is neither a Jinja template nor a readable file "
                    f"({exc.strerror or exc})"
                ) from None
        check_template(value)
        return value


class EmbedSpec(_Model):
    normalize: bool = Field(default=True, description="L2-normalise every vector.")
    truncate: Literal["end", "error"] = Field(
        default="end",
        description="A document longer than the engine's max_model_len: end: cut it to fit "
        "and set truncated; error: make it an error row.",
    )
    dimensions: int | None = Field(
        default=None,
        ge=1,
        description="Matryoshka truncation of the vectors to this many dimensions; only for "
        "models trained for it (their config says so).",
    )


class _ScorerSpec(_Model):
    name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z][A-Za-z0-9_]{0,39}$",
        description="Names the scorer's metrics in the reports and, when the job has several "
        "scorers, prefixes its output columns (name_correct, name_score). Default: its kind.",
    )

    def metric_name(self) -> str:
        return self.name or self.kind  # type: ignore[attr-defined]


class ExactScorer(_ScorerSpec):
    """The output equals the reference."""

    kind: Literal["exact"] = Field(description="The output equals the reference.")
    strip: bool = Field(default=True, description="Ignore whitespace around both.")
    case_sensitive: bool = Field(default=True, description="false: compare case-folded.")


class NormalizedScorer(_ScorerSpec):
    """SQuAD-style exact match: both texts case-folded, with punctuation, the articles
    a/an/the and extra whitespace removed; its score is SQuAD's token F1."""

    kind: Literal["normalized"] = Field(
        description="Exact match after SQuAD's normalisation; score: token F1."
    )


class ContainsScorer(_ScorerSpec):
    """The reference appears somewhere in the output."""

    kind: Literal["contains"] = Field(description="The reference appears in the output.")
    case_sensitive: bool = Field(default=False, description="true: match case too.")


class RegexScorer(_ScorerSpec):
    """Extract an answer from the output with a regular expression (Python ``re``), then
    compare it with the reference; an output the pattern does not match is wrong."""

    kind: Literal["regex"] = Field(description="Extract with a pattern, then compare.")
    pattern: str = Field(
        description="A Python regular expression, e.g. '#### (-?[0-9.,]+)' for a GSM8K-style "
        "final answer. Checked when the spec is validated."
    )
    group: int | str | None = Field(
        default=None,
        description="The group (number or name) that holds the answer. Default: the first "
        "group that matched something (as lm-eval-harness's regex filter does), or the whole "
        "match for a pattern without groups.",
    )
    occurrence: Literal["first", "last"] = Field(
        default="first", description="Which match counts when the pattern matches several times."
    )
    ignore_case: bool = Field(default=False, description="Match the pattern case-insensitively.")
    compare: Literal["exact", "normalized", "numeric"] = Field(
        default="exact",
        description="How the extracted answer is compared with the reference: exact "
        "(whitespace stripped), normalized (as the normalized scorer) or numeric (as numbers, "
        "within abs_tol/rel_tol).",
    )
    extract_reference: bool = Field(
        default=False,
        description="Apply the pattern to the reference too (a reference it does not match "
        "is used as it is).",
    )
    abs_tol: float = Field(default=0.0, ge=0, description="compare: numeric: absolute tolerance.")
    rel_tol: float = Field(default=0.0, ge=0, description="compare: numeric: relative tolerance.")

    @model_validator(mode="after")
    def _compiles(self) -> RegexScorer:
        compiled = self.compiled()  # raises ValueError naming the problem
        if isinstance(self.group, int) and not 0 <= self.group <= compiled.groups:
            raise ValueError(
                f"group {self.group} does not exist: the pattern has {compiled.groups} group(s)"
            )
        if isinstance(self.group, str) and self.group not in compiled.groupindex:
            names = ", ".join(compiled.groupindex) or "none"
            raise ValueError(f"group {self.group!r} is not a named group (named groups: {names})")
        return self

    def compiled(self) -> re.Pattern:
        try:
            return re.compile(self.pattern, re.IGNORECASE if self.ignore_case else 0)
        except re.error as exc:
            raise ValueError(
                f"pattern {self.pattern!r} is not a valid regular expression: {exc}"
            ) from None


class NumericScorer(_ScorerSpec):
    """A number in the output equals the reference's number, within a tolerance."""

    kind: Literal["numeric"] = Field(description="A number in the output equals the reference.")
    occurrence: Literal["first", "last"] = Field(
        default="last", description="Which number of the output is its answer."
    )
    abs_tol: float = Field(default=0.0, ge=0, description="Absolute tolerance.")
    rel_tol: float = Field(default=0.0, ge=0, description="Relative tolerance (of the reference).")


class ChoiceScorer(_ScorerSpec):
    """Multiple choice from generated text: the option letter (or an option's text) the
    output names is the reference's."""

    kind: Literal["choice"] = Field(description="The option the output names is the reference.")
    letters: str = Field(
        default="ABCDEFGHIJKLMNOPQRSTUVWXYZ",
        pattern=r"^[A-Z]{2,26}$",
        description="The option letters, in order (option 0 is the first letter).",
    )


class LoglikelihoodScorer(_ScorerSpec):
    """Multiple choice by log-likelihood, as lm-eval-harness scores MMLU or HellaSwag: the
    engine scores each choice's tokens after the prompt (no generation); the answer is the
    likeliest choice, by summed log-probability (metric <name>) and per character of the
    choice (metric <name>_norm)."""

    kind: Literal["loglikelihood"] = Field(
        description="Score each choice's tokens after the prompt; needs eval.choices_column."
    )
    delimiter: str = Field(default=" ", description="Text put between the prompt and each choice.")


ScorerSpec = Annotated[
    ExactScorer
    | NormalizedScorer
    | ContainsScorer
    | RegexScorer
    | NumericScorer
    | ChoiceScorer
    | LoglikelihoodScorer,
    Field(discriminator="kind"),
]


# The kinds that may be named alone (regex needs its pattern).
ScorerKind = Literal["exact", "normalized", "contains", "numeric", "choice", "loglikelihood"]


class EvalSpec(_Model):
    reference_column: str = Field(
        default="reference",
        description="The column with each row's reference answer: a string, a number, a "
        "list of acceptable strings, or for multiple choice the correct option (0-based "
        "index, letter or option text).",
    )
    # A kind alone (a string) is turned into its scorer by _kind_alone before validation;
    # ScorerKind is in the annotation so that the JSON Schema accepts it too.
    scorers: list[ScorerSpec | ScorerKind] = Field(
        default_factory=list,
        description="How each output is scored (one at least); a kind alone (exact, "
        "normalized, contains, numeric, choice, loglikelihood) takes its defaults.",
    )
    input_task: Literal["auto", "generate", "chat"] = Field(
        default="auto",
        description="How a row becomes a prompt: generate (input.prompt_column or "
        "token_ids_column) or chat (input.messages_column, rendered with the chat "
        "template). auto: chat when the spec sets input.messages_column and not "
        "prompt_column, else generate.",
    )
    choices_column: str | None = Field(
        default=None,
        description="The column with each row's options (a list of strings): needed by "
        "loglikelihood, optional for choice (lets it recognise an option's text).",
    )
    group_by: str | None = Field(
        default=None,
        description="A column to report accuracy per value of (e.g. subject); it is copied "
        "to the output as a string.",
    )

    @field_validator("scorers", mode="before")
    @classmethod
    def _kind_alone(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"kind": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _consistent(self) -> EvalSpec:
        names = [n for s in self.scorers for n in scorer_metrics(s)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(
                f"scorers: metric name(s) {', '.join(dupes)} repeated; give the scorers "
                "distinct names (name: ...)"
            )
        kinds = {s.kind for s in self.scorers}
        if "loglikelihood" in kinds and len(kinds) > 1:
            raise ValueError(
                "scorers: loglikelihood scores the choices without generating text, so it "
                "cannot share a job with text scorers; run them as two eval jobs"
            )
        if "loglikelihood" in kinds and not self.choices_column:
            raise ValueError("scorers: loglikelihood needs eval.choices_column")
        return self

    def loglikelihood(self) -> bool:
        return any(s.kind == "loglikelihood" for s in self.scorers)

    def prompt_task(self, inp: InputSpec) -> str:
        """``generate`` or ``chat``: how a row becomes the prompt (``input_task`` resolved)."""
        if self.input_task != "auto":
            return self.input_task
        chat = "messages_column" in inp.model_fields_set and not (
            "prompt_column" in inp.model_fields_set or inp.token_ids_column
        )
        return "chat" if chat else "generate"


def scorer_metrics(scorer: Any) -> list[str]:
    """The metric names a scorer reports: its name, and for loglikelihood also <name>_norm."""
    name = scorer.metric_name()
    return [name, f"{name}_norm"] if scorer.kind == "loglikelihood" else [name]


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
            _check_eval(self)
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


# Sampling keys that change a job's output columns: job-wide only, not per-row.
OUTPUT_SHAPING = frozenset({"n", "logprobs", "prompt_logprobs", "structured"})

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


def _check_eval(spec: JobSpec) -> None:
    """What an eval job needs beyond its section: scorers, an engine that returns prompt
    log-probabilities for loglikelihood, and output columns that do not clash."""
    from batchjobs.records import RESERVED
    from batchjobs.tasks.eval import eval_columns

    ev = spec.eval
    if not ev.scorers:
        raise ValueError(
            "task eval needs eval.scorers, e.g. [exact] or [{kind: regex, pattern: ...}]"
        )
    if ev.loglikelihood():
        kind = ENGINES[spec.engine.kind]
        if "prompt_logprobs" not in kind.features:
            able = ", ".join(k for k, e in ENGINES.items() if "prompt_logprobs" in e.features)
            raise ValueError(
                f"eval scorer loglikelihood needs an engine that returns prompt "
                f"log-probabilities, and engine.kind {spec.engine.kind!r} does not (use "
                f"engine.kind: {able})"
            )
        if spec.input.token_ids_column:
            raise ValueError(
                "eval scorer loglikelihood reads the prompt as text (input.prompt_column) or "
                "a conversation; remove input.token_ids_column"
            )
        if spec.input.sampling_columns:
            raise ValueError(
                "input.sampling_columns does not apply to eval scorer loglikelihood (it "
                "generates nothing); remove it"
            )
    taken = set(eval_columns(spec, group=False)) | set(RESERVED)
    if ev.group_by and ev.group_by in taken:
        raise ValueError(
            f"eval.group_by {ev.group_by!r} clashes with an output column of the eval job; "
            "rename that column"
        )
    if spec.input.id_column and spec.input.id_column in taken:
        raise ValueError(
            f"id_column {spec.input.id_column!r} clashes with an output column of the eval "
            "job; rename it"
        )


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
