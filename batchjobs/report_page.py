"""The report's HTML page: summary cards, the plots embedded as PNGs, runs, shards and the
spec, in one self-contained file (no network, no scripts)."""

from __future__ import annotations

import base64
import html
import time
from typing import TYPE_CHECKING, Any

from batchjobs import pilotview
from batchjobs.display import duration, usd
from batchjobs.report_charts import (
    _job_usd_per_1m,
    plot_distributions,
    plot_eval,
    plot_norms,
    plot_pilot,
    plot_replicas,
    plot_shard_cost,
)
from batchjobs.report_plots import error_kinds, plot_cost, plot_errors, plot_throughput

if TYPE_CHECKING:
    from batchjobs.report import JobData


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
