"""Cost arithmetic: GPU-seconds to dollars and dollars per million tokens."""

from __future__ import annotations


def usd(gpu_seconds: float, usd_per_gpu_hour: float) -> float:
    return gpu_seconds / 3600.0 * usd_per_gpu_hour


def per_million(cost_usd: float, tokens: int) -> float | None:
    """$ per 1M tokens; None when there were no tokens to divide by."""
    return cost_usd / (tokens / 1e6) if tokens else None
