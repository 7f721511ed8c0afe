"""What the user reads while a job runs: others' output routed to a cleaned, rotated log
file, real errors shown once, batchjobs' own warnings on the terminal."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

from batchjobs.layout import LOGS, RUNS
from batchjobs.logs import LogFile, OutputRouter, clean, is_error, redact, secrets_of
from batchjobs.sink import OutputRoot

CORE_WORKER = (
    "[2026-12-06 11:41:16,808 E 28798 28798] core_worker.cc:2465: Actor with class name: "
    "'MapWorker(MapBatches(EngineStage))' and ID: '9466b3' has constructor arguments in the "
    "object store and max_restarts > 0. If the arguments in the object store go out of scope"
)


def test_clean_removes_colours_and_keeps_a_bar_at_its_last_state():
    raw = "\x1b[36m(MapWorker(MapBatches(EngineStage)) pid=1)\x1b[0m Loading:   0% | 0/1\rLoading: 100% | 1/1\r"
    assert clean(raw) == "(MapWorker(MapBatches(EngineStage)) pid=1) Loading: 100% | 1/1"
    assert clean("\x1b[36m(MapWorker(MapBatches(EngineStage)) pid=1)\x1b[0m \r") == ""
    assert clean("plain\rbar 100%") == "bar 100%"
    assert clean("\x1b[1;31mERROR\x1b[0m boom\x07") == "ERROR boom"


def test_errors_are_told_apart_from_noise():
    assert is_error("2026-12-06 11:41:16,813\tERROR worker.py:28 -- the engine died")
    assert is_error("(MapWorker pid=3) ERROR 12-06 11:43:34 [core.py:1] EngineCore failed")
    assert is_error("[2026-12-06 11:41:16,808 E 1 1] raylet.cc:1: lost the node")
    assert is_error("(raylet) A worker died or was killed while executing a task")
    assert not is_error(CORE_WORKER)  # error level, but no failure (README says so)
    for noise in (
        "Triton is installed, but doesn't include CPU backend. Disabling Triton.",
        "dispatcher.py:138: FutureWarning: `torch.distributed.reduce_op` is deprecated",
        "[W1206 11:43:34.876 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy",
        "Loading safetensors checkpoint shards: 100% Completed | 1/1",
        "2026-12-06 11:40:39,538\tWARNING authentication_token_setup.py:85 -- Token auth",
        "2026-12-06 11:41:16,813\tWARNING __init__.py:28 -- Progress bars disabled.",
    ):
        assert not is_error(noise), noise


def test_secrets_are_masked():
    secrets = secrets_of(
        ["sk-live-abcdef", "us"],
        {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG", "HOME": "/root"},
    )
    assert "wJalrXUtnFEMI/K7MDENG" in secrets and "us" not in secrets and "/root" not in secrets
    line = (
        "key sk-live-abcdef id AKIAIOSFODNN7EXAMPLE secret wJalrXUtnFEMI/K7MDENG password=hunter22"
    )
    masked = redact(line, secrets)
    for s in ("sk-live-abcdef", "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG", "hunter22"):
        assert s not in masked
    assert masked.count("***") == 4


def test_log_file_rotates(tmp_path):
    log = LogFile(tmp_path / "run-1.log", rotate_bytes=200, backups=2)
    for i in range(40):
        log.write(f"line {i:03d} " + "x" * 20)
    log.close()
    names = sorted(p.name for p in log.files())
    assert names == ["run-1.log", "run-1.log.1", "run-1.log.2"]
    assert all(p.stat().st_size <= 200 for p in log.files())
    assert "line 039" in (tmp_path / "run-1.log").read_text()


def test_router_in_a_real_process(tmp_path):
    """Descriptors 1 and 2 routed in a child process: Python prints, C-level writes, a
    subprocess and a warning go to the file; batchjobs' lines and real errors to the
    terminal; the log lands in the output root."""
    out = tmp_path / "out"
    out.mkdir()
    (out / RUNS).write_text("{}\n")  # a root this run has recorded itself in
    script = textwrap.dedent(
        f"""
        import logging, os, subprocess, sys, warnings
        from batchjobs.logs import routed
        from batchjobs.sink import OutputRoot
        with routed(["s3cr3t-value"]) as router:
            print("\\x1b[36m(MapWorker pid=1)\\x1b[0m Triton is installed, but no CPU backend")
            os.write(2, b"{CORE_WORKER}\\n")
            subprocess.run(["echo", "from a child process, key s3cr3t-value"])
            warnings.warn("a FutureWarning nobody needs", FutureWarning)
            print("2026-12-06 11:41:16,813\\tERROR worker.py:28 -- the engine died", file=sys.stderr)
            logging.getLogger("batchjobs").warning("disk almost full")
            print("batchjobs' own line", file=router.term_err)
        router.sync(OutputRoot({str(out)!r}), force=True)
        router.discard_local()
        print("after: stdout is the terminal again")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    shown = proc.stdout + proc.stderr
    assert "batchjobs' own line" in proc.stderr
    assert "warning: disk almost full" in proc.stderr
    assert "the engine died" in proc.stderr  # a real error is shown, with where the log is
    assert "after: stdout is the terminal again" in proc.stdout
    for noise in ("Triton", "core_worker", "child process", "FutureWarning", "\x1b["):
        assert noise not in shown, noise
    logs = list((out / LOGS).iterdir())
    assert len(logs) == 1 and logs[0].name.startswith("run-")
    text = logs[0].read_text()
    for kept in (
        "Triton is installed",
        "core_worker.cc",
        "from a child process",
        "FutureWarning",
        "the engine died",
        "disk almost full",
    ):
        assert kept in text, kept
    assert "\x1b" not in text and "s3cr3t-value" not in text and "key ***" in text


def test_logs_stay_out_of_a_root_the_run_never_recorded_itself_in(tmp_path):
    """Before the run record exists, the root may still be refused (mode: error) or wiped."""
    router = OutputRouter([], folder=tmp_path / "local")
    router.log.write("x")
    assert not router.sync(OutputRoot(str(tmp_path / "out")), force=True)
    assert not (tmp_path / "out").exists()
    router.stop()


def test_batchjobs_warnings_are_shown_and_the_logger_restored_after_the_run(tmp_path):
    from batchjobs.logs import routed

    logger = logging.getLogger("batchjobs")
    before = (logger.propagate, logger.level, list(logger.handlers))
    shown = []
    with routed(["s3cr3t-value"], folder=tmp_path) as router:
        router.show = shown.append
        logger.info("not shown without verbose")
        logger.warning("cannot reach s3cr3t-value")
    assert shown == ["warning: cannot reach ***"]
    assert (logger.propagate, logger.level, list(logger.handlers)) == before
