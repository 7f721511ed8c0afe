"""What the bad-input corpus (tests/data/bad/generate, made by make_corpus.py) holds, as a
generate job reads it: the shards that cannot be read, with what their errors say, and the
rows of each readable shard. The unit and the e2e bad-input tests both check against it.

Importable from both test folders: pytest puts tests/ on sys.path for tests/conftest.py.
"""

from __future__ import annotations

UNREADABLE = {  # shard file -> what its error says
    "truncated.parquet": "not a readable Parquet file",
    "no_prompt.parquet": "no column 'prompt' (columns: id, question, budget, temp)",
    "prompt_int.parquet": "column 'prompt' has type int64, expected string",
    "prompt_list.parquet": "column 'prompt' has type list<element: string>, expected string",
    "prompt_struct.parquet": "column 'prompt' has type struct<text: string>, expected string",
}
ROWS = {  # rows per readable shard (non-blank lines, Parquet rows)
    "good.jsonl": 6,
    "dups.jsonl": 1,
    "malformed.jsonl": 5,
    "latin1.jsonl": 3,
    "nulls.jsonl": 8,
    "weird.jsonl": 9,
    "too_long.jsonl": 2,
    "sampling.jsonl": 8,
    'odd name "quoted" $(touch pwned) ünïcödé.jsonl': 1,
    "empty.jsonl": 0,
    "empty.parquet": 0,
    "nulls.parquet": 4,
}
