"""task: eval without an engine: the spec's eval section, what an eval row reads and
refuses, rows through a replica on fake engines (text scorers, loglikelihood), the manifest's
per-shard metrics, ``_eval.json`` and ``batchjobs compare``. The scorers themselves are in
test_scorers.py."""

from __future__ import annotations

import functools
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_text import cli_text
from typer.testing import CliRunner

from batchjobs import evalreport
from batchjobs.engines.base import Engine, Request, Result
from batchjobs.errors import InputError, OutputError, SpecError
from batchjobs.layout import EVAL_JSON, MANIFEST
from batchjobs.readers import list_shards, preflight, read_shard
from batchjobs.tasks import task_for
from batchjobs.tasks.loglikelihood import lm_eval_pair

transformers = pytest.importorskip("transformers")
runner = CliRunner()


@pytest.fixture(autouse=True)
def _offline(offline):
    pass


@pytest.fixture
def eval_spec(task_spec):
    """eval_spec(eval={...}, **sections) -> a JobSpec of task eval on the tiny tokenizer,
    reading tmp_path/in/*.jsonl."""
    return functools.partial(task_spec, "eval")


# --------------------------------------------------------------------------- the spec


def test_scorers_by_kind_alone_or_with_options(eval_spec):
    spec = eval_spec(
        eval={
            "scorers": ["exact", {"kind": "regex", "name": "gsm", "pattern": r"#### (\d+)"}],
            "reference_column": "answer",
        }
    )
    kinds = [(s.kind, s.metric_name()) for s in spec.eval.scorers]
    assert kinds == [("exact", "exact"), ("regex", "gsm")]
    assert spec.eval.scorers[1].group is None  # the first group that matched
    assert task_for(spec).input_columns().fields == {"prompt": "prompt", "reference": "answer"}


@pytest.mark.parametrize(
    "scorer, message",
    [
        ({"kind": "regex", "pattern": "(unclosed"}, "is not a valid regular expression"),
        ({"kind": "regex", "pattern": r"(\d+)", "group": 2}, "the pattern has 1 group(s)"),
        ({"kind": "regex", "pattern": r"(?P<n>\d+)", "group": "x"}, "is not a named group"),
        ({"kind": "regexp"}, "eval.scorers[0]"),
        ({"kind": "numeric", "abs_tol": -1}, "greater than or equal to 0"),
        ({"kind": "choice", "letters": "abc"}, "letters"),
        ({"kind": "exact", "name": "has space"}, "name"),
    ],
)
def test_bad_scorers_are_refused_at_validation(eval_spec, scorer, message):
    with pytest.raises(SpecError) as err:
        eval_spec(eval={"scorers": [scorer]})
    assert message in str(err.value)
    assert "eval.scorers[0]" in str(err.value)


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"eval": {}}, "task eval needs eval.scorers"),
        ({"eval": {"scorers": ["loglikelihood"]}}, "loglikelihood needs eval.choices_column"),
        (
            {"eval": {"scorers": ["exact", "loglikelihood"], "choices_column": "c"}},
            "cannot share a job with text scorers",
        ),
        ({"eval": {"scorers": ["exact", "exact"]}}, "metric name(s) exact repeated"),
        (
            {"eval": {"scorers": [{"kind": "exact", "name": "ll_norm"}, {"kind": "exact"}]}},
            None,  # names that merely look like another's metric are fine
        ),
        (
            {
                "eval": {"scorers": ["loglikelihood"], "choices_column": "c"},
                "engine": {"kind": "trtllm"},
            },
            "needs an engine that returns prompt log-probabilities",
        ),
        (
            {
                "eval": {"scorers": ["loglikelihood"], "choices_column": "c"},
                "input": {"token_ids_column": "ids"},
            },
            "remove input.token_ids_column",
        ),
        ({"eval": {"scorers": ["exact"], "group_by": "correct"}}, "eval.group_by 'correct'"),
        (
            {"eval": {"scorers": ["exact"]}, "sampling": {"n": 2, "temperature": 1.0}},
            "only tasks generate and chat take generation controls",
        ),
        ({"eval": {"scorers": ["exact"]}, "input": {"id_column": "reference"}}, "clashes"),
    ],
)
def test_eval_spec_checks(eval_spec, sections, message):
    if message is None:
        eval_spec(**sections)
        return
    with pytest.raises(SpecError) as err:
        eval_spec(**sections)
    assert message in str(err.value)


def test_input_task_auto_follows_the_columns_the_spec_names(eval_spec):
    ev = {"scorers": ["exact"]}
    assert eval_spec(eval=ev).prompt_task() == "generate"
    chat = eval_spec(eval=ev, input={"messages_column": "conv"})
    assert chat.prompt_task() == "chat"
    assert task_for(chat).input_columns().fields["messages"] == "conv"
    both = eval_spec(eval=ev, input={"messages_column": "conv", "prompt_column": "q"})
    assert both.prompt_task() == "generate"
    assert eval_spec(eval={**ev, "input_task": "chat"}).prompt_task() == "chat"


def test_fingerprint_covers_the_eval_section(eval_spec, make_spec, tiny_tokenizer_dir):
    base = eval_spec(eval={"scorers": ["exact"]})
    generate = make_spec(engine={"model": str(tiny_tokenizer_dir)})
    assert base.fingerprint() != generate.fingerprint()
    other = eval_spec(eval={"scorers": [{"kind": "exact", "case_sensitive": False}]})
    assert other.fingerprint() != base.fingerprint()
    ll = {"scorers": ["loglikelihood"], "choices_column": "c"}
    # loglikelihood generates nothing: sampling does not change its results
    assert (
        eval_spec(eval=ll).fingerprint()
        == eval_spec(eval=ll, sampling={"max_tokens": 3}).fingerprint()
    )


# --------------------------------------------------------------------------- reading rows


def test_rows_without_a_usable_reference_are_error_rows(tmp_path, write_jsonl, eval_spec):
    rows = [
        {"q": "a", "ref": "A", "opts": ["p", "q"]},
        {"q": "b", "ref": None, "opts": ["p", "q"]},
        {"q": "c", "opts": ["p", "q"]},
        {"q": "d", "ref": "E", "opts": ["p", "q"]},
        {"q": "e", "ref": 1, "opts": "p or q"},
        {"q": "f", "ref": {"a": 1}, "opts": ["p", "q"]},
        {"q": "g", "ref": "q", "opts": ["p", "q"]},
    ]
    path = write_jsonl(tmp_path / "in" / "0.jsonl", rows)
    spec = eval_spec(
        input={"prompt_column": "q"},
        eval={"scorers": ["choice"], "reference_column": "ref", "choices_column": "opts"},
    )
    (shard,) = list_shards(str(path))
    out = [r for b in read_shard(shard, task_for(spec).input_columns()) for r in b.to_pylist()]
    errors = [r["input_error"] for r in out]
    where = f"{shard.url} line"
    assert errors[0] is None and errors[6] is None
    assert errors[1] == f"{where} 2: 'ref' is null (every eval row needs a reference)"
    assert errors[2] == f"{where} 3: no column 'ref'"
    assert errors[3] == (
        f"{where} 4: 'ref' is 'E', not one of the 2 options (a 0-based index, a letter or an "
        "option's text)"
    )
    assert errors[4] == f"{where} 5: 'opts' is not a list of strings"
    assert (
        errors[5] == f"{where} 6: 'ref' is dict, expected a string, a number or a list of strings"
    )


def test_preflight_refuses_a_reference_column_of_another_type(tmp_path, eval_spec):
    (tmp_path / "in").mkdir()
    pq.write_table(
        pa.table({"prompt": ["a"], "reference": pa.array([{"x": 1}])}), tmp_path / "in" / "0.pq"
    )
    spec = eval_spec(input={"path": str(tmp_path / "in")}, eval={"scorers": ["exact"]})
    (shard,) = list_shards(str(tmp_path / "in"))
    with pytest.raises(InputError, match="expected string, number or list<string>"):
        preflight(shard, task_for(spec).input_columns())


def test_preflight_refuses_a_group_column_that_is_not_a_plain_value(tmp_path, eval_spec):
    import datetime

    (tmp_path / "in").mkdir()
    when = pa.array([datetime.datetime(2026, 1, 1)])
    pq.write_table(
        pa.table({"prompt": ["a"], "reference": ["x"], "day": when}), tmp_path / "in" / "0.pq"
    )
    spec = eval_spec(
        input={"path": str(tmp_path / "in")}, eval={"scorers": ["exact"], "group_by": "day"}
    )
    (shard,) = list_shards(str(tmp_path / "in"))
    with pytest.raises(InputError, match="column 'day' has type timestamp.*expected string"):
        preflight(shard, task_for(spec).input_columns())


# --------------------------------------------------------------------------- fake engines


class AnswerEngine(Engine):
    """Answers a prompt from a table of answers (``finish_reason`` stop), else fails."""

    kind = "fake"

    def __init__(self, answers: dict[str, str]):
        self.answers = answers

    async def generate(self, request: Request) -> Result:
        if request.prompt not in self.answers:
            return Result.failed("rejected by engine: no answer", prompt_tokens=1)
        text = self.answers[request.prompt]
        return Result.finished(text, 3, "stop", {"stop": "stop"}, 4, 0.01)

    def close(self) -> None:
        pass


class LogprobEngine(Engine):
    """Prompt log-probabilities that depend on the token and its position:
    ``-(token_id % 13) / 10 - position / 1000``; ``fail`` lists prompts to reject."""

    kind = "fake"

    def __init__(self, fail: tuple = (), give: bool = True):
        self.requests: list[Request] = []
        self.fail, self.give = fail, give

    async def generate(self, request: Request) -> Result:
        self.requests.append(request)
        ids = list(request.token_ids)
        if tuple(ids) in self.fail:
            return Result.failed("rejected by engine: too long", prompt_tokens=len(ids))
        r = Result.finished("x", 1, "length", {"length": "length"}, len(ids), 0.01)
        if request.prompt_logprobs is not None and self.give:
            r.prompt_logprobs = [None] + [lp(t, p) for p, t in enumerate(ids) if p > 0]
        return r

    def close(self) -> None:
        pass


def lp(token: int, position: int) -> float:
    return -(token % 13) / 10 - position / 1000


def _through_replica(spec, engine, batch_rows: int = 3):
    from batchjobs.actor import EngineReplica

    replica = EngineReplica(spec, lambda _: engine, None)
    cols = task_for(spec).input_columns()
    try:
        outs = [
            replica(b)
            for shard in list_shards(spec.input.path)
            for b in read_shard(shard, cols, batch_rows)
        ]
    finally:
        replica.close()
    return pa.concat_tables(outs)


QA = [
    {"id": "q1", "prompt": "2+2?", "answer": "4", "subject": "math"},
    {"id": "q2", "prompt": "capital of France?", "answer": "Paris", "subject": "geo"},
    {"id": "q3", "prompt": "7*6?", "answer": "42", "subject": "math"},
    {"id": "q4", "prompt": "river in Egypt?", "answer": ["Nile", "the Nile"], "subject": "geo"},
    {"id": "q5", "prompt": "unanswerable", "answer": "1", "subject": "math"},
    {"id": "q6", "prompt": "", "answer": "3", "subject": "geo"},  # unread: an empty prompt
]
ANSWERS = {
    "2+2?": "The answer is 4.",
    "capital of France?": "paris",
    "7*6?": "6*7 = 42",
    "river in Egypt?": "The Nile!",
}


def test_text_scorers_through_a_replica(tmp_path, write_jsonl, eval_spec):
    write_jsonl(tmp_path / "in" / "0.jsonl", QA)
    spec = eval_spec(
        input={"id_column": "id"},
        eval={
            "reference_column": "answer",
            "group_by": "subject",
            "scorers": ["exact", "normalized", "numeric", "contains"],
        },
    )
    out = _through_replica(spec, AnswerEngine(ANSWERS))
    task = task_for(spec)
    assert out.column_names == [
        "row_id",
        "shard_id",
        "row_index",
        "shard_rows",
        *task.output_fields(),
        "_cached_tokens",
    ]
    for name, typ in task.output_fields().items():
        assert out.schema.field(name).type == typ, name
    rows = {r["row_id"]: r for r in out.to_pylist()}
    col = {k: [rows[i][k] for i in ("q1", "q2", "q3", "q4", "q5", "q6")] for k in out.column_names}
    assert col["exact_correct"] == [False, False, False, False, False, False]
    assert col["normalized_correct"] == [False, True, False, True, False, False]
    # [answer, is, 4] against [4]: precision ⅓, recall 1, F1 2·⅓/(⅓+1) = ½
    assert col["normalized_score"][0] == pytest.approx(0.5)
    assert col["normalized_score"][2] == pytest.approx(2 / 3)  # "6*7 = 42" -> [67, 42]
    assert col["numeric_correct"] == [True, False, True, False, False, False]
    assert col["numeric_extracted"] == ["4", None, "42", None, None, None]
    assert col["contains_correct"] == [True, True, True, True, False, False]
    assert col["reference"][3] == '["Nile", "the Nile"]'  # a list, as JSON
    assert col["reference"][5] is None  # an input error: no reference read
    assert col["subject"] == ["math", "geo", "math", "geo", "math", None]
    assert (
        col["error"][4].endswith(" line 5: rejected by engine: no answer")
        and "'prompt' is empty" in col["error"][5]
    )


def test_one_scorer_writes_unprefixed_columns(tmp_path, write_jsonl, eval_spec):
    write_jsonl(tmp_path / "in" / "0.jsonl", QA[:3])
    spec = eval_spec(eval={"reference_column": "answer", "scorers": ["numeric"]})
    out = _through_replica(spec, AnswerEngine(ANSWERS))
    assert {"correct", "score", "extracted", "reference"} <= set(out.column_names)
    assert out.column("correct").to_pylist() == [True, False, True]


MC = [
    {"id": "m1", "q": "The sky is", "opts": ["blue", "green", "made of cheese"], "gold": 0},
    {"id": "m2", "q": "Fire is ", "opts": ["cold", "hot"], "gold": "B"},
    {"id": "m3", "q": "Grass is", "opts": ["green", "red"], "gold": "green"},
]


def test_loglikelihood_scores_each_choice_from_prompt_logprobs(
    tmp_path, write_jsonl, eval_spec, tokenizer
):
    write_jsonl(tmp_path / "in" / "0.jsonl", MC)
    spec = eval_spec(
        input={"prompt_column": "q", "id_column": "id"},
        eval={"reference_column": "gold", "choices_column": "opts", "scorers": ["loglikelihood"]},
    )
    engine = LogprobEngine()
    out = _through_replica(spec, engine)
    rows = {r["row_id"]: r for r in out.to_pylist()}
    assert len(engine.requests) == 3 + 2 + 2  # one request per choice
    assert all(r.prompt_logprobs == 0 and r.params["max_tokens"] == 1 for r in engine.requests)
    for row in MC:
        got = rows[row["id"]]
        want_lps, want_lens = [], []
        for choice in row["opts"]:
            ctx, cont = lm_eval_pair(row["q"], " " + choice)
            whole = tokenizer(ctx + cont)["input_ids"]
            n_ctx = len(tokenizer(ctx)["input_ids"])
            want_lps.append(math.fsum(lp(t, p) for p, t in enumerate(whole) if p >= n_ctx))
            want_lens.append(len(whole) - n_ctx)
        assert got["choice_logprobs"] == pytest.approx(want_lps, abs=1e-12)
        assert got["choice_tokens"] == want_lens
        raw = max(range(len(want_lps)), key=lambda i: want_lps[i])
        per_char = [x / len(c) for x, c in zip(want_lps, row["opts"])]
        norm = max(range(len(per_char)), key=lambda i: per_char[i])
        assert (got["answer"], got["answer_norm"]) == (raw, norm)
        gold = {"m1": 0, "m2": 1, "m3": 0}[row["id"]]
        assert got["correct"] == (raw == gold) and got["correct_norm"] == (norm == gold)
        assert got["score"] == float(got["correct"])
        assert got["prompt_tokens"] == sum(n_ctx_plus for n_ctx_plus in _lens(engine, row))
        assert got["error"] is None
    # "Fire is " ends with a space: it moves to the choice, as lm-eval-harness does
    assert lm_eval_pair("Fire is ", " hot") == ("Fire is", "  hot")


def _lens(engine, row):
    return [len(r.token_ids) for r in engine.requests if r.request_id.startswith(row["id"] + "#")]


def test_a_failed_or_logprob_less_choice_is_an_error_row(
    tmp_path, write_jsonl, eval_spec, tokenizer
):
    write_jsonl(tmp_path / "in" / "0.jsonl", MC[:1])
    spec = eval_spec(
        input={"prompt_column": "q"},
        eval={"reference_column": "gold", "choices_column": "opts", "scorers": ["loglikelihood"]},
    )
    ctx, cont = lm_eval_pair("The sky is", " green")
    failing = tuple(tokenizer(ctx + cont)["input_ids"])
    row = _through_replica(spec, LogprobEngine(fail=(failing,))).to_pylist()[0]
    assert row["error"].endswith(" line 1: choice 1: rejected by engine: too long")
    assert row["correct"] is False and row["answer"] is None and row["choice_logprobs"] is None
    row = _through_replica(spec, LogprobEngine(give=False)).to_pylist()[0]
    assert row["error"].endswith(
        " line 1: choice 0: the engine returned no prompt log-probabilities"
    )


def test_loglikelihood_after_a_chat_template(tmp_path, write_jsonl, eval_spec, tokenizer):
    conv = [{"role": "user", "content": "Colour of the sky?"}]
    write_jsonl(tmp_path / "in" / "0.jsonl", [{"messages": conv, "opts": ["blue", "red"], "g": 0}])
    spec = eval_spec(
        input={"messages_column": "messages"},
        eval={"reference_column": "g", "choices_column": "opts", "scorers": ["loglikelihood"]},
    )
    engine = LogprobEngine()
    _through_replica(spec, engine)
    rendered = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
    rendered = list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
    for req, choice in zip(engine.requests, ["blue", "red"]):
        cont = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
        assert list(req.token_ids) == rendered + cont


# --------------------------------------------------------------------------- statistics


def test_proportion_against_textbook_wilson_intervals():
    half = evalreport.proportion(5, 10)
    assert half["accuracy"] == 0.5
    assert half["stderr"] == pytest.approx(math.sqrt(0.25 / 9))  # lm-eval: sample stderr
    assert half["ci95"] == pytest.approx([0.2366, 0.7634], abs=1e-4)
    assert evalreport.proportion(0, 10)["ci95"] == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert evalreport.proportion(10, 10)["ci95"] == pytest.approx([0.7225, 1.0], abs=1e-4)
    assert evalreport.proportion(1, 1)["stderr"] is None
    assert evalreport.proportion(0, 0) == {"accuracy": None, "stderr": None, "ci95": None}


def test_mcnemar_and_paired_difference_by_hand():
    # 7 discordant pairs split 6:1 -> P(X <= 1 | n=7, 1/2) = 8/128; two-sided 0.125
    assert evalreport.mcnemar_p(6, 1) == pytest.approx(0.125)
    assert evalreport.mcnemar_p(0, 0) == 1.0
    assert evalreport.mcnemar_p(3, 3) == 1.0
    a = [True, True, True, False, True]
    b = [True, False, True, True, False]
    p = evalreport.paired(a, b)
    # d = [0, -1, 0, 1, -1]: mean -0.2, sample var (3 - 5·0.04)/4 = 0.7, se sqrt(0.7/5)
    assert (p["worse"], p["better"], p["difference"]) == (2, 1, pytest.approx(-0.2))
    assert p["stderr"] == pytest.approx(math.sqrt(0.7 / 5))
    assert p["ci95"][0] == pytest.approx(-0.2 - 1.959964 * math.sqrt(0.14), abs=1e-6)


# --------------------------------------------------------------------------- a job without Ray


def run_local(spec, engine, batch_rows: int = 3, rows_per_file: int = 1000) -> dict:
    """A job's stages in this process: read, replica, staged write with the task's sums,
    tracker commits, report. As pipeline.run does, without Ray."""
    from batchjobs.actor import EngineReplica
    from batchjobs.planning import plan_job
    from batchjobs.sink import write_staged
    from batchjobs.tracker import Tracker

    plan = plan_job(spec)
    replica = EngineReplica(spec, lambda _: engine, None)
    tracker = Tracker(plan, 1, None)
    cols = task_for(spec).input_columns()
    try:
        for shard in plan.todo:
            for batch in read_shard(shard, cols, batch_rows):
                out = replica(batch)
                for start in range(0, out.num_rows, rows_per_file):
                    part = out.slice(start, rows_per_file)
                    tracker.add(
                        write_staged(part, spec.output.path, {}, spec.input.id_column, spec=spec)
                    )
    finally:
        replica.close()
    tracker.finish()
    plan.manifest.compact()
    return task_for(spec).report(plan.out, plan.manifest.committed())


def _qa_job(
    tmp_path, write_jsonl, eval_spec, name: str, answers: dict, split=(3, 1000), compact_mb=16
):
    inp = tmp_path / "in"
    if not inp.exists():
        write_jsonl(inp / "0.jsonl", QA[:4])
        more = [dict(QA[0], id="q7"), dict(QA[2], id="q8", subject=None)]
        write_jsonl(inp / "1.jsonl", QA[4:] + more)
    spec = eval_spec(
        input={"id_column": "id"},
        output={"path": str(tmp_path / name), "compact_mb": compact_mb},
        eval={
            "reference_column": "answer",
            "group_by": "subject",
            "scorers": ["numeric", "normalized"],
        },
    )
    return spec, run_local(spec, AnswerEngine(answers), *split)


def test_eval_json_and_manifest_metrics(tmp_path, write_jsonl, eval_spec):
    spec, report = _qa_job(tmp_path, write_jsonl, eval_spec, "out", ANSWERS)
    on_disk = json.loads((tmp_path / "out" / EVAL_JSON).read_text())
    assert on_disk.pop("v") == 1 and on_disk == report
    # numeric: q1 q3 q7 q8 right of 8 rows (q5 q6 are error rows: wrong, and counted)
    num = report["metrics"]["numeric"]
    assert (report["rows"], report["error_rows"], report["shards"]) == (8, 2, 2)
    assert (num["rows"], num["correct"], num["accuracy"]) == (8, 4, 0.5)
    assert num["accuracy_without_errors"] == pytest.approx(4 / 6)
    assert num["stderr"] == pytest.approx(math.sqrt(0.25 / 7))
    assert num["correct_column"] == "numeric_correct" and num["kind"] == "numeric"
    norm = report["metrics"]["normalized"]
    assert norm["correct"] == 2  # q2 paris, q4 the Nile
    # token F1 per row: q1 ½, q2 1, q3 ⅔, q4 1, q7 ½, q8 ⅔; q5 q6 (errors) 0
    assert norm["mean_score"] == pytest.approx((0.5 + 1 + 2 / 3 + 1 + 0.5 + 2 / 3) / 8)
    math_rows = report["groups"]["math"]  # q1 q3 q5 (an engine error) q7
    assert (math_rows["rows"], math_rows["error_rows"]) == (4, 1)
    assert math_rows["metrics"]["numeric"]["correct"] == 3
    assert report["groups"]["(null)"]["rows"] == 1  # q8 has no subject
    assert report["groups"]["(null)"]["metrics"]["numeric"]["correct"] == 1
    unread = report["groups"]["(input error)"]  # q6: its row was not read, nor its subject
    assert (unread["rows"], unread["error_rows"]) == (1, 1)
    assert set(report["groups"]) == {"math", "geo", "(null)", "(input error)"}
    # the manifest: per shard, the rows correct and accuracy of each metric
    manifest = [json.loads(x) for x in (tmp_path / "out" / MANIFEST).read_text().splitlines()]
    assert len(manifest) == 2
    for m in manifest:  # q1 q3 right in shard 0; q7 q8 in shard 1
        assert m["metrics"]["numeric.correct"] == 2 and m["metrics"]["numeric.accuracy"] == 0.5
    assert sum(m["metrics"]["normalized.score"] for m in manifest) == pytest.approx(13 / 3)
    assert sum(m["metrics"]["rows"] for m in manifest) == 8


def test_eval_json_does_not_depend_on_how_rows_were_split_into_files(
    tmp_path, write_jsonl, eval_spec
):
    _qa_job(tmp_path, write_jsonl, eval_spec, "a", ANSWERS)
    # a file per row (not compacted at commit)
    _qa_job(tmp_path, write_jsonl, eval_spec, "b", ANSWERS, split=(1, 1), compact_mb=0)
    files_b = list((tmp_path / "b").glob("*/*.parquet"))
    assert len(files_b) == 8 > len(list((tmp_path / "a").glob("*/*.parquet")))
    assert (tmp_path / "a" / EVAL_JSON).read_bytes() == (tmp_path / "b" / EVAL_JSON).read_bytes()


# --------------------------------------------------------------------------- compare


def test_compare_pairs_rows_by_id_and_lists_flips(tmp_path, write_jsonl, eval_spec):
    _qa_job(tmp_path, write_jsonl, eval_spec, "a", ANSWERS)
    worse = {**ANSWERS, "2+2?": "5", "7*6?": "I do not know"}  # q1 q3 q7 q8 flip to wrong
    _qa_job(tmp_path, write_jsonl, eval_spec, "b", worse)
    result = evalreport.compare(str(tmp_path / "a"), str(tmp_path / "b"))
    assert result["paired_rows"] == 8 and result["only_a"] == result["only_b"] == 0
    num = result["metrics"]["numeric"]
    assert (num["accuracy_a"], num["accuracy_b"]) == (0.5, 0.0)
    p = num["paired"]
    assert (p["worse"], p["better"], p["difference"]) == (4, 0, -0.5)
    assert p["mcnemar_p"] == pytest.approx(2 / 16)
    assert [f["id"] for f in num["flipped"]] == ["q1", "q3", "q7", "q8"]
    assert (
        num["flipped"][0]["a_output"] == "The answer is 4." and num["flipped"][0]["b_output"] == "5"
    )
    assert evalreport.worse(result) == ["numeric"]  # the interval lies below zero
    assert result["metrics"]["normalized"]["paired"]["worse"] == 0

    res = runner.invoke(
        app(),
        ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--json", str(tmp_path / "c.json")],
    )
    assert res.exit_code == 0, cli_text(res)
    assert "numeric" in res.output and "q7: right -> wrong" in res.output
    assert (
        json.loads((tmp_path / "c.json").read_text())["metrics"]["numeric"]["paired"]["worse"] == 4
    )
    res = runner.invoke(
        app(), ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--fail-if-worse"]
    )
    assert res.exit_code == 6 and "B is worse than A on: numeric" in cli_text(res)
    res = runner.invoke(
        app(), ["compare", str(tmp_path / "b"), str(tmp_path / "a"), "--fail-if-worse"]
    )
    assert res.exit_code == 0, cli_text(res)


def test_compare_refuses_what_is_not_an_eval_output(tmp_path, write_jsonl, eval_spec):
    _qa_job(tmp_path, write_jsonl, eval_spec, "a", ANSWERS)
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app(), ["compare", str(tmp_path / "a"), str(tmp_path / "empty")])
    assert res.exit_code == 5 and "has no _eval.json" in cli_text(res)
    with pytest.raises(OutputError, match="metric 'exact' is not in both outputs"):
        evalreport.compare(str(tmp_path / "a"), str(tmp_path / "a"), metric="exact")


def app():
    from batchjobs.cli import app as cli_app

    return cli_app
