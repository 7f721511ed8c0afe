"""The report's charts of shards, rows, replicas, eval accuracy and pilot candidates."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow.compute as pc

from batchjobs.display import usd
from batchjobs.projection import replica_unit
from batchjobs.report_plots import COLORS, _figure, _png, _short

if TYPE_CHECKING:
    from batchjobs.report import JobData

MAX_BARS = 60  # per-shard bars; more shards: a histogram


def plot_shard_cost(data: JobData) -> bytes | None:
    recs = [r for r in data.records if r.usd_per_1m_tokens is not None]
    if not recs:
        return None
    fig, axes = _figure(1, 1)
    ax = axes[0, 0]
    values = [r.usd_per_1m_tokens for r in recs]
    if len(recs) <= MAX_BARS:
        ax.bar(range(len(recs)), values, color=COLORS[0])
        ax.set_xticks(range(len(recs)))
        ax.set_xticklabels([_short(r.shard_id) for r in recs], rotation=30, ha="right", fontsize=8)
        ax.set_xlabel("shard")
    else:
        ax.hist(values, bins=40, color=COLORS[0])
        ax.set_xlabel("$ per 1M tokens (in + out)")
        ax.set_ylabel("shards")
    job = _job_usd_per_1m(data)
    if job is not None and len(recs) <= MAX_BARS:
        ax.axhline(
            job, color=COLORS[1], linestyle="--", label=f"job, overhead included: {usd(job)}"
        )
        ax.legend(loc="upper right", frameon=False, fontsize=9)
    if len(recs) <= MAX_BARS:
        ax.set_ylabel("$ per 1M tokens (in + out)")
    return _png(fig)


def _job_usd_per_1m(data: JobData) -> float | None:
    cost = sum(r.get("cost_usd", 0.0) for r in data.runs)
    tokens = sum(r.get("prompt_tokens", 0) + r.get("completion_tokens", 0) for r in data.runs)
    return cost / tokens * 1e6 if tokens and cost else None


def plot_distributions(data: JobData) -> bytes | None:
    t = data.rows
    if t is None or t.num_rows == 0:
        return None
    ok = t.filter(pc.is_null(t.column("error"))) if "error" in t.column_names else t
    panels = []
    if "latency_s" in ok.column_names:
        panels.append(("latency_s", "latency per row (s, queueing in the replica included)"))
    if "completion_tokens" in ok.column_names:
        panels.append(("completion_tokens", "output tokens per row"))
    elif "prompt_tokens" in ok.column_names:
        panels.append(("prompt_tokens", "input tokens per row"))
    if not panels:
        return None
    fig, axes = _figure(1, len(panels), height=3.0)
    for ax, (col, label) in zip(axes.flat, panels):
        values = [v for v in ok.column(col).to_pylist() if v is not None]
        if values:
            ax.hist(values, bins=_bins(values), color=COLORS[0])
            label += _quantiles(ax, values)
        if values and col != "latency_s":
            ax.set_xlim(left=min(0, min(values) - 0.5))  # lengths from 0: their scale shows
        ax.set_xlabel(label)
        ax.set_ylabel("rows")
    return _png(fig)


def _bins(values: list[float]):
    """One bin per value for counts over a short range (token counts), else 40."""
    lo, hi = min(values), max(values)
    if all(float(v).is_integer() for v in values[:1000]) and hi - lo <= 60:
        return [x - 0.5 for x in range(int(lo), int(hi) + 2)]
    return 40


def _quantiles(ax, values: list[float]) -> str:
    """Median (dashed) and 99th percentile (dotted) as lines; their values for the label."""
    import numpy as np

    said = []
    for q, style in ((50, "--"), (99, ":")):
        v = float(np.percentile(values, q))
        ax.axvline(v, color=COLORS[1], linestyle=style, linewidth=1.2)
        said.append(f"p{q} {v:,.3g}")
    return "\n" + " (dashed) · ".join(said) + " (dotted)"


def plot_replicas(data: JobData) -> bytes | None:
    bars = []
    for i, run in enumerate(data.runs, start=1):
        for name, r in sorted((run.get("replicas") or {}).items()):
            if r.get("busy_share") is not None:
                bars.append((f"run {i} · {_short(name, 28)}", r["busy_share"], r, i))
    if not bars:
        return None
    bars = bars[-40:]
    fig, axes = _figure(1, 1, height=0.3 * len(bars) + 1.2)
    ax = axes[0, 0]
    ys = range(len(bars))
    ax.barh(
        ys,
        [b[1] * 100 for b in bars],
        height=0.6,
        color=[COLORS[(b[3] - 1) % len(COLORS)] for b in bars],
    )
    ax.set_ylim(-0.7, len(bars) - 0.3)
    ax.set_yticks(list(ys))
    ax.set_yticklabels([b[0] for b in bars], fontsize=8)
    for y, (_, share, r, _) in zip(ys, bars):
        ax.annotate(
            f" {share:.0%} · {r.get('mean_inflight', 0):.0f} in flight · start-up "
            f"{r.get('startup_s', 0):.0f}s",
            (share * 100, y),
            va="center",
            fontsize=8,
        )
    ax.set_xlim(0, 135)
    ax.set_xticks([0, 25, 50, 75, 100])
    ax.set_xlabel("busy share: time with work in the engine after its start-up (%)")
    ax.invert_yaxis()
    return _png(fig)


def plot_norms(data: JobData) -> bytes | None:
    if not data.vectors:
        return None
    fig, axes = _figure(1, 1, height=3.0)
    ax = axes[0, 0]
    ax.hist(data.vectors, bins=40, color=COLORS[2])
    ax.set_xlabel("L2 norm of the embedding")
    ax.set_ylabel("rows")
    return _png(fig)


def plot_eval(data: JobData) -> bytes | None:
    ev = data.eval
    if not ev or not ev.get("metrics"):
        return None
    metrics = list(ev["metrics"])
    groups = ev.get("groups") or {}
    names = ["all", *groups]
    fig, axes = _figure(1, 1, height=max(2.6, 0.3 * len(names) * len(metrics) + 1.2))
    ax = axes[0, 0]
    height = 0.8 / len(metrics)
    for j, metric in enumerate(metrics):
        ys, acc, lo, hi = [], [], [], []
        for i, g in enumerate(names):
            m = (ev if g == "all" else groups[g])["metrics"].get(metric) or {}
            if m.get("accuracy") is None:
                continue
            ci = m.get("ci95") or [m["accuracy"], m["accuracy"]]
            ys.append(i + j * height)
            acc.append(m["accuracy"])
            lo.append(m["accuracy"] - ci[0])
            hi.append(ci[1] - m["accuracy"])
        ax.barh(ys, acc, height=height, color=COLORS[j % len(COLORS)], label=metric)
        ax.errorbar(acc, ys, xerr=[lo, hi], fmt="none", ecolor="#333333", capsize=3, linewidth=1)
    ax.set_yticks([i + (len(metrics) - 1) * height / 2 for i in range(len(names))])
    ax.set_yticklabels([_short(n, 30) for n in names], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy (error rows count as wrong), with 95% interval (Wilson)")
    ax.invert_yaxis()
    ax.legend(loc="lower right", frameon=False, fontsize=9)
    return _png(fig)


def plot_pilot(data: JobData) -> bytes | None:
    p = data.pilot
    if not p or not p.get("candidates"):
        return None
    metric = p.get("metric", "usd_per_1m_tokens")
    cands = [c for c in p["candidates"] if c.get(metric) is not None]
    if not cands:
        return None
    fig, axes = _figure(1, 1, height=max(2.0, 0.45 * len(cands) + 1.0))
    ax = axes[0, 0]
    colors = [COLORS[1] if c["name"] == p.get("chosen") else COLORS[0] for c in cands]
    ax.barh(range(len(cands)), [c[metric] for c in cands], color=colors)
    ax.set_yticks(range(len(cands)))
    ax.set_yticklabels(
        [c["name"] + (" (chosen)" if c["name"] == p.get("chosen") else "") for c in cands],
        fontsize=9,
    )
    ax.set_xlabel(
        "projected $ per 1M tokens for the job (start-up amortised)"
        if metric == "usd_per_1m_tokens"
        else f"projected {replica_unit(p.get('device'))} per 1M tokens for the job (no price set)"
    )
    ax.invert_yaxis()
    return _png(fig)
