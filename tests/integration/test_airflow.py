"""Airflow 3 (its own virtualenv, .venv-airflow: scripts/setup_airflow.sh) against a real Ray
head: the DAG folder cluster/airflow/ imports without errors and its specs validate with the
rendered overrides; dag.test() runs BatchJobOperator on the CPU demo, the trigger included,
with a first try that dies right after submitting: the retry re-attaches (one Ray job), and
XCom holds the summary and no token; on_kill stops the Ray job.

The Airflow side runs in its virtualenv (airflow_side.py); this module starts the head,
drives it and checks the Ray jobs from the outside.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pyarrow.dataset as pds
import pytest
from ray_head import REPO, RayHead, running_head

from batchjobs.spec import load_spec

pytestmark = pytest.mark.integration
HERE = Path(__file__).resolve().parent
AIRFLOW_PY = REPO / ".venv-airflow" / "bin" / "python"
NIGHT = "2026-11-26"


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory):
    if not AIRFLOW_PY.exists():
        pytest.fail("no Airflow virtualenv: bash scripts/setup_airflow.sh creates .venv-airflow")
    home = tmp_path_factory.mktemp("airflow")
    env = {
        "PATH": f"{AIRFLOW_PY.parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(HERE / "airflow_dags"),
        "BATCHJOBS_REPO": str(REPO),
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }
    migrate = subprocess.run(
        [str(AIRFLOW_PY.parent / "airflow"), "db", "migrate"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    return env


@pytest.fixture(scope="module")
def head():
    with running_head() as h:
        yield h


def airflow_side(env: dict, *args: str, timeout: float = 900) -> tuple[dict, str]:
    proc = subprocess.run(
        [str(AIRFLOW_PY), str(HERE / "airflow_side.py"), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    text = proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, text[-6000:]
    return json.loads(lines[-1][len("RESULT ") :]), text


def connection(head: RayHead) -> str:
    # The token reaches the operator and the trigger only through the connection.
    return json.dumps(
        {"conn_type": "ray", "host": "127.0.0.1", "port": int(head.address.rsplit(":", 1)[1]),
         "password": head.token}
    )  # fmt: skip


def test_dag_folder_imports_and_its_specs_validate(airflow_env):
    got, _ = airflow_side(airflow_env, "dagbag", str(REPO / "cluster" / "airflow"))
    assert got["import_errors"] == {}
    assert got["ray_connection_hook"] == "batchjobs.airflow.hooks.RayJobHook"  # the UI offers it
    tasks = got["dags"]["batchjobs_nightly_scoring"]
    assert [t["task_id"] for t in tasks] == [
        "score_reviews", "embed_reviews", "evaluate_scoring_model",
    ]  # fmt: skip
    assert [t["downstream"] for t in tasks] == [["embed_reviews"], ["evaluate_scoring_model"], []]
    for t in tasks:
        assert t["type"] == "BatchJobOperator" and t["retries"] >= 1
        assert Path(t["working_dir"]) == REPO
        overrides = [o.replace("{{ ds }}", NIGHT) for o in t["overrides"]]
        job = load_spec(REPO / t["spec"], overrides, offline=True)
        assert NIGHT in job.output.path


def test_dag_test_retry_reattaches_and_xcom_holds_the_summary(airflow_env, head):
    out = f"out/it-airflow-{uuid.uuid4().hex[:8]}"
    env = {**airflow_env, "AIRFLOW_CONN_RAY_TEST": connection(head), "BATCHJOBS_TEST_OUT": out}
    try:
        got, text = airflow_side(env, "dagtest", str(HERE / "airflow_dags"), "batchjobs_retry_test")
        assert got["state"] == "success", text[-6000:]
        assert got["tasks"]["demo"] == {"state": "success", "try_number": 2}
        assert "worker lost right after submitting" in text  # try 1 died after submitting
        assert "running trigger in line" in text  # try 2 deferred to the trigger
        summary = got["xcom"]["demo.return_value"]
        sid = got["xcom"]["demo.submission_id"]
        assert summary["submission_id"] == sid
        assert (summary["status"], summary["exit_code"]) == ("SUCCEEDED", 0)
        assert (summary["rows"], summary["error_rows"]) == (200, 2)
        assert summary["tokens"] == summary["prompt_tokens"] + summary["completion_tokens"] > 0
        assert summary["cost_usd"] > 0 and summary["usd_per_1m_tokens"] > 0
        assert summary["output"] == str(REPO / out)
        assert pds.dataset(str(REPO / out), format="parquet").count_rows() == 200

        from batchjobs.ops import jobs

        ray_jobs = [
            j for j in jobs.Head(head.address, token=head.token).batchjobs_jobs()
            if (j.metadata or {}).get("output") == out
        ]  # fmt: skip
        assert [j.submission_id for j in ray_jobs] == [sid]  # the retry re-attached
        # The token is in no XCom, log line or anything Airflow stored.
        assert head.token not in json.dumps(got) + text
        assert head.token.encode() not in (Path(env["AIRFLOW_HOME"]) / "airflow.db").read_bytes()
    finally:
        shutil.rmtree(REPO / out, ignore_errors=True)


def test_on_kill_stops_the_ray_job(airflow_env, head):
    out = f"out/it-airflow-{uuid.uuid4().hex[:8]}"
    env = {**airflow_env, "AIRFLOW_CONN_RAY_TEST": connection(head)}
    try:
        got, _ = airflow_side(
            env, "onkill", str(HERE / "airflow_dags"), "batchjobs_retry_test", "demo", out
        )
        assert got["action"] == "submitted"
        from batchjobs.ops import jobs

        api = jobs.Head(head.address, token=head.token)
        info = jobs._await_end(api, got["submission_id"])
        assert str(info.status) == "STOPPED"
    finally:
        shutil.rmtree(REPO / out, ignore_errors=True)
