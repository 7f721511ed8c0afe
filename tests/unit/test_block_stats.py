"""Ray Data keeps statistics per block of a running dataset in the driver; batchjobs drops
them as the job goes (``compat.ray_data_drop_block_stats``), so that the driver's memory
does not grow with the job's rows (bench/load.py measures it end to end)."""

from __future__ import annotations

import inspect
import types

import pytest

from batchjobs import compat, graph


class Op:
    """An operator of the executor's topology (a dict key, as Ray Data's are)."""

    def __init__(self, **attrs):
        self.__dict__.update(attrs)


def _dataset(topology):
    executor = types.SimpleNamespace(_topology=topology)
    return types.SimpleNamespace(_current_executor=executor)


def test_every_operators_block_stats_are_dropped():
    read = Op(_output_blocks_stats=["b1", "b2"])
    engine = Op(_output_blocks_stats=["b3"])
    source = Op()  # an operator without the list is left alone
    topology = {read: object(), engine: object(), source: object()}
    assert compat.ray_data_drop_block_stats(_dataset(topology)) == 3
    assert read._output_blocks_stats == [] and engine._output_blocks_stats == []
    assert compat.ray_data_drop_block_stats(_dataset(topology)) == 0


def test_nothing_to_drop_before_the_execution_starts():
    assert compat.ray_data_drop_block_stats(types.SimpleNamespace(_current_executor=None)) == 0
    assert compat.ray_data_drop_block_stats(_dataset(None)) == 0


def test_a_changed_ray_data_is_a_compat_error_and_the_pipeline_warns_once(caplog):
    with pytest.raises(compat.CompatError, match="ray_data_drop_block_stats"):
        compat.ray_data_drop_block_stats(types.SimpleNamespace())
    graph._stats_broken.clear()
    try:
        graph.drop_block_stats(types.SimpleNamespace())
        graph.drop_block_stats(types.SimpleNamespace())
        warnings = [r for r in caplog.records if "grows with the job's blocks" in r.message]
        assert len(warnings) == 1
    finally:
        graph._stats_broken.clear()


def test_the_installed_ray_data_keeps_them_where_compat_looks():
    """Without this check a Ray upgrade that renamed them would drop nothing, and every
    other test would still pass."""
    from ray.data import Dataset
    from ray.data._internal.execution.operators.map_operator import MapOperator
    from ray.data._internal.execution.streaming_executor import StreamingExecutor

    assert "self._output_blocks_stats" in inspect.getsource(MapOperator)
    assert "self._current_executor = executor" in inspect.getsource(Dataset)
    assert "self._topology" in inspect.getsource(StreamingExecutor)
