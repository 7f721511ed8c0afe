"""Submitting jobs to a real Ray head (``ray start --head`` with the job API on 127.0.0.1 and
token authentication) from the commands a user types: `batchjobs submit --wait` runs the
demo on the CPU default end to end (the git-ignored model shipped, the output beside the
spec); the same id twice is one Ray job; SIGTERM during --wait stops the job; a wrong or
missing token gives one line that says where the token was looked for; a plain `ray job
submit` of the demo is told first thing on the cluster what its upload left out.

The head is shared by the module. One test runs the demo to its end on a real vLLM CPU
engine (~1 min); the others stop or fail their jobs before an engine matters.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import uuid

import pyarrow.dataset as pds
import pytest
from ray_head import REPO, VENV_BIN, RayHead, running_head

from batchjobs.layout import RUNS

pytestmark = pytest.mark.integration
BATCHJOBS = str(VENV_BIN / "batchjobs")
SHIPPED_MODEL = REPO / "models" / "tiny-llama"


@pytest.fixture(scope="module")
def head():
    if not (SHIPPED_MODEL / "model.safetensors").exists():
        pytest.fail("models/tiny-llama is missing: bash scripts/setup.sh builds it")
    with running_head() as h:
        yield h


@pytest.fixture
def out_dir():
    """A relative output root under the repo's out/ (git-ignored), removed afterwards."""
    rel = f"out/it-{uuid.uuid4().hex[:8]}"
    yield rel
    shutil.rmtree(REPO / rel, ignore_errors=True)


def batchjobs(head: RayHead, *args: str, env: dict | None = None, timeout: float = 600):
    return subprocess.run(
        [BATCHJOBS, *args],
        cwd=REPO,
        env=env or head.env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def jobs_of(head: RayHead, run_key: str) -> list:
    from batchjobs.ops import jobs

    api = jobs.Head(head.address, token=head.token)
    return [j for j in api.batchjobs_jobs() if (j.metadata or {}).get("run_key") == run_key]


def test_submit_wait_runs_the_demo_ships_the_model_and_commits(head, out_dir):
    args = ["submit", "jobs/demo.yaml", "--address", head.address, "--run-key", "wait"]
    proc = batchjobs(head, *args, "--wait", "--set", f"output.path={out_dir}")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    # models/ is git-ignored: submit shipped the model with the working directory.
    assert "shipping git-ignored models/tiny-llama" in proc.stderr
    # A relative output root resolves against the submitter's directory (the head runs on
    # this machine), not inside the job's temporary copy of it.
    out = REPO / out_dir
    table = pds.dataset(str(out), format="parquet").to_table()
    assert table.num_rows == 200
    assert table.column("error").null_count == 198
    record = json.loads((out / RUNS).read_text().splitlines()[-1])
    assert (record["status"], record["exit_code"], record["rows"]) == ("succeeded", 0, 200)
    assert "SUCCEEDED, exit 0; 200 rows (2 errors)" in proc.stderr
    assert head.token not in text

    # The same spec, output and run key again: already succeeded, nothing submitted.
    again = batchjobs(head, *args, "--set", f"output.path={out_dir}")
    assert again.returncode == 0, again.stderr
    assert "already succeeded" in again.stderr
    assert again.stdout.strip() == proc.stderr.split("submitted ")[1].split()[0]
    assert len(jobs_of(head, "wait")) == 1

    status = batchjobs(head, "status", again.stdout.strip(), "--address", head.address, "--json")
    got = json.loads(status.stdout)
    assert (got["status"], got["exit_code"], got["rows"], got["error_rows"]) == (
        "SUCCEEDED", 0, 200, 2,
    )  # fmt: skip
    assert got["tokens"] == got["prompt_tokens"] + got["completion_tokens"] > 0
    assert got["output"] == str(out)


def test_same_id_attaches_and_sigterm_during_wait_stops_the_job(head, out_dir):
    args = ["submit", "jobs/demo.yaml", "--address", head.address, "--run-key", "stop",
            "--set", f"output.path={out_dir}"]  # fmt: skip
    first = batchjobs(head, *args)
    assert first.returncode == 0, first.stderr
    sid = first.stdout.strip()
    second = batchjobs(head, *args)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == sid
    assert f"attached to {sid}" in second.stderr
    assert [j.submission_id for j in jobs_of(head, "stop")] == [sid]

    waiter = subprocess.Popen(
        [BATCHJOBS, *args, "--wait"],
        cwd=REPO,
        env=head.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        seen = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = waiter.stdout.readline()
            seen.append(line)
            if f"attached to {sid}" in line or not line:
                break
        assert any(f"attached to {sid}" in s for s in seen), "".join(seen)
        time.sleep(2)  # inside the wait loop
        waiter.send_signal(signal.SIGTERM)
        rest, _ = waiter.communicate(timeout=120)
    finally:
        if waiter.poll() is None:
            waiter.kill()
    assert waiter.returncode == 128 + signal.SIGTERM, "".join(seen) + rest
    assert "stopped on SIGTERM" in rest
    from batchjobs.ops import jobs

    assert str(jobs.Head(head.address, token=head.token).info(sid).status) == "STOPPED"
    assert len(jobs_of(head, "stop")) == 1


def test_token_errors_say_where_the_token_was_looked_for(head, tmp_path):
    wrong = batchjobs(
        head, "list", "--address", head.address, env=head.env(RAY_AUTH_TOKEN="not-the-token")
    )
    assert wrong.returncode == 1
    assert wrong.stderr.count("\n") == 1, wrong.stderr
    assert f"the Ray head at {head.address} refused the token from RAY_AUTH_TOKEN" in wrong.stderr
    assert "not-the-token" not in wrong.stderr + wrong.stdout

    env = head.env(HOME=str(tmp_path))
    env.pop("RAY_AUTH_TOKEN_PATH")
    missing = batchjobs(head, "list", "--address", head.address, env=env)
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1, missing.stderr
    assert (
        f"needs a token and none was found: looked in RAY_AUTH_TOKEN (unset); "
        f"RAY_AUTH_TOKEN_PATH (unset); {tmp_path}/.ray/auth_token (no such file)"
    ) in missing.stderr


def ray_job_submit(head: RayHead, *entrypoint: str):
    """`ray job submit --working-dir . -- ENTRYPOINT` as README shows it; the job's end as
    batchjobs sees it (its full logs read back, not tailed)."""
    from batchjobs.ops import jobs

    proc = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", head.address, "--no-wait",
         "--working-dir", ".", "--", *entrypoint],
        cwd=REPO, env=head.env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    sid = text.split("Job '", 1)[1].split("'", 1)[0]
    return jobs.wait(sid, address=head.address, token=head.token, poll_s=1.0)


def test_plain_ray_job_submit_names_what_the_upload_left_out(head):
    # Without them, the driver says first thing what is missing and what to do, instead
    # of taking models/tiny-llama for a hub name or writing into its temporary directory.
    model = ray_job_submit(
        head, "batchjobs", "run", "jobs/demo.yaml", "--set", "output.path=/tmp/unused-bj-out"
    )
    assert (model.status, model.exit_code) == ("FAILED", 2), model
    assert model.reason.startswith(
        "engine.model 'models/tiny-llama' does not exist in the job's working directory"
    )
    assert "what .gitignore lists (models/)" in model.reason
    output = ray_job_submit(head, "batchjobs", "run", "jobs/demo.yaml")
    assert (output.status, output.exit_code) == ("FAILED", 2), output
    assert output.reason.startswith("output.path 'out/demo' is relative"), output
