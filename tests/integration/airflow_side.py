"""Run inside the Airflow virtualenv (.venv-airflow) by tests/integration/test_airflow.py:

    python airflow_side.py dagbag FOLDER          parse a DAG folder (no database needed)
    python airflow_side.py dagtest FOLDER DAG_ID  dag.test() one run, trigger included
    python airflow_side.py onkill FOLDER DAG_ID TASK_ID OUT   submit a task's job, on_kill it

Prints one line ``RESULT <json>`` at the end: DAG ids and import errors, or the run's state,
each task's state and tries, and its XComs.
"""

from __future__ import annotations

import json
import sys


def dagbag(folder: str) -> dict:
    import warnings

    from airflow.dag_processing.dagbag import DagBag
    from airflow.providers_manager import ProvidersManager

    bag = DagBag(dag_folder=folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ProvidersManager.hooks: deprecated for task code
        ray = ProvidersManager().hooks.get("ray")
    return {
        "ray_connection_hook": ray.hook_class_name if ray else None,
        "import_errors": {k: str(v) for k, v in bag.import_errors.items()},
        "dags": {
            dag_id: [
                {
                    "task_id": t.task_id,
                    "type": type(t).__name__,
                    "retries": t.retries,
                    "downstream": sorted(t.downstream_task_ids),
                    "spec": getattr(t, "spec", None),
                    "overrides": getattr(t, "overrides", None),
                    "working_dir": getattr(t, "working_dir", None),
                }
                for t in dag.tasks
            ]
            for dag_id, dag in bag.dags.items()
        },
    }


def dagtest(folder: str, dag_id: str) -> dict:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    dag = DagBag(dag_folder=folder).dags[dag_id]
    run = dag.test()
    with create_session() as session:
        tis = session.query(TaskInstance).filter_by(dag_id=dag_id, run_id=run.run_id).all()
        xcoms = session.query(XComModel).filter_by(dag_id=dag_id, run_id=run.run_id).all()
        return {
            "state": str(run.state),
            "tasks": {
                ti.task_id: {"state": str(ti.state), "try_number": ti.try_number} for ti in tis
            },
            "xcom": {f"{x.task_id}.{x.key}": x.value for x in xcoms},
        }


def onkill(folder: str, dag_id: str, task_id: str, out: str) -> dict:
    """Submit one task's job (outside a DAG run) and kill the task as Airflow would."""
    from airflow.dag_processing.dagbag import DagBag

    op = DagBag(dag_folder=folder).dags[dag_id].get_task(task_id)
    op.run_key, op.overrides = "on-kill", [f"output.path={out}"]
    sub = op.submit()
    op.on_kill()
    return {"submission_id": sub.submission_id, "action": sub.action}


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    result = {"dagbag": dagbag, "dagtest": dagtest, "onkill": onkill}[command](*args)
    print("RESULT " + json.dumps(result, default=str), flush=True)
