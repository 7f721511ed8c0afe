"""Document embedding: batchjobs ``task: embed`` against raw vLLM ``LLM.embed`` and
sentence-transformers, on the same documents, one mode after another in one invocation.

    python bench/embed_bench.py run --model models/qwen3-0.6b --load-format dummy \
        --n 50000 --modes raw,batchjobs,st --out bench/results/embed.json

Documents: ``--n`` of ``--min-tokens`` to ``--max-tokens`` tokens (the model's own tokenizer,
special tokens included), words drawn from a fixed vocabulary with a fixed seed, written as
``--shards`` Parquet files with columns ``doc_id`` and ``text``.

Modes, each in a process of its own, its clock started just before that process:
  raw        one ``LLM.embed`` over every document (``runner="pooling"``, ``convert="embed"``)
  batchjobs  ``batchjobs run`` of a ``task: embed`` spec over the same files
  st         sentence-transformers: Transformer (the same config, random weights saved first,
             outside the clock) + last-token pooling + Normalize, in --dtype on cuda
             (float32 on CPU); encodes chunks of documents until all are done or
             --st-deadline passes (then its rates stand for the share it did)
A warm-up (``raw`` on 256 documents, not timed) runs first unless ``--no-warm``, so the first
timed engine does not pay vLLM's compile alone.

End to end is from the mode's process start to its last result (raw: ``LLM.embed``
returned; batchjobs: the summary written, less the engines' teardown after it, as
bench/bench.py counts it). Start-up is to the engine ready (raw: ``LLM()`` returned;
batchjobs: every replica ready; st: the model on its device). Ratios are raw's time over
the mode's (above 1: faster than raw); the table is printed last and written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# Fixed vocabulary: documents are words drawn from it (the same as every run, any model).
VOCAB = (  # noqa: SIM905 - one word list, read as text
    "the of and to in is was for on that with as by at from his her their this which "
    "report market river city engine system data model paper review number story "
    "table water energy policy health school music season light garden signal "
    "network family history science council museum harbour railway bridge village "
    "forest mountain island winter summer morning evening quickly slowly carefully "
    "early later often never always build measure write travel explain consider "
    "improve reduce protect describe discover"
).split()
SAMPLE = 64  # documents whose vectors each mode keeps for the cross-mode check
WARM_DOCS = 256
CHECK_DOCS = 2000  # documents whose planned token counts are checked with the tokenizer


# ---------------------------------------------------------------- documents
def make_docs(
    word_tokens, specials: int, n: int, lo: int, hi: int, seed: int = 0
) -> tuple[list[dict], list[int]]:
    """``n`` documents of ``lo``..``hi`` tokens (uniform target, specials included).

    ``word_tokens(word, first)`` is the token count of ``word`` at the start of a text
    (``first``) or after a space; byte-level BPE tokenizers split on spaces first, so a
    text's count is the sum over its words plus ``specials``. Returns the rows and their
    planned token counts (the caller checks them against the real tokenizer).
    """
    first = {w: word_tokens(w, True) for w in VOCAB}
    rest = {w: word_tokens(w, False) for w in VOCAB}
    filler = min(VOCAB, key=rest.get)  # tops a document up to its target
    rng = random.Random(seed)
    rows, counts = [], []
    for i in range(n):
        target = rng.randint(lo, hi) - specials
        words, used = [], 0
        while True:
            w = rng.choice(VOCAB)
            cost = (first if not words else rest)[w]
            if used + cost > target:
                break
            words.append(w)
            used += cost
        while words and used + rest[filler] <= target:
            words.append(filler)
            used += rest[filler]
        rows.append({"doc_id": f"d{i:07d}", "text": " ".join(words)})
        counts.append(used + specials)
    return rows, counts


def build_docs(model: str, n: int, lo: int, hi: int, seed: int = 0) -> tuple[list[dict], dict]:
    """Documents sized with ``model``'s tokenizer. The planned counts are checked against
    the tokenizer on the first ``CHECK_DOCS`` documents (all of them where one differs);
    a document the tokenizer counts above ``hi`` loses words until it fits. Returns the
    rows and token statistics (of the tokenizer's counts where it counted)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)

    def count(text: str, special: bool = False) -> int:
        return len(tok(text, add_special_tokens=special)["input_ids"])

    def counts(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tok(texts)["input_ids"]]

    specials = count("x", True) - count("x")
    rows, lens = make_docs(lambda w, f: count(w if f else " " + w), specials, n, lo, hi, seed)
    checked = min(n, CHECK_DOCS)
    real = counts([r["text"] for r in rows[:checked]])
    if real != lens[:checked]:
        checked = n
        real = counts([r["text"] for r in rows])
    lens[:checked] = real
    for i, length in enumerate(lens):
        while length > hi:
            rows[i]["text"] = rows[i]["text"].rsplit(" ", 1)[0]
            length = count(rows[i]["text"], True)
        lens[i] = length
    return rows, {
        "docs": n,
        "tokens": sum(lens),
        "min_tokens": min(lens),
        "max_tokens": max(lens),
        "mean_tokens": sum(lens) / n,
        "special_tokens_per_doc": specials,
        "counted_by_tokenizer": checked,
    }


def write_shards(rows: list[dict], out: Path, shards: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    per = -(-len(rows) // shards)
    for k in range(shards):
        part = rows[k * per : (k + 1) * per]
        if part:
            pq.write_table(pa.Table.from_pylist(part), out / f"part-{k:04d}.parquet")


def read_docs(data: Path, limit: int | None = None) -> tuple[list[str], list[str]]:
    import pyarrow.parquet as pq

    ids, texts = [], []
    for f in sorted(data.glob("*.parquet")):
        t = pq.read_table(f, columns=["doc_id", "text"])
        ids += t.column("doc_id").to_pylist()
        texts += t.column("text").to_pylist()
    return ids[:limit], texts[:limit]


def sample_ids(ids: list[str]) -> list[str]:
    return sorted(ids)[:SAMPLE]


# ---------------------------------------------------------------- the batchjobs spec
def embed_spec(a, data: Path, out: Path) -> dict:
    """The ``task: embed`` job this bench runs (the interface of docs/ and issue 23)."""
    args = json.loads(a.engine_args)
    if a.load_format:
        args["load_format"] = a.load_format
    return {
        "name": "embed-bench",
        "task": "embed",
        "input": {"path": str(data), "prompt_column": "text", "id_column": "doc_id"},
        "output": {"path": str(out), "mode": "overwrite"},
        "engine": {
            "model": a.model,
            "dtype": a.dtype,
            "max_model_len": a.max_model_len,
            "args": args,
            **json.loads(a.spec_engine),
        },
        "embed": {"normalize": True, "truncate": "end"},
        "resources": {"replicas": 1, "batch_size": a.batch_size, **json.loads(a.resources)},
    }


# ---------------------------------------------------------------- modes (child processes)
def mode_raw(a, limit: int | None = None) -> dict:
    from vllm import LLM

    t_imported = time.time()
    ids, texts = read_docs(Path(a.data), limit)
    kw = {"max_model_len": a.max_model_len, "dtype": a.dtype, **json.loads(a.engine_args)}
    if a.load_format:
        kw["load_format"] = a.load_format
    llm = LLM(model=a.model, runner="pooling", convert="embed", **kw)
    t_ready = time.time()
    outs = llm.embed(texts, use_tqdm=False)
    t_end = time.time()
    keep = set(sample_ids(ids))
    return {
        "docs": len(outs),
        "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs),
        "dim": len(outs[0].outputs.embedding),
        "imported_at": t_imported,
        "ready_at": t_ready,
        "end_at": t_end,
        "sample": {i: list(o.outputs.embedding) for i, o in zip(ids, outs) if i in keep},
    }


def st_prepare(a) -> None:
    """Random weights in ``a.st_model`` (the model's config and tokenizer): made before the
    clock, as a user's checkpoint would already be on disk."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModel

    out = Path(a.st_model)
    if (out / "model.safetensors").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(a.model).iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.endswith(".safetensors"):
            shutil.copy(f, out / f.name)
    config = AutoConfig.from_pretrained(a.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModel.from_config(config, dtype=st_dtype(a))
    model.save_pretrained(str(out))


def st_dtype(a):
    import torch

    return getattr(torch, a.dtype) if torch.cuda.is_available() else torch.float32


def mode_st(a) -> dict:
    import torch

    try:
        from sentence_transformers.sentence_transformer.modules import (
            Normalize,
            Pooling,
            Transformer,
        )
    except ImportError:  # sentence-transformers before 6
        from sentence_transformers.models import Normalize, Pooling, Transformer
    from sentence_transformers import SentenceTransformer

    t_imported = time.time()
    ids, texts = read_docs(Path(a.data))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tr = Transformer(
        a.st_model, max_seq_length=a.max_model_len, model_kwargs={"dtype": st_dtype(a)}
    )
    if tr.tokenizer.pad_token is None:  # batches need one; last-token pooling skips padding
        tr.tokenizer.pad_token = tr.tokenizer.eos_token
    dim = json.loads((Path(a.st_model) / "config.json").read_text())["hidden_size"]
    model = SentenceTransformer(modules=[tr, Pooling(dim, "lasttoken"), Normalize()], device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    t_ready = time.time()
    done = 0
    while done < len(texts):
        chunk = texts[done : done + a.st_chunk]
        emb = model.encode(chunk, batch_size=a.st_batch_size, convert_to_numpy=True)
        done += len(chunk)
        if a.st_deadline and time.time() > a.st_deadline:
            break
    t_end = time.time()
    # tokens as the model saw them, counted after the clock stopped
    ids_done = tr.tokenizer(texts[:done], truncation=True, max_length=a.max_model_len)["input_ids"]
    tokens = sum(len(x) for x in ids_done)
    return {
        "docs": done,
        "docs_total": len(texts),
        "prompt_tokens": tokens,
        "dim": int(emb.shape[1]),
        "imported_at": t_imported,
        "ready_at": t_ready,
        "end_at": t_end,
    }


def batchjobs_result(out: Path, summary_path: Path, t0: float) -> dict:
    """Rows, tokens, timing and sample vectors of a finished ``batchjobs run``."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    s = json.loads(summary_path.read_text())
    teardown = s.get("teardown_s") or 0.0
    end = summary_path.stat().st_mtime - teardown
    t = pds.dataset(str(out), format="parquet").to_table(
        columns=["doc_id", "embedding", "prompt_tokens", "error"]
    )
    readies = [r["ready_at"] for r in (s.get("replicas") or {}).values() if r.get("ready_at")]
    keep = set(sample_ids(t.column("doc_id").to_pylist()))
    mask = pc.is_in(t.column("doc_id"), value_set=pa.array(sorted(keep)))
    picked = t.filter(mask)
    emb_type = t.schema.field("embedding").type
    return {
        "docs": t.num_rows,
        "error_rows": t.num_rows - t.column("error").null_count,
        "distinct_ids": len(set(t.column("doc_id").to_pylist())),
        "prompt_tokens": int(pc.sum(t.column("prompt_tokens")).as_py() or 0),
        "dim": getattr(emb_type, "list_size", None),
        "embedding_type": str(emb_type),
        "ready_at": max(readies) if readies else None,
        "end_at": end,
        "teardown_s": teardown,
        "summary_wall_s": s.get("wall_s"),
        "sample": dict(
            zip(picked.column("doc_id").to_pylist(), picked.column("embedding").to_pylist())
        ),
    }


# ---------------------------------------------------------------- numbers
def rates(r: dict) -> dict:
    """docs/s and tokens/s end to end and with start-up excluded; for a mode that did a
    share of the documents (st at its deadline) end to end is projected to all of them."""
    gen = r["wall_s"] - r["startup_s"] if r.get("startup_s") is not None else None
    share = r["docs"] / r.get("docs_total", r["docs"])
    wall_all = r["startup_s"] + gen / share if gen and share < 1 else r["wall_s"]
    return {
        "docs_s": r["docs"] / r["wall_s"],
        "tok_s": r["prompt_tokens"] / r["wall_s"],
        "docs_s_ex_start": r["docs"] / gen if gen else None,
        "tok_s_ex_start": r["prompt_tokens"] / gen if gen else None,
        "share_done": share,
        "wall_all_s": wall_all,
    }


def ratios(raw: dict, other: dict) -> dict:
    """Raw's time over ``other``'s for the same documents (above 1: faster than raw), end
    to end and with start-up excluded; from token rates, so a share done (st) compares too."""
    out = {"e2e": raw["wall_all_s"] / other["wall_all_s"]}
    if raw.get("tok_s_ex_start") and other.get("tok_s_ex_start"):
        out["ex_start"] = other["tok_s_ex_start"] / raw["tok_s_ex_start"]
    else:
        out["ex_start"] = None
    return out


def cosine_check(a: dict, b: dict) -> dict | None:
    """Vectors of the same documents from two modes: the lowest cosine between a document's
    two vectors, and the mean cosine between different documents (how alike any two are)."""
    common = sorted(set(a) & set(b))
    if len(common) < 2:
        return None

    def cos(x, y):
        nx, ny = math.sqrt(sum(v * v for v in x)), math.sqrt(sum(v * v for v in y))
        return sum(p * q for p, q in zip(x, y)) / (nx * ny) if nx and ny else float("nan")

    same = [cos(a[i], b[i]) for i in common]
    other = [cos(a[i], b[j]) for i, j in zip(common, common[1:])]
    return {
        "docs": len(common),
        "min_cos_same_doc": min(same),
        "mean_cos_other_doc": sum(other) / len(other),
        "max_abs_diff": max(abs(p - q) for i in common for p, q in zip(a[i], b[i])),
    }


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(results: list[dict]) -> dict:
    """The table, and the ratios of every mode to raw (returned for the results file)."""
    raw = next((r for r in results if r["mode"] == "raw" and r.get("wall_s")), None)
    print(
        f"{'mode':10} {'docs':>7} {'tokens':>10} {'wall s':>7} {'start s':>7} {'docs/s':>7} "
        f"{'tok/s':>8} {'tok/s ex-st':>11} {'vs raw':>7} {'ex-start':>8}"
    )
    out = {}
    for r in results:
        if not r.get("wall_s"):
            print(f"{r['mode']:10} FAILED rc={r.get('rc')}")
            continue
        q = ratios(raw, r) if raw else {"e2e": None, "ex_start": None}
        out[r["mode"]] = q
        done = "" if r["share_done"] == 1 else f"  ({r['share_done']:.0%} of docs; e2e projected)"
        print(
            f"{r['mode']:10} {r['docs']:>7} {r['prompt_tokens']:>10} {r['wall_s']:>7.1f} "
            f"{fmt(r.get('startup_s'), '7.1f')} {r['docs_s']:>7.0f} {r['tok_s']:>8.0f} "
            f"{fmt(r.get('tok_s_ex_start'), '11.0f')} {fmt(q['e2e'], '7.3f')} "
            f"{fmt(q['ex_start'], '8.3f')}{done}"
        )
    return out


# ---------------------------------------------------------------- orchestration
def child_argv(a, mode: str, data: Path, result: Path, extra: list[str] = ()) -> list[str]:
    argv = [sys.executable, __file__, "child", mode, "--data", str(data), "--result", str(result)]
    argv += ["--model", a.model, "--max-model-len", str(a.max_model_len), "--dtype", a.dtype]
    argv += ["--engine-args", a.engine_args, "--st-model", a.st_model]
    argv += ["--st-batch-size", str(a.st_batch_size), "--st-chunk", str(a.st_chunk)]
    argv += ["--st-deadline", str(a.st_deadline or 0)]
    argv += ["--load-format", a.load_format] if a.load_format else []
    return argv + list(extra)


def run_mode(a, mode: str, data: Path, work: Path) -> dict:
    res_file = work / f"result-{mode}.json"
    res_file.unlink(missing_ok=True)
    if mode == "batchjobs":
        import yaml

        out = work / "batchjobs-out"
        spec = work / "embed-spec.yaml"
        spec.write_text(yaml.safe_dump(embed_spec(a, data, out), sort_keys=False))
        summary = work / "batchjobs-summary.json"
        summary.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "batchjobs.cli", "run", str(spec)]
        argv += ["--summary-json", str(summary)]
    else:
        argv = child_argv(a, mode, data, res_file)
    t0 = time.time()
    rc = subprocess.call(argv, cwd=REPO)
    exited = time.time()
    row = {"mode": mode, "rc": rc, "exit_s": exited - t0}
    if rc == 0 and mode == "batchjobs":
        row.update(batchjobs_result(out, summary, t0))
    elif rc == 0 and res_file.exists():
        row.update(json.loads(res_file.read_text()))
    if rc == 0 and row.get("end_at"):
        row["wall_s"] = row["end_at"] - t0
        row["startup_s"] = row["ready_at"] - t0 if row.get("ready_at") else None
        if row.get("imported_at"):
            row["import_s"] = row["imported_at"] - t0
        row.update(rates(row))
    return row


def git_state() -> dict:
    """The commit measured and whether tracked files differed from it. A copy of the tree
    without .git (the GPU host's) takes both from BENCH_COMMIT and BENCH_DIRTY (0 or 1)."""
    if os.environ.get("BENCH_COMMIT"):
        dirty = os.environ.get("BENCH_DIRTY")
        return {
            "commit": os.environ["BENCH_COMMIT"],
            "dirty": None if dirty is None else dirty == "1",
        }

    def git(*args):
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": git("log", "-1", "--format=%h"),
        "dirty": bool(status) if status is not None else None,
    }


def device_name() -> str:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "cpu"


def run_all(a) -> None:
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"data-{Path(a.model).name}-{a.n}-{a.min_tokens}-{a.max_tokens}-s{a.shards}"
    stats_file = data / "_stats.json"
    if not stats_file.exists():
        rows, stats = build_docs(a.model, a.n, a.min_tokens, a.max_tokens)
        write_shards(rows, data, a.shards)
        stats_file.write_text(json.dumps(stats))
    stats = json.loads(stats_file.read_text())
    print(f"documents: {json.dumps(stats)}", flush=True)
    modes = a.modes.split(",")
    if "st" in modes:
        subprocess.check_call(child_argv(a, "st_prepare", data, work / "unused.json"), cwd=REPO)
    meta = {**git_state(), "device": device_name(), "documents": stats, "args": vars(a)}
    if a.warm:
        print("=== warm (raw, not timed)", flush=True)
        extra = ["--limit", str(WARM_DOCS)]
        rc = subprocess.call(child_argv(a, "raw", data, work / "result-warm.json", extra), cwd=REPO)
        meta["warm_rc"] = rc
    results = []
    for mode in modes:
        print(f"=== {mode} {time.strftime('%H:%M:%S')}", flush=True)
        results.append(run_mode(a, mode, data, work))
        save(a, meta, results, None)
    print_table_and_save(a, meta, results)


def print_table_and_save(a, meta: dict, results: list[dict]) -> None:
    q = print_table(results)
    by_mode = {r["mode"]: r for r in results}
    bj, raw = by_mode.get("batchjobs"), by_mode.get("raw")
    # st's weights are its own, so only batchjobs' vectors can be compared with raw's
    check = (
        cosine_check(raw["sample"], bj["sample"])
        if bj and raw and "sample" in bj and "sample" in raw
        else None
    )
    if bj and bj.get("docs") is not None:
        n = meta["documents"]["docs"]
        print(
            f"batchjobs: {bj['docs']} rows of {n} documents, {bj.get('distinct_ids')} distinct ids, "
            f"{bj.get('error_rows')} error rows, embedding {bj.get('embedding_type')}"
        )
    if check:
        print(
            f"batchjobs vs raw: {check['docs']} documents, lowest cosine of a document's two "
            f"vectors {check['min_cos_same_doc']:.4f} (different documents: "
            f"{check['mean_cos_other_doc']:.4f})"
        )
    for m, r in q.items():
        if m != "raw":
            print(
                f"{m}/raw: {fmt(r['e2e'], '.3f')} end to end, {fmt(r['ex_start'], '.3f')} start-up excluded"
            )
    save(a, meta, results, {"ratios": q, "batchjobs_vs_raw_vectors": check})


def save(a, meta: dict, results: list[dict], extra: dict | None) -> None:
    if not a.out:
        return
    rows = [{k: v for k, v in r.items() if k != "sample"} for r in results]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({**meta, "results": rows, **(extra or {})}, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--model", required=True)
        sp.add_argument("--max-model-len", type=int, default=512)
        sp.add_argument("--dtype", default="bfloat16")
        sp.add_argument("--load-format", default=None)
        sp.add_argument(
            "--engine-args", default="{}", help="JSON: vLLM engine args for raw and batchjobs"
        )
        sp.add_argument("--st-model", default=None, help="where st's random weights go")
        sp.add_argument("--st-batch-size", type=int, default=128)
        sp.add_argument("--st-chunk", type=int, default=5000, help="documents per encode call")
        sp.add_argument("--st-deadline", type=float, default=0, help="epoch s: st stops after it")

    r = sub.add_parser("run")
    common(r)
    r.add_argument("--n", type=int, default=50000)
    r.add_argument("--min-tokens", type=int, default=64)
    r.add_argument("--max-tokens", type=int, default=512)
    r.add_argument("--shards", type=int, default=8)
    r.add_argument("--modes", default="raw,batchjobs,st")
    r.add_argument("--batch-size", type=int, default=256, help="batchjobs resources.batch_size")
    r.add_argument("--resources", default="{}", help="JSON: more batchjobs resources keys")
    r.add_argument("--spec-engine", default="{}", help="JSON: more batchjobs engine keys")
    r.add_argument("--no-warm", dest="warm", action="store_false")
    r.add_argument("--workdir", default=str(REPO / "bench" / "results" / "embed-work"))
    r.add_argument("--out", default=None)

    c = sub.add_parser("child")
    c.add_argument("mode", choices=["raw", "st", "st_prepare"])
    common(c)
    c.add_argument("--data", required=True)
    c.add_argument("--result", required=True)
    c.add_argument("--limit", type=int, default=None)

    a = p.parse_args()
    if a.cmd == "run":
        a.st_model = a.st_model or str(Path(a.workdir) / f"st-{Path(a.model).name}")
        run_all(a)
        return
    if a.mode == "st_prepare":
        st_prepare(a)
        return
    res = mode_raw(a, a.limit) if a.mode == "raw" else mode_st(a)
    Path(a.result).write_text(json.dumps(res))


if __name__ == "__main__":
    main()
