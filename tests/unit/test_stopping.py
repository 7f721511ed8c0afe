"""Stopping a run on SIGTERM / SIGINT (``batchjobs.stopping``): the signal's exception and
exit code, a commit never cut in two, Ray's own SIGTERM handler replaced, the run recorded
before the engines are stopped, and the bounded exit. Signals are sent to this process (the
handlers live in the main thread) or, for the exits, to a child process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from batchjobs import pipeline, stopping
from batchjobs.layout import RUNS
from batchjobs.spec import parse_spec

REPO = Path(__file__).resolve().parents[2]


def _signal_self(signum: int) -> None:
    os.kill(os.getpid(), signum)  # the handler runs in this (the main) thread, at once


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_run_with_its_exit_code_and_handlers_are_restored(signum, code):
    said: list[str] = []
    before = signal.getsignal(signum)
    with pytest.raises(stopping.Stopped) as stop, stopping.handling(5.0, said.append):
        _signal_self(signum)
    assert stop.value.exit_code == code and stop.value.signum == signum
    assert str(stop.value).startswith(f"stopped by {signal.Signals(signum).name}:")
    assert "exiting within 5s" in said[0] and "committed shards are kept" in said[0]
    assert signal.getsignal(signum) is before
    assert not stopping.requested()  # the next run starts afresh


def test_a_stop_inside_a_commit_takes_effect_when_the_commit_is_done():
    steps = []
    with pytest.raises(stopping.Stopped), stopping.handling(5.0, lambda line: None):
        with stopping.critical():
            _signal_self(signal.SIGTERM)
            steps.append("renamed")  # the commit goes on after the signal ...
            with stopping.critical():  # ... nested sections too
                steps.append("recorded")
            assert stopping.requested()
        steps.append("after")  # never reached: the stop is raised as the section ends
    assert steps == ["renamed", "recorded"]


def test_a_failure_inside_a_commit_is_not_replaced_by_a_pending_stop():
    with (
        pytest.raises(OSError, match="disk full"),
        stopping.handling(5.0, lambda line: None),
        stopping.critical(),
    ):
        _signal_self(signal.SIGTERM)
        raise OSError("disk full")


def test_rearm_puts_the_handler_back_after_ray_init_replaced_it():
    def rays(signum, frame):  # what ray.init installs: sys.exit(signum)
        sys.exit(signum)

    with pytest.raises(stopping.Stopped), stopping.handling(5.0, lambda line: None):
        signal.signal(signal.SIGTERM, rays)
        stopping.rearm()
        _signal_self(signal.SIGTERM)


def test_classify_reads_rays_exceptions_as_the_stop_they_are():
    # Ray re-raises a plain KeyboardInterrupt from a blocking call; its SIGTERM handler
    # (in place while ray.init runs) raises SystemExit(15).
    assert stopping.classify(KeyboardInterrupt()).exit_code == 130
    assert stopping.classify(SystemExit(signal.SIGTERM)).exit_code == 143
    other = SystemExit(2)
    assert stopping.classify(other) is other
    err = ValueError("x")
    assert stopping.classify(err) is err
    with pytest.raises(stopping.Stopped), stopping.handling(5.0, lambda line: None):
        _signal_self(signal.SIGTERM)
    with stopping.handling(5.0, lambda line: None):
        with pytest.raises(stopping.Stopped):
            _signal_self(signal.SIGTERM)
        # after a SIGTERM, Ray's KeyboardInterrupt is that SIGTERM's stop
        assert stopping.classify(KeyboardInterrupt()).exit_code == 143
        assert 0 < stopping.remaining(60.0) <= 3.0  # 5 s of grace less 2 to exit cleanly
    assert stopping.remaining(60.0) == 60.0  # no stop: the caller's own limit


_CHILD = textwrap.dedent(
    """
    import sys, time
    from batchjobs import stopping
    with stopping.handling(float(sys.argv[1])):
        with stopping.critical():  # stuck where a stop cannot cut it
            print("ready", flush=True)
            time.sleep(600)
    """
)


@pytest.mark.parametrize("second", [False, True], ids=["grace-runs-out", "second-signal"])
def test_the_exit_is_bounded_by_the_grace_or_a_second_signal(second):
    grace = 600.0 if second else 1.0
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(grace)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    first = ""
    if second:
        first = proc.stderr.readline()  # the first stop's line: its handler has run
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = first + err
    assert proc.returncode == 143  # the first signal's code
    assert "stopping on SIGTERM" in err
    if second:
        assert "SIGINT again: exiting now" in err
    else:
        assert "the stop took longer than 1s; exiting now" in err


@pytest.fixture
def two_shards(spec_dict, tmp_path):
    (tmp_path / "in").mkdir()
    for name in ("a", "b"):
        (tmp_path / "in" / f"{name}.jsonl").write_text('{"prompt": "hi"}\n')
    return parse_spec(spec_dict)


def test_a_stopped_run_is_recorded_before_its_engines_are_stopped(
    two_shards, monkeypatch, tmp_path
):
    runs = tmp_path / "out" / RUNS
    events = []
    for name in ("connect_ray", "check_resources", "start_board"):
        monkeypatch.setattr(pipeline, name, lambda *a, **k: None)
    monkeypatch.setattr(pipeline, "resolve_device", lambda spec: "cuda")
    monkeypatch.setattr(pipeline, "start_replicas", lambda *a, **k: "replicas")

    def stop_replicas(replicas, timeout_s):
        events.append(("stop", replicas, runs.exists()))

    def execute(*args, **kwargs):
        raise KeyboardInterrupt  # as Ray raises it after our handler's Stopped

    monkeypatch.setattr(pipeline, "stop_replicas", stop_replicas)
    monkeypatch.setattr(pipeline, "_execute", execute)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(two_shards)
    assert events == [("stop", "replicas", True)]  # once, and after the record was written
    [rec] = [json.loads(line) for line in runs.read_text().splitlines()]
    assert (rec["status"], rec["exit_code"]) == ("stopped", 130)
    assert rec["reason"].startswith("stopped by SIGINT")
