"""Staged writes, per-shard commit, atomic small files, the manifest and cost arithmetic."""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchjobs.cost import Weights, per_million, usd
from batchjobs.errors import OutputError
from batchjobs.layout import MANIFEST, MANIFEST_DELTAS, MANIFEST_V, STAGING, SUCCESS
from batchjobs.manifest import COMMITTED, SUPERSEDED, Manifest, ShardRecord
from batchjobs.sink import SUMMARY_SCHEMA, OutputRoot, output_table, write_staged
from batchjobs.tasks.generate import TEXT_FIELDS


def output_schema(id_column: str | None) -> pa.Schema:
    """A generate job's output file: the id, the shard bookkeeping, the task's columns."""
    return pa.schema(
        [
            (id_column or "row_id", pa.string()),
            ("shard_id", pa.string()),
            ("row_index", pa.int64()),
            *TEXT_FIELDS.items(),
        ]
    )


def _two_shard_batch(engine_output) -> pa.Table:
    """Rows of shards s-a (3 of 4 rows, one error) and s-b (2 of 2 rows), out of order."""
    return engine_output(
        [
            {
                "shard_id": "s-a",
                "row_index": 2,
                "shard_rows": 4,
                "prompt_tokens": 7,
                "_cached_tokens": 5,
            },
            {"shard_id": "s-b", "row_index": 1, "shard_rows": 2, "completion_tokens": 9},
            {"shard_id": "s-a", "row_index": 0, "shard_rows": 4, "error": "prompt too long"},
            {"shard_id": "s-b", "row_index": 0, "shard_rows": 2},
            {"shard_id": "s-a", "row_index": 1, "shard_rows": 4, "_cached_tokens": 0},
        ]
    )


def _read_parquet_at(fs, path: str) -> pa.Table:
    with fs.open(path, "rb") as fh:
        return pq.read_table(io.BytesIO(fh.read()))


def _staged(root: Path) -> dict[str, list[str]]:
    staging = root / STAGING
    if not staging.exists():
        return {}
    return {d.name: sorted(os.listdir(d)) for d in staging.iterdir()}


# --------------------------------------------------------------------------- write_staged


def test_write_staged_summaries(tmp_path, engine_output):
    root = tmp_path / "out"
    meta = {"batchjobs.task": "generate", "batchjobs.fingerprint": "f" * 16}
    summary = write_staged(_two_shard_batch(engine_output), str(root), {}, None, meta)
    assert summary.schema == SUMMARY_SCHEMA
    by_shard = {r["shard_id"]: r for r in summary.to_pylist()}
    assert set(by_shard) == {"s-a", "s-b"}

    a, b = by_shard["s-a"], by_shard["s-b"]
    assert (a["shard_rows"], a["rows"], a["error_rows"]) == (4, 3, 1)
    assert (b["shard_rows"], b["rows"], b["error_rows"]) == (2, 2, 0)
    assert a["prompt_tokens"] == 7 + 10 + 10
    assert a["completion_tokens"] == 5 * 3
    assert b["prompt_tokens"] == 20
    assert b["completion_tokens"] == 9 + 5
    assert a["cached_tokens"] == 5 + 2 + 0
    assert b["cached_tokens"] == 2 + 2
    # the file's schema metadata rides along, for the tracker (manifest, run summary)
    assert json.loads(a["metadata"]) == meta and json.loads(b["metadata"]) == meta
    files = {
        r["shard_id"]: pq.read_schema(root / STAGING / r["shard_id"] / r["file"]) for r in (a, b)
    }
    for schema in files.values():
        assert {k.decode(): v.decode() for k, v in schema.metadata.items()} == meta

    # one staged file per shard, named as the summary says
    assert _staged(root) == {"s-a": [a["file"]], "s-b": [b["file"]]}
    assert a["file"].endswith(".parquet") and a["file"] != b["file"]


def test_staged_file_has_output_schema_sorted_by_row_index(tmp_path, engine_output):
    root = tmp_path / "out"
    summary = write_staged(_two_shard_batch(engine_output), str(root), {}, None)
    a = next(r for r in summary.to_pylist() if r["shard_id"] == "s-a")
    table = pq.read_table(root / STAGING / "s-a" / a["file"])
    assert table.schema.remove_metadata().equals(output_schema(None))
    assert table.column_names == [
        "row_id",
        "shard_id",
        "row_index",
        "text",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "latency_s",
        "error",
    ]
    assert table.column("row_index").to_pylist() == [0, 1, 2]
    assert table.column("row_id").to_pylist() == ["s-a:0", "s-a:1", "s-a:2"]
    assert table.column("error").to_pylist() == ["prompt too long", None, None]
    assert set(table.column("shard_id").to_pylist()) == {"s-a"}


def test_staged_file_uses_id_column_name(tmp_path, engine_output):
    root = tmp_path / "out"
    batch = engine_output(
        [
            {"shard_id": "s", "row_index": 1, "shard_rows": 2, "row_id": "u-1"},
            {"shard_id": "s", "row_index": 0, "shard_rows": 2, "row_id": "u-0"},
        ]
    )
    (row,) = write_staged(batch, str(root), {}, "uid").to_pylist()
    table = pq.read_table(root / STAGING / "s" / row["file"])
    assert table.schema.remove_metadata().equals(output_schema("uid"))
    assert table.column_names[0] == "uid"
    assert "row_id" not in table.column_names
    assert table.column("uid").to_pylist() == ["u-0", "u-1"]


def test_output_table_puts_id_and_bookkeeping_first_and_records_vector_size():
    """Whatever columns a task writes (here embed's), the file starts with the id, shard_id
    and row_index, drops the pipeline's internal columns, and says the vector size."""
    from batchjobs.tasks.embed import embedding_array

    part = pa.table(
        {
            "embedding": embedding_array([[1.0, 0.0, 0.0], None], 3),
            "row_index": pa.array([1, 0], pa.int64()),
            "shard_rows": pa.array([2, 2], pa.int64()),
            "row_id": pa.array(["d-1", "d-0"]),
            "truncated": pa.array([True, False]),
            "_cached_tokens": pa.array([0, 3], pa.int64()),
            "shard_id": pa.array(["s", "s"]),
            "error": pa.array([None, "row d-0: document is empty"]),
        }
    )
    out = output_table(part, "doc_id", {"batchjobs.task": "embed"})
    assert out.column_names == [
        "doc_id",
        "shard_id",
        "row_index",
        "embedding",
        "truncated",
        "error",
    ]
    assert out.column("doc_id").to_pylist() == ["d-0", "d-1"]  # sorted by row_index
    assert out.column("row_index").to_pylist() == [0, 1]
    assert out.column("embedding").to_pylist() == [None, [1.0, 0.0, 0.0]]
    assert out.schema.field("embedding").type == pa.list_(pa.float32(), 3)
    assert out.schema.metadata == {b"batchjobs.task": b"embed", b"batchjobs.embedding.dim": b"3"}


def test_write_staged_on_memory(memfs, engine_output):
    summary = write_staged(_two_shard_batch(engine_output), "memory://out", {}, None)
    for row in summary.to_pylist():
        path = f"/out/{STAGING}/{row['shard_id']}/{row['file']}"
        assert memfs.exists(path)
        table = _read_parquet_at(memfs, path)
        assert table.num_rows == row["rows"]
        assert table.schema.remove_metadata().equals(output_schema(None))


def test_write_staged_failure_is_an_output_error(tmp_path, engine_output):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the output root should be")
    with pytest.raises(OutputError) as info:
        write_staged(_two_shard_batch(engine_output), str(blocker), {}, None)
    msg = str(info.value)
    assert msg.startswith("cannot write ")
    assert f"{blocker}/{STAGING}/" in msg


# --------------------------------------------------------------------------- commit


def test_commit_moves_reported_files_and_drops_strays(tmp_path, engine_output):
    root = tmp_path / "out"
    out = OutputRoot(str(root))
    assert out.local
    batch = engine_output([{"shard_id": "s", "row_index": i, "shard_rows": 4} for i in range(2)])
    batch2 = engine_output([{"shard_id": "s", "row_index": i, "shard_rows": 4} for i in (2, 3)])
    f1 = write_staged(batch, str(root), {}, None).column("file")[0].as_py()
    f2 = write_staged(batch2, str(root), {}, None).column("file")[0].as_py()
    # a retried write task that died after writing: its file is staged but never reported
    stray = write_staged(batch2, str(root), {}, None).column("file")[0].as_py()
    assert len(_staged(root)["s"]) == 3

    final = out.commit("s", [f2, f1])
    assert final == [str(root / "s" / name) for name in sorted([f1, f2])]
    committed = sorted(p for p in os.listdir(root / "s") if p.endswith(".parquet"))
    assert committed == sorted([f1, f2])
    assert stray not in os.listdir(root / "s")
    assert not (root / STAGING / "s").exists()
    rows = pq.read_table(root / "s").column("row_index").to_pylist()
    assert sorted(rows) == [0, 1, 2, 3]  # no duplicated rows from the stray file

    out.remove_empty_staging()
    assert not (root / STAGING).exists()


@pytest.mark.parametrize("where", ["local", "memory"])
def test_commit_compacts_small_staged_files_into_one_in_row_order(
    tmp_path, memfs, engine_output, where
):
    """Rows of a shard reach the writer interleaved with other shards': many small staged
    files. Up to compact_bytes, the commit writes them as one file sorted by row_index
    (strays still dropped, schema metadata kept); above it, or with 0, the files stay."""
    url = str(tmp_path / "out") if where == "local" else "memory://out"
    fs = OutputRoot(url).fs
    meta = {"batchjobs.task": "generate"}

    def stage(sid: str, indexes) -> str:
        rows = [{"shard_id": sid, "row_index": i, "shard_rows": 6} for i in indexes]
        return write_staged(engine_output(rows), url, {}, None, meta).column("file")[0].as_py()

    names = [stage("s", (4, 1)), stage("s", (0, 5)), stage("s", (3, 2))]
    stage("s", (9,))  # a stray: written by an attempt that never reported
    (final,) = OutputRoot(url, compact_bytes=1 << 20).commit("s", names)
    table = _read_parquet_at(fs, final)
    assert table.column("row_index").to_pylist() == [0, 1, 2, 3, 4, 5]
    assert table.schema.metadata[b"batchjobs.task"] == b"generate"
    root = OutputRoot(url).root
    parquet = lambda d: [p for p in fs.ls(d, detail=False) if p.endswith(".parquet")]  # noqa: E731
    assert parquet(f"{root}/s") == [final]
    assert not fs.exists(f"{root}/{STAGING}/s") or parquet(f"{root}/{STAGING}/s") == []

    for limit in (0, 100):  # off, and smaller than the files: committed as staged
        names = [stage("t", (0, 1)), stage("t", (2, 3))]
        committed = OutputRoot(url, compact_bytes=limit).commit("t", names)
        assert [p.rpartition("/")[2] for p in committed] == sorted(names)


def test_commit_replaces_an_earlier_partial_commit(tmp_path, engine_output):
    root = tmp_path / "out"
    out = OutputRoot(str(root))
    (root / "s").mkdir(parents=True)
    (root / "s" / "old.parquet").write_bytes(b"stale")
    batch = engine_output([{"shard_id": "s", "row_index": 0, "shard_rows": 1}])
    name = write_staged(batch, str(root), {}, None).column("file")[0].as_py()
    out.commit("s", [name])
    assert "old.parquet" not in os.listdir(root / "s")
    assert name in os.listdir(root / "s")


def test_commit_without_files_creates_success_marker(tmp_path):
    root = tmp_path / "out"
    out = OutputRoot(str(root))
    assert out.commit("empty-shard", []) == []
    assert (root / "empty-shard").is_dir()
    assert os.listdir(root / "empty-shard") == [SUCCESS]


def test_commit_on_memory_writes_success(memfs, engine_output):
    out = OutputRoot("memory://out")
    assert not out.local
    batch = engine_output([{"shard_id": "s", "row_index": i, "shard_rows": 2} for i in range(2)])
    name = write_staged(batch, "memory://out", {}, None).column("file")[0].as_py()
    stray = write_staged(batch, "memory://out", {}, None).column("file")[0].as_py()

    final = out.commit("s", [name])
    assert final == [f"/out/s/{name}"]
    assert memfs.exists(f"/out/s/{name}")
    assert memfs.exists(f"/out/s/{SUCCESS}")
    assert not memfs.exists(f"/out/s/{stray}")
    assert not memfs.exists(f"/out/{STAGING}/s/{name}")
    assert not memfs.exists(f"/out/{STAGING}/s/{stray}")
    assert _read_parquet_at(memfs, f"/out/s/{name}").num_rows == 2


def test_commit_without_files_on_memory(memfs):
    out = OutputRoot("memory://out")
    out.commit("e", [])
    assert memfs.exists(f"/out/e/{SUCCESS}")


def test_clear_shard_removes_staged_and_committed_output(tmp_path, engine_output):
    root = tmp_path / "out"
    out = OutputRoot(str(root))
    (root / "s").mkdir(parents=True)
    (root / "s" / "old.parquet").write_bytes(b"x")
    write_staged(
        engine_output([{"shard_id": "s", "row_index": 0, "shard_rows": 1}]), str(root), {}, None
    )
    out.clear_shard("s")
    assert not (root / "s").exists()
    assert not (root / STAGING / "s").exists()


def test_write_atomic_replaces_content(tmp_path):
    root = tmp_path / "out"
    out = OutputRoot(str(root))
    out.write_atomic("state.json", b"first")
    out.write_atomic("state.json", b"second, longer")
    assert (root / "state.json").read_bytes() == b"second, longer"
    assert out.read("state.json") == b"second, longer"
    assert os.listdir(root) == ["state.json"]  # no temporary file left behind
    assert out.read("absent.json") is None


def test_write_atomic_on_memory(memfs):
    out = OutputRoot("memory://out")
    out.write_atomic("state.json", b"first")
    out.write_atomic("state.json", b"second")
    assert memfs.cat("/out/state.json") == b"second"
    assert out.read("state.json") == b"second"


def test_is_empty_and_wipe(tmp_path):
    out = OutputRoot(str(tmp_path / "out"))
    assert out.is_empty()
    out.write_atomic("x", b"1")
    assert not out.is_empty()
    out.wipe()
    assert out.is_empty()
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- manifest


def _record(sid: str, **kw) -> ShardRecord:
    rec = ShardRecord(
        shard_id=sid,
        source=f"file:///in/{sid}.jsonl",
        status=COMMITTED,
        rows=10,
        error_rows=1,
        prompt_tokens=100,
        completion_tokens=50,
        files=[f"/out/{sid}/part.parquet"],
        engine="vllm",
        model="/models/m",
        fingerprint="abcdef0123456789",
        started_at=1.5,
        committed_at=2.25,
    )
    for k, v in kw.items():
        setattr(rec, k, v)
    rec.finalise(Weights(0.01, 0.03, "fit"), 2, 3.0)  # 100 × 0.01 + 50 × 0.03 = 2.5 s
    return rec


def test_manifest_round_trip(tmp_path):
    out = OutputRoot(str(tmp_path / "out"))
    m = Manifest(out)
    assert m.records == {}
    m.records["s1"] = _record("s1")
    m.records["s2"] = _record(
        "s2",
        status="pending",
        fingerprint="other",
        prompt_tokens=0,
        completion_tokens=0,
    )
    m.save()
    assert (tmp_path / "out" / MANIFEST).exists()

    loaded = Manifest(OutputRoot(str(tmp_path / "out")))
    assert loaded.records == m.records
    assert loaded.records["s2"].usd_per_1m_tokens is None  # None survives the round trip
    assert loaded.records["s1"].usd_per_1m_tokens == pytest.approx(
        m.records["s1"].usd_per_1m_tokens
    )
    assert set(loaded.committed()) == {"s1"}
    assert loaded.fingerprints() == {"abcdef0123456789"}
    assert [r["shard_id"] for r in loaded.as_rows()] == ["s1", "s2"]


def test_manifest_lines_are_json_records(tmp_path):
    out = OutputRoot(str(tmp_path / "out"))
    m = Manifest(out)
    m.records["s1"] = _record("s1")
    m.save()
    lines = (tmp_path / "out" / MANIFEST).read_text().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["shard_id"] == "s1"
    assert json.loads(lines[0])["status"] == COMMITTED


@pytest.mark.parametrize(
    "bad_line",
    ["{not json}", '["a", "list"]', '{"shard_id": "x", "source": "y", "unknown_field": 1}'],
)
def test_corrupt_manifest_line_names_the_line(tmp_path, bad_line):
    root = tmp_path / "out"
    root.mkdir()
    good = json.dumps({"shard_id": "a", "source": "s"})
    (root / MANIFEST).write_text(f"{good}\n\n{bad_line}\n")
    with pytest.raises(OutputError) as info:
        Manifest(OutputRoot(str(root)))
    msg = str(info.value)
    assert f"{root}/{MANIFEST} line 3 is not a shard record" in msg
    assert "--fresh" in msg


@pytest.fixture(params=["local", "memory"])
def manifest_root(request, tmp_path, memfs):
    """An output root on a local disk and on an object-store-like filesystem (no rename)."""
    url = str(tmp_path / "out") if request.param == "local" else "memory://out"
    return OutputRoot(url)


def _deltas(root: OutputRoot) -> list[str]:
    try:
        return sorted(
            os.path.basename(p) for p in root.fs.ls(root.path(MANIFEST_DELTAS), detail=False)
        )
    except FileNotFoundError:
        return []


def _count_rewrites(monkeypatch, root: OutputRoot) -> list[str]:
    written: list[str] = []
    real = root.write_atomic

    def counting(name, data):
        written.append(name)
        real(name, data)

    monkeypatch.setattr(root, "write_atomic", counting)
    return written


def test_commit_writes_one_small_file_and_not_the_whole_manifest(manifest_root, monkeypatch):
    m = Manifest(manifest_root, compact_every=100)
    rewrites = _count_rewrites(monkeypatch, manifest_root)
    for i in range(99):
        m.commit(_record(f"s{i:03d}"))
    assert rewrites == []  # 99 commits, no rewrite of _manifest.jsonl
    assert _deltas(manifest_root) == [f"{i:012d}.jsonl" for i in range(1, 100)]
    assert manifest_root.read(MANIFEST) is None
    # a reader (the next run, `batchjobs manifest`) sees every commit already
    seen = Manifest(manifest_root)
    assert seen.records == m.records and len(seen.committed()) == 99

    m.commit(_record("s099"))  # the 100th: one compaction, the deltas go
    assert rewrites == [MANIFEST]
    assert _deltas(manifest_root) == []
    if manifest_root.local:
        assert not os.path.exists(manifest_root.path(MANIFEST_DELTAS))
    lines = manifest_root.read(MANIFEST).decode().splitlines()
    assert [json.loads(x)["shard_id"] for x in lines] == [f"s{i:03d}" for i in range(100)]
    assert all(json.loads(x)["v"] == MANIFEST_V and json.loads(x)["seq"] == 100 for x in lines)
    assert Manifest(manifest_root).records == m.records


def test_compactions_grow_with_the_manifest(tmp_path, monkeypatch):
    """Every max(compact_every, records / 10) commits: rewrites stay a constant cost per commit."""
    root = OutputRoot(str(tmp_path / "out"))
    m = Manifest(root, compact_every=5)
    rewrites = _count_rewrites(monkeypatch, root)
    sizes = []
    for i in range(300):
        m.commit(_record(f"s{i}"))
        if len(rewrites) > len(sizes):
            sizes.append(len(m.records))
    assert sizes[:3] == [5, 10, 15]
    gaps = [b - a for a, b in zip(sizes, sizes[1:])]
    assert gaps == sorted(gaps) and gaps[-1] >= 25  # records // 10 once past 50
    rows_written = sum(sizes)
    assert rows_written < 300 * 12  # the old full rewrite per commit: 300 * 301 / 2
    assert Manifest(root).records == m.records


def test_compact_at_the_end_and_a_later_record_wins(manifest_root):
    m = Manifest(manifest_root)
    m.commit(_record("a", rows=1))
    m.commit(_record("b"))
    m.commit(_record("a", rows=2))  # the same shard again: the later record counts
    assert Manifest(manifest_root).records["a"].rows == 2
    m.compact()
    assert _deltas(manifest_root) == []
    lines = manifest_root.read(MANIFEST).decode().splitlines()
    assert sorted((json.loads(x)["shard_id"], json.loads(x)["rows"]) for x in lines) == [
        ("a", 2),
        ("b", 10),
    ]
    m.compact()  # nothing new: no rewrite needed, nothing breaks
    assert Manifest(manifest_root).records == m.records


def test_a_killed_driver_leaves_its_commits_for_the_next_run(manifest_root):
    first = Manifest(manifest_root)
    first.save()  # an empty compacted manifest, as an earlier run would leave
    for sid in ("a", "b", "c"):
        first.commit(_record(sid))
    # killed here: no compaction; the next run reads the deltas and goes on numbering
    second = Manifest(manifest_root)
    assert set(second.committed()) == {"a", "b", "c"} and second.seq == 3
    second.commit(_record("d"))
    assert _deltas(manifest_root)[-1] == f"{4:012d}.jsonl"
    second.compact()
    assert _deltas(manifest_root) == []
    assert set(Manifest(manifest_root).committed()) == {"a", "b", "c", "d"}


def test_crash_between_compaction_and_deleting_deltas_loses_and_doubles_nothing(
    manifest_root, monkeypatch
):
    m = Manifest(manifest_root)
    m.commit(_record("a"))
    m.commit(_record("b"))

    # the compaction is written, but the deltas are not deleted (crash or no delete right)
    def denied(*args, **kwargs):
        raise OSError("denied")

    monkeypatch.setattr(type(manifest_root.fs), "rm", denied)
    m.records["a"].status = SUPERSEDED  # changed in place, then saved whole (retire_superseded)
    m.save()
    assert _deltas(manifest_root) == [f"{1:012d}.jsonl", f"{2:012d}.jsonl"]
    monkeypatch.undo()

    again = Manifest(manifest_root)
    # delta 1 (a: committed) is older than the compaction: it must not undo "superseded"
    assert again.records["a"].status == SUPERSEDED
    assert set(again.committed()) == {"b"} and len(again.records) == 2
    again.commit(_record("c"))  # numbering continues after the leftovers
    assert again.seq == 3
    assert set(Manifest(manifest_root).committed()) == {"b", "c"}
    again.compact()  # and the leftovers are deleted with this run's deltas
    assert _deltas(manifest_root) == []
    assert set(Manifest(manifest_root).committed()) == {"b", "c"}


def test_a_reader_racing_a_compaction_reads_again(manifest_root, monkeypatch):
    m = Manifest(manifest_root)
    m.commit(_record("a"))
    fs_type = type(manifest_root.fs)
    real_cat = fs_type.cat
    calls = []

    def racing_cat(self, paths, *a, **k):
        calls.append(paths)
        if len(calls) == 1:  # the writer compacts between our listing and our read
            m.compact()
            raise FileNotFoundError(paths[0])
        return real_cat(self, paths, *a, **k)

    monkeypatch.setattr(fs_type, "cat", racing_cat)
    assert set(Manifest(manifest_root).committed()) == {"a"}
    assert len(calls) == 1  # the second reading found the compacted manifest, no deltas


def test_old_manifest_lines_without_version_or_seq_are_read(tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    old = asdict(_record("a"))
    (root / MANIFEST).write_text(json.dumps(old) + "\n")
    m = Manifest(OutputRoot(str(root)))
    assert m.records["a"] == _record("a") and m.seq == 0
    m.commit(_record("b"))
    assert set(Manifest(OutputRoot(str(root))).committed()) == {"a", "b"}


def test_newer_manifest_version_and_bad_delta_lines_are_refused(tmp_path):
    root = tmp_path / "out"
    (root / MANIFEST_DELTAS).mkdir(parents=True)
    (root / MANIFEST).write_text(json.dumps({"shard_id": "a", "source": "s", "v": 1}) + "\n")
    (root / MANIFEST_DELTAS / "000000000001.jsonl").write_text('{"shard_id": "b"}\n')
    with pytest.raises(OutputError) as info:
        Manifest(OutputRoot(str(root)))
    assert f"{root}/{MANIFEST_DELTAS}/000000000001.jsonl line 1 is not a shard record" in str(
        info.value
    )
    (root / MANIFEST).write_text(json.dumps({"shard_id": "a", "source": "s", "v": 2}) + "\n")
    with pytest.raises(OutputError, match=r"line 1 has schema version 2; .*upgrade batchjobs"):
        Manifest(OutputRoot(str(root)))


def test_temp_files_of_a_write_that_died_are_not_records(tmp_path):
    root = tmp_path / "out"
    (root / MANIFEST_DELTAS).mkdir(parents=True)
    (root / MANIFEST_DELTAS / ".000000000001.jsonl.ab12cd34.tmp").write_text('{"trunc')
    m = Manifest(OutputRoot(str(root)))
    assert m.records == {}
    m.commit(_record("a"))
    assert set(Manifest(OutputRoot(str(root))).committed()) == {"a"}


# --------------------------------------------------------------------------- cost


def test_finalise_computes_cost_and_rates():
    rec = ShardRecord(shard_id="s", source="x", prompt_tokens=1000, completion_tokens=3000)
    rec.finalise(Weights(0.001, 0.003, "fit"), gpus_per_replica=2, usd_per_gpu_hour=3.6)
    assert rec.engine_s == pytest.approx(1.0 + 9.0)
    assert rec.cost_weights == {
        "prefill_s": 0.001,
        "decode_s": 0.003,
        "method": "fit",
        "windows": 0,
    }
    assert rec.gpu_s == pytest.approx(20.0)
    assert rec.cost_usd == pytest.approx(20.0 / 3600 * 3.6)  # 0.02
    assert rec.usd_per_1m_tokens == pytest.approx(0.02 / 4000 * 1e6)  # 5.0
    assert rec.usd_per_1m_output_tokens == pytest.approx(0.02 / 3000 * 1e6)
    assert rec.tokens_per_s == pytest.approx(400.0)
    assert rec.output_tokens_per_s == pytest.approx(300.0)


def test_finalise_without_tokens_or_engine_time():
    rec = ShardRecord(shard_id="s", source="x")
    rec.finalise(Weights(0.001, 0.003, "fit"), gpus_per_replica=4, usd_per_gpu_hour=2.0)
    assert rec.gpu_s == 0.0
    assert rec.cost_usd == 0.0
    assert rec.usd_per_1m_tokens is None
    assert rec.usd_per_1m_output_tokens is None
    assert rec.tokens_per_s is None
    assert rec.output_tokens_per_s is None


def test_finalise_prompt_tokens_only():
    rec = ShardRecord(shard_id="s", source="x", prompt_tokens=600, cached_tokens=100)
    rec.finalise(Weights(0.002, 0.5, "fit"), gpus_per_replica=1, usd_per_gpu_hour=36.0)
    assert rec.engine_s == pytest.approx(1.0)  # the 500 prompt tokens the engine computed
    assert rec.cost_usd == pytest.approx(0.01)
    assert rec.usd_per_1m_tokens == pytest.approx(0.01 / 600 * 1e6)  # per token the job sent
    assert rec.usd_per_1m_output_tokens is None  # no output tokens to divide by
    assert rec.output_tokens_per_s == 0.0


def test_cost_helpers():
    assert usd(3600.0, 2.5) == pytest.approx(2.5)
    assert usd(0.0, 2.5) == 0.0
    assert per_million(1.0, 500_000) == pytest.approx(2.0)
    assert per_million(1.0, 0) is None


def test_changed_input_file_retires_the_old_shard_output(tmp_path, spec_dict):
    import os

    from batchjobs.manifest import COMMITTED, SUPERSEDED, Manifest, ShardRecord
    from batchjobs.planning import plan_job, retire_superseded
    from batchjobs.spec import parse_spec

    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "a.jsonl").write_text('{"prompt": "x"}\n')
    spec_dict["input"]["path"] = str(inp / "*.jsonl")
    spec = parse_spec(spec_dict)
    plan = plan_job(spec)
    (old,) = plan.todo
    # pretend the first run committed it
    (tmp_path / "out" / old.shard_id).mkdir(parents=True)
    (tmp_path / "out" / old.shard_id / "part.parquet").write_bytes(b"x")
    plan.manifest.records[old.shard_id] = ShardRecord(
        shard_id=old.shard_id,
        source=old.url,
        status=COMMITTED,
        rows=1,
        fingerprint=spec.fingerprint(),
    )
    plan.manifest.save()
    # the input file changes: a new shard id
    (inp / "a.jsonl").write_text('{"prompt": "x"}\n{"prompt": "y"}\n')
    os.utime(inp / "a.jsonl", (1, 1))
    plan = plan_job(spec)
    assert [s.shard_id for s in plan.todo] != [old.shard_id]
    retire_superseded(plan)
    assert not (tmp_path / "out" / old.shard_id).exists()
    rec = Manifest(plan.out).records[old.shard_id]
    assert rec.status == SUPERSEDED and rec.files == []
