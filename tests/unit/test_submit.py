"""Submitting without a cluster: the token lookup and its messages, deterministic ids and
attempts, what the working directory ships, the checks where the spec is written and on
the cluster, and how a Ray job's end maps to batchjobs' exit codes. A stand-in for Ray's job
client plays the head; tests/integration/test_submit.py drives a real one."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cli_text import cli_text
from typer.testing import CliRunner

from batchjobs.cli import app
from batchjobs.errors import InputError, SpecError
from batchjobs.ops import auth, checks, jobs, ship
from batchjobs.spec import load_spec, parse_spec

runner = CliRunner()


# --- the token ----------------------------------------------------------------------------


@pytest.fixture
def no_token_env(monkeypatch, tmp_path):
    monkeypatch.delenv(auth.TOKEN_ENV, raising=False)
    monkeypatch.delenv(auth.TOKEN_PATH_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home" / ".ray" / "auth_token"


def test_token_order_explicit_env_path_file(no_token_env, monkeypatch, tmp_path):
    default = no_token_env
    default.parent.mkdir(parents=True)
    default.write_text("from-file\n")
    assert auth.find_token().token.source == str(default)
    path = tmp_path / "tok"
    path.write_text("from-path")
    monkeypatch.setenv(auth.TOKEN_PATH_ENV, str(path))
    assert auth.find_token().token.value == "from-path"
    monkeypatch.setenv(auth.TOKEN_ENV, "from-env")
    assert auth.find_token().token.value == "from-env"
    found = auth.find_token("from-conn", "the Airflow connection ray_default's password")
    assert found.token.value == "from-conn"
    # An empty connection password is noted and the search goes on.
    found = auth.find_token("", "the Airflow connection ray_default's password")
    assert found.token.value == "from-env"
    assert found.looked[0] == "the Airflow connection ray_default's password (empty)"


def test_token_never_shown(no_token_env):
    token = auth.Token("s3cr3t-value", "RAY_AUTH_TOKEN")
    assert "s3cr3t" not in repr(token) + str(token)
    lookup = auth.Lookup(token, ("RAY_AUTH_TOKEN",))
    err = auth.auth_error("http://h:8265", 403, lookup)
    assert "s3cr3t" not in str(err)
    assert str(err).startswith(
        "the Ray head at http://h:8265 refused the token from RAY_AUTH_TOKEN"
    )
    assert auth.scrub("Bearer s3cr3t-value here", lookup) == "Bearer *** here"


def test_missing_token_says_where_it_looked(no_token_env):
    lookup = auth.find_token()
    assert lookup.token is None
    msg = str(auth.auth_error("http://h:8265", 401, lookup))
    assert "\n" not in msg
    assert (
        f"looked in RAY_AUTH_TOKEN (unset); RAY_AUTH_TOKEN_PATH (unset); {no_token_env} "
        "(no such file)"
    ) in msg


# --- ids ----------------------------------------------------------------------------------


def test_submission_id_is_deterministic_and_says_what_changed(spec_dict):
    base = parse_spec(spec_dict)
    sid = jobs.submission_id(base, "2026-11-26T00:00:00+00:00")
    assert sid == jobs.submission_id(parse_spec(spec_dict), "2026-11-26T00:00:00+00:00")
    assert sid.startswith("bj-unit-job-")
    assert all(c.isalnum() or c in "._-" for c in sid)
    more = parse_spec({**spec_dict, "resources": {"replicas": 4}})
    assert jobs.submission_id(more, "2026-11-26T00:00:00+00:00") == sid  # same job, sized up
    for other in (
        jobs.submission_id(base, "2026-11-27T00:00:00+00:00"),
        jobs.submission_id(base, None),
        jobs.submission_id(parse_spec({**spec_dict, "output": {"path": "/elsewhere"}}), None),
        jobs.submission_id(parse_spec({**spec_dict, "sampling": {"max_tokens": 9}}), None),
    ):
        assert other != sid
    assert jobs.attempt_id(sid, 1) == sid and jobs.attempt_id(sid, 3) == f"{sid}-a3"


# --- a stand-in head ----------------------------------------------------------------------


@dataclass
class FakeInfo:
    submission_id: str
    status: str
    metadata: dict = field(default_factory=dict)
    driver_exit_code: int | None = None
    message: str | None = None
    start_time: int = 0


class FakeClient:
    def __init__(self):
        self.jobs: dict[str, FakeInfo] = {}
        self.logs: dict[str, str] = {}
        self.submitted: list[dict] = []
        self.stopped: list[str] = []

    def submit_job(self, **kw):
        if kw["submission_id"] in self.jobs:
            raise RuntimeError(
                "Request failed with status code 400: Job with submission_id already exists."
            )
        self.submitted.append(kw)
        self.jobs[kw["submission_id"]] = FakeInfo(kw["submission_id"], "PENDING", kw["metadata"])
        return kw["submission_id"]

    def get_job_info(self, sid):
        if sid not in self.jobs:
            raise RuntimeError("Request failed with status code 404: no such job.")
        return self.jobs[sid]

    def get_job_logs(self, sid):
        return self.logs.get(sid, "")

    def stop_job(self, sid):
        self.stopped.append(sid)
        self.jobs[sid].status = "STOPPED"
        return True

    def list_jobs(self):
        return list(self.jobs.values())


@pytest.fixture
def fake_head(monkeypatch):
    client = FakeClient()

    class FakeHead(jobs.Head):
        def __init__(self, address=None, token=None, token_source=None):
            self.address = jobs.resolve_address(address)
            self.lookup = auth.Lookup(None, ())
            self.client = client

    monkeypatch.setattr(jobs, "Head", FakeHead)
    return client


@pytest.fixture
def repo(tmp_path, model_dir, write_jsonl):
    """A git work tree with a job whose model directory is git-ignored, as in this repo."""
    wd = tmp_path / "repo"
    (wd / "jobs").mkdir(parents=True)
    (wd / "models").mkdir()
    (wd / "models" / "tiny").mkdir()
    (wd / "models" / "tiny" / "config.json").write_text("{}")
    (wd / "models" / "big").mkdir()
    (wd / "out").mkdir()
    (wd / ".gitignore").write_text("models/\nout/\n")
    write_jsonl(wd / "data" / "a.jsonl", [{"prompt": "hi"}])
    spec = {
        "name": "demo",
        "input": {"path": "data/*.jsonl"},
        "output": {"path": "out/demo"},
        "engine": {"model": "models/tiny"},
    }
    (wd / "jobs" / "job.yaml").write_text(json.dumps(spec))
    subprocess.run(["git", "init", "-q", str(wd)], check=True)
    return wd


def test_submit_attaches_resumes_and_leaves_a_success_alone(fake_head, repo, monkeypatch):
    monkeypatch.chdir(repo)
    said = []
    first = jobs.submit("jobs/job.yaml", run_key="k", say=said.append)
    assert (first.action, first.attempt) == ("submitted", 1)
    assert first.shipped == [("models/tiny", 2)]
    (call,) = fake_head.submitted
    assert call["entrypoint"] == "batchjobs run jobs/job.yaml --summary-json -"
    assert call["metadata"]["batchjobs"] == "1" and call["metadata"]["run_key"] == "k"
    assert (call["entrypoint_num_cpus"], call["entrypoint_num_gpus"]) == (0, 0)
    env = call["runtime_env"]
    assert env["working_dir"] == str(repo)
    # git's ignored paths are excluded, except the model the spec names.
    assert "/out" in env["excludes"] and "/models/big" in env["excludes"]
    assert not any(e.startswith("/models/tiny") or e == "/models" for e in env["excludes"])
    assert env["env_vars"][checks.SUBMIT_SPEC] == "jobs/job.yaml"

    again = jobs.submit("jobs/job.yaml", run_key="k", say=said.append)
    assert (again.action, again.submission_id) == ("attached", first.submission_id)
    fake_head.jobs[first.submission_id].status = "FAILED"
    retry = jobs.submit("jobs/job.yaml", run_key="k", say=said.append)
    assert (retry.action, retry.submission_id) == ("submitted", f"{first.submission_id}-a2")
    fake_head.jobs[retry.submission_id].status = "SUCCEEDED"
    done = jobs.submit("jobs/job.yaml", run_key="k", say=said.append)
    assert (done.action, done.submission_id) == ("succeeded", retry.submission_id)
    forced = jobs.submit("jobs/job.yaml", run_key="k", force=True, say=said.append)
    assert forced.submission_id == f"{first.submission_id}-a3"
    assert len(fake_head.submitted) == 3
    assert any("already succeeded" in s for s in said)


def test_submit_race_attaches_to_the_other_submission(fake_head, repo, monkeypatch):
    monkeypatch.chdir(repo)
    sid = jobs.submission_id(load_spec(repo / "jobs/job.yaml"), None)
    real = fake_head.get_job_info
    calls = []

    def appears_late(s):  # absent when probed, present when submitted: another submitter
        calls.append(s)
        if len(calls) == 1:
            raise RuntimeError("Request failed with status code 404: no such job.")
        return real(s)

    fake_head.jobs[sid] = FakeInfo(sid, "RUNNING")
    fake_head.get_job_info = appears_late
    sub = jobs.submit("jobs/job.yaml")
    assert (sub.action, sub.submission_id, sub.status) == ("attached", sid, "RUNNING")
    assert fake_head.submitted == []


# --- what ships -----------------------------------------------------------------------------


def test_ship_refuses_a_large_ignored_model_and_a_spec_outside(repo, tmp_path, monkeypatch):
    monkeypatch.chdir(repo)
    (repo / "models" / "tiny" / "weights.bin").write_bytes(b"\0" * 2_000_000)
    job = load_spec(repo / "jobs/job.yaml")
    with pytest.raises(SpecError, match=r"engine.model 'models/tiny' is git-ignored and 2 MiB"):
        ship.plan(job, repo / "jobs/job.yaml", repo, limit_mb=1)
    assert ship.plan(job, repo / "jobs/job.yaml", repo, limit_mb=3).shipped[0][0] == "models/tiny"
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text((repo / "jobs/job.yaml").read_text())
    with pytest.raises(SpecError, match="outside the working directory"):
        ship.plan(job, outside, repo)


def test_ship_outside_git_leaves_ignoring_to_ray(repo, monkeypatch):
    monkeypatch.chdir(repo)
    (repo / ".git").rename(repo / ".git-off")
    job = load_spec(repo / "jobs/job.yaml")
    shipment = ship.plan(job, repo / "jobs/job.yaml", repo)
    assert (shipment.git, shipment.shipped) == (False, [])
    with shipment.upload_context():
        assert ship.IGNORE_GITIGNORE not in os.environ


def test_exclude_patterns_are_anchored_and_escaped():
    assert ship._escape("a b[1]*") == "a\\ b\\[1\\]\\*"


# --- checks where the spec is written -------------------------------------------------------


def test_validate_notes_a_model_that_is_only_on_the_cluster(spec_dict, write_yaml, monkeypatch):
    from batchjobs import cli

    monkeypatch.setattr(cli, "_check_engine_installed", lambda kind: None)
    Path(spec_dict["input"]["path"]).parent.mkdir(parents=True)
    Path(spec_dict["input"]["path"]).with_name("a.jsonl").write_text('{"prompt": "hi"}\n')
    spec_dict["engine"]["model"] = "/mnt/models/not-here"
    result = runner.invoke(app, ["validate", str(write_yaml(spec_dict))])
    assert result.exit_code == 0, cli_text(result)
    assert "ok: unit-job: 1 shard(s)" in result.output
    assert (
        "note: engine.model /mnt/models/not-here is not on this machine: it is checked on the "
        "cluster, first thing when the job starts"
    ) in result.output
    # The cluster runs the full check first thing (batchjobs run loads the spec as usual).
    with pytest.raises(SpecError, match="model '/mnt/models/not-here' does not exist"):
        load_spec(write_yaml(spec_dict))


def test_validate_still_refuses_a_missing_relative_model(spec_dict, write_yaml):
    spec_dict["engine"]["model"] = "./models/nothing"
    result = runner.invoke(app, ["validate", str(write_yaml(spec_dict))])
    assert result.exit_code == 2
    assert "'./models/nothing' does not exist" in cli_text(result)


def test_input_url_without_its_filesystem_is_noted(spec_dict, write_yaml):
    spec_dict["input"]["path"] = "nosuchfs://bucket/in/*.parquet"
    checked = checks.check_here(write_yaml(spec_dict))
    assert checked.shards is None
    assert checked.notes[0].startswith(
        "input.path nosuchfs://bucket/in/*.parquet is not readable here"
    )


def test_submit_notes_an_absolute_input_that_is_only_on_the_cluster(spec_dict, write_yaml):
    spec_dict["input"]["path"] = "/mnt/data/in/*.parquet"
    with pytest.raises(InputError, match="matched no input files"):
        checks.check_here(write_yaml(spec_dict))  # validate: this machine's view
    checked = checks.check_here(write_yaml(spec_dict), for_cluster=True)
    assert checked.notes == [
        "input.path /mnt/data/in/*.parquet is not on this machine: it is checked on the "
        "cluster, first thing when the job starts"
    ]


# --- first thing on the cluster -------------------------------------------------------------


@pytest.fixture
def in_ray_job(monkeypatch, tmp_path):
    """This process as the driver of a Ray job: cwd is the job's copy of the working dir."""
    copy = tmp_path / "ray_pkg"
    copy.mkdir()
    (copy / ".gitignore").write_text("# built here\nmodels/\n")
    monkeypatch.chdir(copy)
    config = {"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}
    monkeypatch.setenv(checks.RAY_JOB_CONFIG, json.dumps(config))
    for key in (checks.SUBMIT_HOST, checks.SUBMIT_DIR, checks.SUBMIT_SPEC, checks.SUBMIT_SPEC_SHA):
        monkeypatch.delenv(key, raising=False)
    return copy


def test_on_cluster_is_a_no_op_outside_a_ray_job(spec_dict, monkeypatch):
    monkeypatch.delenv(checks.RAY_JOB_CONFIG, raising=False)
    job = parse_spec({**spec_dict, "output": {"path": "out/x"}})
    assert checks.on_cluster(job) is job


def test_on_cluster_refuses_a_relative_output_away_from_the_submitter(in_ray_job, spec_dict):
    job = parse_spec({**spec_dict, "output": {"path": "out/x"}})
    with pytest.raises(SpecError, match="output.path 'out/x' is relative: in a Ray job"):
        checks.on_cluster(job)
    assert checks.on_cluster(parse_spec({**spec_dict, "output": {"path": "s3://b/x"}}))


def test_on_cluster_resolves_a_relative_output_on_the_submitting_machine(
    in_ray_job, spec_dict, tmp_path, monkeypatch
):
    import socket

    submit_dir = tmp_path / "project"
    (submit_dir / "jobs").mkdir(parents=True)
    (submit_dir / "jobs" / "j.yaml").write_text("name: x\n")
    monkeypatch.setenv(checks.SUBMIT_HOST, socket.gethostname())
    monkeypatch.setenv(checks.SUBMIT_DIR, str(submit_dir))
    monkeypatch.setenv(checks.SUBMIT_SPEC, "jobs/j.yaml")
    monkeypatch.setenv(checks.SUBMIT_SPEC_SHA, checks.spec_sha256(submit_dir / "jobs" / "j.yaml"))
    job = checks.on_cluster(parse_spec({**spec_dict, "output": {"path": "out/x"}}))
    assert job.output.path == str(submit_dir / "out" / "x")
    # A spec that differs from the one there: not the submitting machine after all.
    (submit_dir / "jobs" / "j.yaml").write_text("name: changed\n")
    with pytest.raises(SpecError, match="is relative"):
        checks.on_cluster(parse_spec({**spec_dict, "output": {"path": "out/x"}}))


def test_on_cluster_names_a_model_the_upload_left_out(in_ray_job, spec_dict):
    # models/tiny-llama looks like a hub name (org/name); .gitignore says it is a path.
    job = parse_spec({**spec_dict, "engine": {"model": "models/tiny-llama"}})
    with pytest.raises(SpecError) as err:
        checks.on_cluster(job)
    assert "engine.model 'models/tiny-llama' does not exist in the job's working directory" in str(
        err.value
    )
    assert "what .gitignore lists (models/)" in str(err.value)
    hub = parse_spec({**spec_dict, "engine": {"model": "Qwen/Qwen3-0.6B"}})
    assert checks.on_cluster(hub).engine.model == "Qwen/Qwen3-0.6B"


# --- how a job ends -------------------------------------------------------------------------


SUMMARY = {"name": "demo", "output": "/o", "rows": 200, "error_rows": 2, "prompt_tokens": 600,
           "completion_tokens": 400, "cost_usd": 0.002, "wall_s": 9.0}  # fmt: skip


@pytest.mark.parametrize(
    ("status", "code", "logs", "want"),
    [
        ("SUCCEEDED", 0, jobs.SUMMARY_PREFIX + json.dumps(SUMMARY), (0, None)),
        ("FAILED", 2, "x\nerror: bad spec:\n  - engine.model: nope\n", (2, "bad spec:")),
        ("FAILED", 4, "error: engine failed to start\n", (4, "engine failed to start")),
        ("FAILED", 127, "/bin/sh: 1: batchjobs: not found\n", (1, "`batchjobs` was not found")),
        ("FAILED", None, "", (1, "runtime env failed")),
        ("STOPPED", None, "", (130, "the Ray job was stopped")),
    ],
)
def test_outcome_maps_the_ray_job_to_exit_codes(status, code, logs, want):
    info = FakeInfo("bj-x", status, driver_exit_code=code, message="runtime env failed\nmore")
    out = jobs.outcome_of("bj-x", info, logs)
    assert out.exit_code == want[0]
    assert (out.reason or None) == want[1] or want[1] in (out.reason or "")


def test_outcome_record_has_the_summary_and_per_token_price():
    progress = "[demo] 120 rows (60%), 1 errors, 1/2 shards committed, 9 output tok/s, ETA 5s\n"
    logs = progress + jobs.SUMMARY_PREFIX + json.dumps(SUMMARY) + "\n"
    d = jobs.outcome_of("bj-x", FakeInfo("bj-x", "SUCCEEDED", driver_exit_code=0), logs).to_dict()
    assert d["rows"] == 200 and d["tokens"] == 1000
    assert d["usd_per_1m_tokens"] == pytest.approx(2.0)
    assert d["progress"] == {"rows": 120, "pct": 60, "errors": 1, "done": 1, "total": 2}
    running = jobs.outcome_of("bj-x", FakeInfo("bj-x", "RUNNING"), progress)
    assert running.exit_code is None and running.progress["rows"] == 120


def test_wait_stops_the_job_after_its_timeout(fake_head):
    fake_head.jobs["bj-x"] = FakeInfo("bj-x", "RUNNING")
    out = jobs.wait("bj-x", timeout=0.0, poll_s=0.01, stop_on_signals=False)
    assert fake_head.stopped == ["bj-x"]
    assert (out.status, out.exit_code) == ("STOPPED", jobs.TIMEOUT_EXIT)
    assert "still running after" in out.reason


def test_api_is_importable_from_the_package_without_ray():
    import batchjobs

    assert batchjobs.submit is jobs.submit and batchjobs.wait is jobs.wait
