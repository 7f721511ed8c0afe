"""The Ray Data graph of a job, as a list of stages: read groups of shards (sorted by
prefix), the engine stage (an actor pool, each actor an engine replica or forwarding to
one), and staged writes that return one small summary per file."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable

import pyarrow as pa

from batchjobs import compat
from batchjobs.feeding import inflight_batches, io_concurrency, tasks_per_replica
from batchjobs.ordering import group_by_prefix, read_groups
from batchjobs.planning import Plan
from batchjobs.readers import Shard
from batchjobs.replicas import EarlyReplicas, engine_resources
from batchjobs.shard_errors import read_or_mark
from batchjobs.sink import write_staged
from batchjobs.spec import JobSpec
from batchjobs.tasks import task_for

log = logging.getLogger("batchjobs")


def _read_fn(batch: pa.Table, spec: JobSpec, batch_rows: int, gate=None):
    """Ray Data UDF: read one group of shards; with ``order: prefix`` sort it as one. With
    a ``gate`` (readgate.py), the group waits until reading is not too far ahead of the
    writes.

    ``spec`` arrives as the driver validated it: a read task re-checks nothing, so it may
    run on a node that lacks the model directory."""
    cols = task_for(spec).input_columns()
    for row in batch.to_pylist():
        tables = (
            table
            for shard in json.loads(row["shards"])
            # a shard that cannot be read ends in a marker row (shard_errors.py): it fails
            # alone, the others go on
            for table in read_or_mark(Shard(**shard), cols, batch_rows, spec.input.storage_options)
        )
        if spec.input.order == "prefix":
            tables = group_by_prefix(tables, batch_rows)
        if gate is None:
            yield from tables
            continue
        # Ray Data hands on what one task yields only when the task ends (merged into
        # blocks), so the gate admits the whole group at once, once it has been read.
        import ray

        tables = list(tables)
        ray.get(gate.admit.remote(sum(t.num_rows for t in tables)))
        yield from tables


def build_dataset(
    plan: Plan,
    device: str,
    engine_factory: Callable | None = None,
    replicas: EarlyReplicas | None = None,
    board=None,
    gate=None,
):
    """The Ray Data plan: one read task per read group of shards (held back by ``gate``),
    an engine actor pool, staged writes."""
    import ray
    from ray.data import TaskPoolStrategy

    spec = plan.spec
    res = spec.resources
    groups = read_groups(
        plan.todo, spec.input.order, spec.input.prefix_group_mb, spec.input.prefix_group_shards
    )
    ds = ray.data.from_items(
        [{"shards": json.dumps([s.to_dict() for s in group])} for group in groups],
        override_num_blocks=len(groups),
    )
    io = TaskPoolStrategy(size=io_concurrency())
    ds = ds.map_batches(
        _read_fn,
        # Read blocks of exactly one engine batch: Ray Data runs the batches of one task in
        # sequence, so a task holding several would wait on each batch's longest request.
        fn_kwargs={"spec": spec, "batch_rows": res.batch_size, "gate": gate},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=0.5,
        compute=io,
    )
    # Ray Data merges what one read task yields into one block (a whole shard). An engine
    # task runs the batches of its block one after another, so a 250-row block is four
    # waits on each batch's longest request, and the first replica to start takes every
    # block at once (measured: 2 GPUs no faster than 1). Blocks of one batch each keep
    # a replica's whole batch window in flight and spread work over replicas.
    ds = ds.repartition(target_num_rows_per_block=res.batch_size)
    with warnings.catch_warnings():
        # max_restarts has no named parameter in Ray Data 2.60, so it goes through the
        # deprecated **ray_remote_args; the warning would greet every run (it still works
        # up to Ray 2.64).
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = _engine_stage(ds, plan, device, engine_factory, replicas, board)
    return ds.map_batches(
        write_staged,
        fn_kwargs={
            "root": spec.output.path,
            "storage_options": spec.output.storage_options,
            "id_column": spec.input.id_column,
            "metadata": {"batchjobs.task": spec.task, "batchjobs.fingerprint": plan.fingerprint},
            "spec": spec,
        },
        batch_size=res.rows_per_file,
        batch_format="pyarrow",
        num_cpus=0.5,
        compute=io,
    )


def _engine_stage(ds, plan: Plan, device: str, engine_factory, replicas, board):
    from ray.data import ActorPoolStrategy

    from batchjobs.actor import EngineStage

    spec, res = plan.spec, plan.spec.resources
    if replicas is not None:
        # Ray Data's actors only forward to the replicas started before (start_replicas):
        # the replicas hold the devices and the engine's environment.
        held = {"num_gpus": 0, "num_cpus": 0}
        kwargs = {"replicas": replicas.actors, "claim_key": replicas.claim_key}
    else:
        held = engine_resources(spec, device, engine_factory)
        kwargs = {"engine_factory": engine_factory, "board": board}
    return ds.map_batches(
        EngineStage,
        fn_constructor_kwargs={"spec": spec, **kwargs},
        batch_size=res.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(
            **(
                {"size": res.replicas}
                if res.min_replicas in (None, res.replicas)
                else {"min_size": res.min_replicas, "max_size": res.replicas}
            ),
            max_tasks_in_flight_per_actor=tasks_per_replica(spec, plan.todo, device),
            max_concurrent_calls_per_actor=inflight_batches(spec, device),
            enable_true_multi_threading=True,
        ),
        max_restarts=res.max_restarts,
        **held,
    )


_stats_broken: list[BaseException] = []  # the compat error, once: then no more tries


def drop_block_stats(dataset) -> None:
    """Drop the statistics Ray Data keeps per block of a running dataset
    (``compat.ray_data_drop_block_stats``), so that the driver's memory does not grow with
    the job's rows. Called as the driver takes each batch of write summaries."""
    if _stats_broken:
        return
    try:
        compat.ray_data_drop_block_stats(dataset)
    except compat.CompatError as exc:
        _stats_broken.append(exc)
        log.warning("%s; the driver's memory grows with the job's blocks", exc)
