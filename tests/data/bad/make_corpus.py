"""Writes the bad-input corpus beside this file (run it to rebuild it; the files are
committed). Each case and what batchjobs makes of it is in docs/errors.md.

generate/: one generate job reads all of it (prompt column ``prompt``, id column ``id``,
per-row sampling columns ``budget`` -> max_tokens and ``temp`` -> temperature).
chat/: conversations for a chat job (messages column ``messages``).

Not committed, made by the tests that need them: the 10 MB prompt, and a shard deleted
between planning and reading.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
# A file name with spaces, quotes, a command substitution and non-ASCII letters.
ODD_NAME = 'odd name "quoted" $(touch pwned) ünïcödé.jsonl'


def _line(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"


def _parquet(path: Path, table: pa.Table) -> None:
    """A Parquet shard with the corpus's sampling columns, all null (the job's settings)."""
    n = table.num_rows
    table = table.append_column("budget", pa.nulls(n, pa.int64()))
    pq.write_table(table.append_column("temp", pa.nulls(n, pa.float64())), path)


def make(root: Path = HERE) -> None:
    gen = root / "generate"
    gen.mkdir(parents=True, exist_ok=True)
    for old in gen.iterdir():
        old.unlink()

    # good rows, and an id twice in one shard
    (gen / "good.jsonl").write_bytes(
        b"".join(_line({"id": f"g-{i}", "prompt": f"the night job number {i}"}) for i in range(4))
        + _line({"id": "dup-1", "prompt": "first of two rows with one id"})
        + _line({"id": "dup-1", "prompt": "second of two rows with one id"})
    )
    # an id that is also in good.jsonl: duplicates across shards
    (gen / "dups.jsonl").write_bytes(_line({"id": "dup-1", "prompt": "a third row, another shard"}))

    # a malformed line mid-file (line 3), and a blank line (line 5, not a row)
    (gen / "malformed.jsonl").write_bytes(
        _line({"id": "m-1", "prompt": "before the damage"})
        + _line({"id": "m-2", "prompt": "still fine"})
        + b'{"id": "m-3", "prompt": "cut off here\n'
        + _line({"id": "m-4", "prompt": "after the damage"})
        + b"\n"
        + _line({"id": "m-6", "prompt": "the last line"})
    )
    # Latin-1 bytes in line 2: not UTF-8
    (gen / "latin1.jsonl").write_bytes(
        _line({"id": "l-1", "prompt": "plain ascii"})
        + '{"id": "l-2", "prompt": "caf\xe9 cr\xe8me"}\n'.encode("latin-1")
        + _line({"id": "l-3", "prompt": "plain again"})
    )
    # null, empty, blank, missing and non-string prompts; a null id; a lone surrogate
    (gen / "nulls.jsonl").write_bytes(
        _line({"id": "n-1", "prompt": None})
        + _line({"id": "n-2", "prompt": ""})
        + _line({"id": "n-3", "prompt": "   \t "})
        + _line({"id": "n-4"})
        + _line({"id": "n-5", "prompt": ["a", "list"]})
        + _line({"id": None, "prompt": "a row without an id"})
        + b'{"id": "n-7", "prompt": "broken \\ud800 escape"}\n'
        + _line({"id": "n-8", "prompt": "fine"})
    )
    # lines that are JSON but not rows; JSON nested deeper than a parser follows; Windows
    # line ends; a byte-order mark mid-file; NaN and a 5000-digit number
    (gen / "weird.jsonl").write_bytes(
        b"[1, 2, 3]\n"
        + b'"just a string"\n'
        + b"null\n"
        + b"[" * 10_000
        + b"]" * 10_000
        + b"\n"
        + b'{"id": "w-5", "prompt": "windows line end"}\r\n'
        + b'\xef\xbb\xbf{"id": "w-6", "prompt": "a BOM mid-file"}\n'
        + b'{"id": "w-7", "prompt": NaN}\n'
        + b'{"id": "w-8", "prompt": "big", "budget": '
        + b"9" * 5000
        + b"}\n"
        + _line({"id": {"nested": ["id"]}, "prompt": "an id that is an object"})
    )
    # a prompt longer than max_model_len (256 tokens in the tests), short enough in
    # characters that only tokenizing it can tell
    (gen / "too_long.jsonl").write_bytes(
        _line({"id": "t-1", "prompt": "the data " * 300})
        + _line({"id": "t-2", "prompt": "short enough"})
    )
    # per-row sampling values out of range or of the wrong type
    (gen / "sampling.jsonl").write_bytes(
        _line({"id": "s-1", "prompt": "ok", "budget": 3})
        + _line({"id": "s-2", "prompt": "negative", "budget": -1})
        + _line({"id": "s-3", "prompt": "zero", "budget": 0})
        + _line({"id": "s-4", "prompt": "text", "budget": "ten"})
        + _line({"id": "s-5", "prompt": "float", "budget": 2.0})
        + _line({"id": "s-6", "prompt": "cold", "temp": -2})
        + _line({"id": "s-7", "prompt": "hot", "temp": "hot"})
        + _line({"id": "s-8", "prompt": "list", "budget": [1, 2]})
    )
    (gen / ODD_NAME).write_bytes(_line({"id": "o-1", "prompt": "a file with an odd name"}))
    (gen / "empty.jsonl").write_bytes(b"")
    _parquet(
        gen / "empty.parquet",
        pa.table({"id": pa.array([], pa.string()), "prompt": pa.array([], pa.string())}),
    )
    _parquet(
        gen / "nulls.parquet",
        pa.table({"id": ["pn-0", "pn-1", "pn-2", "pn-3"], "prompt": ["fine", None, "", "  "]}),
    )
    # Parquet shards that fail as a whole
    buf = io.BytesIO()
    pq.write_table(
        pa.table({"id": [f"tr-{i}" for i in range(50)], "prompt": [f"row {i}" for i in range(50)]}),
        buf,
    )
    (gen / "truncated.parquet").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _parquet(gen / "no_prompt.parquet", pa.table({"id": ["np-0"], "question": ["where?"]}))
    _parquet(gen / "prompt_int.parquet", pa.table({"id": ["pi-0"], "prompt": [7]}))
    _parquet(gen / "prompt_list.parquet", pa.table({"id": ["pl-0"], "prompt": [["a", "b"]]}))
    _parquet(
        gen / "prompt_struct.parquet",
        pa.table({"id": ["ps-0"], "prompt": [{"text": "in a struct"}]}),
    )

    chat = root / "chat"
    chat.mkdir(parents=True, exist_ok=True)
    (chat / "roles.jsonl").write_bytes(
        _line({"id": "c-1", "messages": [{"role": "user", "content": "hello"}]})
        + _line({"id": "c-2", "messages": [{"role": "wizard", "content": "abracadabra"}]})
        + _line(
            {
                "id": "c-3",
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "root", "content": "sudo"},
                ],
            }
        )
        + _line({"id": "c-4", "messages": [{"role": "user"}]})
        + _line({"id": "c-5", "messages": "not a list"})
        + _line({"id": "c-6", "messages": []})
        + _line({"id": "c-7", "messages": [{"role": "user", "content": ["parts"]}]})
    )


if __name__ == "__main__":
    make()
