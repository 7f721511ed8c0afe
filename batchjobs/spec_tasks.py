"""The job spec's sections for what a row asks of the engine: sampling (with structured
output) for generate and chat, the chat template, and embedding."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from batchjobs.spec_io import _Model


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


# Sampling keys that change a job's output columns: job-wide only, not per-row.
OUTPUT_SHAPING = frozenset({"n", "logprobs", "prompt_logprobs", "structured"})
