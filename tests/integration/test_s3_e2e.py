"""Object storage for real: jobs that read and write ``s3://`` on a moto S3 server on
127.0.0.1 (one for the module, IAM authentication on, so credentials that do not reach a
process make it fail), with the store failing in the ways production stores do.

* ``batchjobs run`` with the real vLLM CPU engine: input shards read from S3, shards
  committed with ``_SUCCESS``; the driver killed mid-job; an input shard changed before the
  rerun; the rerun, under injected store errors and slow writes, commits every row exactly
  once. Credentials come from the input URL (``s3://KEY:SECRET@bucket``) and the output's
  storage options in the first run, from the environment in the second; none of them (nor
  an engine env value, nor a Ray auth token) is in any file the job wrote, on S3 or in
  Ray's session folder, or in what it printed.
* A stand-in engine (the store is under test, not generation): writes that fail for good
  from the third on end the job with one clear error after bounded retries; a bucket that
  vanishes mid-job ends it at once; the rerun writes every row exactly once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO, spec_dict
from jobhelpers import kill_after_commits
from s3_server import REGION, Fault, S3Server

from batchjobs.engines.base import Engine, Result
from batchjobs.errors import OutputError
from batchjobs.manifest import SUPERSEDED, Manifest
from batchjobs.sink import OutputRoot

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3():
    server = S3Server()
    for bucket in ("inputs", "outputs"):
        server.bucket(bucket)
    yield server
    server.stop()


def _put_shards(fs, prefix: str, shards: int, rows: int) -> dict[str, set[str]]:
    """``shards`` Parquet files under ``prefix``: ids by file name."""
    ids = {}
    for s in range(shards):
        name = f"part-{s}.parquet"
        ids[name] = _put_shard(fs, f"{prefix}/{name}", [f"s{s}-r{i}" for i in range(rows)])
    return ids


def _put_shard(fs, path: str, keys: list[str], bad_line: int | None = None) -> set[str]:
    """One shard, Parquet or (by its name) JSON Lines, whose line ``bad_line`` (1-based) is
    not JSON; its ids, without the bad line's."""
    prompts = [f"list every number of the river {k}" for k in keys]
    if path.endswith(".jsonl"):
        lines = [json.dumps({"id": k, "prompt": p}) for k, p in zip(keys, prompts)]
        if bad_line is not None:
            lines[bad_line - 1] = "{this is not json"
            keys = keys[: bad_line - 1] + keys[bad_line:]
        fs.pipe_file(path, ("\n".join(lines) + "\n").encode())
        return set(keys)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": keys, "prompt": prompts}), sink)
    fs.pipe_file(path, sink.getvalue().to_pybytes())
    return set(keys)


def _output_ids(fs, root: str) -> list[str]:
    """Every id under an output root, as readers see it (names starting with _ skipped)."""
    return pds.dataset(root, filesystem=fs, format="parquet").to_table().column("id").to_pylist()


def _assert_nowhere(secrets: list[str], blobs: dict[str, bytes]) -> None:
    leaks = [
        (i, where)
        for where, data in blobs.items()
        for i, s in enumerate(secrets)
        if s.encode() in data
    ]
    assert not leaks, f"secrets (by index) found: {leaks}"


def _bucket_files(fs, root: str) -> dict[str, bytes]:
    files = fs.find(root)
    assert files, f"nothing under {root}"
    return {f"s3://{p}": fs.cat_file(p) for p in files}


def _local_files(folder: Path) -> dict[str, bytes]:
    return {
        str(p): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and not p.is_symlink() and not p.is_socket()
    }


# --------------------------------------------------------------------------- the real engine


def _job(model: Path, path: Path, inp: str, in_opts: dict, out_opts: dict, env: dict) -> None:
    spec = spec_dict(
        model,
        inp,
        "s3://outputs/job1",
        name="s3-job",
        input={"id_column": "id", "order": "input", "storage_options": in_opts},
        output={"storage_options": out_opts},
        engine={"env": {"VLLM_CPU_KVCACHE_SPACE": "1", **env}},
        sampling={"max_tokens": 16, "ignore_eos": True},
        resources={"batch_size": 4, "max_inflight_batches": 1, "rows_per_file": 8},
    )
    path.write_text(yaml.safe_dump(spec))


def test_cli_on_s3_kill_resume_changed_shard_store_faults_and_no_secret_anywhere(
    s3, tiny_model, tmp_path
):
    fs = s3.fs()
    by_file = _put_shards(fs, "inputs/job1", shards=3, rows=24)
    by_file["part-3.jsonl"] = _put_shard(
        fs, "inputs/job1/part-3.jsonl", [f"s3-r{i}" for i in range(24)], bad_line=6
    )
    token = uuid.uuid4().hex[:12]
    engine_secret = f"engine-env-secret-{token}"
    ray_token = f"ray-auth-token-{token}"
    quoted = quote(s3.secret, safe="")
    secrets = [s3.key, s3.secret, quoted, engine_secret, ray_token]
    ray_tmp = Path(tempfile.mkdtemp(prefix="bjs3-", dir="/tmp"))  # short: Ray's socket paths
    local_tmp = ray_tmp / "tmp"  # the job's local files (its log before it reaches S3)
    local_tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",
        RAY_TMPDIR=str(ray_tmp),
        TMPDIR=str(local_tmp),
        RAY_AUTH_TOKEN=ray_token,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,  # no credentials but the ones given
        AWS_CONFIG_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
    )
    job = tmp_path / "job.yaml"  # the user's own file: it holds the credentials of run 1
    cmd = [sys.executable, "-m", "batchjobs.cli", "run", str(job)]
    printed: dict[str, bytes] = {}
    out = OutputRoot("s3://outputs/job1", s3.options())
    try:
        # Run 1: credentials in the input URL and the output's storage options; killed once
        # a shard is committed.
        _job(
            tiny_model,
            job,
            f"s3://{s3.key}:{quoted}@inputs/job1/part-*",
            {"client_kwargs": {"endpoint_url": s3.url, "region_name": REGION}},
            s3.options(),
            {"BATCHJOBS_TEST_SECRET": engine_secret},
        )
        printed["run 1 output"] = kill_after_commits(cmd, env, out, commits=1)
        first = {sid: r for sid, r in Manifest(out).committed().items()}
        assert 1 <= len(first) < 4, first
        for sid in first:
            assert fs.exists(f"outputs/job1/{sid}/_SUCCESS")

        # A committed shard's input changes before the rerun: its old rows must go.
        changed_sid, changed = next(
            (sid, r) for sid, r in first.items() if r.source.endswith(".parquet")
        )
        name = changed.source.rsplit("/", 1)[1]
        assert changed.source == f"s3://inputs/job1/{name}"  # no credentials in the source
        by_file[name] = _put_shard(
            fs, f"inputs/job1/{name}", [f"{name}-v2-r{i}" for i in range(24)]
        )

        # Run 2: credentials from the environment only, and a store that fails and is slow:
        # more errors in a row than botocore's own attempts, so batchjobs' retries matter.
        _job(
            tiny_model,
            job,
            "s3://inputs/job1/part-*",
            {},
            {},
            {"BATCHJOBS_TEST_SECRET": engine_secret},
        )
        faults = [
            s3.inject(Fault("PUT", re.compile(r"^/outputs/job1/_staging/"), times=7, copy=False)),
            s3.inject(
                Fault(
                    "PUT",
                    re.compile(r"^/outputs/job1/[^_/][^/]*/[^/]+\.parquet$"),
                    times=7,
                    copy=True,
                )
            ),
            s3.inject(Fault("PUT", re.compile(r"^/outputs/job1/_manifest\.d/"), times=7)),
            s3.inject(
                Fault(
                    "PUT", re.compile(r"^/outputs/job1/_staging/"), times=3, delay_s=1.5, copy=False
                )
            ),
        ]
        summary_json = tmp_path / "summary.json"
        rerun = subprocess.run(
            cmd + ["--summary-json", str(summary_json)],
            cwd=REPO,
            # botocore tries each request twice (its default: 5 times over ~11 s), so the
            # faults outlast it sooner, in the write tasks too
            env={**env, **s3.env(), "AWS_MAX_ATTEMPTS": "2"},
            capture_output=True,
            timeout=600,
        )
        s3.clear()
        printed["run 2 stdout"], printed["run 2 stderr"] = rerun.stdout, rerun.stderr
        stdout, stderr = rerun.stdout.decode(), rerun.stderr.decode()
        assert rerun.returncode == 0, stderr[-3000:]
        assert [f.fired for f in faults] == [f.times for f in faults]
        # the driver's own retries (commit, manifest) are on the terminal
        assert re.search(r"output store: commit shard \S+ under s3://outputs/job1 failed", stderr)
        assert re.search(r"output store: write s3://outputs/job1/_manifest\.d/\S+ failed", stderr)
        assert f"shards: {4 - len(first) + 1} run, {len(first) - 1} skipped" in stdout

        records = Manifest(out).records
        assert records[changed_sid].status == SUPERSEDED
        committed = Manifest(out).committed()
        assert len(committed) == 4 and changed_sid not in committed
        for sid, rec in first.items():  # the others were not redone
            if sid != changed_sid:
                assert committed[sid].committed_at == rec.committed_at
        assert not fs.exists(f"outputs/job1/{changed_sid}")
        for sid in committed:
            assert fs.exists(f"outputs/job1/{sid}/_SUCCESS")
        assert not fs.find("outputs/job1/_staging")
        rows = pds.dataset("outputs/job1", filesystem=fs, format="parquet").to_table()
        (bad,) = [r for r in rows.to_pylist() if r["id"].endswith(":5")]  # no id of its own
        assert bad["error"].startswith("s3://inputs/job1/part-3.jsonl line 6: not valid JSON")
        expected = sorted(set().union(*by_file.values()) | {bad["id"]})
        assert sorted(rows.column("id").to_pylist()) == expected  # each row exactly once

        # Not a secret anywhere the job wrote: the output root (manifest, runs, progress,
        # logs, report), the summary, what it printed, and Ray's session folder (driver,
        # raylet and actor logs).
        written = _bucket_files(fs, "outputs/job1")
        assert any("/_logs/" in p for p in written) and any(
            p.endswith("_report.html") for p in written
        )
        assert any("/_manifest" in p for p in written) and any(
            p.endswith("_runs.jsonl") for p in written
        )
        assert any(p.endswith("_progress.jsonl") for p in written)
        # a write task's own retries (botocore's attempts used up) are in the run's log
        logs = b"".join(data for p, data in written.items() if "/_logs/" in p)
        assert b"output store: write s3://outputs/job1/_staging/" in logs
        ray_files = _local_files(ray_tmp)  # Ray's session folder and the job's local files
        assert any(p.endswith(".log") or p.endswith(".out") for p in ray_files)
        assert any("batchjobs-logs-" in p for p in ray_files)  # the killed run's local log
        _assert_nowhere(
            secrets,
            {**written, **ray_files, **printed, str(summary_json): summary_json.read_bytes()},
        )
    finally:
        s3.clear()
        shutil.rmtree(ray_tmp, ignore_errors=True)


# --------------------------------------------------------------------------- a stand-in engine


ENGINE_TOKEN = f"engine-token-{uuid.uuid4().hex[:12]}"


class EchoEngine(Engine):
    kind = "echo"

    def __init__(self, spec):
        pass

    async def generate(self, request):
        # whether engine.env's credential reached the engine's process (not its value)
        text = "env:" + ("yes" if os.environ.get("BATCHJOBS_TEST_TOKEN") == ENGINE_TOKEN else "no")
        return Result(text=text, finish_reason="stop", prompt_tokens=1, completion_tokens=1)

    def close(self):
        pass


def _echo_factory(spec):
    return EchoEngine(spec)


def test_failing_store_fails_once_clearly_and_the_rerun_is_exact(s3, tiny_model, ray_session):
    import ray

    from batchjobs.pipeline import run
    from batchjobs.spec import parse_spec

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests
    fs = s3.fs()
    s3.bucket("job2-out")
    ids = set().union(*_put_shards(fs, "inputs/job2", shards=4, rows=12).values())
    secrets = [s3.key, s3.secret, quote(s3.secret, safe=""), ENGINE_TOKEN]
    spec = parse_spec(
        spec_dict(
            tiny_model,
            "s3://inputs/job2/*.parquet",
            f"s3://{s3.key}:{quote(s3.secret, safe='')}@job2-out/run",  # credentials in the URL
            input={"id_column": "id", "order": "input", "storage_options": s3.options()},
            output={
                "storage_options": {
                    "client_kwargs": {"endpoint_url": s3.url, "region_name": REGION},
                    # botocore tries once: the retries are batchjobs' alone
                    "config_kwargs": {"retries": {"total_max_attempts": 1}},
                },
                "retries": 2,
                "retry_wait_s": 0.2,
            },
            engine={"env": {"BATCHJOBS_TEST_TOKEN": ENGINE_TOKEN}},
            resources={"batch_size": 4, "rows_per_file": 4},
        )
    )
    assert spec.output.path == "s3://job2-out/run"
    out = OutputRoot(spec.output.path, spec.output.storage_options)
    messages = {}
    try:
        # 1. Writes fail for good from the third on: bounded retries, then one clear error.
        s3.inject(
            Fault("PUT", re.compile(r"^/job2-out/run/_staging/"), 2, delay_s=0.01, copy=False)
        )
        broken = s3.inject(Fault("PUT", re.compile(r"^/job2-out/run/_staging/"), 10**6, copy=False))
        with pytest.raises(OutputError) as err:
            run(spec, engine_factory=_echo_factory)
        s3.clear()
        msg = messages["failing writes"] = str(err.value)
        assert "\n" not in msg and "Traceback" not in msg and "RayTaskError" not in msg
        assert msg.startswith("cannot write s3://job2-out/run/_staging/"), msg
        assert "InternalError" in msg or "injected by the test" in msg
        assert msg.endswith("(still failing after 2 retries)"), msg
        assert broken.fired >= 3  # a write tried three times
        (failed,) = [r for r in _runs(out) if r["status"] == "failed"]
        assert failed["exit_code"] == 5 and failed["reason"] == msg

        # 2. The bucket vanishes right after the first shard is committed: no retries (it
        # will not come back), one clear error.
        vanish = s3.inject(
            Fault(
                "PUT",
                re.compile(r"^/job2-out/run/_manifest\.d/"),
                1,
                action=lambda: s3.vanish("job2-out"),
            )
        )
        with pytest.raises(OutputError) as err:
            run(spec, engine_factory=_echo_factory)
        s3.clear()
        assert vanish.fired == 1 and not fs.exists("job2-out")
        msg = messages["vanished bucket"] = str(err.value)
        assert "\n" not in msg and "Traceback" not in msg and "RayTaskError" not in msg
        assert "s3://job2-out/run/" in msg and "the bucket does not exist" in msg, msg
        assert "retries" not in msg

        # 3. The bucket is back: the rerun writes every row exactly once.
        s3.bucket("job2-out")
        summary = run(spec, engine_factory=_echo_factory)
        assert summary.rows == len(ids) and summary.shards_run == 4
        assert sorted(_output_ids(fs, "job2-out/run")) == sorted(ids)
        texts = pds.dataset("job2-out/run", filesystem=fs, format="parquet").to_table()
        assert set(texts.column("text").to_pylist()) == {"env:yes"}
        _assert_nowhere(
            secrets,
            {**_bucket_files(fs, "job2-out"), **{k: v.encode() for k, v in messages.items()}},
        )
    finally:
        s3.clear()


def _runs(out: OutputRoot) -> list[dict]:
    from batchjobs.layout import RUNS, read_records

    return read_records(out, RUNS)
