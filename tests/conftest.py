"""Top-level test configuration: GPU tests run only where asked for."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
    if os.environ.get("BATCHJOBS_GPU_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="GPU test: set BATCHJOBS_GPU_TESTS=1 on a CUDA host")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
