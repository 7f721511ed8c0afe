"""Helpers the fault and stop tests share: input shards with known ids, a `batchjobs run`
command over them, what a job committed and wrote, and a driver killed mid-job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import yaml
from conftest import REPO, spec_dict

from batchjobs.manifest import Manifest
from batchjobs.sink import OutputRoot


def write_shards(inp: Path, shards: int, rows: int) -> set[str]:
    """``shards`` Parquet files in ``inp`` of ``rows`` rows each (ids "s<shard>-r<row>",
    prompts long enough to take the tokens asked for); every id."""
    inp.mkdir()
    ids = set()
    for s in range(shards):
        keys = [f"s{s}-r{i}" for i in range(rows)]
        ids |= set(keys)
        prompts = [f"list every number of the river {k}" for k in keys]
        pq.write_table(pa.table({"id": keys, "prompt": prompts}), inp / f"part-{s}.parquet")
    return ids


def cli_job(tmp_path: Path, model: Path, out: Path, *options: str) -> tuple[list[str], dict]:
    """A `batchjobs run` command (with ``options``) over tmp_path/in into ``out``, and its
    environment: 24 tokens a row, 4 rows a batch, 20 rows a file."""
    spec = spec_dict(
        model,
        str(tmp_path / "in"),
        str(out),
        input={"id_column": "id"},
        sampling={"max_tokens": 24, "ignore_eos": True},
        resources={"batch_size": 4, "max_inflight_batches": 2, "rows_per_file": 20},
    )
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    return [sys.executable, "-m", "batchjobs.cli", "run", str(path), *options], env


def committed(out: Path) -> dict:
    """The committed shards' records: _manifest.jsonl and the commits since its compaction."""
    return Manifest(OutputRoot(str(out))).committed()


def written_ids(out: Path) -> list[str]:
    """The ``id`` column of every row written under ``out``."""
    return pds.dataset(str(out), format="parquet").to_table().column("id").to_pylist()


def start_job(
    cmd: list[str], env: dict, out: OutputRoot, commits: int, **pipes
) -> subprocess.Popen:
    """Start the job ``cmd`` in a session of its own (``pipes``: Popen's stdout, stderr,
    text) and return once ``out`` holds ``commits`` committed shards, the job ended, or
    400 s passed."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, **pipes)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if len(Manifest(out).committed()) >= commits:
            break
        time.sleep(0.2)
    return proc


def kill_after_commits(cmd: list[str], env: dict, out: OutputRoot, commits: int) -> bytes:
    """Start the job ``cmd``, wait until ``out`` holds ``commits`` committed shards, then
    SIGKILL the driver and everything it started. What it printed."""
    proc = start_job(cmd, env, out, commits, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.poll() is None, (
        "the job finished before it could be killed: " + proc.communicate()[0].decode()[-3000:]
    )
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    return proc.communicate()[0]
