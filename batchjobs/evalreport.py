"""An eval job's figures: ``<output>/_eval.json`` and ``batchjobs compare``.

``_eval.json`` is computed from the committed output files (the manifest lists them), so a
resumed job reports over all its shards, whichever run wrote them, and the same rows give
the same file. Per metric: rows, rows correct, accuracy (error rows count as wrong; they
are also counted apart, with the accuracy over the rows without an error), its standard
error (the sample standard error, as lm-eval-harness reports it), a 95% Wilson interval,
and the mean score with its standard error; the same per value of ``eval.group_by``.
Sums use ``math.fsum``, so the order in which files are read does not change a digit.

``compare`` pairs two eval outputs by their id column: the accuracy of each, the paired
difference B − A with its standard error and 95% interval, McNemar's exact test over the
rows whose correctness differs, and those rows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from batchjobs.errors import OutputError
from batchjobs.layout import EVAL_JSON, stamped, unstamped
from batchjobs.records import DEFAULT_ID_COLUMN

if TYPE_CHECKING:  # pragma: no cover
    from batchjobs.manifest import ShardRecord
    from batchjobs.sink import OutputRoot
    from batchjobs.spec import JobSpec
    from batchjobs.tasks.eval import Metric

Z95 = 1.959963984540054  # the standard normal's 97.5th percentile
NULL_GROUP = "(null)"  # the group of rows whose group_by value is null
# The rows whose input could not be read (a malformed line, an empty prompt, no reference):
# their group is not known.
UNREAD_GROUP = "(input error)"


# ---------------------------------------------------------------- statistics


def proportion(correct: int, rows: int) -> dict[str, Any]:
    """Accuracy ``correct / rows``, its sample standard error and 95% Wilson interval."""
    if rows == 0:
        return {"accuracy": None, "stderr": None, "ci95": None}
    p = correct / rows
    stderr = math.sqrt(p * (1 - p) / (rows - 1)) if rows > 1 else None
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * rows)) / (1 + z2 / rows)
    half = Z95 / (1 + z2 / rows) * math.sqrt(p * (1 - p) / rows + z2 / (4 * rows * rows))
    return {
        "accuracy": p,
        "stderr": stderr,
        "ci95": [max(0.0, centre - half), min(1.0, centre + half)],
    }


def mean_stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard error and normal 95% interval (clipped to [0, 1]) of scores."""
    n = len(values)
    if n == 0:
        return {"mean_score": None, "score_stderr": None, "score_ci95": None}
    mean = math.fsum(values) / n
    if n < 2:
        return {"mean_score": mean, "score_stderr": None, "score_ci95": None}
    stderr = math.sqrt(math.fsum((x - mean) ** 2 for x in values) / (n - 1) / n)
    return {
        "mean_score": mean,
        "score_stderr": stderr,
        "score_ci95": [max(0.0, mean - Z95 * stderr), min(1.0, mean + Z95 * stderr)],
    }


def metric_stats(correct: Sequence[bool], scores: Sequence[float], errors: Sequence[bool]):
    """A metric's figures over some rows (``errors[i]``: row i is an error row)."""
    rows, right = len(correct), sum(1 for c in correct if c)
    answered = rows - sum(1 for e in errors if e)
    right_answered = sum(1 for c, e in zip(correct, errors) if c and not e)
    return {
        "rows": rows,
        "correct": right,
        **proportion(right, rows),
        "accuracy_without_errors": right_answered / answered if answered else None,
        **mean_stats([0.0 if s is None else s for s in scores]),
    }


def mcnemar_p(worse: int, better: int) -> float:
    """Two-sided exact McNemar test: the binomial probability, under no difference, of a
    split of the discordant pairs at least this uneven."""
    n = worse + better
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(worse, better) + 1))
    return min(1.0, 2 * tail / 2**n)


def paired(a: Sequence[bool], b: Sequence[bool]) -> dict[str, Any]:
    """B − A over paired rows: the difference in accuracy, its standard error and 95%
    interval (normal, over the per-row differences), and McNemar's test."""
    n = len(a)
    worse = sum(1 for x, y in zip(a, b) if x and not y)
    better = sum(1 for x, y in zip(a, b) if y and not x)
    out: dict[str, Any] = {
        "rows": n,
        "accuracy_a": sum(a) / n if n else None,
        "accuracy_b": sum(b) / n if n else None,
        "difference": (better - worse) / n if n else None,
        "stderr": None,
        "ci95": None,
        "worse": worse,
        "better": better,
        "mcnemar_p": mcnemar_p(worse, better),
    }
    if n > 1:
        d = (better - worse) / n
        var = ((worse + better) - n * d * d) / (n - 1)  # Σ(dᵢ − d̄)² / (n − 1), dᵢ ∈ {−1, 0, 1}
        se = math.sqrt(max(var, 0.0) / n)
        out["stderr"] = se
        out["ci95"] = [d - Z95 * se, d + Z95 * se]
    return out


# ---------------------------------------------------------------- the job's report


def read_outputs(
    out: OutputRoot,
    records: Iterable[ShardRecord],
    columns: list[str],
    optional: Sequence[str] = (),
) -> pa.Table:
    """``columns`` (and those of ``optional`` that exist) of every committed output file
    of ``records``, in shard order."""
    import pyarrow.dataset as pds

    files = [f for r in sorted(records, key=lambda r: r.shard_id) for f in r.files]
    if not files:
        return pa.table({c: pa.array([], pa.null()) for c in columns})
    try:
        dataset = pds.dataset(files, filesystem=out.fs, format="parquet")
        missing = [c for c in columns if c not in dataset.schema.names]
        if missing:
            raise OutputError(
                f"{out.url}: the output files have no column {missing[0]!r}; is this the "
                "output of an eval job?"
            )
        extra = [c for c in optional if c in dataset.schema.names and c not in columns]
        return dataset.to_table(columns=[*columns, *extra])
    except (OSError, pa.ArrowInvalid) as exc:
        raise OutputError(f"cannot read the output files under {out.url}: {exc}") from None


def aggregate(table: pa.Table, metrics: Sequence[Metric], group_by: str | None) -> dict[str, Any]:
    """Rows, error rows and each metric's figures, overall and per group."""
    errors = [e is not None for e in table.column("error").to_pylist()]
    cols = {
        m.name: (table.column(m.correct).to_pylist(), table.column(m.score).to_pylist())
        for m in metrics
    }

    def figures(rows: list[int]) -> dict[str, Any]:
        errs = [errors[i] for i in rows]
        return {
            "rows": len(rows),
            "error_rows": sum(errs),
            "metrics": {
                name: metric_stats([bool(correct[i]) for i in rows], [score[i] for i in rows], errs)
                for name, (correct, score) in cols.items()
            },
        }

    report = figures(list(range(table.num_rows)))
    for m in metrics:
        report["metrics"][m.name] = {
            "kind": m.kind,
            "correct_column": m.correct,
            "score_column": m.score,
            **report["metrics"][m.name],
        }
    if group_by:
        members: dict[str, list[int]] = {}
        refs = table.column("reference").to_pylist()
        for i, g in enumerate(table.column(group_by).to_pylist()):
            key = str(g) if g is not None else NULL_GROUP if refs[i] is not None else UNREAD_GROUP
            members.setdefault(key, []).append(i)
        report["groups"] = {g: figures(members[g]) for g in sorted(members)}
    return report


def write_report(
    spec: JobSpec, metrics: Sequence[Metric], out: OutputRoot, records
) -> dict[str, Any]:
    """Compute the job's ``_eval.json`` from its committed shards, write it, return it."""
    records = list(records.values() if isinstance(records, dict) else records)
    id_column = spec.input.id_column or DEFAULT_ID_COLUMN
    group = spec.eval.group_by
    columns = [id_column, "error", *(c for m in metrics for c in (m.correct, m.score))]
    table = read_outputs(out, records, columns + ([group, "reference"] if group else []))
    body = aggregate(table, metrics, group)
    report = {
        "job": spec.name,
        "fingerprint": spec.fingerprint(),
        "model": spec.engine.model,
        "id_column": id_column,
        "reference_column": spec.eval.reference_column,
        "group_by": group,
        "shards": len(records),
        **body,
    }
    out.write_atomic(
        EVAL_JSON,
        (json.dumps(stamped(EVAL_JSON, report), indent=1, sort_keys=True) + "\n").encode(),
    )
    return report


def load_report(root: str, storage_options: dict | None = None) -> tuple[OutputRoot, dict]:
    """An output root and its ``_eval.json``; ``OutputError`` if it has none."""
    from batchjobs.sink import OutputRoot

    out = OutputRoot(root, storage_options)
    raw = out.read(EVAL_JSON)
    if raw is None:
        raise OutputError(
            f"{root} has no {EVAL_JSON}: it is not the output of an eval job, or the job has "
            "not finished (rerun it to the end; committed shards are kept)"
        )
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise OutputError(f"{root}/{EVAL_JSON} is not JSON ({exc})") from None
    return out, unstamped(EVAL_JSON, data, f"{root}/{EVAL_JSON}")


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The report as short lines: one per metric, then per group."""
    lines = []
    for name, m in report["metrics"].items():
        lines.append(f"{name}: {_metric_text(m)}")
    for g, fig in (report.get("groups") or {}).items():
        parts = [f"{name} {_acc(m)}" for name, m in fig["metrics"].items()]
        lines.append(f"  {g} ({fig['rows']} rows, {fig['error_rows']} errors): {', '.join(parts)}")
    return lines


def _acc(m: dict[str, Any]) -> str:
    if m["accuracy"] is None:
        return "-"
    lo, hi = m["ci95"]
    return f"{m['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"


def _metric_text(m: dict[str, Any]) -> str:
    se = f" ± {m['stderr']:.3f}" if m.get("stderr") is not None else ""
    if m["accuracy"] is None:
        return "no rows"
    text = (
        f"accuracy {m['accuracy']:.4f}{se} (95% CI {m['ci95'][0]:.3f}-{m['ci95'][1]:.3f}), "
        f"{m['correct']}/{m['rows']} rows correct"
    )
    if m.get("kind") == "normalized" and m.get("mean_score") is not None:
        text += f", token F1 {m['mean_score']:.4f}"
    return text


# ---------------------------------------------------------------- compare


def _rows(out: OutputRoot, report: dict, names: list[str]) -> dict[str, dict[str, Any]]:
    """Each row of an eval output by id: its error, the metrics' correct flags, and what
    it answered (``text``, or ``answer`` for loglikelihood) and its reference."""
    from batchjobs.manifest import Manifest

    records = Manifest(out).committed().values()
    id_column = report["id_column"]
    wanted = [id_column, "error", *(report["metrics"][n]["correct_column"] for n in names)]
    table = read_outputs(out, records, wanted, optional=("reference", "text", "answer"))
    rows: dict[str, dict[str, Any]] = {}
    for row in table.to_pylist():
        key = str(row[id_column])
        if key in rows:
            raise OutputError(
                f"{out.url}: id {key!r} appears more than once in column {id_column!r}; "
                "compare pairs rows by id (set input.id_column to a unique column)"
            )
        rows[key] = row
    return rows


def compare(
    a: str, b: str, metric: str | None = None, storage_options: dict | None = None
) -> dict[str, Any]:
    """Pair two eval outputs by id and compare each metric they share (or ``metric``)."""
    out_a, rep_a = load_report(a, storage_options)
    out_b, rep_b = load_report(b, storage_options)
    shared = [n for n in rep_a["metrics"] if n in rep_b["metrics"]]
    if metric is not None:
        if metric not in shared:
            raise OutputError(
                f"metric {metric!r} is not in both outputs (shared: {', '.join(shared) or 'none'})"
            )
        shared = [metric]
    if not shared:
        raise OutputError(
            f"{a} and {b} share no metric (A: {', '.join(rep_a['metrics'])}; "
            f"B: {', '.join(rep_b['metrics'])})"
        )
    rows_a, rows_b = _rows(out_a, rep_a, shared), _rows(out_b, rep_b, shared)
    common = sorted(set(rows_a) & set(rows_b))
    result: dict[str, Any] = {
        "a": _side(a, rep_a),
        "b": _side(b, rep_b),
        "paired_rows": len(common),
        "only_a": len(set(rows_a) - set(rows_b)),
        "only_b": len(set(rows_b) - set(rows_a)),
        "metrics": {},
    }
    for name in shared:
        ca, cb = rep_a["metrics"][name]["correct_column"], rep_b["metrics"][name]["correct_column"]
        va = [bool(rows_a[k][ca]) for k in common]
        vb = [bool(rows_b[k][cb]) for k in common]
        flipped = [
            {
                "id": k,
                "a_correct": x,
                "b_correct": y,
                "reference": rows_a[k].get("reference"),
                "a_output": _output(rows_a[k]),
                "b_output": _output(rows_b[k]),
            }
            for k, x, y in zip(common, va, vb)
            if x != y
        ]
        result["metrics"][name] = {
            "accuracy_a": rep_a["metrics"][name]["accuracy"],
            "accuracy_b": rep_b["metrics"][name]["accuracy"],
            "paired": paired(va, vb),
            "flipped": flipped,
        }
    return result


def _side(root: str, report: dict) -> dict[str, Any]:
    return {
        "output": root,
        "job": report.get("job"),
        "model": report.get("model"),
        "rows": report["rows"],
        "error_rows": report["error_rows"],
    }


def _output(row: dict[str, Any]) -> Any:
    if row.get("error") is not None:
        return f"error: {row['error']}"
    return row.get("text", row.get("answer"))


def worse(result: dict[str, Any]) -> list[str]:
    """The metrics on which B is worse than A beyond doubt: the paired 95% interval of
    B − A lies below zero."""
    return [
        name
        for name, m in result["metrics"].items()
        if m["paired"]["ci95"] is not None and m["paired"]["ci95"][1] < 0
    ]


def compare_lines(result: dict[str, Any], show: int = 20) -> list[str]:
    """``compare``'s result as the terminal shows it."""
    a, b = result["a"], result["b"]
    lines = [
        f"A: {a['output']} (job {a['job']}, model {a['model']}): {a['rows']} rows, "
        f"{a['error_rows']} errors",
        f"B: {b['output']} (job {b['job']}, model {b['model']}): {b['rows']} rows, "
        f"{b['error_rows']} errors",
        f"paired by id: {result['paired_rows']} rows (only in A: {result['only_a']}, "
        f"only in B: {result['only_b']})",
        "",
        f"{'metric':<16} {'A':>7} {'B':>7} {'B - A':>8}  {'95% CI':<18} {'McNemar p':>9} "
        f"{'worse':>6} {'better':>6}",
    ]
    for name, m in result["metrics"].items():
        p = m["paired"]
        ci = f"[{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]" if p["ci95"] else "-"
        diff = f"{p['difference']:+.3f}" if p["difference"] is not None else "-"
        lines.append(
            f"{name:<16} {_f(p['accuracy_a']):>7} {_f(p['accuracy_b']):>7} {diff:>8}  {ci:<18} "
            f"{p['mcnemar_p']:>9.3g} {p['worse']:>6} {p['better']:>6}"
        )
    for name, m in result["metrics"].items():
        flips = m["flipped"]
        if not flips or show <= 0:
            continue
        lines += [
            "",
            f"rows that flipped on {name} (first {min(show, len(flips))} of {len(flips)}):",
        ]
        for f in flips[:show]:
            mark = "right -> wrong" if f["a_correct"] else "wrong -> right"
            lines.append(
                f"  {f['id']}: {mark}; reference {_short(f['reference'])}; "
                f"A {_short(f['a_output'])}; B {_short(f['b_output'])}"
            )
    return lines


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _short(value: Any, width: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"
