"""Bad input, fast: the corpus in tests/data/bad read as a job reads it, each case an error
row, a failed shard or a preflight error naming file, line or row and column; a replica
that refuses prompts too long for its engine before the engine sees them; a shard that
fails alone in the driver's bookkeeping; max_error_rate. No Ray, no engine
(tests/integration/test_bad_input_e2e.py runs the corpus on the real one)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from bad_corpus import ROWS, UNREADABLE

from batchjobs.engines.base import Engine, Request, Result
from batchjobs.errors import InputError, RowErrorRateError, ShardsFailedError
from batchjobs.readers import list_shards, preflight, read_shard
from batchjobs.shard_errors import (
    check_outcome,
    failure_of,
    preflight_all,
    read_or_mark,
    split_failed,
)
from batchjobs.tasks import task_for

CORPUS = Path(__file__).resolve().parents[1] / "data" / "bad"
SAMPLING = {"max_tokens": "budget", "temperature": "temp"}


@pytest.fixture
def corpus(tmp_path) -> Path:
    shutil.copytree(CORPUS / "generate", tmp_path / "in")
    return tmp_path / "in"


def _read(shard, cols, batch_rows=64) -> list[dict]:
    return [r for b in read_or_mark(shard, cols, batch_rows, None) for r in b.to_pylist()]


def test_the_corpus_as_a_generate_job_reads_it(corpus, read_columns):
    cols = read_columns(id_column="id", sampling_columns=SAMPLING)
    shards = list_shards(str(corpus))
    failed = preflight_all(shards, cols, None, strict=False)
    by_name = {s.rel: s for s in shards}
    # whole shards set aside at planning, each naming the file and the column
    assert {by_name[n].shard_id for n in FAILING} == set(failed)
    for name, why in FAILING.items():
        assert (
            failed[by_name[name].shard_id].startswith(by_name[name].url)
            and why in (failed[by_name[name].shard_id])
        )
    rows = {s.rel: _read(s, cols) for s in shards if s.shard_id not in failed}
    assert {n: len(r) for n, r in rows.items()} == ROWS
    for (name, index), (place, why) in READ_ERRORS.items():
        row = rows[name][index]
        assert row["input_error"].startswith(f"{by_name[name].url} {place}: "), row
        assert why in row["input_error"], row
        assert row["payload"] is None and row["where"] == f"{by_name[name].url} {place}"
    errors = [r for rs in rows.values() for r in rs if r["input_error"]]
    assert len(errors) == len(READ_ERRORS)  # every other row reaches the engine stage
    # a row's own sampling values, parsed as the spec's rules parse them
    sampling = {r["row_id"]: r["params"] for r in rows["sampling.jsonl"]}
    assert sampling["s-1"] == json.dumps({"max_tokens": 3})
    assert sampling["s-5"] == json.dumps({"max_tokens": 2})
    # duplicate ids stay: three rows, told apart by shard and row index
    dups = {
        (r["shard_id"], r["row_index"])
        for rs in rows.values()
        for r in rs
        if r["row_id"] == "dup-1"
    }
    assert len(dups) == 3


FAILING = {
    **UNREADABLE,
    "no_prompt.parquet": UNREADABLE["no_prompt.parquet"] + "; set input.prompt_column",
}
READ_ERRORS = {  # (file, row index) -> (place, what the error says)
    ("malformed.jsonl", 2): ("line 3", "not valid JSON (Unterminated string"),
    ("latin1.jsonl", 1): ("line 2", "not UTF-8 (byte 28)"),
    ("nulls.jsonl", 0): ("line 1", "'prompt' is null"),
    ("nulls.jsonl", 1): ("line 2", "'prompt' is empty"),
    ("nulls.jsonl", 2): ("line 3", "'prompt' is empty"),
    ("nulls.jsonl", 3): ("line 4", "no column 'prompt'"),
    ("nulls.jsonl", 4): ("line 5", "'prompt' is list, expected string"),
    ("nulls.jsonl", 5): ("line 6", "id column 'id' is null or missing"),
    ("nulls.jsonl", 6): ("line 7", "'prompt' holds a lone surrogate '\\ud800'"),
    ("weird.jsonl", 0): ("line 1", "expected a JSON object, got list"),
    ("weird.jsonl", 1): ("line 2", "expected a JSON object, got str"),
    ("weird.jsonl", 2): ("line 3", "expected a JSON object, got NoneType"),
    ("weird.jsonl", 3): ("line 4", "not valid JSON (nested too deeply)"),
    ("weird.jsonl", 5): ("line 6", "not valid JSON (Unexpected UTF-8 BOM"),
    ("weird.jsonl", 6): ("line 7", "'prompt' is float, expected string"),
    ("weird.jsonl", 7): ("line 8", "not valid JSON (Exceeds the limit (4300 digits)"),
    ("weird.jsonl", 8): ("line 9", "id column 'id' holds an object; an id is a string or"),
    ("sampling.jsonl", 1): ("line 2", "column 'budget' (sampling.max_tokens) is -1: "),
    ("sampling.jsonl", 2): ("line 3", "column 'budget' (sampling.max_tokens) is 0: "),
    ("sampling.jsonl", 3): ("line 4", "column 'budget' (sampling.max_tokens) is 'ten': "),
    ("sampling.jsonl", 5): ("line 6", "column 'temp' (sampling.temperature) is -2: "),
    ("sampling.jsonl", 6): ("line 7", "column 'temp' (sampling.temperature) is 'hot': "),
    ("sampling.jsonl", 7): ("line 8", "column 'budget' (sampling.max_tokens) is [1, 2]: "),
    ("nulls.parquet", 1): ("row 1", "'prompt' is null"),
    ("nulls.parquet", 2): ("row 2", "'prompt' is empty"),
    ("nulls.parquet", 3): ("row 3", "'prompt' is empty"),
}


def test_chat_messages_with_unknown_roles_are_error_rows(read_columns, tiny_tokenizer_dir):
    (shard,) = list_shards(str(CORPUS / "chat" / "roles.jsonl"))
    model = {"engine": {"model": str(tiny_tokenizer_dir)}}
    rows = _read(shard, read_columns(task="chat", spec=model, id_column="id"))
    errors = {r["row_id"]: r["input_error"] for r in rows}
    assert errors["c-1"] is None
    expected = {
        "c-2": "line 2: 'messages' message 0 has role 'wizard' (allowed: system, user, ",
        "c-3": "line 3: 'messages' message 1 has role 'root'",
        "c-4": "line 4: 'messages' message 0 (user) has no content, expected a string",
        "c-5": "line 5: 'messages' is str, expected a list of {role, content} messages",
        "c-6": "line 6: 'messages' is an empty list of messages",
        "c-7": "line 7: 'messages' message 0 (user) content part 0 is 'str'; only text parts",
    }
    for row_id, fragment in expected.items():
        assert errors[row_id].startswith(f"{shard.url} {fragment}"), errors[row_id]


# ------------------------------------------------------------------ shards that fail alone


def test_preflight_sets_bad_shards_aside_and_stops_only_when_all_fail(corpus, read_columns):
    cols = read_columns(id_column="id", sampling_columns=SAMPLING)
    bad = [s for s in list_shards(str(corpus)) if s.rel in FAILING]
    good = [s for s in list_shards(str(corpus)) if s.rel == "good.jsonl"]
    assert set(preflight_all(bad + good, cols, None, strict=False)) == {s.shard_id for s in bad}
    with pytest.raises(InputError) as info:  # every shard fails: the spec is wrong
        preflight_all(bad, cols, None, strict=False)
    assert str(info.value).startswith("5 of 5 input shards cannot be read:")
    with pytest.raises(InputError) as info:  # batchjobs validate: any bad shard
        preflight_all(bad + good, cols, None, strict=True)
    assert all(name in str(info.value) for name in FAILING)


def test_jsonl_preflight_looks_past_damaged_first_lines(tmp_path, read_columns):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'not json\n{"other": 1}\n{"prompt": "fine"}\n')
    (shard,) = list_shards(str(path))
    preflight(shard, read_columns(), None)  # line 3 has the column: lines 1-2 are row errors
    path.write_bytes(b"not json\n\xff\xfe\n")
    preflight(shard, read_columns(), None)  # nothing parses: each line is a row error


def test_a_shard_deleted_after_planning_becomes_a_marker(tmp_path, write_jsonl, read_columns):
    path = write_jsonl(tmp_path / "gone.jsonl", [{"prompt": "a"}])
    (shard,) = list_shards(str(path))
    path.unlink()
    (marker,) = list(read_or_mark(shard, read_columns(), 8, None))
    row = marker.to_pylist()[0]
    assert row["shard_rows"] == -1 and row["payload"] is None
    assert row["input_error"] == f"{shard.url}: file vanished after planning"


def test_parquet_damaged_mid_file_keeps_its_rows_then_marks_the_shard(tmp_path, read_columns):
    path = tmp_path / "damaged.parquet"
    prompts = [f"prompt number {i} " * 20 for i in range(400)]
    pq.write_table(pa.table({"prompt": prompts}), path, row_group_size=100, compression="snappy")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 2000] = b"\x00" * 2000  # a row group in the middle; footer intact
    path.write_bytes(bytes(data))
    (shard,) = list_shards(str(path))
    preflight(shard, read_columns(), None)  # the footer is fine
    batches = list(read_or_mark(shard, read_columns(), 100, None))
    last = batches[-1].to_pylist()
    assert len(last) == 1 and last[0]["shard_rows"] == -1
    assert last[0]["input_error"].startswith(f"{shard.url}: corrupt Parquet data after row ")
    assert sum(b.num_rows for b in batches[:-1]) < 400


def test_a_parquet_value_python_cannot_hold_is_its_rows_error(tmp_path, read_columns):
    path = tmp_path / "ts.parquet"
    ids = pa.array([0, 2**40, 5], pa.timestamp("s"))  # the middle one: year ~35,000
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "id": ids}), path)
    (shard,) = list_shards(str(path))
    rows = _read(shard, read_columns(id_column="id"))
    assert [r["input_error"] is None for r in rows] == [True, False, True]
    assert rows[1]["input_error"].startswith(f"{shard.url} row 1: column 'id' holds a value")


def test_a_null_typed_or_dictionary_prompt_column_is_read_per_row(tmp_path, read_columns):
    path = tmp_path / "n.parquet"
    cat = pa.array(["x", "y"]).dictionary_encode()  # a pandas category
    pq.write_table(pa.table({"prompt": pa.nulls(2), "p2": cat}), path)
    (shard,) = list_shards(str(path))
    preflight(shard, read_columns(), None)
    nulls = _read(shard, read_columns())
    assert len(nulls) == 2 and all(r["input_error"].endswith("'prompt' is null") for r in nulls)
    preflight(shard, read_columns(prompt_column="p2"), None)
    assert [r["input_error"] for r in _read(shard, read_columns(prompt_column="p2"))] == [None] * 2


def test_a_gzip_file_cut_short_fails_alone(tmp_path, read_columns):
    import gzip

    path = tmp_path / "cut.jsonl.gz"
    data = gzip.compress(
        b"".join(b'{"prompt": "row %d %x"}\n' % (i, i * 7919) for i in range(2000))
    )
    path.write_bytes(data[: len(data) // 2])
    (shard,) = list_shards(str(path))
    (marker,) = list(read_or_mark(shard, read_columns(), 8, None))
    assert marker.column("input_error")[0].as_py().startswith(f"{shard.url}: cannot be read (")


def test_directory_symlinks_are_not_followed_and_file_symlinks_are_named_by_link(
    tmp_path, write_jsonl, read_columns
):
    inp, outside = tmp_path / "in", tmp_path / "outside"
    write_jsonl(outside / "o.jsonl", [{"prompt": "outside"}])
    write_jsonl(inp / "a.jsonl", [{"prompt": "a"}])
    (inp / "up").symlink_to(tmp_path)  # a loop back above the input
    (inp / "link.jsonl").symlink_to(outside / "o.jsonl")
    shards = list_shards(str(inp), fmt="jsonl")  # every name counts as JSON Lines here
    assert sorted(s.rel for s in shards) == ["a.jsonl", "link.jsonl"]
    assert all(s.shard_id.startswith(("a.jsonl-", "link.jsonl-")) for s in shards)


def test_a_broken_link_is_named_in_a_warning_not_silently_dropped(tmp_path, write_jsonl, caplog):
    inp = tmp_path / "in"
    write_jsonl(inp / "a.jsonl", [{"prompt": "a"}])
    (inp / "gone.jsonl").symlink_to(tmp_path / "unmounted" / "gone.jsonl")
    with caplog.at_level("WARNING", logger="batchjobs"):
        shards = list_shards(str(inp))
    assert [s.rel for s in shards] == ["a.jsonl"]
    assert f"{inp}/gone.jsonl is a broken link" in caplog.text


# ------------------------------------------------------------------ in the engine replica


class LimitEngine(Engine):
    """Echoes; states a max_model_len like vLLM does (``limit``: None like a fake)."""

    kind = "fake"

    def __init__(self, limit: int | None):
        self.limit, self.requests = limit, []

    async def generate(self, request: Request) -> Result:
        self.requests.append(request)
        n = len(request.token_ids) if request.token_ids is not None else 1
        if request.prompt == "refuse me":
            return Result.failed("rejected by engine: no")
        return Result.finished("ok", 1, "stop", {"stop": "stop"}, n, 0.01)

    def max_model_len(self) -> int | None:
        return self.limit

    def close(self) -> None:
        pass


@pytest.fixture
def generate_task(make_spec, tiny_tokenizer_dir):
    def _task(limit: int | None, task: str = "generate", **sections):
        spec = make_spec(task=task, engine={"model": str(tiny_tokenizer_dir)}, **sections)
        t = task_for(spec)
        asyncio.run(t.setup(LimitEngine(limit)))
        return t

    return _task


def test_prompts_that_cannot_fit_the_engine_are_refused_in_the_replica(generate_task):
    task = generate_task(16)
    tok = task.tokenizer
    fits = "one two three"
    n = len(tok(fits)["input_ids"])
    exactly = " ".join(["word"] * 40)
    while len(tok(exactly)["input_ids"]) > 16:
        exactly = exactly.rsplit(" ", 1)[0]
    huge = "x" * (10 << 20)
    payloads = [json.dumps({"prompt": p}) for p in (fits, exactly, "a b " * 20, huge)]
    wheres = [f"file:///in.jsonl line {i}" for i in range(1, 5)]
    out = task.prepare_batch(["a", "b", "c", "d"], payloads, [None] * 4, [None] * 4, wheres)
    assert out[0].request.token_ids == tok(fits)["input_ids"] and len(out[0].request.token_ids) == n
    assert out[0].request.prompt == fits  # the text travels too
    if len(tok(exactly)["input_ids"]) == 16:  # as long as the engine: no room for an output
        assert out[1].startswith("file:///in.jsonl line 2: 'prompt' has 16 tokens; ")
    assert out[2].startswith("file:///in.jsonl line 3: 'prompt' has ")
    assert "engine.max_model_len is 16" in out[2]
    assert out[3].startswith("file:///in.jsonl line 4: 'prompt' has 10,485,760 characters")


def test_an_engine_without_a_stated_length_gets_the_text_unchecked(generate_task):
    task = generate_task(None)
    assert task.tokenizer is None
    (prepared,) = task.prepare_batch(["a"], [json.dumps({"prompt": "x " * 500})], [None], [None])
    assert prepared.request.prompt == "x " * 500 and prepared.request.token_ids is None


def test_a_rendered_conversation_too_long_is_an_error_row(generate_task):
    task = generate_task(16, task="chat")
    long = [{"role": "user", "content": "tell me about the night job " * 10}]
    (row,) = task.prepare_batch(["a"], [json.dumps({"messages": long})], [None], [None])
    assert row.startswith("row a: 'messages' has ") and "engine.max_model_len is 16" in row


def test_errors_from_the_engine_name_the_file_and_line(
    tmp_path, write_jsonl, make_spec, tiny_tokenizer_dir
):
    from batchjobs.actor import EngineReplica

    path = write_jsonl(tmp_path / "in" / "r.jsonl", [{"prompt": "fine"}, {"prompt": "refuse me"}])
    spec = make_spec(input={"path": str(path)}, engine={"model": str(tiny_tokenizer_dir)})
    replica = EngineReplica(spec, lambda _: LimitEngine(64), None)
    try:
        (shard,) = list_shards(str(path))
        (batch,) = list(read_shard(shard, task_for(spec).input_columns()))
        out = replica(batch).to_pylist()
    finally:
        replica.close()
    assert out[0]["error"] is None
    assert out[1]["error"] == f"{shard.url} line 2: rejected by engine: no"


def test_a_result_that_cannot_be_written_is_that_rows_error(make_spec):
    from batchjobs.rowcheck import safe_columns

    task = task_for(make_spec())
    good = Result.finished("ok", 1, "stop", {"stop": "stop"}, 3, 0.1)
    bad = Result.finished("ok", 1, "stop", {"stop": "stop"}, 3, 0.1)
    bad.completion_tokens = "many"  # not an int32
    cols = safe_columns(task, [good, bad], [{}, {}], ["f line 1", "f line 2"])
    assert cols["error"].to_pylist()[0] is None
    assert cols["error"].to_pylist()[1].startswith("f line 2: its result could not be written: ")
    assert cols["finish_reason"].to_pylist() == ["stop", "error"]


# ------------------------------------------------------------------ the driver


def test_a_failed_shard_is_never_committed_and_its_rows_are_dropped(
    tmp_path, write_jsonl, make_spec, engine_output
):
    from batchjobs.planning import plan_job
    from batchjobs.sink import write_staged
    from batchjobs.tracker import Tracker

    for name in ("a", "b"):
        write_jsonl(tmp_path / "in" / f"{name}.jsonl", [{"prompt": "x"}] * 3)
    plan = plan_job(make_spec())
    a, b = (s.shard_id for s in plan.todo)
    tracker = Tracker(plan, 1, None)
    out = str(tmp_path / "out")

    def stage(rows):
        tracker.add(write_staged(engine_output(rows), out, {}, None))

    stage([{"shard_id": a, "row_index": i, "shard_rows": 3} for i in range(2)])
    marker = {"shard_id": a, "row_index": -1, "shard_rows": -1, "error": "x: file vanished"}
    stage([marker, {"shard_id": b, "row_index": 0, "shard_rows": 3}])
    stage([{"shard_id": a, "row_index": 2, "shard_rows": 3}])  # after the failure: dropped
    stage([{"shard_id": b, "row_index": i, "shard_rows": 3} for i in (1, 2)])
    tracker.finish()
    assert tracker.failed == {a: "x: file vanished"}
    assert set(plan.manifest.committed()) == {b}
    assert not (tmp_path / "out" / a).exists() and not (tmp_path / "out" / "_staging" / a).exists()


def test_split_failed_turns_markers_into_summaries(engine_output):
    batch = engine_output(
        [
            {"shard_id": "s1", "row_index": 0, "shard_rows": 1},
            {"shard_id": "s2", "row_index": -1, "shard_rows": -1, "error": "s2: not Parquet"},
        ]
    )
    rest, summaries = split_failed(batch)
    assert rest.column("shard_id").to_pylist() == ["s1"]
    (summary,) = summaries
    assert summary["shard_id"] == "s2" and failure_of(summary) == "s2: not Parquet"
    assert failure_of({"shard_rows": 1, "errors": "{}"}) is None


def _records(rows: int, errors: int):
    return [SimpleNamespace(rows=rows, error_rows=errors)]


def test_check_outcome(make_spec):
    spec = make_spec(output={"max_error_rate": 0.1})
    check_outcome(spec, {}, _records(100, 10), None)  # at the limit: fine
    with pytest.raises(RowErrorRateError) as info:
        check_outcome(spec, {}, _records(100, 11), "the summary")
    assert info.value.exit_code == 7 and info.value.summary == "the summary"
    assert str(info.value).startswith(
        "11 of 100 rows (11.0%) are error rows, above output.max_error_rate 0.1"
    )
    with pytest.raises(ShardsFailedError) as info:
        check_outcome(spec, {"s": "file:///x.parquet: not Parquet"}, _records(100, 11), None)
    assert info.value.exit_code == 3
    assert "file:///x.parquet: not Parquet" in str(info.value) and "also: 11 of 100" in str(
        info.value
    )
    check_outcome(make_spec(), {}, _records(100, 100), None)  # no limit set
    with pytest.raises(RowErrorRateError):
        check_outcome(make_spec(output={"max_error_rate": 0}), {}, _records(5, 1), None)


@pytest.mark.parametrize("pattern", ["in/*.jsonl", "in"])
def test_an_empty_glob_or_directory_is_a_preflight_error(tmp_path, make_spec, pattern):
    from batchjobs.planning import plan_job

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("not input")
    spec = make_spec(input={"path": str(tmp_path / pattern)})
    with pytest.raises(InputError) as info:
        plan_job(spec)
    assert info.value.exit_code == 3 and "matched no input files" in str(info.value)
    assert not (tmp_path / "out").exists()  # stopped before the output root was touched
