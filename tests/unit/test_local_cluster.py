"""The local Ray that `batchjobs run` starts: what it turns off beside the engine."""

from __future__ import annotations

from batchjobs import cluster


def test_local_cluster_settings():
    cfg = cluster.LOCAL_SYSTEM_CONFIG
    assert cfg["enable_worker_prestart"] is False
    assert cfg["prestart_worker_first_driver"] is False
    assert cfg["task_events_report_interval_ms"] == 0
    assert cfg["enable_metrics_collection"] is False
    # the OOM killer stays on, only slower
    assert 0 < cfg["memory_monitor_refresh_ms"] <= 1000
