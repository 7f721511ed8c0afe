"""Nightly scoring on a Ray cluster, from Airflow 3: score last night's reviews, embed them,
then run the labelled eval set against the scoring model.

Each task submits a batchjobs job spec to the Ray head named by the Airflow connection
``ray_default`` (type ``ray``: host, port 8265, the head's token as password) and waits for
it in Airflow's triggerer, so a job that runs for hours holds no worker slot. The run key
is the DAG run's logical date: a retried task re-attaches to its running Ray job, or
resumes a failed one from its committed shards, and never starts a second copy.

Deploy this repository (or the project holding the specs) where the DAG processor and the
workers read it; BATCHJOBS_PROJECT overrides where the specs are found. The workers need
``pip install batchjobs apache-airflow``; the model directories live on the cluster's nodes,
and the workers check everything else before submitting.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import DAG

from batchjobs.airflow import BatchJobOperator

PROJECT = os.environ.get("BATCHJOBS_PROJECT", str(Path(__file__).resolve().parents[2]))
DAY = "{{ ds }}"
HOURS = 3600

with DAG(
    dag_id="batchjobs_nightly_scoring",
    description="Score, embed and evaluate last night's reviews with batchjobs on Ray",
    schedule="0 2 * * *",
    start_date=datetime(2026, 11, 1),
    catchup=False,
    max_active_runs=1,
    default_args={
        "retries": 3,
        "retry_delay": timedelta(minutes=5),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=30),
    },
    tags=["batchjobs", "ray"],
) as dag:
    score = BatchJobOperator(
        task_id="score_reviews",
        spec="jobs/nightly_scoring.yaml",
        working_dir=PROJECT,
        overrides=[
            f"input.path=s3://acme-ml/scoring/{DAY}/*.parquet",
            f"output.path=s3://acme-ml/scoring-out/{DAY}/",
        ],
        job_timeout=8 * HOURS,
    )
    embed = BatchJobOperator(
        task_id="embed_reviews",
        spec="jobs/nightly_embed.yaml",
        working_dir=PROJECT,
        overrides=[
            f"input.path=s3://acme-ml/scoring/{DAY}/*.parquet",
            f"output.path=s3://acme-ml/embeddings/{DAY}/",
        ],
        job_timeout=4 * HOURS,
    )
    evaluate = BatchJobOperator(
        task_id="evaluate_scoring_model",
        spec="jobs/nightly_eval.yaml",
        working_dir=PROJECT,
        overrides=[f"output.path=s3://acme-ml/eval-out/{DAY}/"],
        job_timeout=2 * HOURS,
    )
    score >> embed >> evaluate
