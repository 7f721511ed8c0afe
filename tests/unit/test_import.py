"""Importing the package and its CLI must stay cheap: no engine, torch or Ray at import time."""

from __future__ import annotations

import json
import subprocess
import sys

MODULES = [
    "batchjobs",
    "batchjobs.cli",
    "batchjobs.spec",
    "batchjobs.pipeline",
    "batchjobs.readers",
    "batchjobs.sink",
    "batchjobs.manifest",
    "batchjobs.actor",
    "batchjobs.ops.jobs",
    "batchjobs.ops.cli",
]
HEAVY = ["vllm", "torch", "tensorrt_llm", "ray", "airflow"]

SCRIPT = f"""
import importlib, json, sys
for name in {MODULES!r}:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
"""


def test_import_does_not_load_engines_torch_or_ray():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded == [], f"imported at package import time: {loaded}"
