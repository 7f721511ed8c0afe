"""One real vLLM engine that every job of a test module shares, so the module pays one engine
start instead of one per job: ``EngineHost``, a Ray actor running batchjobs' vLLM adapter,
and ``HostedEngine``, a replica's engine that forwards each request to it.

Ray workers cannot import the tests: a module that uses these registers this module (and
itself) with ``ray.cloudpickle.register_pickle_by_value`` (``register``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from batchjobs.engines.base import Engine, Request, Result


class EngineHost:
    """The module's one vLLM engine (batchjobs' adapter over AsyncLLM), as a Ray actor."""

    def __init__(self, spec):
        self.spec = spec
        self.engine = None

    async def start(self) -> None:
        from batchjobs.engines.vllm import VLLMEngine

        self.engine = VLLMEngine(self.spec)  # on the actor's event loop, as in a replica

    def sampling(self) -> dict:
        return self.spec.sampling.model_dump()

    async def generate(self, request: Request) -> Result:
        return await self.engine.generate(request)

    def max_model_len(self) -> int | None:
        return self.engine.max_model_len()

    def close(self) -> None:
        self.engine.close()


class HostedEngine(Engine):
    """A replica's engine that forwards each request to the module's ``EngineHost``.
    ``context``: it states the host engine's max_model_len (else none, the default)."""

    kind = "vllm"

    def __init__(self, host, context: bool = False):
        import ray

        self.host = host
        self.context = ray.get(host.max_model_len.remote()) if context else None

    async def generate(self, request: Request) -> Result:
        return await self.host.generate.remote(request)

    def max_model_len(self) -> int | None:
        return self.context

    def close(self) -> None:
        pass  # the module's fixture closes the host


def attach(name: str, spec, same_sampling: bool = False, context: bool = False) -> HostedEngine:
    """A replica's engine over the host actor ``name``. ``same_sampling``: refuse a job whose
    sampling differs from the host's (it would not be honoured)."""
    import ray

    host = ray.get_actor(name)
    if same_sampling and ray.get(host.sampling.remote()) != spec.sampling.model_dump():
        raise AssertionError("this job's sampling differs from the shared engine's")
    return HostedEngine(host, context=context)


def register(module_name: str) -> None:
    """Let Ray's workers unpickle this module's and ``module_name``'s classes by value."""
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.register_pickle_by_value(sys.modules[module_name])


@contextmanager
def started_host(name: str, spec, max_concurrency: int, cls: type = EngineHost) -> Iterator:
    """The host actor ``name`` (``cls``, an ``EngineHost``) serving ``spec``'s engine, started;
    closed and killed on exit."""
    import ray

    host = (
        ray.remote(cls)
        .options(
            name=name,
            num_cpus=0,
            max_concurrency=max_concurrency,
            runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"}},
        )
        .remote(spec)
    )
    ray.get(host.start.remote())
    yield host
    ray.get(host.close.remote())
    ray.kill(host)
