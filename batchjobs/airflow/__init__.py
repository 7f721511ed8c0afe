"""Airflow 3 support: ``BatchJobOperator`` submits a job spec to a Ray cluster and waits for
it deferrably (``BatchJobTrigger`` polls the Ray job), ``RayJobHook`` reads the head's address
and token from an Airflow connection of type ``ray``.

Importing this package imports Airflow; importing ``batchjobs`` does not.
"""

from batchjobs.airflow.hooks import RayJobHook
from batchjobs.airflow.operators import BatchJobOperator
from batchjobs.airflow.triggers import BatchJobTrigger

__all__ = ["BatchJobOperator", "BatchJobTrigger", "RayJobHook"]
