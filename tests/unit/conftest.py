"""Shared fixtures for the fast unit tests: no Ray, no engine, no GPU."""

from __future__ import annotations

import copy
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


def _engine_output_schema() -> pa.Schema:
    """The engine stage's output for a generate job: the read bookkeeping, the task's
    result columns, and each row's engine seconds (``actor.EngineReplica.__call__``)."""
    from batchjobs.tasks.generate import TEXT_FIELDS

    return pa.schema(
        [
            ("row_id", pa.string()),
            ("shard_id", pa.string()),
            ("row_index", pa.int64()),
            ("shard_rows", pa.int64()),
            *TEXT_FIELDS.items(),
            ("_cached_tokens", pa.int64()),
        ]
    )


def _engine_output(rows: list[dict[str, Any]]) -> pa.Table:
    """A table shaped like EngineStage's output. Each row needs shard_id, row_index, shard_rows;
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
            "_cached_tokens": 2,
        }
        d.update(r)
        full.append(d)
    return pa.Table.from_pylist(full, schema=_engine_output_schema())


@pytest.fixture
def engine_output():
    """engine_output(rows) -> pa.Table shaped like the engine actor's output."""
    return _engine_output


@pytest.fixture
def make_spec(spec_dict):
    """make_spec(task=..., input={...}, chat={...}, ...) -> the validated JobSpec of
    ``spec_dict`` with those sections merged in (a dict updates the section, anything else
    replaces the key)."""
    from batchjobs.spec import parse_spec

    def _make(**sections: Any):
        raw = copy.deepcopy(spec_dict)
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(raw.get(key), dict):
                raw[key] = {**raw[key], **value}
            else:
                raw[key] = value
        return parse_spec(raw)

    return _make


@pytest.fixture
def read_columns(make_spec):
    """read_columns(task="generate", spec={sections}, **input_keys) -> the ``Columns`` the
    task of that spec reads (``task_for(spec).input_columns()``)."""
    from batchjobs.tasks import task_for

    def _cols(task: str = "generate", spec: dict[str, Any] | None = None, **input_keys: Any):
        return task_for(make_spec(task=task, input=input_keys, **(spec or {}))).input_columns()

    return _cols


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A local tokenizer as ``batchjobs make-model --shape tiny`` builds it (ChatML chat
    template included), built once per session: it takes seconds."""
    from batchjobs.tools.models import SHAPES, build_tokenizer

    out = tmp_path_factory.mktemp("tiny-tokenizer")
    build_tokenizer(out, SHAPES["tiny"]["vocab_size"])
    (out / "config.json").write_text("{}")
    return out


@pytest.fixture
def offline(monkeypatch):
    """No hub: every tokenizer comes from a local directory."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tokenizer(tiny_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


@pytest.fixture
def task_spec(make_spec, tiny_tokenizer_dir, offline):
    """task_spec(task, **sections) -> a JobSpec of that task on the tiny tokenizer."""

    def _spec(task: str, **sections):
        engine = {"model": str(tiny_tokenizer_dir), **sections.pop("engine", {})}
        return make_spec(task=task, engine=engine, **sections)

    return _spec


@pytest.fixture
def fake_pipeline_run(monkeypatch):
    """Install a pipeline.run stand-in (and a CPU device) for pilot tests: ``install(rows_of)``
    has each run call ``rows_of(spec)`` for its row count (it may write outputs or raise),
    then report 10 prompt and 5 completion tokens a row, n * 8 / max_num_seqs s of engine
    time and one replica 30 s in starting. ``install`` returns the specs run, in order."""
    import batchjobs.cluster as cluster
    import batchjobs.pipeline as pipeline

    def install(rows_of):
        calls = []

        def fake_run(spec, **kwargs):
            calls.append(spec)
            n = rows_of(spec)
            s = pipeline.RunSummary(spec.name, spec.output.path, spec.fingerprint(), 1, 0, 1)
            s.rows, s.prompt_tokens, s.completion_tokens = n, 10 * n, 5 * n
            s.engine_s = n * 8.0 / (spec.engine.max_num_seqs or 8)
            s.replicas = {"r": {"startup_s": 30.0, "engine_s": s.engine_s, "idle_s": 0.0}}
            s.gpu_s = s.engine_s + 30.0
            return s

        monkeypatch.setattr(pipeline, "run", fake_run)
        monkeypatch.setattr(cluster, "resolve_device", lambda spec: "cpu")
        return calls

    return install
