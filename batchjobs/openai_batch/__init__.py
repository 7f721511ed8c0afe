"""OpenAI Batch API files in and out.

An OpenAI Batch request file holds one request per line: ``custom_id``, ``method``,
``url`` and ``body``. With ``input.format: openai_batch`` each line is one row, named by its
``custom_id``; the line's url picks what it asks for and its body the request's parameters
(``requests``). A ``task: generate`` job serves ``/v1/chat/completions`` and
``/v1/completions`` lines, a ``task: embed`` job ``/v1/embeddings`` lines (``tasks``); a line
the job cannot serve, or whose body asks for something batchjobs does not implement, is an
error line naming the field. With ``output.format: openai_batch`` the committed shards are
also written as OpenAI batch output files (``files``). ``batchjobs run-batch`` takes the
flags of vLLM's ``run-batch`` and runs a file in one pass per engine kind (``runbatch``).
"""

from __future__ import annotations

# What each endpoint asks for, and the engine call that serves it.
ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/embeddings": "embedding",
}
SERVED_BY = {"chat": "generate", "completion": "generate", "embedding": "embed"}
OUTPUT_DIR = "_openai"  # under the output root: the assembled files (a "_" name: not Parquet)
BATCH_OUTPUT = "batch_output.jsonl"
BATCH_ERRORS = "batch_errors.jsonl"
JOB_STATE = "job.json"  # the job's creation time, which every response carries
