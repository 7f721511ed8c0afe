"""What ``batchjobs run`` shows while a job runs: a live panel (rich) on a terminal, the
plain progress lines anywhere else (``ray job submit``, Airflow, a pipe, ``--quiet``).

The panel redraws once a second from the tracker's latest sample (``tracker.Progress``);
between samples only its clock moves. Messages (the pilot's table, "all rows committed")
print above it. The plain mode prints one line per ``plain_every_s`` and no control
characters, so logs read the same as before.
"""

from __future__ import annotations

import contextlib
import math
import time
import traceback
from collections.abc import Iterator
from typing import TYPE_CHECKING, TextIO

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from batchjobs.tracker import Progress

PLAIN_EVERY_S = 5.0
STALLED_EVERY_S = 30.0  # plain lines while no row comes in (engines starting): less often
REPLICA_LINES = 8  # replicas listed one per line; more are summed up in one line
ERROR_LINES = 3  # most frequent error kinds shown


class Display:
    """The progress display of one ``batchjobs run``: ``message`` for lines (messages, the
    pilot's progress), ``update`` for typed samples, ``close`` at the end (the panel's last
    state stays on screen)."""

    def __init__(
        self,
        job: str,
        console: Console,
        live: bool,
        replicas_planned: int = 0,
        plain_every_s: float = PLAIN_EVERY_S,
        quiet: bool = False,
    ):
        self.job = job
        self.console = console
        self.quiet = quiet
        self.plain_every_s = plain_every_s
        self.replicas_planned = replicas_planned
        self.sample: Progress | None = None
        self.sampled_at = 0.0
        self.started = time.time()
        self.printed_at = 0.0
        self.printed_line = ""
        self.printed_rows = -1
        self.live: Live | None = None
        if live and not quiet:
            self.live = Live(
                get_renderable=self.render,
                console=console,
                refresh_per_second=1,
                transient=False,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self.live.start()

    @classmethod
    def for_terminal(cls, job: str, stream: TextIO, quiet: bool, **kwargs) -> Display:
        """A live panel where ``stream`` is a terminal that can redraw, plain lines elsewhere."""
        console = Console(file=stream, highlight=False, soft_wrap=True)
        live = console.is_terminal and not console.is_dumb_terminal
        if not live:  # never a colour or cursor code in a log
            console = Console(
                file=stream, highlight=False, soft_wrap=True, color_system=None, width=10_000
            )
        return cls(job, console, live=live, quiet=quiet, **kwargs)

    def message(self, line: str) -> None:
        if not self.quiet:
            self.alert(line)

    def alert(self, line: str) -> None:
        """A line shown even with ``quiet``: a warning or an error."""
        self.console.print(Text(line), soft_wrap=True)

    def update(self, p: Progress) -> None:
        self.sample, self.sampled_at = p, time.time()
        if self.live is not None:
            self.live.refresh()
        elif not self.quiet:
            now = time.time()
            line = p.line()
            done = p.fraction >= 1 and line.split(";")[0] != self.printed_line.split(";")[0]
            every = self.plain_every_s if p.rows != self.printed_rows else STALLED_EVERY_S
            if done or now - self.printed_at >= every:
                self.message(line)
                self.printed_at, self.printed_line, self.printed_rows = now, line, p.rows

    def close(self) -> None:
        if self.live is not None:
            self.live.refresh()
            self.live.stop()
            self.live = None

    def __enter__(self) -> Display:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def render(self) -> RenderableType:
        now = time.time()
        if self.sample is None:
            return starting_panel(self.job, now - self.started, self.replicas_planned)
        return panel(self.sample, self.sample.elapsed_s + now - self.sampled_at)


def starting_panel(job: str, elapsed_s: float, replicas: int) -> RenderableType:
    body = Text(
        f"starting Ray and {replicas or 'the'} engine replica(s): they load the model "
        "before the first rows come out",
        style="dim",
    )
    return Panel(body, title=f"{job} · {duration(elapsed_s)}", title_align="left", width=100)


def panel(p: Progress, elapsed_s: float | None = None) -> RenderableType:
    """The live panel for one sample (``elapsed_s``: the clock to show, default the
    sample's); every figure says what it covers."""
    elapsed = p.elapsed_s if elapsed_s is None else elapsed_s
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", width=9)
    grid.add_column()
    total = f"~{p.rows_total:,.0f}" if p.rows_total else "?"
    bar = ProgressBar(total=1.0, completed=p.fraction, width=24)
    eta = p.eta_s
    when = "done" if p.fraction >= 1 else f"ETA {duration(eta)}" if eta is not None else "ETA -"
    rows = Table.grid(padding=(0, 1))
    rows.add_row(bar, Text(f"{p.rows:,} of {total} ({p.fraction:.0%}) · {when}"))
    grid.add_row("rows", rows)
    grid.add_row("shards", Text(f"{p.shards_committed} of {p.shards_total} committed"))
    grid.add_row("input", Text(_rates(p.input_tokens_per_s_now, p.input_tokens_per_s_avg)))
    grid.add_row("output", Text(_rates(p.output_tokens_per_s_now, p.output_tokens_per_s_avg)))
    unit = "CPU" if p.device == "cpu" else "GPU"
    projected = p.usd_projected
    grid.add_row(
        "cost",
        Text(
            f"{usd(p.usd)} so far"
            + (f" · {usd(projected)} projected for the job" if projected is not None else "")
            + f" ({p.device_s:,.0f} {unit}-s, start-up included)"
        ),
    )
    grid.add_row("errors", _errors(p))
    grid.add_row("replicas", _replicas(p))
    return Panel(
        grid,
        title=f"{p.job} · {duration(elapsed)}",
        title_align="left",
        subtitle="now: last 30 s · avg: since the first engine was ready",
        subtitle_align="right",
        width=100,
    )


def _rates(now: float | None, avg: float | None) -> str:
    if now is None and avg is None:
        return "- tok/s (no rows yet)"
    return f"{_num(now)} tok/s now · {_num(avg)} avg"


def _errors(p: Progress) -> RenderableType:
    share = p.error_rows / p.rows if p.rows else 0.0
    head = Text(f"{p.error_rows:,} rows ({share:.1%})", style="red" if p.error_rows else "")
    kinds = sorted(p.error_kinds.items(), key=lambda kv: -kv[1])
    lines: list[RenderableType] = [head]
    for kind, n in kinds[:ERROR_LINES]:
        lines.append(Text(f"{n:>6,} × {kind}", overflow="ellipsis", no_wrap=True))
    if len(kinds) > ERROR_LINES:
        rest = sum(n for _, n in kinds[ERROR_LINES:])
        lines.append(Text(f"{rest:>6,} × {len(kinds) - ERROR_LINES} other kind(s)"))
    return Group(*lines)


def _replicas(p: Progress) -> RenderableType:
    of = f" of {p.replicas_planned}" if p.replicas_planned else ""
    parts = [f"{p.replicas_up}{of} up"]
    if p.replicas_starting:
        parts.append(f"{p.replicas_starting} starting")
    parts.append(f"{p.replicas_restarting} restarting")
    if p.restarts:
        parts.append(f"{p.restarts} restart(s) so far")
    lines: list[RenderableType] = [Text(" · ".join(parts))]
    figures = sorted(p.replica_figures.items())
    for name, r in figures[:REPLICA_LINES]:
        share = r.get("busy_share")
        row = Table.grid(padding=(0, 1))
        row.add_column(width=22, no_wrap=True, overflow="ellipsis")
        row.add_column(width=10)
        row.add_column()
        row.add_row(
            Text(name),
            ProgressBar(total=1.0, completed=share or 0.0, width=10),
            Text(
                f"busy {_pct(share)} · {r.get('inflight', 0):.0f} in flight · "
                f"{r.get('rows', 0):,} rows"
            ),
        )
        lines.append(row)
    if len(figures) > REPLICA_LINES:
        shares = sorted(r["busy_share"] for _, r in figures if r.get("busy_share") is not None)
        if shares:
            lines.append(
                Text(
                    f"{len(figures) - REPLICA_LINES} more; busy share of all: min "
                    f"{shares[0]:.0%}, median {shares[len(shares) // 2]:.0%}, max {shares[-1]:.0%}"
                )
            )
    if figures:
        lines.append(Text("busy: share of time with work since its start-up", style="dim"))
    return Group(*lines)


def duration(s: float | None) -> str:
    """``45s``, ``3m12s``, ``2h05m``."""
    if s is None:
        return "-"
    s = max(0, int(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def usd(v: float | None) -> str:
    """Dollars to what matters: ``$1,234``, ``$12.30``, ``$0.0421``, ``$0.000083``."""
    if v is None:
        return "-"
    if v == 0:
        return "$0"
    if abs(v) >= 100:
        return f"${v:,.0f}"
    if abs(v) >= 1:
        return f"${v:,.2f}"
    digits = 2 - math.floor(math.log10(abs(v)))  # three significant digits
    return "$" + f"{v:.{digits}f}".rstrip("0")


def compact(n: float) -> str:
    """``9,999``, ``123,456``, ``12.3M``, ``4.6B``: at most 7 characters."""
    if abs(n) < 1_000_000:
        return f"{n:,.0f}"
    if abs(n) < 1_000_000_000:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e9:.1f}B"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


# --------------------------------------------------------------------- a run of the CLI


class Watch:
    """What ``batchjobs run`` hands the pipeline: ``message`` (lines), ``update`` (samples),
    ``every_s`` (how often to sample); it keeps the terminal, the log file and the output
    root's copy of the log in step."""

    def __init__(self, display: Display, router, out):
        self.display = display
        self.router = router
        self.out = out
        self.every_s = 1.0 if display.live is not None else PLAIN_EVERY_S
        self.noted_at = 0.0

    def message(self, line: str) -> None:
        self.display.message(line)
        self.router.note(line)

    def update(self, p: Progress) -> None:
        self.display.update(p)
        now = time.time()
        if now - self.noted_at >= PLAIN_EVERY_S:  # the log file has the plain lines too
            self.router.note(p.line())
            self.noted_at = now
        self.router.sync(self.out)

    @property
    def logs(self) -> str:
        """Where the run's log is (the output root's copy once it has one)."""
        return self.router.where


@contextlib.contextmanager
def watching(job, quiet: bool = False, verbose: bool = False) -> Iterator[Watch]:
    """The terminal side of one ``batchjobs run``: others' output routed to the log file
    (``logs.routed``), a ``Display`` on the terminal, the log copied into the output root
    as the run goes and at its end."""
    from batchjobs.logs import routed
    from batchjobs.secrets import spec_secrets
    from batchjobs.sink import OutputRoot

    secrets = spec_secrets(job)
    out = OutputRoot(job.output.path, job.output.storage_options)
    router = None
    failed = True
    try:
        with routed(secrets, verbose) as router:
            display = Display.for_terminal(
                job.name, router.term_err, quiet, replicas_planned=job.resources.replicas
            )
            router.show = display.alert
            watch = Watch(display, router, out)
            try:
                yield watch
                failed = False
            except Exception as exc:
                from batchjobs.errors import BatchJobError

                if not isinstance(exc, BatchJobError):  # a bug or an unforeseen failure:
                    router.note("".join(traceback.format_exception(exc)))  # its traceback
                raise
            finally:
                display.close()
    finally:
        # Failed or not: into the output root if the run recorded itself there. A local
        # copy stays only for a failed run whose root could not take it (the error names it).
        if router is not None and (router.sync(out, force=True) or router.is_empty() or not failed):
            router.discard_local()


# --------------------------------------------------------------------- batchjobs manifest


def device_unit(runs: list[dict]) -> str:
    """``CPU-s`` when the output root's latest run recorded a CPU run, else ``GPU-s``."""
    for run in reversed(runs):
        if run.get("device"):
            return "CPU-s" if run["device"] == "cpu" else "GPU-s"
    return "GPU-s"


def manifest_tables(records, runs: list[dict], output: str, wide: bool = False) -> list:
    """``batchjobs manifest``: the per-shard table (fits 100 columns; ``wide`` adds the
    rest), a line on what its figures cover, and the job's totals from the run records."""
    unit = device_unit(runs)
    records = list(records)
    statuses = {r.status for r in records}
    table = Table(
        title=f"manifest of {output}: {len(records)} shard(s)"
        + (", all committed" if statuses == {"committed"} else ""),
        box=box.SIMPLE_HEAD,
        header_style="bold",
        pad_edge=False,
        collapse_padding=True,
    )
    cols: list[tuple[str, str]] = [("shard", "left")]
    if wide or len(statuses) > 1:
        cols.append(("status", "left"))
    cols += [
        ("rows", "right"),
        ("errors", "right"),
        ("tok in", "right"),
        ("tok out", "right"),
        (unit, "right"),
        ("$", "right"),
        ("$/1M tok", "right"),
    ]
    if wide:
        cols += [
            ("$/1M out", "right"),
            ("out tok/s of work", "right"),
            ("committed", "left"),
            ("engine", "left"),
            ("source", "left"),
        ]
    for name, justify in cols:
        long = name in ("shard", "source")  # these fold onto a second line if they must
        table.add_column(
            name, justify=justify, no_wrap=not long, overflow="fold" if long else "ellipsis"
        )
    names = [c for c, _ in cols]
    for r in records:
        values = {
            "shard": r.shard_id,
            "status": r.status,
            "rows": compact(r.rows),
            "errors": compact(r.error_rows),
            "tok in": compact(r.prompt_tokens),
            "tok out": compact(r.completion_tokens),
            unit: f"{r.gpu_s:,.1f}" if r.gpu_s < 1000 else compact(r.gpu_s),
            "$": usd(r.cost_usd),
            "$/1M tok": usd(r.usd_per_1m_tokens),
            "$/1M out": usd(r.usd_per_1m_output_tokens),
            "out tok/s of work": _num(r.output_tokens_per_s),
            "committed": time.strftime("%Y-%m-%d %H:%M", time.localtime(r.committed_at))
            if r.committed_at
            else "-",
            "engine": f"{r.engine} {r.model}".strip(),
            "source": r.source,
        }
        table.add_row(*(values[n] for n in names))
    covers = Text(
        f"{unit} and $ per shard: its rows' work only (the replicas' time charged by the "
        "run's cost per prefill and decode token); start-up, idle and under-fill are job "
        "overhead, in the total below." + ("" if wide else " --wide: more columns."),
        style="dim",
    )
    out: list = [table, covers]
    if runs:
        device_s = sum(r.get("gpu_s", 0.0) for r in runs)
        overhead = sum(r.get("overhead_s", 0.0) for r in runs)
        cost = sum(r.get("cost_usd", 0.0) for r in runs)
        tokens = sum(r.get("prompt_tokens", 0) + r.get("completion_tokens", 0) for r in runs)
        per_m = f", {usd(cost / tokens * 1e6)} per 1M tokens" if tokens else ""
        failed = sum(1 for r in runs if r.get("status") == "failed")
        out.append(
            Text(
                f"Job total over {len(runs)} run(s){f' ({failed} failed)' if failed else ''}: "
                f"{device_s:,.1f} {unit} = {usd(cost)}{per_m}, of which overhead "
                f"{overhead:,.1f} {unit} (start-up, idle, under-fill)"
            )
        )
    return out
