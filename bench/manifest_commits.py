"""Time a long sequence of shard commits to the manifest: what committing one more shard
costs when thousands are already committed.

Two ways of recording a commit, in the same process on the same records:

  new   ``Manifest.commit``: one small file under ``_manifest.d/`` per commit, compacted
        into ``_manifest.jsonl`` now and then (batchjobs/manifest.py)
  old   the whole ``_manifest.jsonl`` rewritten on every commit (what batchjobs did before;
        reimplemented here as it was)

on a local temporary directory and on ``memory://`` (an object-store-like filesystem: no
rename, whole-object writes). The new way runs the whole sequence. The old way costs
O(committed) per commit, so its whole sequence takes a quarter of an hour at 10,000 shards:
by default it times its first ``--window`` commits and its last ``--window`` (after the
manifest is filled with the records before them) and estimates the total as the mean of
the two windows times the number of commits (the cost grows linearly, which the two
windows show); ``--full-old`` runs it whole.

    python bench/manifest_commits.py --shards 10000
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from batchjobs.manifest import COMMITTED, Manifest, ShardRecord  # noqa: E402
from batchjobs.sink import OutputRoot  # noqa: E402


def record(i: int) -> ShardRecord:
    """A shard record shaped like a real one (about 750 bytes of JSON)."""
    sid = f"part-{i:05d}.parquet-{uuid.uuid4().hex[:10]}"
    rec = ShardRecord(
        shard_id=sid,
        source=f"s3://bucket/jobs/nightly/input/part-{i:05d}.parquet",
        status=COMMITTED,
        rows=1000,
        error_rows=3,
        prompt_tokens=512_000,
        completion_tokens=256_000,
        engine_s=41.5,
        files=[f"s3://bucket/jobs/nightly/output/{sid}/{uuid.uuid4().hex}.parquet"],
        engine="vllm 0.24.0",
        model="/models/llama3-8b-instruct",
        fingerprint="0123456789abcdef",
        started_at=1.7e9 + i,
        committed_at=1.7e9 + i + 40,
    )
    rec.finalise(1, 2.5)
    return rec


class OldManifest:
    """The manifest as it was: every commit rewrites the whole file in one step."""

    def __init__(self, root: OutputRoot):
        self.root = root
        self.records: dict[str, ShardRecord] = {}

    def commit(self, rec: ShardRecord) -> None:
        self.records[rec.shard_id] = rec
        lines = [json.dumps(asdict(r), sort_keys=True) for r in self.records.values()]
        self.root.write_atomic("_manifest.jsonl", ("\n".join(lines) + "\n").encode())


def timed(commit, recs: list[ShardRecord]) -> list[float]:
    out = []
    for rec in recs:
        t0 = time.perf_counter()
        commit(rec)
        out.append(time.perf_counter() - t0)
    return out


def root_for(fs: str, tmp: str, name: str) -> OutputRoot:
    return OutputRoot(f"{tmp}/{name}" if fs == "local" else f"memory://bench-{name}")


def run_new(fs: str, tmp: str, recs: list[ShardRecord]) -> dict:
    root = root_for(fs, tmp, "new")
    m = Manifest(root)
    times = timed(m.commit, recs)
    t0 = time.perf_counter()
    m.compact()  # what the end of a run does
    final = time.perf_counter() - t0
    t0 = time.perf_counter()
    back = Manifest(root)
    reload_s = time.perf_counter() - t0
    assert back.records == m.records, "the manifest read back differs from what was committed"
    root.wipe()
    return {"times": times, "total": sum(times) + final, "reload_s": reload_s, "estimated": False}


def run_old(fs: str, tmp: str, recs: list[ShardRecord], window: int, full: bool) -> dict:
    root = root_for(fs, tmp, "old")
    m = OldManifest(root)
    n = len(recs)
    if full or n <= 2 * window:
        times = timed(m.commit, recs)
        first, last, total, estimated = times[:window], times[-window:], sum(times), False
    else:
        first = timed(m.commit, recs[:window])
        for rec in recs[window : n - window]:  # filled in memory: not timed, not written
            m.records[rec.shard_id] = rec
        last = timed(m.commit, recs[n - window :])
        total, estimated = (statistics.mean(first) + statistics.mean(last)) / 2 * n, True
        times = first + last
    t0 = time.perf_counter()
    back = Manifest(root)  # the new reader reads the old file
    reload_s = time.perf_counter() - t0
    assert len(back.records) == n
    root.wipe()
    return {
        "times": times,
        "first": first,
        "last": last,
        "total": total,
        "reload_s": reload_s,
        "estimated": estimated,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=10_000)
    ap.add_argument("--window", type=int, default=100, help="commits timed at each end")
    ap.add_argument("--fs", default="local,memory", help="local, memory or both")
    ap.add_argument("--full-old", action="store_true", help="run the old way's whole sequence")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    recs = [record(i) for i in range(args.shards)]
    w = args.window
    print(f"manifest: {args.shards} shard commits, {len(json.dumps(asdict(recs[0])))} B per record")
    header = (
        f"{'fs':<7} {'way':<4} {'first ms':>9} {'last ms':>9} {'last/first':>10} "
        f"{'last median':>11} {'last max':>9} {'total s':>9} {'reread s':>8}"
    )
    print(f"ms: per commit, mean over the first / last {w} commits (median and max of the last)")
    print(header)
    print("-" * len(header))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fs in args.fs.split(","):
            new = run_new(fs, tmp, recs)
            new["first"], new["last"] = new["times"][:w], new["times"][-w:]
            old = run_old(fs, tmp, recs, w, args.full_old)
            for way, r in (("new", new), ("old", old)):
                first, last = statistics.mean(r["first"]) * 1e3, statistics.mean(r["last"]) * 1e3
                total = f"{'~' if r['estimated'] else ''}{r['total']:.1f}"
                median = statistics.median(r["last"]) * 1e3
                print(
                    f"{fs:<7} {way:<4} {first:>9.3f} {last:>9.3f} {last / first:>10.1f} "
                    f"{median:>11.3f} {max(r['last']) * 1e3:>9.1f} {total:>9} {r['reload_s']:>8.2f}"
                )
                results[f"{fs}/{way}"] = {
                    "first_ms": first,
                    "last_ms": last,
                    "last_median_ms": median,
                    "last_max_ms": max(r["last"]) * 1e3,
                    "total_s": r["total"],
                    "total_estimated": r["estimated"],
                    "reread_s": r["reload_s"],
                }
            results[f"{fs}/old_over_new_total"] = old["total"] / new["total"]
    for fs in args.fs.split(","):
        print(
            f"{fs}: old / new total time = {results[f'{fs}/old_over_new_total']:.0f}x"
            + (" (old total estimated, ~)" if results[f"{fs}/old"]["total_estimated"] else "")
        )
    if args.json:
        args.json.write_text(json.dumps({"shards": args.shards, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
