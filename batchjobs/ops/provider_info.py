"""What Airflow's providers manager reads through the entry point
``apache_airflow_provider`` (pyproject.toml): the ``ray`` connection type, so Airflow's UI
offers it. A module of its own that imports nothing: Airflow loads it while its own
configuration is still being set up."""

from __future__ import annotations


def get_provider_info() -> dict:
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
