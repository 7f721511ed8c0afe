"""``batchjobs report``: one self-contained HTML file, ``<output>/_report.html``, that says
what a job did and cost, from its output root alone.

It reads the manifest, the run records (``_runs.jsonl``: every run, with the spec it ran,
secrets already hidden), the progress samples (``_progress.jsonl``), ``_eval.json`` and
``_pilot.json`` where present, and a sample of the output rows (at most ``MAX_ROWS``) for the
distributions; nothing else, so a root copied from an object store to a laptop reports the
same. The plots are PNGs (matplotlib, no display needed) embedded in the page: no network,
no scripts. Several runs of one root (a job resumed) are one job, its runs marked.
"""

from __future__ import annotations

import base64
import html
import io
import json
import posixpath
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchjobs import pilotview
from batchjobs.display import device_unit, duration, usd
from batchjobs.errors import OutputError
from batchjobs.layout import EVAL_JSON, PILOT_JSON, REPORT, RUNS, read_records, unstamped
from batchjobs.progress import error_kind, read_samples
from batchjobs.projection import replica_unit

if TYPE_CHECKING:
    from batchjobs.manifest import ShardRecord
    from batchjobs.sink import OutputRoot

MAX_ROWS = 200_000  # output rows read for the distributions
MAX_VECTORS = 20_000  # embeddings read for the norm distribution
MAX_BARS = 60  # per-shard bars; more shards: a histogram
NAN = float("nan")  # breaks a plotted line (between runs)
COLORS = ["#3b6ea8", "#d9822b", "#3a9a5b", "#c0392b", "#8e6bb8", "#7f7f7f"]


def read_runs(out: OutputRoot) -> list[dict[str, Any]]:
    """Every record in ``_runs.jsonl``, oldest first (lines that do not parse are skipped)."""
    return sorted(read_records(out, RUNS), key=lambda r: r.get("started_at") or 0)


@dataclass
class JobData:
    """What the report shows, as read from the output root."""

    url: str
    records: list[ShardRecord]
    runs: list[dict[str, Any]]
    samples: list[dict[str, Any]]
    eval: dict[str, Any] | None = None
    pilot: dict[str, Any] | None = None
    rows: pa.Table | None = None  # a sample of the output rows (the columns the plots use)
    rows_read: int = 0
    vectors: list[float] = field(default_factory=list)  # embedding norms of the rows read

    @property
    def unit(self) -> str:
        return device_unit(self.runs)

    @property
    def spec(self) -> dict[str, Any] | None:
        for run in reversed(self.runs):
            if run.get("spec"):
                return run["spec"]
        return None

    @property
    def task(self) -> str:
        return next((r["task"] for r in reversed(self.runs) if r.get("task")), "generate")


def _read_json(out: OutputRoot, name: str) -> dict[str, Any] | None:
    raw = out.read(name)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return unstamped(name, data, f"{out.url}/{name}") if isinstance(data, dict) else None


def load(out: OutputRoot) -> JobData:
    """Everything the report needs from the output root ``out``."""
    from batchjobs.manifest import COMMITTED, Manifest

    records = list(Manifest(out).records.values())
    runs = read_runs(out)
    if not records and not runs:
        raise OutputError(
            f"{out.url} has no manifest and no run records: not a batchjobs output root, or "
            "no run has started there"
        )
    data = JobData(out.url, records, runs, read_samples(out))
    data.eval = _read_json(out, EVAL_JSON)
    data.pilot = _read_json(out, PILOT_JSON)
    _read_rows(out, [r for r in records if r.status == COMMITTED], data)
    return data


def _read_rows(out: OutputRoot, records: list[ShardRecord], data: JobData) -> None:
    """Up to ``MAX_ROWS`` output rows from files spread over the committed shards, found
    under the root by name (the manifest's paths may be where the root was written)."""
    files = [
        out.path(r.shard_id, posixpath.basename(f))
        for r in sorted(records, key=lambda r: r.shard_id)
        for f in r.files
    ]
    total = sum(r.rows for r in records)
    if not files or not total:
        return
    step = max(1, round(total / MAX_ROWS / max(1, total / len(files))))
    wanted = ("latency_s", "completion_tokens", "prompt_tokens", "error", "finish_reason")
    tables, vectors, read = [], [], 0
    for path in files[::step]:
        try:
            names = pq.read_schema(path, filesystem=out.fs).names
            cols = [c for c in wanted if c in names]
            embed = "embedding" in names and len(vectors) < MAX_VECTORS
            t = pq.read_table(
                path, columns=cols + (["embedding"] if embed else []), filesystem=out.fs
            )
        except (OSError, pa.ArrowInvalid):
            continue  # a file moved or removed since: the plots use the rest
        if embed:
            vectors.extend(_norms(t.column("embedding")))
            t = t.drop_columns(["embedding"])
        tables.append(t)
        read += t.num_rows
        if read >= MAX_ROWS:
            break
    if tables:
        data.rows = pa.concat_tables(tables, promote_options="default")
        data.rows_read = read
    data.vectors = vectors[:MAX_VECTORS]


def _norms(column: pa.ChunkedArray) -> list[float]:
    import numpy as np

    out = []
    for chunk in column.chunks:
        valid = chunk.drop_null()
        if len(valid) == 0:
            continue
        flat = valid.flatten().to_numpy(zero_copy_only=False)
        dim = len(flat) // len(valid)
        out.extend(np.linalg.norm(flat.reshape(len(valid), dim), axis=1).tolist())
    return out


# ------------------------------------------------------------------------------ plots


def _figure(rows: int = 1, cols: int = 1, height: float = 3.2, width: float = 10.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height * rows), dpi=100, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.grid(True, color="#e5e5e5", linewidth=0.8)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    return fig, axes


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _job_time(samples: list[dict], runs: list[dict]) -> tuple[list[float], list[tuple[float, str]]]:
    """Each sample's time on the job's clock (the runs one after another, the gaps between
    them left out) and where each run starts on it."""
    starts: dict[float, float] = {}
    clock = 0.0
    marks = []
    for i, run in enumerate(runs, start=1):
        key = run.get("started_at")
        starts[key] = clock
        marks.append((clock, f"run {i}"))
        clock += (run.get("ended_at") or key or 0) - (key or 0)
    xs = []
    for s in samples:
        base = starts.get(s["run"])
        if base is None:  # a run whose record is missing (a killed driver): after the rest
            starts[s["run"]] = base = clock
            marks.append((clock, "run (killed)"))
        xs.append(base + s["t"] - s["run"])
    return xs, marks


def _mark_runs(ax, marks: list[tuple[float, str]], scale: float) -> None:
    if len(marks) < 2:
        return
    for x, label in marks:
        ax.axvline(x / scale, color="#999999", linestyle="--", linewidth=0.9)
        ax.annotate(
            label,
            (x / scale, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -3),
            textcoords="offset points",
            va="top",
            fontsize=8,
            color="#666666",
        )


def _time_axis(xs: list[float]) -> tuple[float, str]:
    span = max(xs) if xs else 0
    if span > 3 * 3600:
        return 3600.0, "job time (hours; gaps between runs left out)"
    if span > 180:
        return 60.0, "job time (minutes; gaps between runs left out)"
    return 1.0, "job time (seconds; gaps between runs left out)"


def _rates(samples: list[dict], xs: list[float], key: str) -> tuple[list[float], list[float]]:
    """Per second between consecutive samples of the same run, at the interval's end; a
    gap (NaN) between runs, so that no line joins them."""
    px, py = [], []
    for (a, xa), (b, xb) in zip(zip(samples, xs), zip(samples[1:], xs[1:])):
        if a["run"] != b["run"]:
            px.append(NAN)
            py.append(NAN)
        if a["run"] != b["run"] or xb <= xa:
            continue
        px.append(xb)
        py.append(max(0.0, (b[key] - a[key]) / (xb - xa)))
    return px, py


def _by_run(samples: list[dict], values: list[float]) -> list[float]:
    """``values`` (one per sample) with a NaN between runs."""
    out: list[float] = []
    for i, v in enumerate(values):
        if i and samples[i]["run"] != samples[i - 1]["run"]:
            out.append(NAN)
        out.append(v)
    return out


def plot_throughput(data: JobData) -> bytes | None:
    samples = data.samples
    if len(samples) < 2:
        return None
    xs, marks = _job_time(samples, data.runs)
    scale, label = _time_axis(xs)
    fig, axes = _figure(2, 1, height=2.6)
    rx, ry = _rates(samples, xs, "rows")
    axes[0, 0].plot([x / scale for x in rx], ry, color=COLORS[0], marker=".", linewidth=1.4)
    axes[0, 0].set_ylabel("rows/s")
    for i, (key, name) in enumerate((("prompt_tokens", "input"), ("completion_tokens", "output"))):
        tx, ty = _rates(samples, xs, key)
        axes[1, 0].plot(
            [x / scale for x in tx], ty, color=COLORS[i], marker=".", linewidth=1.4, label=name
        )
    axes[1, 0].set_ylabel("tokens/s")
    axes[1, 0].legend(loc="center left", frameon=False, fontsize=9)
    for ax in axes.flat:
        _mark_runs(ax, marks, scale)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
    axes[1, 0].set_xlabel(label)
    return _png(fig)


def plot_cost(data: JobData) -> bytes | None:
    samples = data.samples
    if len(samples) < 2:
        return None
    xs, marks = _job_time(samples, data.runs)
    scale, label = _time_axis(xs)
    # Earlier runs' cost (their records) under each later run's samples.
    before: dict[float, float] = {}
    spent = 0.0
    for run in data.runs:
        before[run.get("started_at")] = spent
        spent += run.get("cost_usd", 0.0)
    fig, axes = _figure(1, 1)
    ax = axes[0, 0]
    cum = [before.get(s["run"], 0.0) + s["usd"] for s in samples]
    xs_runs = _by_run(samples, [x / scale for x in xs])
    ax.plot(xs_runs, _by_run(samples, cum), color=COLORS[0], linewidth=1.8, label="spent so far")
    proj = [
        before.get(s["run"], 0.0) + s["usd_projected"]
        if s.get("usd_projected") is not None
        else NAN
        for s in samples
    ]
    if any(p == p for p in proj):  # not all NaN
        ax.plot(
            xs_runs,
            _by_run(samples, proj),
            color=COLORS[1],
            linestyle=":",
            linewidth=1.5,
            label="projected then",
        )
    ends = []
    clock = 0.0
    for run in data.runs:
        clock += (run.get("ended_at") or 0) - (run.get("started_at") or 0)
        ends.append((clock / scale, before.get(run.get("started_at"), 0) + run.get("cost_usd", 0)))
    if ends:
        ax.scatter(*zip(*ends), color=COLORS[2], zorder=3, s=25, label="run's recorded total")
    _mark_runs(ax, marks, scale)
    ax.set_ylabel("$ (replica time, start-up included)")
    ax.set_xlabel(label)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", frameon=False, fontsize=9)
    return _png(fig)


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


def error_kinds(data: JobData) -> dict[str, int]:
    t = data.rows
    if t is None or "error" not in t.column_names:
        return {}
    kinds: dict[str, int] = {}
    for message in t.column("error").drop_null().to_pylist():
        k = error_kind(message)
        kinds[k] = kinds.get(k, 0) + 1
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


def plot_errors(data: JobData) -> bytes | None:
    kinds = error_kinds(data)
    samples = data.samples
    moving = sum(
        1 for a, b in zip(samples, samples[1:]) if a["run"] == b["run"] and b["rows"] > a["rows"]
    )
    has_rate = moving >= 3 and any(s["error_rows"] for s in samples)
    if not kinds and not has_rate:
        return None
    panels = int(has_rate) + int(bool(kinds))
    fig, axes = _figure(1, panels, height=min(3.0, 1.4 + 0.35 * len(kinds)))
    i = 0
    if has_rate:
        ax = axes[0, i]
        xs, marks = _job_time(samples, data.runs)
        scale, label = _time_axis(xs)
        px, py = [], []
        for a, b, xb in zip(samples, samples[1:], xs[1:]):
            rows = b["rows"] - a["rows"]
            if a["run"] != b["run"]:
                px.append(NAN)
                py.append(NAN)
            elif rows > 0:
                px.append(xb / scale)
                py.append(100 * (b["error_rows"] - a["error_rows"]) / rows)
        ax.plot(px, py, color=COLORS[3], marker=".", linewidth=1.2)
        _mark_runs(ax, marks, scale)
        ax.set_ylabel("error rows (% of rows written)")
        ax.set_xlabel(label)
        ax.set_xlim(0, max(xs) / scale * 1.02)
        ax.set_ylim(bottom=0)
        i += 1
    if kinds:
        ax = axes[0, i]
        from matplotlib.ticker import MaxNLocator

        top = list(kinds.items())[:8][::-1]
        ax.barh(range(len(top)), [n for _, n in top], color=COLORS[3], height=0.55)
        ax.set_yticks(range(len(top)))
        ax.set_yticklabels([_wrap(k, 38) for k, _ in top], fontsize=8)
        ax.set_ylim(-0.7, len(top) - 0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("error rows")
    return _png(fig)


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


# ------------------------------------------------------------------------------ the page


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#222;
background:#f6f7f9}
main{max-width:1080px;margin:0 auto;padding:24px 28px 60px;background:#fff}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 8px;border-bottom:1px solid
#ddd;padding-bottom:4px}.sub{color:#666;font-size:13px;margin-bottom:18px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}.card{border:1px solid #e1e4e8;
border-radius:6px;padding:8px 12px;min-width:140px}.card b{display:block;font-size:20px}
.card span{color:#666;font-size:12px}.card b.failed{color:#b42318}.card b.ok{color:#1a7f37}
table{border-collapse:collapse;font-size:13px;margin:6px 0}th,td{padding:4px 10px;
border-bottom:1px solid #eee;text-align:right;vertical-align:top}th{background:#fafbfc}
td.l,th.l{text-align:left}.failed{color:#b42318;font-weight:600}.ok{color:#1a7f37}
img{max-width:100%;display:block;margin:6px 0}.note{color:#555;font-size:13px;margin:2px 0 8px}
pre{background:#f6f8fa;padding:10px;font-size:12px;overflow:auto;border-radius:4px}
"""


def build_html(data: JobData) -> str:
    """The report page for ``data``."""
    spec = data.spec or {}
    name = spec.get("name") or next((r.get("name") for r in data.runs if r.get("name")), "job")
    unit = data.unit
    last = data.runs[-1] if data.runs else {}
    committed = [r for r in data.records if r.status == "committed"]
    rows = sum(r.rows for r in committed)
    errors = sum(r.error_rows for r in committed)
    tin = sum(r.prompt_tokens for r in committed)
    tout = sum(r.completion_tokens for r in committed)
    cost = sum(r.get("cost_usd", 0.0) for r in data.runs)
    device_s = sum(r.get("gpu_s", 0.0) for r in data.runs)
    overhead = sum(r.get("overhead_s", 0.0) for r in data.runs)
    wall = sum(r.get("wall_s", 0.0) for r in data.runs)
    shards_total = last.get("shards") or len(data.records)
    per_m = _job_usd_per_1m(data)
    status = last.get("status", "unknown")
    engine = next((r.engine for r in data.records if r.engine), "")
    model = spec.get("engine", {}).get("model") or next((r.model for r in data.records), "")

    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_e(name)}: batchjobs report</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{_e(name)}</h1>",
        f"<div class='sub'>{_e(data.task)} job · {_e(model)} · {_e(engine)} · output "
        f"{_e(data.url)} · report written {_e(time.strftime('%Y-%m-%d %H:%M'))}</div>",
        "<div class='cards'>",
        _card(
            _e(status), f"last run of {len(data.runs)}", "ok" if status == "succeeded" else "failed"
        ),
        _card(f"{len(committed):,} / {shards_total:,}", "shards committed"),
        _card(
            f"{rows:,}", f"rows ({errors:,} error rows, {errors / rows:.1%})" if rows else "rows"
        ),
        _card(f"{tin:,} / {tout:,}", "tokens in / out"),
        _card(usd(cost), f"cost, all runs ({device_s:,.0f} {unit})"),
        _card(usd(per_m) if per_m else "-", "$ per 1M tokens, overhead included"),
        _card(duration(wall), "wall time, all runs (start-up included)"),
        "</div>",
        f"<p class='note'>Cost counts every second the replicas held their devices ({unit}), "
        f"start-up and idle included: {device_s - overhead:,.1f} {unit} of it was the rows' "
        f"work (charged to the shards), {overhead:,.1f} {unit} overhead (start-up, idle, "
        "under-fill).</p>",
    ]
    parts += _runs_section(data, unit)
    sections = [
        (
            "Throughput over time",
            plot_throughput(data),
            "Rows and tokens per second between consecutive progress samples (every few "
            "seconds) of each run; engine start-up shows as the stretch before the first rows.",
        ),
        (
            "Cumulative cost",
            plot_cost(data),
            "Dollars of replica time as the runs went (start-up included), the projection the "
            "live display showed at each moment, and each run's recorded total.",
        ),
        (
            "$ per 1M tokens per shard",
            plot_shard_cost(data),
            "Each shard's rows' work (input and output tokens) at the run's fitted cost per "
            "token; the dashed line is the whole job's, overhead included.",
        ),
        (
            "Latency and length",
            plot_distributions(data),
            f"Rows without an error, from {data.rows_read:,} of {rows:,} output rows read."
            " Latency is from a row entering its replica to its result.",
        ),
        ("Embedding norms", plot_norms(data), f"{len(data.vectors):,} embeddings read."),
        (
            "Errors",
            plot_errors(data),
            f"Error rows by kind (file and line left out) in the {data.rows_read:,} rows "
            "read; where the job ran long enough, also their share of the rows written "
            "between progress samples.",
        ),
        (
            "Replicas",
            plot_replicas(data),
            "Each replica's share of its time after start-up with work in its engine, the "
            "requests in it on average while it had work, and its start-up.",
        ),
        ("Eval accuracy", plot_eval(data), _eval_note(data.eval)),
        ("Pilot: engine candidates", plot_pilot(data), _pilot_note(data.pilot)),
    ]
    for title, png, note in sections:
        if png is None:
            continue
        parts.append(f"<h2>{_e(title)}</h2><p class='note'>{_e(note)}</p>")
        parts.append(
            f"<img alt='{_e(title)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
        )
    parts += pilotview.report_section(data.pilot, data.runs, data.records)
    kinds = error_kinds(data)
    if kinds:
        parts.append("<h2>Error kinds</h2><table><tr><th>rows</th><th class='l'>kind</th></tr>")
        parts += [f"<tr><td>{n:,}</td><td class='l'>{_e(k)}</td></tr>" for k, n in kinds.items()]
        parts.append("</table>")
    parts += _shards_section(data, unit)
    if not data.samples:
        parts.append(
            "<p class='note'>No progress samples (_progress.jsonl): throughput and cost over "
            "time are not shown.</p>"
        )
    parts.append("<h2>Spec</h2>")
    if spec:
        import yaml

        parts.append(
            "<p class='note'>As the last run ran it; storage options and engine env values "
            "are hidden.</p>"
        )
        parts.append(f"<pre>{_e(yaml.safe_dump(_for_task(spec), sort_keys=False))}</pre>")
    else:
        parts.append("<p class='note'>Not recorded by the runs of this output root.</p>")
    parts.append("</main></body></html>")
    return "\n".join(parts)


def _for_task(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec without the sections its task does not read (their defaults are noise)."""
    task = spec.get("task", "generate")
    unused = {
        "embed": task != "embed",
        "eval": task != "eval",
        "chat": task not in ("chat", "eval"),
    }
    return {k: v for k, v in spec.items() if not unused.get(k) and v is not None}


def _runs_section(data: JobData, unit: str) -> list[str]:
    if not data.runs:
        return []
    out = [
        "<h2>Runs</h2><table><tr><th>run</th><th class='l'>started</th><th>wall</th>"
        "<th class='l'>status</th><th>rows</th><th>shards run / skipped</th>"
        f"<th>{unit}</th><th>$</th><th class='l'>reason</th></tr>"
    ]
    for i, r in enumerate(data.runs, start=1):
        ok = r.get("status") == "succeeded"
        code = "" if ok else f" (exit {r.get('exit_code')})"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.get("started_at") or 0))
        out.append(
            f"<tr><td>{i}</td><td class='l'>{when}</td><td>{duration(r.get('wall_s'))}</td>"
            f"<td class='l {'ok' if ok else 'failed'}'>{_e(r.get('status', '?'))}"
            f"{code}</td>"
            f"<td>{r.get('rows', 0):,}</td><td>{r.get('shards_run', 0)} / "
            f"{r.get('shards_skipped', 0)}</td><td>{r.get('gpu_s', 0.0):,.1f}</td>"
            f"<td>{usd(r.get('cost_usd'))}</td><td class='l'>{_e(r.get('reason') or '')}</td></tr>"
        )
    out.append("</table>")
    return out


def _shards_section(data: JobData, unit: str) -> list[str]:
    recs = sorted(data.records, key=lambda r: -(r.cost_usd or 0))
    if not recs:
        return []
    shown = recs[:50]
    out = [
        "<h2>Shards</h2>",
        f"<p class='note'>{'The 50 costliest of ' if len(recs) > 50 else ''}{len(recs):,} "
        f"shard(s). Per shard: its rows' work only ({unit} charged by tokens); overhead is the "
        "job's.</p>",
        "<table><tr><th class='l'>shard</th><th class='l'>status</th><th>rows</th>"
        f"<th>errors</th><th>tok in</th><th>tok out</th><th>{unit}</th><th>$</th>"
        "<th>$/1M tok</th></tr>",
    ]
    for r in shown:
        out.append(
            f"<tr><td class='l'>{_e(r.shard_id)}</td><td class='l'>{_e(r.status)}</td>"
            f"<td>{r.rows:,}</td><td>{r.error_rows:,}</td><td>{r.prompt_tokens:,}</td>"
            f"<td>{r.completion_tokens:,}</td><td>{r.gpu_s:,.2f}</td><td>{usd(r.cost_usd)}</td>"
            f"<td>{usd(r.usd_per_1m_tokens)}</td></tr>"
        )
    out.append("</table>")
    return out


def _eval_note(ev: dict | None) -> str:
    if not ev:
        return ""
    return (
        f"From _eval.json: {ev.get('rows', 0):,} rows ({ev.get('error_rows', 0):,} error rows)"
        + (f", grouped by {ev['group_by']}" if ev.get("group_by") else "")
        + "."
    )


def _pilot_note(p: dict | None) -> str:
    if not p:
        return ""
    return (
        f"From _pilot.json: {p.get('pilot_rows')} rows per candidate, projected onto "
        f"{p.get('expected_rows'):,} job rows × {p.get('replicas')} replica(s); "
        f"{p.get('reason', '')}"
    )


def _card(value: str, label: str, cls: str = "") -> str:
    return f"<div class='card'><b class='{cls}'>{value}</b><span>{_e(label)}</span></div>"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _short(text: str, width: int = 24) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _wrap(text: str, width: int) -> str:
    import textwrap

    lines = textwrap.wrap(text, width)[:2]
    if len(textwrap.wrap(text, width)) > 2:
        lines[-1] = lines[-1][: width - 1] + "…"
    return "\n".join(lines)


def write_report(output: str, storage_options: dict | None = None) -> str:
    """Build the report of the output root ``output`` and write it there as
    ``_report.html``; returns where it is."""
    from batchjobs.sink import OutputRoot

    out = OutputRoot(output, storage_options)
    page = build_html(load(out))
    out.write_atomic(REPORT, page.encode())
    return f"{output.rstrip('/')}/{REPORT}"
