"""The report's plots over the job's time (throughput, cumulative cost, errors) and the
helpers every plot of the report uses: a figure in the report's style, and its PNG."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from batchjobs.progress import error_kind

if TYPE_CHECKING:
    from batchjobs.report import JobData

NAN = float("nan")  # breaks a plotted line (between runs)
COLORS = ["#3b6ea8", "#d9822b", "#3a9a5b", "#c0392b", "#8e6bb8", "#7f7f7f"]


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


def _short(text: str, width: int = 24) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _wrap(text: str, width: int) -> str:
    import textwrap

    lines = textwrap.wrap(text, width)[:2]
    if len(textwrap.wrap(text, width)) > 2:
        lines[-1] = lines[-1][: width - 1] + "…"
    return "\n".join(lines)
