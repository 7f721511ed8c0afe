"""What batchjobs turns down on a CPU engine's machine: Ray Data's loop period (CPU only)
and Ray's own bookkeeping on a local cluster (docs/PERFORMANCE.md, runs S)."""

from __future__ import annotations

import pytest

from batchjobs import cluster, pipeline


@pytest.fixture
def loop_constant():
    from ray.data._internal.execution import streaming_executor_state as state

    before = state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S
    state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S = 0.1  # Ray Data 2.60's own, whatever ran before
    yield state
    state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S = before


def test_ray_data_loop_slows_to_the_cpu_period(loop_constant):
    pipeline._slower_scheduling_loop()
    assert loop_constant.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S == pipeline.CPU_SCHEDULING_LOOP_S


def test_local_cluster_settings():
    cfg = cluster.LOCAL_SYSTEM_CONFIG
    assert cfg["enable_worker_prestart"] is False
    assert cfg["prestart_worker_first_driver"] is False
    assert cfg["task_events_report_interval_ms"] == 0
    assert cfg["enable_metrics_collection"] is False
    # the OOM killer stays on, only slower
    assert 0 < cfg["memory_monitor_refresh_ms"] <= 1000
