"""What the warm fork server imports before vLLM asks it for an engine core (warmstart.py).

The server runs ``preload`` when it starts (through ``_server_preload``, the module it is
told to import). Every engine core forked from the server starts with vLLM's engine core
modules loaded, so it does not import them itself. The server imports them in its own
process while the actor imports vLLM; that is free only while the server is done before
the actor's vLLM asks for its engine core: until then the request waits.

Imports are best effort: a module this vLLM version lacks, or one that fails, is skipped,
and the engine core imports what it needs itself, as it would without a warm start.
"""

from __future__ import annotations

import importlib

from batchjobs import compat


def preload(modules: tuple[str, ...] | None = None) -> list[str]:
    """Import ``modules`` (by default vLLM's engine core, ``compat.vllm_engine_core_modules``);
    the names that failed."""
    if modules is None:
        modules = compat.vllm_engine_core_modules()
    return [name for name in modules if not _try_import(name)]


def _try_import(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - best effort: the engine core imports it if it must
        return False
    return True
