"""Progress samples beyond the terminal: ``<output>/_progress.jsonl`` (bounded in size) and
Ray's metrics, both fed the tracker's samples (``tracker.Progress``); and the short kind of
an error row's message that the live panel, the samples and the report count by.

One line of ``_progress.jsonl`` is one sample of one run::

    {"v": 1, "run": 1796554387.26, "t": 1796554395.1, "elapsed_s": 7.8, "rows": 120,
     "rows_total": 200.0, "error_rows": 2, "prompt_tokens": 2150, "completion_tokens": 3800,
     "shards_committed": 1, "shards_total": 2, "usd": 0.0021, "usd_projected": 0.0034,
     "device_s": 74.2, "device": "cpu", "replicas": {"host:123:ab12cd": {"busy_share": 0.98,
     "inflight": 195.0, "rows": 120, "state": "up"}}, "errors": {"'prompt' is empty": 1}}

``run`` is the run's start (its ``started_at`` in ``_runs.jsonl``), so the samples of the runs
of one output root (a job resumed) stay apart. ``usd`` is what the replicas' time has cost so
far, start-up included; ``device_s`` the same in GPU-seconds (CPU-seconds on a CPU run).

The file is rewritten whole (one PUT on object stores) at most every ``every_s`` seconds and
kept under ``max_bytes``: when a sample would take it over, every other sample of every run
is dropped (each run's first and last are kept) and this run samples half as often, so a run
of any length leaves a file of bounded size that still spans all of it.
"""

from __future__ import annotations

import json
import logging
import re
from typing import TYPE_CHECKING, Any

from batchjobs.layout import PROGRESS, read_records, stamped

if TYPE_CHECKING:
    from batchjobs.sink import OutputRoot
    from batchjobs.tracker import Progress

log = logging.getLogger("batchjobs")

PROGRESS_EVERY_S = 5.0
MAX_BYTES = 1 << 20  # 1 MiB: a day's run at 5 s per sample thins to about one a minute
TOP_ERRORS = 5  # error kinds kept per sample

_LOCATION = re.compile(r"^\S+ (?:line|row) \d+: ")  # "file:///x.jsonl line 58: ..."
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
MAX_KIND = 100


def error_kind(message: str | None) -> str:
    """An error row's message without what differs from row to row (its file and line,
    numbers, everything after the first sentence), so rows that failed the same way count
    as one kind: ``"…/part-000.jsonl line 58: 'prompt' is empty"`` -> ``'prompt' is empty``."""
    text = _LOCATION.sub("", (message or "").strip().splitlines()[0] if message else "")
    text = _NUMBER.sub("N", text)
    cut = text.find(". ")
    if cut > 0:
        text = text[: cut + 1]
    if len(text) > MAX_KIND:
        text = text[: MAX_KIND - 1] + "…"
    return text or "(no message)"


def sample(p: Progress, run: float) -> dict[str, Any]:
    """One line of ``_progress.jsonl`` for a tracker sample of the run started at ``run``."""
    return stamped(
        PROGRESS,
        {
            "run": run,
            "t": round(p.started_at + p.elapsed_s, 3),
            "elapsed_s": round(p.elapsed_s, 3),
            "rows": p.rows,
            "rows_total": round(p.rows_total, 1),
            "error_rows": p.error_rows,
            "prompt_tokens": p.prompt_tokens,
            "completion_tokens": p.completion_tokens,
            "shards_committed": p.shards_committed,
            "shards_total": p.shards_total,
            "usd": p.usd,
            "usd_projected": p.usd_projected,
            "device_s": round(p.device_s, 3),
            "device": p.device,
            "replicas": {
                name: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                for name, r in p.replica_figures.items()
            },
            "errors": dict(sorted(p.error_kinds.items(), key=lambda kv: -kv[1])[:TOP_ERRORS]),
        },
    )


def read_samples(out: OutputRoot) -> list[dict[str, Any]]:
    """Every sample in ``<output>/_progress.jsonl`` (none if it is missing); lines that do
    not parse (a file cut short) are skipped."""
    return read_records(out, PROGRESS)


class ProgressLog:
    """Writes a run's samples to ``<output>/_progress.jsonl`` beside earlier runs' (see the
    module docstring). A sample it cannot write is logged once and the job goes on."""

    def __init__(
        self,
        out: OutputRoot,
        run: float,
        every_s: float = PROGRESS_EVERY_S,
        max_bytes: int = MAX_BYTES,
    ):
        self.out = out
        self.run = run
        self.every_s = every_s
        self.max_bytes = max_bytes
        self.lines: list[tuple[float, str]] = []  # (run, JSON line), earlier runs first
        self.last = 0.0
        self.failed = False
        try:
            raw = out.read(PROGRESS) or b""
        except OSError:
            raw = b""
        for line in raw.decode(errors="replace").splitlines():
            try:
                earlier = json.loads(line)["run"]
            except (ValueError, KeyError, TypeError):
                continue
            if earlier != run:
                self.lines.append((earlier, line))

    def __call__(self, p: Progress, force: bool = False) -> None:
        now = p.started_at + p.elapsed_s  # the sample's own time
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        line = json.dumps(sample(p, self.run), sort_keys=True)
        # The final sample replaces one taken moments before (a rate over a sliver of time
        # is noise), not the series' spacing.
        if (
            force
            and self.lines
            and self.lines[-1][0] == self.run
            and now - json.loads(self.lines[-1][1])["t"] < self.every_s / 2
        ):
            self.lines.pop()
        self.lines.append((self.run, line))
        while self._size() > self.max_bytes and self._thin():
            self.every_s *= 2
        self._write()

    def _size(self) -> int:
        return sum(len(line) + 1 for _, line in self.lines)

    def _thin(self) -> bool:
        """Drop every other sample of each run, keeping its first and last; False when
        nothing is left to drop."""
        kept: list[tuple[float, str]] = []
        runs: dict[float, list[tuple[float, str]]] = {}
        for item in self.lines:
            runs.setdefault(item[0], []).append(item)
        for items in runs.values():
            middle = items[1:-1][1::2]  # every other one of those between first and last
            kept.extend([items[0], *middle, items[-1]] if len(items) > 1 else items)
        dropped = len(kept) < len(self.lines)
        self.lines = kept
        return dropped

    def _write(self) -> None:
        data = "".join(line + "\n" for _, line in self.lines).encode()
        try:
            self.out.write_atomic(PROGRESS, data)
        except Exception as exc:  # noqa: BLE001 - the job matters more than its samples
            if not self.failed:
                log.warning(
                    "cannot write progress samples to %s/%s: %s", self.out.url, PROGRESS, exc
                )
                self.failed = True


class RayMetrics:
    """The samples' figures as Ray metrics (``ray.util.metrics``), tagged with the job's
    name, for a Prometheus that scrapes the cluster (which sees them as ``ray_batchjobs_*``,
    counters with ``_total``): ``batchjobs_rows``,
    ``batchjobs_error_rows``, ``batchjobs_input_tokens``, ``batchjobs_output_tokens``
    (counters), ``batchjobs_rows_per_s``, ``batchjobs_input_tokens_per_s``,
    ``batchjobs_output_tokens_per_s`` (over the last samples), ``batchjobs_cost_usd``,
    ``batchjobs_projected_cost_usd``, ``batchjobs_shards_committed``,
    ``batchjobs_replicas_up`` and ``batchjobs_replica_busy_share`` (per ``replica``).
    Metrics that cannot be recorded (no metrics agent) are given up after the first error."""

    def __init__(self, job: str):
        self.tags = {"job": job}
        self.sent = {"rows": 0, "error_rows": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self.m: dict[str, Any] | None = None
        self.off = False

    def _make(self) -> dict[str, Any]:
        from ray.util.metrics import Counter, Gauge

        job = ("job",)
        counters = {
            "rows": Counter("batchjobs_rows", "Rows written (results and error rows).", job),
            "error_rows": Counter("batchjobs_error_rows", "Error rows written.", job),
            "prompt_tokens": Counter(
                "batchjobs_input_tokens", "Prompt tokens of rows written.", job
            ),
            "completion_tokens": Counter(
                "batchjobs_output_tokens", "Output tokens of rows written.", job
            ),
        }
        gauges = {
            name: Gauge(f"batchjobs_{name}", text, job)
            for name, text in (
                ("rows_per_s", "Rows per second over the last samples."),
                ("input_tokens_per_s", "Prompt tokens per second over the last samples."),
                ("output_tokens_per_s", "Output tokens per second over the last samples."),
                ("cost_usd", "Dollars of replica time so far, start-up included."),
                ("projected_cost_usd", "Dollars the job will have cost at its end, projected."),
                ("shards_committed", "Shards committed by this run."),
                ("replicas_up", "Engine replicas that have reported work."),
            )
        }
        gauges["busy"] = Gauge(
            "batchjobs_replica_busy_share",
            "Share of a replica's time after start-up with work in its engine.",
            ("job", "replica"),
        )
        return {**counters, **gauges}

    def __call__(self, p: Progress) -> None:
        if self.off:
            return
        try:
            if self.m is None:
                self.m = self._make()
            m = self.m
            for key in self.sent:
                value = getattr(p, key)
                if value > self.sent[key]:
                    m[key].inc(value - self.sent[key], tags=self.tags)
                    self.sent[key] = value
            m["rows_per_s"].set(p.rows_per_s_now or 0.0, tags=self.tags)
            m["input_tokens_per_s"].set(p.input_tokens_per_s_now or 0.0, tags=self.tags)
            m["output_tokens_per_s"].set(p.output_tokens_per_s_now or 0.0, tags=self.tags)
            m["cost_usd"].set(p.usd, tags=self.tags)
            m["projected_cost_usd"].set(p.usd_projected or p.usd, tags=self.tags)
            m["shards_committed"].set(p.shards_committed, tags=self.tags)
            m["replicas_up"].set(p.replicas, tags=self.tags)
            for name, r in p.replica_figures.items():
                if r.get("busy_share") is not None:
                    m["busy"].set(r["busy_share"], tags={**self.tags, "replica": name})
        except Exception as exc:  # noqa: BLE001 - metrics never fail a job
            log.debug("Ray metrics off: %s", exc)
            self.off = True
