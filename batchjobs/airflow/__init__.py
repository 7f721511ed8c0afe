"""Airflow 3 support: ``BatchJobOperator`` submits a job spec to a Ray cluster and waits for
it deferrably (``BatchJobTrigger`` polls the Ray job), ``RayJobHook`` reads the head's address
and token from an Airflow connection of type ``ray``.

Importing this package imports Airflow; importing ``batchjobs`` does not.
"""

from batchjobs.airflow.hooks import RayJobHook
from batchjobs.airflow.operators import BatchJobOperator
from batchjobs.airflow.triggers import BatchJobTrigger

__all__ = ["BatchJobOperator", "BatchJobTrigger", "RayJobHook", "get_provider_info"]


def get_provider_info() -> dict:
    """What Airflow's providers manager reads (entry point ``apache_airflow_provider``): the
    ``ray`` connection type, so the UI offers it."""
    return {
        "package-name": "batchjobs",
        "name": "batchjobs",
        "description": "Offline batch LLM inference jobs on Ray: submit, wait, re-attach.",
        "connection-types": [
            {
                "connection-type": "ray",
                "hook-class-name": "batchjobs.airflow.hooks.RayJobHook",
                "hook-name": "Ray job API (batchjobs)",
            }
        ],
        "versions": ["0.1.0"],
    }
