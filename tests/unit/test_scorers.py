"""The eval scorers against hand-computed cases."""

from __future__ import annotations

import re

import pytest

from batchjobs import scorers as sc

# ---------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    "text, want",
    [
        ("The  Eiffel Tower!", "eiffel tower"),
        ("  an apple, a pear ", "apple pear"),
        ("Théâtre «Café»", "théâtre café"),  # Unicode punctuation goes, accents stay
        ("Rock—roll", "rockroll"),  # removed, not replaced by a space (as SQuAD does "-")
        ("STRASSE", "strasse"),
        ("Straße", "strasse"),  # case-folded, not just lower-cased
        ("１２３", "123"),  # full-width digits (NFKC)
        ("$5+3=8", "538"),  # SQuAD drops ASCII symbols too (string.punctuation)
        ("", ""),
        ("the", ""),
        ("theatre", "theatre"),  # an article only as a whole word
    ],
)
def test_normalize_text(text, want):
    assert sc.normalize_text(text) == want


def test_normalize_equals_squad_on_ascii():
    # SQuAD v1.1's normalize_answer, verbatim.
    import string as _string

    def squad(s):
        def remove_articles(t):
            return re.sub(r"\b(a|an|the)\b", " ", t)

        def white_space_fix(t):
            return " ".join(t.split())

        def remove_punc(t):
            exclude = set(_string.punctuation)
            return "".join(ch for ch in t if ch not in exclude)

        return white_space_fix(remove_articles(remove_punc(s.lower())))

    for s in ["The cat's hat.", "A (big) deal!", "  Rock-and-roll  ", "U.S.A.", "an_apple"]:
        assert sc.normalize_text(s) == squad(s)


def test_token_f1_by_hand():
    # pred tokens: [big, red, dog]; ref: [red, dog, barks]; common 2 -> P=2/3, R=2/3, F1=2/3
    assert sc.token_f1("the big red dog", "Red dog barks.") == pytest.approx(2 / 3)
    assert sc.token_f1("", "") == 1.0
    assert sc.token_f1("something", "") == 0.0
    assert sc.token_f1("cat", "dog") == 0.0
    # repeated tokens count with multiplicity: pred [a1 a1 b], ref [a1 b b]: common {a1:1,b:1}
    assert sc.token_f1("x x y", "x y y") == pytest.approx(2 / 3)


# ---------------------------------------------------------------- exact, normalized, contains


def test_exact():
    assert sc.exact(" Paris\n", "Paris") == sc.Score(True, 1.0)
    assert sc.exact("paris", "Paris") == sc.Score(False, 0.0)
    assert sc.exact("paris", "Paris", case_sensitive=False).correct
    assert not sc.exact(" Paris", "Paris", strip=False).correct
    assert sc.exact("", "").correct  # an empty output matches an empty reference only
    assert not sc.exact("", "Paris").correct
    assert sc.exact(None, "Paris") == sc.WRONG  # an error row
    assert sc.exact("72", 72).correct  # a number reference compares as its text
    assert sc.exact("Lyon", ["Paris", "Lyon"]).correct  # any of several references


def test_normalized_scores_f1_and_takes_the_best_reference():
    s = sc.normalized("The Eiffel tower.", "eiffel Tower")
    assert s.correct and s.score == 1.0
    s = sc.normalized("the big red dog", ["cat", "Red dog barks."])
    assert not s.correct and s.score == pytest.approx(2 / 3)
    s = sc.normalized("Ça va?", "ca va")  # accents are kept: not the same word
    assert not s.correct and s.score == pytest.approx(0.5)
    assert sc.normalized("", "x") == sc.Score(False, 0.0)
    assert sc.normalized(None, "x") == sc.WRONG


def test_contains():
    assert sc.contains("I think it is PARIS, France", "Paris").correct
    assert not sc.contains("I think it is PARIS", "Paris", case_sensitive=True).correct
    assert not sc.contains("anything", "").correct  # an empty reference never counts
    assert not sc.contains("", "Paris").correct
    assert sc.contains("Ünïcödé wins", "ÜNÏCÖDÉ").correct


# ---------------------------------------------------------------- numbers


def test_numbers_in_text():
    assert sc.numbers_in("He paid $1,234.50 for 3 items, -2 left, 1e3 total") == [
        "1,234.50",
        "3",
        "-2",
        "1e3",
    ]
    assert sc.numbers_in("no digits here") == []
    assert sc.numbers_in("x2 and v1.2.3") == []  # digits inside words or versions are not numbers
    assert sc.numbers_in("−5 degrees") == ["−5"]  # the Unicode minus
    assert sc.parse_number("−5") == -5.0
    assert sc.parse_number("1,000") == 1000.0
    assert sc.parse_number("50%") == 50.0
    assert sc.parse_number("$7") == 7.0
    assert sc.parse_number("abc") is None
    assert sc.parse_number("inf") is None


def test_numeric_takes_the_last_number_by_default():
    out = "First 3 apples, then 5 more: 8 in total"
    assert sc.numeric(out, "8") == sc.Score(True, 1.0, "8")
    assert sc.numeric(out, "3", occurrence="first") == sc.Score(True, 1.0, "3")
    assert sc.numeric(out, "3") == sc.Score(False, 0.0, "8")
    assert sc.numeric("72.0", 72).correct  # 72 = 72.0
    assert sc.numeric("The answer is 1,000.", "1000").correct
    assert sc.numeric("no number", "5") == sc.WRONG
    assert sc.numeric("", "5") == sc.WRONG
    assert sc.numeric("#### 18", "Janet sells 16 - 3 - 4 = 9 ... #### 18").correct  # ref's last


def test_numeric_tolerances():
    assert not sc.numeric("3.14", "3.14159").correct
    assert sc.numeric("3.14", "3.14159", abs_tol=0.01).correct
    assert sc.numeric("101", "100", rel_tol=0.01).correct
    assert not sc.numeric("102", "100", rel_tol=0.01).correct


# ---------------------------------------------------------------- regex


GSM = re.compile(r"#### (\-?[0-9\.\,]+)")


def test_regex_extracts_then_compares():
    s = sc.regex("so she has 9 left.\n#### 18", "18", GSM, group=1)
    assert s == sc.Score(True, 1.0, "18")
    # the reference extracted with the same pattern
    s = sc.regex("#### 18", "16 - 3 - 4 = 9 eggs ... #### 18", GSM, 1, extract_reference=True)
    assert s.correct
    # numeric compare: 1,000 = 1000.0
    assert sc.regex("#### 1,000", "1000.0", GSM, 1, compare="numeric").correct
    assert not sc.regex("#### 1,000", "1000.0", GSM, 1).correct  # exact: different text


def test_regex_that_matches_nothing_is_wrong_with_nothing_extracted():
    s = sc.regex("The answer is eighteen.", "18", GSM, 1)
    assert s == sc.Score(False, 0.0, None)
    assert sc.regex("", "18", GSM, 1) == sc.Score(False, 0.0, None)
    assert sc.regex(None, "18", GSM, 1) == sc.WRONG


def test_regex_without_a_group_takes_the_first_group_that_matched():
    # GSM8K's "flexible-extract" in lm-eval-harness: the last match of two alternatives
    flexible = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
    s = sc.regex("5 apples, then 12, so 7", "7", flexible, occurrence="last")
    assert s == sc.Score(True, 1.0, "7")  # group 2 matched; group 1 is empty
    s = sc.regex("costs $1,200 or 3", "$1,200", flexible)
    assert s == sc.Score(True, 1.0, "$1,200")
    whole = re.compile(r"\d+")  # no groups: the whole match
    assert sc.regex("x 42 y", "42", whole).correct


def test_regex_first_or_last_match():
    pat = re.compile(r"answer: (\w+)", re.IGNORECASE)
    out = "Answer: cat ... on reflection, answer: dog"
    assert sc.regex(out, "cat", pat, 1).extracted == "cat"
    assert sc.regex(out, "dog", pat, 1, occurrence="last") == sc.Score(True, 1.0, "dog")
    # named group and normalized compare
    named = re.compile(r"final: (?P<ans>.+)$", re.MULTILINE)
    assert sc.regex("final: The Beatles!", "beatles", named, "ans", compare="normalized").correct


# ---------------------------------------------------------------- multiple choice


def test_choice_index_of_references():
    choices = ["Paris", "Lyon", "Nice", "Lille"]
    assert sc.choice_index(2, choices, sc.string.ascii_uppercase) == 2
    assert sc.choice_index("B", choices, "ABCD") == 1
    assert sc.choice_index("b", choices, "ABCD") == 1
    assert sc.choice_index("Nice", choices, "ABCD") == 2
    assert sc.choice_index("3", choices, "ABCD") == 3  # HellaSwag's string labels
    assert sc.choice_index(4, choices, "ABCD") is None  # out of range
    assert sc.choice_index("E", choices, "ABCDE") is None  # a letter past the choices
    assert sc.choice_index("Marseille", choices, "ABCD") is None
    assert sc.choice_index(True, choices, "ABCD") is None
    # a choice text that looks like an index is read as the text
    assert sc.choice_index("2", ["1", "2", "3"], "ABC") == 1


@pytest.mark.parametrize(
    "output, want",
    [
        ("B", 1),
        ("(C)", 2),
        ("The answer is (D).", 3),
        ("Answer: A", 0),
        ("answer is b", None),  # lower-case letters are not option letters
        ("A. Paris is the capital", 0),
        ("I would say Lyon.", 1),  # an option's text
        ("Certainly B, not A", None),  # two lone letters, no explicit answer: no pick
        ("A good guess: C", None),  # two lone letters (one the article): no pick
        ("My guess: C", 2),
        ("", None),
        ("Probably Lille or Nice", None),  # two options named
    ],
)
def test_extract_choice(output, want):
    assert sc.extract_choice(output, ["Paris", "Lyon", "Nice", "Lille"], "ABCD") == want


def test_extract_choice_prefers_the_longer_option_text():
    choices = ["New York", "New York City", "Boston"]
    assert sc.extract_choice("It is New York City.", choices, "ABC") == 1


def test_choice_scorer():
    choices = ["Paris", "Lyon", "Nice", "Lille"]
    assert sc.choice("The answer is (C)", 2, choices) == sc.Score(True, 1.0, "C")
    assert sc.choice("The answer is (C)", "C", None) == sc.Score(True, 1.0, "C")
    assert sc.choice("Nice, of course", "Nice", choices) == sc.Score(True, 1.0, "C")
    assert sc.choice("B", 2, choices) == sc.Score(False, 0.0, "B")
    assert sc.choice("no idea", 2, choices) == sc.WRONG
    assert sc.choice(None, 2, choices) == sc.WRONG


def test_loglikelihood_pick_raw_and_per_character():
    # raw: -4 (choice 1) is the largest; per char: -6/6=-1.0, -4/1=-4, -9/12=-0.75 -> choice 2
    raw, norm = sc.loglikelihood_pick([-6.0, -4.0, -9.0], ["abcdef", "a", "abcdefghijkl"])
    assert (raw, norm) == (1, 2)
    assert sc.loglikelihood_pick([-1.0, -1.0], ["ab", "cd"]) == (0, 0)  # ties: the first
