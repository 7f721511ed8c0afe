"""What the warm fork server imports before vLLM asks it for an engine core (warmstart.py).

The server runs ``preload`` when it starts (through ``_server_preload``, the module it is
told to import). Every engine core forked from the server starts with these modules
loaded, so it does not import them itself. The server imports them in its own process
while the actor imports vLLM; that is free only while the server is done before the
actor's vLLM asks for its engine core: until then the request waits.

- Always: vLLM's engine core.
- On a GPU with ``BATCHJOBS_PRELOAD_GPU_WORKER=1`` in ``engine.env``: also the worker and
  model runner that vLLM's engine core builds for one GPU per engine, with the attention
  backends and torch's compiler stack they import. Off by default. On one H200 (run L,
  docs/PERFORMANCE.md) it took 1-2 s off the core's own start when the server was ready
  in time (once), and delayed the core by 4 and 6 s when it was not (twice).
  On CPU the core starts its worker as a new interpreter, which inherits nothing, so these
  are never imported there.

Imports are best effort: a module this vLLM version lacks, or one that fails, is skipped,
and the engine core imports what it needs itself, as it would without a warm start. None
of these modules initializes CUDA on import (a forked process could not use it); the
server checks, and says so in the actor's log if one ever does.
"""

from __future__ import annotations

import importlib
import os
import sys

from batchjobs import compat

GPU_WORKER_VAR = "BATCHJOBS_PRELOAD_GPU_WORKER"
CUDA = (
    "vllm.v1.executor.uniproc_executor",
    "vllm.v1.worker.gpu_worker",  # vLLM's worker_cls on CUDA; imports the model runner
    "vllm.v1.worker.gpu_model_runner",
    "vllm.v1.attention.backends.flash_attn",
    "vllm.model_executor.model_loader",
    "vllm.compilation.backends",
)


def _is_cuda() -> bool:
    from vllm.platforms import current_platform  # NVML on CUDA: no CUDA context

    return bool(current_platform.is_cuda())


def preload(core=None, cuda=CUDA, is_cuda=_is_cuda, gpu_worker=None) -> list[str]:
    """Import ``core`` (by default vLLM's engine core, ``compat.vllm_engine_core_modules``), then ``cuda`` when asked for (``gpu_worker``, by default the
    ``BATCHJOBS_PRELOAD_GPU_WORKER`` variable) on a CUDA host; the names that failed."""
    if core is None:
        core = compat.vllm_engine_core_modules()
    failed = [name for name in core if not _try_import(name)]
    if gpu_worker is None:
        gpu_worker = os.environ.get(GPU_WORKER_VAR) == "1"
    if not gpu_worker:
        return failed
    try:
        on_cuda = is_cuda()
    except Exception:  # noqa: BLE001 - no platform: the core's modules are enough
        on_cuda = False
    if on_cuda:
        failed += [name for name in cuda if not _try_import(name)]
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            print(
                "batchjobs warm start: a preloaded module initialized CUDA; engine cores "
                "forked from this server cannot use the GPU. Set engine.env "
                "VLLM_WORKER_MULTIPROC_METHOD=spawn to turn the warm start off.",
                file=sys.stderr,
            )
    return failed


def _try_import(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - best effort: the engine core imports it if it must
        return False
    return True
