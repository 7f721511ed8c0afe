"""Shared fixtures for the fast unit tests: no Ray, no engine, no GPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pytest
import yaml


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A fake local model directory: JobSpec only checks that the path exists."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


@pytest.fixture
def spec_dict(tmp_path: Path, model_dir: Path) -> dict[str, Any]:
    """A minimal valid raw spec (absolute paths, so the current directory does not matter)."""
    return {
        "name": "unit-job",
        "input": {"path": str(tmp_path / "in" / "*.jsonl")},
        "output": {"path": str(tmp_path / "out")},
        "engine": {"model": str(model_dir)},
    }


@pytest.fixture
def write_yaml(tmp_path: Path):
    def _write(data: Any, name: str = "job.yaml") -> Path:
        p = tmp_path / name
        p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
        return p

    return _write


def _clear_memory_fs() -> None:
    mem = fsspec.filesystem("memory")
    mem.store.clear()
    mem.pseudo_dirs.clear()
    mem.pseudo_dirs.append("")


@pytest.fixture
def memfs():
    """fsspec's in-memory filesystem, emptied before and after the test (it is process-global)."""
    _clear_memory_fs()
    yield fsspec.filesystem("memory")
    _clear_memory_fs()


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def write_jsonl():
    """write_jsonl(path, rows): one JSON document per line."""
    return _write_jsonl


ENGINE_OUTPUT_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("shard_id", pa.string()),
        ("row_index", pa.int64()),
        ("shard_rows", pa.int64()),
        ("text", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("latency_s", pa.float32()),
        ("error", pa.string()),
        ("_engine_s", pa.float64()),
        ("_replica", pa.string()),
        ("_replica_startup_s", pa.float64()),
        ("_replica_ready_at", pa.float64()),
        ("_replica_idle_s", pa.float64()),
        ("_replica_limit", pa.int64()),
        ("_replica_inflight_s", pa.float64()),
        ("_replica_busy_s", pa.float64()),
        ("_replica_prompt_tokens", pa.float64()),
        ("_replica_cached_tokens", pa.float64()),
    ]
)


def _engine_output(rows: list[dict[str, Any]]) -> pa.Table:
    """A table shaped like EngineActor's output. Each row needs shard_id, row_index, shard_rows;
    the rest gets defaults that a test may override."""
    full = []
    for r in rows:
        d = {
            "row_id": f"{r['shard_id']}:{r['row_index']}",
            "text": f"out {r['row_index']}",
            "finish_reason": "stop",
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "latency_s": 0.25,
            "error": None,
            "_engine_s": 0.5,
            "_replica": "rep-a",
            "_replica_startup_s": 3.0,
            "_replica_ready_at": 1000.0,
            "_replica_idle_s": 0.5,
            "_replica_limit": 512,
            "_replica_inflight_s": 30.0,
            "_replica_busy_s": 10.0,
            "_replica_prompt_tokens": 400.0,
            "_replica_cached_tokens": 100.0,
        }
        d.update(r)
        full.append(d)
    return pa.Table.from_pylist(full, schema=ENGINE_OUTPUT_SCHEMA)


@pytest.fixture
def engine_output():
    """engine_output(rows) -> pa.Table shaped like the engine actor's output."""
    return _engine_output
