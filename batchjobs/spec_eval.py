"""The job spec's eval section: the scorers (one model per kind) and what an eval job needs
beyond its section."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from batchjobs.engines import ENGINES
from batchjobs.spec_io import _Model

if TYPE_CHECKING:
    from batchjobs.spec import JobSpec
    from batchjobs.spec_io import InputSpec


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


def check_eval(spec: JobSpec) -> None:
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
