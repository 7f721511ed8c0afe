"""The job spec's input and output sections, and the base of every spec model: unknown
keys are refused and a validated spec is frozen."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from batchjobs.retries import RETRIES, RETRY_WAIT_S
from batchjobs.secrets import lift_section


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
        "A group's shards finish (and commit) together, so more shards per group means "
        "more work lost to a crash. 1: sort each shard alone.",
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
        from batchjobs.spec_tasks import OUTPUT_SHAPING, SamplingSpec

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
    compact_mb: int = Field(
        default=16,
        ge=0,
        description="A shard whose staged files total at most this many MB is committed as "
        "one file, its rows in input order (rows reach the writer interleaved with other "
        "shards' rows, so a shard is staged as many small files). Larger shards keep their "
        "files of up to resources.rows_per_file rows. 0: never.",
    )

    @model_validator(mode="before")
    @classmethod
    def _url_credentials(cls, data: Any) -> Any:
        return lift_section(data, "output")  # s3://KEY:SECRET@... -> storage_options
