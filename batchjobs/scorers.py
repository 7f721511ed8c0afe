"""Scorers of an eval job: compare a model's output with a row's reference.

Each scorer is a pure function of (output, reference[, choices]) that returns a ``Score``:
``correct`` (bool), ``score`` (float: 1.0 or 0.0, except ``normalized``, whose score is
SQuAD's token F1) and what it ``extracted`` from the output (regex, numeric, choice).
The spec names scorers and their options (``spec.ScorerSpec``); nothing from the spec is
run as code: patterns are Python ``re`` expressions, compiled when the spec is validated.

A reference may be a list (several acceptable answers): the row is correct if any of them
is, and its score is the best one. A missing output (an error row) is never correct.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Score:
    correct: bool
    score: float
    extracted: str | None = None


WRONG = Score(False, 0.0)

# ---------------------------------------------------------------- normalisation

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCT = frozenset(string.punctuation)


def normalize_text(text: str) -> str:
    """SQuAD's answer normalisation, for any script: NFKC, case-folded, punctuation
    removed (ASCII ``string.punctuation`` as SQuAD does, and every Unicode punctuation
    character), the English articles a/an/the removed, whitespace collapsed. On ASCII text
    it equals SQuAD's ``normalize_answer``."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(
        " "
        if ch.isspace()
        else ""
        if ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")
        else ch
        for ch in text
    )
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 of two texts after ``normalize_text``."""
    pred, ref = normalize_text(prediction).split(), normalize_text(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------- numbers

# An optional sign (ASCII or the Unicode minus), digits with optional thousands separators,
# an optional fraction and exponent; or a bare fraction (.5).
_NUMBER = re.compile(
    r"(?<![\w.])[-+\u2212]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?(?!\w)"
)


def numbers_in(text: str) -> list[str]:
    """The numbers written in ``text``, as written (``1,234.5``, ``-3``, ``2e-3``)."""
    return _NUMBER.findall(unicodedata.normalize("NFKC", text))


def parse_number(text: str) -> float | None:
    """``text`` as a number (thousands separators, the Unicode minus and a trailing ``%``
    allowed), or None."""
    t = unicodedata.normalize("NFKC", text).strip().replace("\u2212", "-").rstrip("%").strip()
    t = t.lstrip("$€£¥").replace(",", "")
    try:
        value = float(t)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def pick_number(text: str, occurrence: str = "last") -> str | None:
    """The first or last number in ``text``, as written, or None."""
    found = numbers_in(text)
    if not found:
        return None
    return found[0] if occurrence == "first" else found[-1]


def close(a: float, b: float, abs_tol: float = 0.0, rel_tol: float = 0.0) -> bool:
    """``a`` equals the reference ``b`` within ``abs_tol`` or ``rel_tol`` × ``|b|``."""
    return abs(a - b) <= max(abs_tol, rel_tol * abs(b))


def reference_number(reference: Any) -> float | None:
    """A numeric reference: a number, or the last number in its text."""
    if isinstance(reference, bool):
        return None
    if isinstance(reference, (int, float)):
        return float(reference)
    if isinstance(reference, str):
        direct = parse_number(reference)
        if direct is not None:
            return direct
        last = pick_number(reference, "last")
        return parse_number(last) if last is not None else None
    return None


# ---------------------------------------------------------------- the scorers


def _refs(reference: Any) -> list[Any]:
    return list(reference) if isinstance(reference, (list, tuple)) else [reference]


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _best(scores: Sequence[Score]) -> Score:
    return max(scores, key=lambda s: (s.correct, s.score)) if scores else WRONG


def exact(output: str | None, reference: Any, strip: bool = True, case_sensitive: bool = True):
    """The output equals a reference (both stripped of surrounding whitespace by default)."""
    if output is None:
        return WRONG

    def prep(text: str) -> str:
        text = text.strip() if strip else text
        return text if case_sensitive else text.casefold()

    out = prep(output)
    ok = any(out == prep(_as_text(r)) for r in _refs(reference))
    return Score(ok, float(ok))


def normalized(output: str | None, reference: Any) -> Score:
    """SQuAD-style: exact match after ``normalize_text``; the score is the token F1."""
    if output is None:
        return WRONG
    out = normalize_text(output)
    return _best(
        [
            Score(out == normalize_text(_as_text(r)), token_f1(output, _as_text(r)))
            for r in _refs(reference)
        ]
    )


def contains(output: str | None, reference: Any, case_sensitive: bool = False) -> Score:
    """A reference appears in the output (an empty reference never counts)."""
    if output is None:
        return WRONG
    out = output if case_sensitive else output.casefold()
    for r in _refs(reference):
        text = _as_text(r)
        needle = text if case_sensitive else text.casefold()
        if needle.strip() and needle in out:
            return Score(True, 1.0)
    return WRONG


def extract(pattern: re.Pattern, text: str, group: int | str | None, occurrence: str) -> str | None:
    """The ``group`` of the first or last match of ``pattern`` in ``text``, or None. With
    ``group`` None: the first group that matched something (as lm-eval-harness's regex
    filter takes it, for patterns of alternatives such as ``(-?[0-9.,]{2,})|(-?[0-9]+)``),
    or the whole match for a pattern without groups."""
    if occurrence == "last":
        m = None
        for m in pattern.finditer(text):  # noqa: B007 - the last one is wanted
            pass
    else:
        m = pattern.search(text)
    if m is None:
        return None
    if group is None:
        value = next((g for g in m.groups() if g), None) if pattern.groups else m.group(0)
    else:
        value = m.group(group)
    return value.strip() if value is not None else None


def compare_extracted(
    value: str, reference: Any, how: str, abs_tol: float = 0.0, rel_tol: float = 0.0
) -> bool:
    """An extracted answer against one reference: ``exact`` (stripped), ``normalized``
    (``normalize_text``) or ``numeric`` (both parsed as numbers, within the tolerances)."""
    if how == "numeric":
        got, want = parse_number(value), reference_number(reference)
        return got is not None and want is not None and close(got, want, abs_tol, rel_tol)
    ref = _as_text(reference)
    if how == "normalized":
        return normalize_text(value) == normalize_text(ref)
    return value.strip() == ref.strip()


def regex(
    output: str | None,
    reference: Any,
    pattern: re.Pattern,
    group: int | str | None = None,
    occurrence: str = "first",
    compare: str = "exact",
    extract_reference: bool = False,
    abs_tol: float = 0.0,
    rel_tol: float = 0.0,
) -> Score:
    """Extract an answer from the output with ``pattern``, then compare it with the
    reference. With ``extract_reference`` the pattern is applied to the reference too (a
    reference it does not match is used as it is). No match in the output: wrong."""
    if output is None:
        return WRONG
    got = extract(pattern, output, group, occurrence)
    if got is None:
        return WRONG
    for r in _refs(reference):
        ref = r
        if extract_reference and isinstance(r, str):
            ref = extract(pattern, r, group, occurrence) or r
        if compare_extracted(got, ref, compare, abs_tol, rel_tol):
            return Score(True, 1.0, got)
    return Score(False, 0.0, got)


def numeric(
    output: str | None,
    reference: Any,
    occurrence: str = "last",
    abs_tol: float = 0.0,
    rel_tol: float = 0.0,
) -> Score:
    """The first or last number in the output equals the reference's number within the
    tolerances (exactly, by default: ``72`` = ``72.0`` = ``72.00``)."""
    if output is None:
        return WRONG
    got = pick_number(output, occurrence)
    if got is None:
        return WRONG
    value = parse_number(got)
    ok = value is not None and any(
        (want := reference_number(r)) is not None and close(value, want, abs_tol, rel_tol)
        for r in _refs(reference)
    )
    return Score(ok, float(ok), got)


# ---------------------------------------------------------------- multiple choice


def choice_index(reference: Any, choices: Sequence[str] | None, letters: str) -> int | None:
    """A multiple-choice reference as a 0-based index: an integer index; or a string that
    is one of the choices' texts, else one of ``letters`` (``B`` → 1), else the digits of
    an index (``"2"``, as HellaSwag labels). None if it is none of these or out of range."""
    n = len(choices) if choices is not None else len(letters)
    idx: int | None = None
    if isinstance(reference, bool):
        return None
    if isinstance(reference, int):
        idx = reference
    elif isinstance(reference, float) and reference.is_integer():
        idx = int(reference)
    elif isinstance(reference, str):
        text = reference.strip()
        if choices is not None and text in [c.strip() for c in choices]:
            idx = [c.strip() for c in choices].index(text)
        elif len(text) == 1 and text.upper() in letters:
            idx = letters.index(text.upper())
        elif text.isdigit():
            idx = int(text)
    return idx if idx is not None and 0 <= idx < n else None


def _letter_patterns(valid: str) -> list[re.Pattern]:
    cls = f"[{re.escape(valid)}]"
    return [
        # "Answer: B", "the answer is (B)", "answer is B."
        re.compile(rf"(?i:answer)\s*(?:is|:)?\s*[:\-]?\s*\(?({cls})\)?(?![A-Za-z])"),
        # the whole output is one letter, perhaps in brackets or with a period
        re.compile(rf"^\W*({cls})\W*$"),
        # "(B)"
        re.compile(rf"\(({cls})\)"),
        # "B." / "B)" / "B:" at the start
        re.compile(rf"^\s*({cls})[.):]"),
    ]


def extract_choice(output: str, choices: Sequence[str] | None, letters: str) -> int | None:
    """The option an output picks, as an index, or None when it picks none or several.

    In order: an explicit answer letter (``Answer: B``, ``the answer is (B)``, a lone
    ``B``, ``(B)``, ``B.`` first); else the one option whose text the output contains
    (after ``normalize_text``; the longest when one contains another); else the one
    letter that stands alone as a word."""
    n = len(choices) if choices is not None else len(letters)
    valid = letters[:n]
    for pattern in _letter_patterns(valid):
        m = pattern.search(output)
        if m:
            return valid.index(m.group(1))
    if choices:
        out = f" {normalize_text(output)} "
        hits = [
            i
            for i, c in enumerate(choices)
            if normalize_text(c) and f" {normalize_text(c)} " in out
        ]
        # "New York City" also contains "New York": keep the hits no other hit contains.
        hits = [
            i
            for i in hits
            if not any(
                j != i and normalize_text(choices[i]) in normalize_text(choices[j]) for j in hits
            )
        ]
        if len(hits) == 1:
            return hits[0]
    alone = {
        m.group(1) for m in re.finditer(rf"(?<![A-Za-z])([{re.escape(valid)}])(?![A-Za-z])", output)
    }
    if len(alone) == 1:
        return valid.index(alone.pop())
    return None


def choice(
    output: str | None,
    reference: Any,
    choices: Sequence[str] | None = None,
    letters: str = string.ascii_uppercase,
) -> Score:
    """The option the output picks (a letter, or an option's text) is the reference's."""
    if output is None:
        return WRONG
    want = choice_index(reference, choices, letters)
    got = extract_choice(output, choices, letters)
    if got is None:
        return WRONG
    ok = want is not None and got == want
    return Score(ok, float(ok), letters[got])


# ---------------------------------------------------------------- log-likelihood


def loglikelihood_pick(logprobs: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """The most likely choice by summed log-probability, and by log-probability per
    character of the choice's text (lm-eval-harness's ``acc`` and ``acc_norm``); ties go to
    the first."""
    raw = max(range(len(logprobs)), key=lambda i: (logprobs[i], -i))
    per_char = [lp / max(len(c), 1) for lp, c in zip(logprobs, choices)]
    norm = max(range(len(per_char)), key=lambda i: (per_char[i], -i))
    return raw, norm
