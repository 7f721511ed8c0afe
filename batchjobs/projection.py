"""The pilot's arithmetic and its table: project what one candidate measured on the pilot
rows onto the whole job, rank the candidates, and show the result (see ``pilot`` for the
formulas and how the pilot runs)."""

from __future__ import annotations

from typing import Any

OK, FAILED, NOT_INSTALLED = "ok", "failed", "not installed"


def project(
    measured: dict[str, Any], expected_rows: int, replicas: int, usd_per_gpu_hour: float
) -> dict[str, Any]:
    """Project one pilot's measurements onto the whole job (see the module docstring).

    ``measured``: rows, prompt_tokens, completion_tokens, startup_s (one replica),
    engine_s (Σ the pilot rows' charges), gpus_per_replica, and drain_s (one replica's idle
    and under-fill: the ramp-up and the draining tail, paid once per replica like start-up).
    """
    rows = measured["rows"]
    tokens = measured["prompt_tokens"] + measured["completion_tokens"]
    gpus = measured["gpus_per_replica"]
    scale = expected_rows / rows if rows else 0.0
    expected_tokens = tokens * scale
    fixed_s = measured["startup_s"] + measured.get("drain_s", 0.0)
    gpu_s = gpus * (fixed_s * replicas + measured["engine_s"] * scale)
    gpu_s_per_1m = gpu_s / expected_tokens * 1e6 if expected_tokens else None
    return {
        "tokens_per_row": tokens / rows if rows else None,
        # the pilot rows' work rate (start-up excluded): tokens per replica-second busy
        "tokens_per_s": tokens / measured["engine_s"] if measured["engine_s"] else None,
        "expected_rows": expected_rows,
        "expected_tokens": round(expected_tokens),
        "expected_gpu_s": gpu_s,
        "expected_usd": gpu_s / 3600 * usd_per_gpu_hour,
        "gpu_s_per_1m_tokens": gpu_s_per_1m,
        "usd_per_1m_tokens": (
            None if gpu_s_per_1m is None else gpu_s_per_1m / 3600 * usd_per_gpu_hour
        ),
    }


def metric_for(usd_per_gpu_hour: float) -> str:
    """$ per 1M tokens when there is a price, else GPU-seconds per 1M tokens (same order)."""
    return "usd_per_1m_tokens" if usd_per_gpu_hour > 0 else "gpu_s_per_1m_tokens"


def rank(table: list[dict[str, Any]], metric: str) -> str | None:
    """The cheapest measured candidate by ``metric`` that the quality guard did not rule
    out (``excluded``; ties: the one listed first)."""
    measured = [r for r in table if r["status"] == OK and not r.get("excluded")]
    ok = [r for r in measured if r.get(metric) is not None]
    if ok:
        return min(ok, key=lambda r: r[metric])["name"]
    return measured[0]["name"] if measured else None


def replica_unit(device: str | None) -> str:
    """What a replica-second is on ``device``: GPU-s on cuda, CPU-s on cpu (a CPU replica
    is priced as one unit)."""
    return "CPU-s" if device == "cpu" else "GPU-s"


def decision_reason(
    table: list[dict[str, Any]], chosen: str, metric: str, price: float, unit: str
) -> str:
    """Why the pilot chose ``chosen``, in one line."""
    best = next(r for r in table if r["name"] == chosen)
    others = [
        f"{r['name']} {fmt_value(r.get(metric))}"
        for r in table
        if r["name"] != chosen and r["status"] == OK and not r.get("excluded")
    ]
    out = [r for r in table if r.get("excluded")]
    return (
        f"cheapest by {metric_label(metric, unit)}: {fmt_value(best.get(metric))}"
        + (f" (vs {', '.join(others)})" if others else " (the only one left)")
        + (
            "; ruled out by pilot.min_agreement: "
            + ", ".join(f"{r['name']} ({r['excluded']})" for r in out)
            if out
            else ""
        )
        + ("" if price > 0 else f"; no price set (cost.usd_per_gpu_hour), so ranked by {unit}")
    )


def format_table(report: dict[str, Any]) -> list[str]:
    """The pilot table as text lines (what the CLI prints). Replica time is named for the
    device it was measured on (GPU-s, or CPU-s on a CPU run); ``agree``: mean token
    agreement with the reference candidate, ``same``: share of identical outputs."""
    unit = replica_unit(report.get("device"))
    head = (
        f"{'candidate':<16} {'status':<13} {'rows':>5} {'tok/row':>8} {'start-up s':>10} "
        f"{'engine s':>9} {'job ' + unit:>10} {unit + '/1M tok':>13} {'$/1M tok':>10} "
        f"{'agree':>6} {'same':>6}"
    )
    unit_h = "GPU-h" if unit == "GPU-s" else "replica-h"
    lines = [
        f"pilot: {report['pilot_rows']} rows per candidate, projected onto "
        f"{report['expected_rows']} job rows{' (estimated)' if report['expected_rows_estimated'] else ''}"
        f" × {report['replicas']} replica(s) at ${report['usd_per_gpu_hour']}/{unit_h}",
        "  " + head,
    ]
    for r in report["candidates"]:
        mark = "*" if r["name"] == report["chosen"] else " "
        if r["status"] != OK:
            lines.append(f"{mark} {r['name']:<16} {r['status']:<13} {r.get('error', '')}")
            continue
        status = "excluded" if r.get("excluded") else r["status"]
        if r["name"] == report.get("reference"):
            status += " (ref)"
        lines.append(
            f"{mark} {r['name']:<16} {status:<13} {r['rows']:>5} {fmt_value(r['tokens_per_row'], '.1f'):>8} "
            f"{r['startup_s']:>10.1f} {r['engine_s']:>9.2f} {r['expected_gpu_s']:>10.1f} "
            f"{fmt_value(r['gpu_s_per_1m_tokens'], '.1f'):>13} {fmt_value(r['usd_per_1m_tokens']):>10} "
            f"{fmt_value(r.get('agreement'), '.3f'):>6} {fmt_value(r.get('identical_share'), '.3f'):>6}"
        )
    if report.get("agreement_note"):
        lines.append(f"pilot: agreement: {report['agreement_note']}")
    lines.append(f"pilot: chose {report['chosen']!r}: {report['reason']}")
    if "pilot_gpu_s" in report:
        lines.append(
            f"pilot: the pilot itself took {report['pilot_gpu_s']:.1f} {unit} "
            f"(${report['pilot_usd']:.4f}); its rows are run again by the job"
        )
    return lines


def summary_line(report: dict[str, Any]) -> str:
    best = next(r for r in report["candidates"] if r["name"] == report["chosen"])
    how = "recorded pilot decision reused" if report.get("reused") else report["reason"]
    return f"engine: {report['chosen']!r} chosen by pilot ({how}; {best.get('kind', '')})"


def metric_label(metric: str, unit: str = "GPU-s") -> str:
    return "$ per 1M tokens" if metric == "usd_per_1m_tokens" else f"{unit} per 1M tokens"


def fmt_value(v: float | None, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)
