"""Input shards: listing, stable ids, reading batches, row-level errors, preflight."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchjobs.errors import InputError
from batchjobs.readers import list_shards, preflight, read_shard

SAFE_ID = re.compile(r"^[A-Za-z0-9._-]+$")
READ_COLUMNS = [
    "shard_id",
    "row_index",
    "shard_rows",
    "row_id",
    "payload",
    "input_error",
    "params",
    "where",
]


def _prompts(n: int) -> list[dict]:
    return [{"prompt": f"p{i}", "id": 100 + i} for i in range(n)]


def _write_parquet(path: Path, table: pa.Table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _read_all(shard, cols, batch_rows=1024):
    return list(read_shard(shard, cols, batch_rows))


def _rows(batches) -> list[dict]:
    return [r for b in batches for r in b.to_pylist()]


def _prompt(row: dict) -> str | None:
    """The prompt a read row carries to the engine (None: the row carries nothing)."""
    return json.loads(row["payload"])["prompt"] if row["payload"] is not None else None


@pytest.fixture
def generate(read_columns):
    """The columns a generate job reads (prompt column "prompt"; keys as in input:)."""
    return read_columns


# --------------------------------------------------------------------------- list_shards


@pytest.fixture
def input_dir(tmp_path, write_jsonl) -> Path:
    d = tmp_path / "in"
    write_jsonl(d / "a.jsonl", _prompts(2))
    _write_parquet(d / "b.parquet", pa.table({"prompt": ["x"]}))
    write_jsonl(d / "sub" / "c.jsonl", _prompts(1))
    (d / "README.md").write_text("not input")
    write_jsonl(d / "_hidden.jsonl", _prompts(1))
    write_jsonl(d / ".dot.jsonl", _prompts(1))
    return d


def test_list_local_directory(input_dir):
    shards = list_shards(str(input_dir))
    assert [s.rel for s in shards] == ["a.jsonl", "b.parquet", "sub/c.jsonl"]
    assert [s.format for s in shards] == ["jsonl", "parquet", "jsonl"]
    assert shards[0].url == f"file://{input_dir}/a.jsonl"
    assert shards[0].size == (input_dir / "a.jsonl").stat().st_size
    assert len({s.shard_id for s in shards}) == 3


def test_list_glob(input_dir):
    shards = list_shards(str(input_dir / "*.jsonl"))
    assert [s.rel for s in shards] == ["a.jsonl"]  # _hidden and .dot are skipped
    nested = list_shards(str(input_dir / "**" / "*.jsonl"))
    assert [s.rel for s in nested] == ["a.jsonl", "sub/c.jsonl"]


def test_glob_matching_an_unknown_extension_asks_for_format(input_dir):
    with pytest.raises(InputError) as info:
        list_shards(str(input_dir / "*.md"))
    msg = str(info.value)
    assert "README.md" in msg
    assert "set input.format" in msg
    # with the format given, the same file is taken as JSONL
    (shard,) = list_shards(str(input_dir / "*.md"), fmt="jsonl")
    assert shard.format == "jsonl"


def test_list_single_file(input_dir):
    (shard,) = list_shards(str(input_dir / "sub" / "c.jsonl"))
    assert shard.rel == "c.jsonl"
    assert shard.format == "jsonl"
    assert shard.url == f"file://{input_dir}/sub/c.jsonl"


def test_list_memory_url(memfs):
    memfs.pipe("/data/a.jsonl", b'{"prompt": "a"}\n')
    memfs.pipe("/data/sub/b.parquet", _parquet_bytes(pa.table({"prompt": ["b"]})))
    memfs.pipe("/data/notes.txt", b"skip me")
    shards = list_shards("memory://data")
    assert [s.rel for s in shards] == ["a.jsonl", "sub/b.parquet"]
    assert [s.url for s in shards] == ["memory:///data/a.jsonl", "memory:///data/sub/b.parquet"]
    assert [s.format for s in shards] == ["jsonl", "parquet"]
    assert [s.rel for s in list_shards("memory://data/*.jsonl")] == ["a.jsonl"]
    (single,) = list_shards("memory://data/sub/b.parquet")
    assert single.rel == "b.parquet"


def test_shard_ids_are_stable(input_dir):
    assert list_shards(str(input_dir)) == list_shards(str(input_dir))


def test_shard_id_changes_with_size(input_dir, write_jsonl):
    before = {s.rel: s.shard_id for s in list_shards(str(input_dir))}
    write_jsonl(input_dir / "a.jsonl", _prompts(3))  # bigger
    after = {s.rel: s.shard_id for s in list_shards(str(input_dir))}
    assert after["a.jsonl"] != before["a.jsonl"]
    assert after["b.parquet"] == before["b.parquet"]
    assert after["sub/c.jsonl"] == before["sub/c.jsonl"]


def test_shard_id_changes_with_mtime_at_same_size(input_dir):
    path = input_dir / "a.jsonl"
    before = list_shards(str(path))[0]
    data = path.read_bytes()
    path.write_bytes(data.replace(b"p0", b"q0"))  # same size, new content
    st = path.stat()
    os.utime(path, (st.st_atime, st.st_mtime + 10))
    after = list_shards(str(path))[0]
    assert after.size == before.size
    assert after.shard_id != before.shard_id


def test_shard_id_changes_when_memory_file_is_rewritten(memfs):
    memfs.pipe("/d/a.jsonl", b'{"prompt": "a"}\n')
    before = list_shards("memory://d")[0].shard_id
    assert before == list_shards("memory://d")[0].shard_id
    memfs.pipe("/d/a.jsonl", b'{"prompt": "abc"}\n')
    assert list_shards("memory://d")[0].shard_id != before


def test_shard_ids_are_file_name_safe_for_odd_names(tmp_path, write_jsonl):
    root = tmp_path / "odd"
    names = [
        "a b/c?.jsonl",
        "a b/[br].jsonl",
        "a b/sub/é漢 字.jsonl",
        "x%20y;$(z).jsonl",
        "-dash.jsonl",
        "new\nline.jsonl",
        "q'uo\"te.jsonl",
        "%s.jsonl" % ("long" * 40),
    ]
    for n in names:
        write_jsonl(root / n, _prompts(1))
    shards = list_shards(str(root))
    assert len(shards) == len(names)
    ids = [s.shard_id for s in shards]
    assert len(set(ids)) == len(ids)
    for sid in ids:
        assert SAFE_ID.match(sid), sid
        assert not sid.startswith((".", "_")), sid
        assert len(sid) <= 91, sid
    # a glob with ".." in it gives relative paths that are still safe ids
    globbed = list_shards(str(root / "a b" / "sub" / ".." / "*.jsonl"))
    assert sorted(s.rel for s in globbed) == ["[br].jsonl", "c?.jsonl"]
    for s in globbed:
        assert SAFE_ID.match(s.shard_id), s.shard_id


def test_missing_path_names_the_path(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(InputError) as info:
        list_shards(missing)
    assert f"input.path {missing!r} does not exist" in str(info.value)
    assert info.value.exit_code == 3


def test_glob_without_match_names_the_path(tmp_path):
    pattern = str(tmp_path / "*.jsonl")
    with pytest.raises(InputError) as info:
        list_shards(pattern)
    msg = str(info.value)
    assert f"input.path {pattern!r} matched no input files" in msg
    assert ".parquet" in msg and ".jsonl" in msg


def test_directory_without_input_files(tmp_path):
    (tmp_path / "README.md").write_text("x")
    with pytest.raises(InputError) as info:
        list_shards(str(tmp_path))
    assert f"input.path {str(tmp_path)!r} matched no input files" in str(info.value)


def test_files_under_hidden_directories_are_skipped(tmp_path, write_jsonl):
    root = tmp_path / "in"
    write_jsonl(root / "a.jsonl", _prompts(1))
    write_jsonl(root / "_staging" / "s" / "b.jsonl", _prompts(1))
    write_jsonl(root / ".cache" / "c.jsonl", _prompts(1))
    assert [s.rel for s in list_shards(str(root))] == ["a.jsonl"]


# --------------------------------------------------------------------------- read_shard


@pytest.fixture(params=["jsonl-local", "parquet-local", "jsonl-memory", "parquet-memory"])
def ten_row_shard(request, tmp_path, memfs):
    """A 10-row shard (prompts p0..p9, ids 100..109) in each format and location."""
    fmt, where = request.param.split("-")
    rows = _prompts(10)
    if fmt == "jsonl":
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    else:
        data = _parquet_bytes(pa.Table.from_pylist(rows))
    name = f"ten.{fmt}"
    if where == "local":
        (tmp_path / name).write_bytes(data)
        url = str(tmp_path / name)
    else:
        memfs.pipe(f"/in/{name}", data)
        url = f"memory://in/{name}"
    (shard,) = list_shards(url)
    assert shard.format == fmt
    return shard


def test_read_shard_batches_and_bookkeeping(ten_row_shard, generate):
    batches = _read_all(ten_row_shard, generate(), batch_rows=3)
    assert [b.num_rows for b in batches] == [3, 3, 3, 1]
    for b in batches:
        assert b.column_names == READ_COLUMNS
        assert b.schema.field("row_index").type == pa.int64()
        assert b.schema.field("row_id").type == pa.string()
    rows = _rows(batches)
    sid = ten_row_shard.shard_id
    assert [r["row_index"] for r in rows] == list(range(10))
    assert {r["shard_rows"] for r in rows} == {10}
    assert {r["shard_id"] for r in rows} == {sid}
    assert [r["row_id"] for r in rows] == [f"{sid}:{i}" for i in range(10)]
    assert [json.loads(r["payload"]) for r in rows] == [{"prompt": f"p{i}"} for i in range(10)]
    assert all(r["input_error"] is None for r in rows)
    assert all(r["params"] is None for r in rows)


def test_read_shard_id_column_values_become_strings(ten_row_shard, generate):
    rows = _rows(_read_all(ten_row_shard, generate(id_column="id"), batch_rows=4))
    assert [r["row_id"] for r in rows] == [str(100 + i) for i in range(10)]
    assert [r["row_index"] for r in rows] == list(range(10))
    assert all(r["input_error"] is None for r in rows)


def test_jsonl_ids_of_mixed_types_are_strings(tmp_path, write_jsonl, generate):
    path = write_jsonl(
        tmp_path / "ids.jsonl",
        [{"prompt": "a", "id": 7}, {"prompt": "b", "id": "x-1"}, {"prompt": "c", "id": 2.5}],
    )
    (shard,) = list_shards(str(path))
    (batch,) = _read_all(shard, generate(id_column="id"))
    assert batch.schema.field("row_id").type == pa.string()
    assert batch.column("row_id").to_pylist() == ["7", "x-1", "2.5"]


def test_jsonl_row_level_problems_become_input_errors(tmp_path, generate):
    lines = [
        b'{"prompt": "ok", "id": 1}',  # line 1
        b"",  # line 2: blank, skipped
        b'{"prompt": "broken", ',  # line 3
        b'\xff\xfe{"prompt": "x", "id": 3}',  # line 4
        b'["prompt", "in", "a", "list"]',  # line 5
        b'{"prompt": null, "id": 5}',  # line 6
        b'{"prompt": 42, "id": 6}',  # line 7
        b'{"prompt": "   ", "id": 7}',  # line 8
        b'{"prompt": "", "id": 8}',  # line 9
        b'{"text": "no prompt key", "id": 9}',  # line 10
        b'{"prompt": "null id", "id": null}',  # line 11
        b"   \t ",  # line 12: whitespace only, skipped
        b'{"prompt": "no id key"}',  # line 13
        b'{"prompt": "fine", "id": 14}',  # line 14
    ]
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    (shard,) = list_shards(str(path))
    rows = _rows(_read_all(shard, generate(id_column="id"), batch_rows=5))
    url = shard.url
    assert len(rows) == 12  # the two blank lines are not rows
    assert {r["shard_rows"] for r in rows} == {12}
    assert [r["row_index"] for r in rows] == list(range(12))
    errors = [r["input_error"] for r in rows]
    assert errors[0] is None and errors[11] is None
    expected = [
        (1, f"{url} line 3: not valid JSON"),
        (2, f"{url} line 4: not UTF-8 (byte 0)"),
        (3, f"{url} line 5: expected a JSON object, got list"),
        (4, f"{url} line 6: 'prompt' is null"),
        (5, f"{url} line 7: 'prompt' is int, expected string"),
        (6, f"{url} line 8: 'prompt' is empty"),
        (7, f"{url} line 9: 'prompt' is empty"),
        (8, f"{url} line 10: no column 'prompt'"),
        (9, f"{url} line 11: id column 'id' is null or missing"),
        (10, f"{url} line 13: id column 'id' is null or missing"),
    ]
    for i, fragment in expected:
        assert errors[i] is not None and errors[i].startswith(fragment), (i, errors[i])
    # a row with an input error (a non-string prompt) carries nothing to the engine
    assert all(r["payload"] is None for r in rows[1:11])
    assert rows[8]["row_id"] == "9"  # a row whose id is known keeps it, error or not
    assert _prompt(rows[0]) == "ok" and rows[0]["row_id"] == "1"
    assert _prompt(rows[11]) == "fine" and rows[11]["row_id"] == "14"


def test_an_id_that_is_an_object_or_a_list_is_the_rows_error(tmp_path, generate):
    path = tmp_path / "ids.jsonl"
    path.write_text(
        '{"prompt": "a", "id": {"k": 1}}\n{"prompt": "b", "id": [1, 2]}\n'
        '{"prompt": "c", "id": 7}\n{"prompt": "d", "id": "x"}\n'
    )
    (shard,) = list_shards(str(path))
    rows = _rows(_read_all(shard, generate(id_column="id"), batch_rows=5))
    errors = [r["input_error"] for r in rows]
    assert (
        errors[0]
        == f"{shard.url} line 1: id column 'id' holds an object; an id is a string or a number"
    )
    assert (
        errors[1]
        == f"{shard.url} line 2: id column 'id' holds a list; an id is a string or a number"
    )
    assert errors[2:] == [None, None] and [r["row_id"] for r in rows[2:]] == ["7", "x"]


def test_jsonl_without_id_column_keeps_generated_ids_for_bad_rows(tmp_path, generate):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "a"}\nnot json\n{"prompt": "c"}\n')
    (shard,) = list_shards(str(path))
    rows = _rows(_read_all(shard, generate()))
    assert [r["row_id"] for r in rows] == [f"{shard.shard_id}:{i}" for i in range(3)]
    assert rows[1]["input_error"].startswith(f"{shard.url} line 2: not valid JSON")


def test_empty_jsonl_yields_no_batches(tmp_path, generate):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"\n\n")
    (shard,) = list_shards(str(path))
    assert _read_all(shard, generate()) == []


def test_gzipped_jsonl_is_read(tmp_path, generate):
    import gzip

    path = tmp_path / "z.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"prompt": "a"}\n{"prompt": "b"}\n'))
    (shard,) = list_shards(str(path))
    assert shard.format == "jsonl"
    preflight(shard, generate(), None)
    assert [_prompt(r) for r in _rows(_read_all(shard, generate()))] == ["a", "b"]


def test_parquet_row_level_problems_name_the_row(tmp_path, generate):
    path = _write_parquet(
        tmp_path / "p.parquet",
        pa.table({"prompt": ["ok", None, "", "fine"], "id": [1, 2, None, 4]}),
    )
    (shard,) = list_shards(str(path))
    rows = _rows(_read_all(shard, generate(id_column="id"), batch_rows=3))
    errors = [r["input_error"] for r in rows]
    assert errors[0] is None and errors[3] is None
    assert errors[1] == f"{shard.url} row 1: 'prompt' is null"
    assert errors[2] == f"{shard.url} row 2: id column 'id' is null or missing"
    # an unknown id falls back to the generated "<shard>:<row>" id, so the error row is findable
    assert [r["row_id"] for r in rows] == ["1", "2", f"{shard.shard_id}:2", "4"]


def test_sampling_columns_become_params(tmp_path, write_jsonl, generate):
    path = write_jsonl(
        tmp_path / "s.jsonl",
        [{"prompt": "a", "mt": 5}, {"prompt": "b", "mt": None}, {"prompt": "c"}],
    )
    (shard,) = list_shards(str(path))
    rows = _rows(_read_all(shard, generate(sampling_columns={"max_tokens": "mt"})))
    assert [r["params"] for r in rows] == [json.dumps({"max_tokens": 5}), None, None]


def test_vanished_file(tmp_path, write_jsonl, generate):
    path = write_jsonl(tmp_path / "gone.jsonl", _prompts(1))
    (shard,) = list_shards(str(path))
    path.unlink()
    with pytest.raises(InputError) as info:
        _read_all(shard, generate())
    assert f"{shard.url}: file vanished after planning" in str(info.value)


def test_jsonl_with_utf8_bom_reads_first_row(tmp_path, generate):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n{"prompt": "b"}\n')
    (shard,) = list_shards(str(path))
    preflight(shard, generate(), None)  # passes
    rows = _rows(_read_all(shard, generate()))
    assert [r["input_error"] for r in rows] == [None, None]
    assert [_prompt(r) for r in rows] == ["a", "b"]


# --------------------------------------------------------------------------- preflight


def test_preflight_parquet_missing_column(tmp_path, generate):
    path = _write_parquet(tmp_path / "p.parquet", pa.table({"question": ["a"], "uid": [1]}))
    (shard,) = list_shards(str(path))
    with pytest.raises(InputError) as info:
        preflight(shard, generate(), None)
    msg = str(info.value)
    assert msg.startswith(shard.url)
    assert "no column 'prompt'" in msg
    assert "(columns: question, uid)" in msg
    assert "set input.prompt_column" in msg


def test_preflight_parquet_missing_id_column(tmp_path, generate):
    path = _write_parquet(tmp_path / "p.parquet", pa.table({"prompt": ["a"]}))
    (shard,) = list_shards(str(path))
    with pytest.raises(InputError) as info:
        preflight(shard, generate(id_column="uid"), None)
    msg = str(info.value)
    assert "no column 'uid'" in msg
    assert "set input.id_column" in msg


def test_preflight_parquet_non_string_prompt(tmp_path, generate):
    path = _write_parquet(tmp_path / "p.parquet", pa.table({"prompt": [1, 2]}))
    (shard,) = list_shards(str(path))
    with pytest.raises(InputError) as info:
        preflight(shard, generate(), None)
    assert f"{shard.url}: column 'prompt' has type int64, expected string" in str(info.value)


def test_preflight_parquet_accepts_string_and_large_string(tmp_path, generate):
    for i, typ in enumerate([pa.string(), pa.large_string()]):
        path = _write_parquet(
            tmp_path / f"p{i}.parquet", pa.table({"prompt": pa.array(["a"], typ)})
        )
        (shard,) = list_shards(str(path))
        preflight(shard, generate(), None)  # no error


def test_preflight_parquet_on_memory(memfs, generate):
    memfs.pipe("/in/p.parquet", _parquet_bytes(pa.table({"q": ["a"]})))
    (shard,) = list_shards("memory://in/p.parquet")
    with pytest.raises(InputError) as info:
        preflight(shard, generate(), None)
    assert "memory:///in/p.parquet: no column 'prompt' (columns: q)" in str(info.value)


def test_preflight_jsonl_first_line_missing_column(tmp_path, generate):
    path = tmp_path / "j.jsonl"
    path.write_text('\n{"question": "a", "n": 1}\nnot json\n{"question": "b"}\n')
    (shard,) = list_shards(str(path))
    with pytest.raises(InputError) as info:
        preflight(shard, generate(), None)
    msg = str(info.value)
    assert f"{shard.url} line 2: no column 'prompt' (columns: question, n)" in msg
    assert "set input.prompt_column" in msg


def test_preflight_jsonl_first_line_missing_id_column(tmp_path, write_jsonl, generate):
    path = write_jsonl(tmp_path / "j.jsonl", [{"prompt": "a"}])
    (shard,) = list_shards(str(path))
    with pytest.raises(InputError) as info:
        preflight(shard, generate(id_column="uid"), None)
    assert "no column 'uid'" in str(info.value)
    assert "set input.id_column" in str(info.value)


def test_preflight_jsonl_accepts_good_first_line(tmp_path, write_jsonl, generate):
    path = write_jsonl(tmp_path / "j.jsonl", [{"prompt": "a", "id": 1}, {"other": 1}])
    (shard,) = list_shards(str(path))
    preflight(shard, generate(id_column="id"), None)  # only the first line is checked


def test_corrupt_parquet_is_an_input_error(tmp_path, generate):
    path = tmp_path / "corrupt.parquet"
    path.write_bytes(os.urandom(64) + b"definitely not parquet")
    (shard,) = list_shards(str(path))
    assert shard.format == "parquet"
    with pytest.raises(InputError) as info:
        preflight(shard, generate(), None)
    assert f"{shard.url}: not a readable Parquet file" in str(info.value)
    with pytest.raises(InputError) as info:
        _read_all(shard, generate())
    assert f"{shard.url}: not a readable Parquet file" in str(info.value)
