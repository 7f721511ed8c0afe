"""The pilot's quality guard: how closely each candidate's outputs agree with the reference
candidate's on the pilot rows, and ``pilot.min_agreement`` ruling out those below it.

Rows are matched by their position in the pilot input (every candidate ran the same rows).
Per candidate, over the rows where it or the reference produced a result (rows that are
error rows for both are left out; an error row on one side only agrees 0):

- ``identical_share``: the share of rows whose outputs are identical (every sample's text
  for ``sampling.n`` > 1; the vector for ``embed``).
- ``agreement``: the mean per-row agreement. For text, the longest common prefix of the
  two outputs' token ids over the longer one's length, ``lcp(a, b) / max(len(a), len(b))``
  (1 when both are empty; for ``n`` > 1 the mean over the samples). Decoding is
  autoregressive: once a token differs, everything after it is conditioned on another
  text, so tokens that happen to match later are not agreement; dividing by the longer
  output counts an output cut short (or run on) as disagreement. For ``embed`` it is the
  cosine similarity of the two vectors.

Token ids are those of the job's tokenizer (the reference's ``engine.tokenizer`` or model)
applied to the output texts: the engine's own ids are not kept in the output, and asking
the engine for them (log-probabilities) would slow the very runs the pilot times. For a
tokenizer that round-trips its own output this is the generated ids.

Agreement is meaningful at temperature 0 (or with a ``sampling.seed``): unseeded samples
differ from run to run in any configuration.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from batchjobs.errors import EngineError
from batchjobs.projection import OK

Encoder = Callable[[list[str]], list[list[int]]]


# --------------------------------------------------------------------------- measures


def prefix_agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """``lcp(a, b) / max(len(a), len(b))``; 1.0 for two empty outputs."""
    longest = max(len(a), len(b))
    if longest == 0:
        return 1.0
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n / longest


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return dot / (na * nb)


def compare(ref: dict[int, Any], cand: dict[int, Any], encode: Encoder | None) -> dict[str, Any]:
    """Agreement of ``cand`` with ``ref``: row position -> output (a list of sample texts,
    a vector, or None for an error row). ``encode`` turns texts into token ids; without
    one only ``identical_share`` is measured."""
    rows = sorted(set(ref) | set(cand))
    both = [(ref.get(i), cand.get(i)) for i in rows]
    both = [(a, b) for a, b in both if a is not None or b is not None]
    if not both:
        return {"agreement_rows": 0, "identical_share": None, "agreement": None}
    identical = sum(1 for a, b in both if a is not None and b is not None and _same(a, b))
    scores: list[float] = []
    texts = [(a, b) for a, b in both if a is not None and b is not None and _is_text(a, b)]
    if encode is not None and texts:
        flat = [t for a, b in texts for t in (*a, *b)]
        ids = iter(encode(flat))
        for a, b in texts:
            ia, ib = [next(ids) for _ in a], [next(ids) for _ in b]
            pairs = list(zip(ia, ib))
            per = [prefix_agreement(x, y) for x, y in pairs]
            # a sample one side lacks agrees 0
            scores.append(sum(per) / max(len(ia), len(ib)) if pairs else 1.0)
    for a, b in both:
        if a is None or b is None:
            scores.append(0.0)
        elif not _is_text(a, b):
            scores.append(cosine(a, b))
    measured = encode is not None or not texts
    return {
        "agreement_rows": len(both),
        "identical_share": identical / len(both),
        "agreement": sum(scores) / len(scores) if measured and scores else None,
    }


def _is_text(a: Any, b: Any) -> bool:
    return bool(a) and isinstance(a[0], str) or bool(b) and isinstance(b[0], str)


def _same(a: Any, b: Any) -> bool:
    return len(a) == len(b) and all(x == y for x, y in zip(a, b))


# --------------------------------------------------------------------------- reading


def read_outputs(path: str, storage_options: dict | None = None) -> dict[int, Any] | None:
    """A pilot run's outputs by row position: sample texts (generate, chat, eval), the
    vector (embed), None for an error row; None when its outputs hold neither."""
    import pyarrow.parquet as pq

    from batchjobs.manifest import Manifest
    from batchjobs.sink import OutputRoot

    root = OutputRoot(path, storage_options)
    out: dict[int, Any] = {}
    for rec in Manifest(root).committed().values():
        for f in rec.files:
            file = root.path(rec.shard_id, f.rsplit("/", 1)[-1])
            names = pq.read_schema(file, filesystem=root.fs).names
            value = next((c for c in ("texts", "text", "embedding") if c in names), None)
            if value is None:
                return None
            t = pq.read_table(file, columns=["row_index", "error", value], filesystem=root.fs)
            for i, err, v in zip(*(t.column(c).to_pylist() for c in t.column_names)):
                if err is not None or v is None:
                    out[i] = None
                else:
                    out[i] = [v] if value == "text" else list(v)
    return out


def load_encoder(spec: Any) -> Encoder | None:
    """Token ids of texts with the job's tokenizer (``engine.tokenizer``, else the model's:
    its ``tokenizer.json`` through ``tokenizers`` where there is one, else transformers);
    None where it cannot be loaded."""
    tokenizer_dir = spec.engine.tokenizer or spec.engine.model
    trust_remote_code = spec.engine.trust_remote_code
    try:
        file = Path(tokenizer_dir).expanduser() / "tokenizer.json"
        if file.is_file():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(file))
            return lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code)
        return lambda texts: hf(texts, add_special_tokens=False)["input_ids"]
    except Exception:  # noqa: BLE001 - agreement is then measured as identical outputs only
        return None


# --------------------------------------------------------------------------- the guard


def guard(
    table: list[dict[str, Any]],
    reference: str,
    outputs: Callable[[str], dict[int, Any] | None],
    encoder: Callable[[], Encoder | None],
    min_agreement: float | None,
) -> dict[str, Any]:
    """Fill each measured row of the pilot ``table`` with its agreement with ``reference``
    (``outputs(name)`` reads a candidate's pilot outputs; ``encoder()`` loads the tokenizer,
    called only for text) and rule out (``excluded``) those below ``min_agreement``.
    Returns what the decision records about it."""
    ref_row = next(r for r in table if r["name"] == reference)
    info: dict[str, Any] = {"reference": reference, "min_agreement": min_agreement}
    ref = outputs(reference) if ref_row["status"] == OK else None
    if ref is None:
        why = (
            f"the reference candidate {reference!r} was not measured ({ref_row['status']})"
            if ref_row["status"] != OK
            else "the task's outputs have no text or vector to compare"
        )
        if min_agreement is not None:
            raise EngineError(
                f"pilot.min_agreement is set, but {why}: mark an installed candidate "
                "`reference: true`, or remove pilot.min_agreement"
            )
        info["agreement_note"] = f"no agreement: {why}"
        return info
    texts = any(v and isinstance(v[0], str) for v in ref.values())
    encode = encoder() if texts else None
    if texts and encode is None:
        info["agreement_note"] = "the tokenizer did not load: only identical outputs measured"
    for row in table:
        if row["status"] != OK:
            continue
        row.update(compare(ref, outputs(row["name"]) or {}, encode))
        score = row["agreement"]
        if (
            min_agreement is not None
            and row["name"] != reference
            and (score is None or score < min_agreement)
        ):
            row["excluded"] = (
                f"agreement {'-' if score is None else f'{score:.3f}'} < min_agreement "
                f"{min_agreement}"
            )
    return info
