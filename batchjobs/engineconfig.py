"""Which engine configuration produced a shard: its digest, and the pilot candidate's name
when the job's engine was chosen by a pilot (``_pilot.json`` at the output root).

Every shard record of the manifest carries both (``engine_digest``, ``engine_config``), so
a job whose shards came from more than one configuration (a rerun with ``--set
pilot=null`` or an edited engine section, where the fingerprint allows it) says which shard
came from which.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from batchjobs.layout import PILOT_JSON
from batchjobs.spec import JobSpec


def engine_digest(spec: JobSpec) -> str:
    """What identifies an engine configuration (env by names only: no values)."""
    engine = spec.engine.model_dump()
    engine["env"] = sorted(engine["env"])
    return hashlib.sha256(json.dumps(engine, sort_keys=True, default=str).encode()).hexdigest()[:16]


def chosen_name(decision: dict[str, Any] | None, digest: str) -> str:
    """The pilot candidate a decision chose, if the engine with ``digest`` is that
    candidate; else ""."""
    if not decision or decision.get("chosen_engine_digest") != digest:
        return ""
    return str(decision.get("chosen") or "")


def configuration(out: Any, spec: JobSpec) -> dict[str, str]:
    """The shard record's ``engine_digest`` and ``engine_config`` for a run of ``spec`` at
    the output root ``out`` (a ``sink.OutputRoot``)."""
    digest = engine_digest(spec)
    try:
        raw = out.read(PILOT_JSON)
        decision = json.loads(raw) if raw else None
    except (OSError, ValueError):
        decision = None
    return {
        "engine_digest": digest,
        "engine_config": chosen_name(decision if isinstance(decision, dict) else None, digest),
    }
