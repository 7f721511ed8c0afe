"""The pilot's part of the run report and of ``batchjobs manifest``: the candidates with
their projected cost, throughput and agreement, the projection for the chosen one against
what the job then measured, and which engine configuration produced the shards."""

from __future__ import annotations

import html
from collections import Counter
from typing import Any

from batchjobs.projection import OK, fmt_value, replica_unit


def measured(runs: list[dict[str, Any]], price: float) -> dict[str, float] | None:
    """What the job's runs measured per 1M tokens (every replica-second they held, start-up
    and idle included): replica-seconds and, with a price, dollars."""
    tokens = sum(r.get("prompt_tokens", 0) + r.get("completion_tokens", 0) for r in runs)
    device_s = sum(r.get("gpu_s", 0.0) for r in runs)
    if not tokens or not device_s:
        return None
    per_1m = device_s / tokens * 1e6
    return {"gpu_s_per_1m_tokens": per_1m, "usd_per_1m_tokens": per_1m / 3600 * price}


def projection_check(pilot: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    """One line: the chosen candidate's projection against the job's measured cost."""
    best = next((c for c in pilot.get("candidates", []) if c["name"] == pilot.get("chosen")), None)
    metric = pilot.get("metric", "usd_per_1m_tokens")
    got = measured(runs, pilot.get("usd_per_gpu_hour", 0.0))
    if best is None or best.get(metric) is None or got is None or not got[metric]:
        return ""
    unit = replica_unit(pilot.get("device"))
    name = "$" if metric == "usd_per_1m_tokens" else unit
    off = (best[metric] - got[metric]) / got[metric]
    return (
        f"Projected {fmt_value(best[metric])} {name} per 1M tokens for {pilot['chosen']!r}; "
        f"the job's {len(runs)} run(s) measured {fmt_value(got[metric])} ({off:+.1%}), "
        "start-up and idle included."
    )


def shards_by_config(records: list[Any]) -> dict[str, int]:
    """Committed shards per engine configuration: the pilot candidate's name, else the
    configuration's digest (records older than these fields: "unrecorded")."""
    return dict(
        Counter(
            r.engine_config or (f"engine {r.engine_digest}" if r.engine_digest else "unrecorded")
            for r in records
            if r.status == "committed"
        )
    )


def report_section(pilot: dict[str, Any] | None, runs: list[dict], records: list) -> list[str]:
    """The report's table of the pilot's candidates and the lines under it (HTML)."""
    if not pilot or not pilot.get("candidates"):
        return []
    unit = replica_unit(pilot.get("device"))
    ref = pilot.get("reference")
    out = [
        "<h2>Pilot: candidates</h2><table><tr><th class='l'>candidate</th>"
        f"<th class='l'>status</th><th>projected $/1M tok</th><th>projected {unit}/1M tok</th>"
        "<th>tok/s (pilot rows' work)</th><th>agreement</th><th>identical</th></tr>"
    ]
    for c in pilot["candidates"]:
        status = c.get("excluded") or c.get("error") or c["status"]
        if c["status"] == OK and not c.get("excluded"):
            status = "chosen" if c["name"] == pilot.get("chosen") else "ok"
        tags = " (reference)" if c["name"] == ref else ""
        out.append(
            f"<tr><td class='l'>{_e(c['name'])}{tags}</td><td class='l'>{_e(status)}</td>"
            f"<td>{fmt_value(c.get('usd_per_1m_tokens'))}</td>"
            f"<td>{fmt_value(c.get('gpu_s_per_1m_tokens'), '.1f')}</td>"
            f"<td>{fmt_value(c.get('tokens_per_s'), ',.0f')}</td>"
            f"<td>{fmt_value(c.get('agreement'), '.3f')}</td>"
            f"<td>{fmt_value(c.get('identical_share'), '.3f')}</td></tr>"
        )
    out.append("</table>")
    notes = [
        f"Agreement: mean token agreement with the reference {ref!r} over the pilot rows "
        "(longest common prefix of the token ids over the longer output); identical: share "
        "of identical outputs."
        + (
            f" Candidates below {pilot['min_agreement']} are ruled out."
            if pilot.get("min_agreement") is not None
            else ""
        )
        + (f" {pilot['agreement_note']}." if pilot.get("agreement_note") else ""),
        projection_check(pilot, runs),
        "Shards by engine configuration: "
        + ", ".join(f"{k}: {n}" for k, n in shards_by_config(records).items()),
    ]
    out += [f"<p class='note'>{_e(n)}</p>" for n in notes if n]
    return out


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)
