"""``task: embed``: a document (text or token ids) in, one embedding vector out.

Documents are tokenized in the engine's process by the model's tokenizer, so a document
longer than the engine's context is known exactly: cut to fit and flagged ``truncated``
(``embed.truncate: end``) or made an error row (``error``). The engine runs in vLLM's
pooling mode; the vector is L2-normalised unless ``embed.normalize`` is false.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from batchjobs.tasks.base import Prepared, RowError, Task, common_columns, request_id
from batchjobs.tasks.chat import load_tokenizer


class EmbedTask(Task):
    name = "embed"
    call = "embed"
    dim: int | None = None

    async def setup(self, engine) -> None:
        from batchjobs.engines.base import Request

        self.max_len = engine.max_model_len() or self.spec.engine.max_model_len
        self.tokenizer = None if self.spec.input.token_ids_column else load_tokenizer(self.spec)
        # One short request tells the vector's size, so that every output file of the job
        # has the same fixed-size column type, also a batch of error rows only.
        probe = await engine.embed(Request("batchjobs-probe", token_ids=[1]))
        if probe.embedding is None:
            raise RuntimeError(f"the engine did not embed a probe request: {probe.error}")
        self.dim = len(probe.embedding)

    def fit(self, ids: list[int], text: str | None) -> tuple[list[int], bool]:
        """A row's token ids cut to the engine's context when allowed; and whether cut."""
        if self.max_len is None or len(ids) <= self.max_len:
            return ids, False
        if self.spec.embed.truncate == "error":
            raise RowError(
                f"document has {len(ids)} tokens, more than the engine's max_model_len "
                f"{self.max_len} (embed.truncate: end cuts it to fit instead)"
            )
        if text is None:
            return ids[: self.max_len], True
        # Re-tokenized with the tokenizer's own truncation, which keeps the special tokens
        # the model expects (an end-of-text token that last-token pooling reads).
        with self.lock:
            cut = self.tokenizer(
                text, add_special_tokens=True, truncation=True, max_length=self.max_len
            )["input_ids"]
        return cut, True

    def prepare(self, request_id: str, values: dict[str, Any], params: dict | None) -> Prepared:
        return self.prepare_batch([request_id], [json.dumps(values)], [None], [params])[0]

    def prepare_batch(
        self, ids, payloads, input_errors, params, wheres=None
    ) -> list[Prepared | str]:
        """Tokenize the batch's documents in one call of the tokenizer (its Rust core
        encodes them in parallel), then cut or refuse the long ones."""
        from batchjobs.engines.base import Request
        from batchjobs.rowcheck import exception_text, located

        values = [json.loads(p) if e is None else None for p, e in zip(payloads, input_errors)]
        texts = [v["prompt"] for v in values if v is not None and "prompt" in v]
        encoded = iter(())
        if texts:
            try:
                with self.lock:
                    encoded = iter(self.tokenizer(texts, add_special_tokens=True)["input_ids"])
            except Exception:  # noqa: BLE001 - tokenized one by one below, to find the bad one
                encoded = iter([None] * len(texts))
        out: list[Prepared | str] = []
        for row_id, v, error, where in zip(ids, values, input_errors, wheres or [None] * len(ids)):
            if v is None:
                out.append(error)
                continue
            text = v.get("prompt")
            try:
                tokens = list(v["token_ids"]) if text is None else next(encoded)
                if tokens is None:
                    with self.lock:
                        tokens = self.tokenizer(text, add_special_tokens=True)["input_ids"]
                tokens, cut = self.fit(list(tokens), text)
            except RowError as exc:
                out.append(located(where or f"row {row_id}", str(exc)))
                continue
            except Exception as exc:  # noqa: BLE001 - one row's failure is that row's error
                out.append(
                    located(where or f"row {row_id}", f"cannot be prepared ({exception_text(exc)})")
                )
                continue
            out.append(Prepared(Request(request_id(row_id), token_ids=tokens), {"truncated": cut}))
        return out

    def output_fields(self) -> dict[str, pa.DataType]:
        return {
            "embedding": pa.list_(pa.float32(), self.dim or -1),
            "prompt_tokens": pa.int32(),
            "truncated": pa.bool_(),
            "latency_s": pa.float32(),
            "error": pa.string(),
        }

    def to_columns(self, results, extras) -> dict[str, pa.Array]:
        common = common_columns(results)
        return {
            "embedding": embedding_array([r.embedding for r in results], self.dim),
            "prompt_tokens": common["prompt_tokens"],
            "truncated": pa.array([bool(e.get("truncated")) for e in extras], pa.bool_()),
            "latency_s": common["latency_s"],
            "error": common["error"],
        }

    def schema_metadata(self) -> dict[str, str]:
        return {**super().schema_metadata(), "batchjobs.embedding_dim": str(self.dim)}


def embedding_array(vectors: list, dim: int) -> pa.FixedSizeListArray:
    """Vectors (None for error rows) as ``fixed_size_list<float32>[dim]``, built from one
    flat float32 buffer rather than a Python list per value."""
    n = len(vectors)
    flat = np.zeros((n, dim), dtype=np.float32)
    valid = np.ones(n, dtype=bool)
    for i, v in enumerate(vectors):
        if v is None:
            valid[i] = False
        else:
            flat[i] = np.asarray(v, dtype=np.float32)
    mask = pa.array(~valid) if not valid.all() else None
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), dim, mask=mask)
