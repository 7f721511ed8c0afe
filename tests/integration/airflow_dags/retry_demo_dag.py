"""A DAG for tests/integration/test_airflow.py: the CPU demo job through BatchJobOperator,
whose first try dies right after submitting (as a worker lost mid-task would), so the
retry must re-attach to the Ray job that try started instead of submitting another."""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow.sdk import DAG

from batchjobs.airflow import BatchJobOperator


class LoseWorkerAfterSubmit(BatchJobOperator):
    def execute(self, context):
        if context["ti"].try_number == 1:
            self.submit()
            raise RuntimeError("worker lost right after submitting (test)")
        return super().execute(context)


with DAG(
    dag_id="batchjobs_retry_test",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
) as dag:
    LoseWorkerAfterSubmit(
        task_id="demo",
        spec="jobs/demo.yaml",
        ray_conn_id="ray_test",
        working_dir=os.environ["BATCHJOBS_REPO"],
        overrides=["output.path={{ params.out }}"],
        params={"out": os.environ.get("BATCHJOBS_TEST_OUT", "out/airflow-test")},
        retries=1,
        retry_delay=timedelta(seconds=0),
        poll_interval=2.0,
    )
