"""The warm engine start's process rules, with real processes and no vLLM.

An owner process (standing in for the engine actor) starts children through WarmContext,
the context vLLM is handed. The children must see the owner's environment as it was when
the context was made (not the fork server's), and must not outlive the owner: when the
actor dies, an orphaned engine core would keep its GPU.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

OWNER = textwrap.dedent(
    """
    import os, subprocess, sys, time
    from batchjobs.engines.warmstart import WarmContext

    if __name__ == "__main__":
        out = sys.argv[1]
        os.environ["WARM_TEST_VAR"] = "set-before-the-context"
        ctx = WarmContext(dict(os.environ))
        os.environ["WARM_TEST_VAR"] = "set-after-the-context"
        env = ctx.Process(target=subprocess.call,
                          args=(["sh", "-c", f'echo "$WARM_TEST_VAR" > {out}/env'],))
        env.start(); env.join()
        sleeper = ctx.Process(target=time.sleep, args=(600,))
        sleeper.start()
        with open(f"{out}/pids", "w") as f:
            f.write(f"{os.getpid()} {sleeper.pid} {os.getppid()}")
        time.sleep(600)
    """
)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] == "Z"  # a zombie has exited
    except FileNotFoundError:
        return True


def _wait(path: Path, timeout: float) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.1)
    raise AssertionError(f"{path} was not written in {timeout}s")


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs os.pidfd_open (Linux)")
def test_children_take_the_owners_environment_and_die_with_it(tmp_path):
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    owner = subprocess.Popen([sys.executable, str(script), str(tmp_path)])
    try:
        pids = _wait(tmp_path / "pids", 30)
        owner_pid, child_pid, _ = map(int, pids.split())
        assert (tmp_path / "env").read_text().strip() == "set-before-the-context"
        assert not _gone(child_pid)
        # The child is the fork server's, not the owner's: killing the owner does not
        # reach it through the process tree.
        with open(f"/proc/{child_pid}/stat") as f:
            assert int(f.read().split(")")[1].split()[1]) != owner_pid
        os.kill(owner_pid, signal.SIGKILL)
        owner.wait(10)
        deadline = time.time() + 15
        while not _gone(child_pid) and time.time() < deadline:
            time.sleep(0.2)
        assert _gone(child_pid), "the warm-started child outlived its owner"
    finally:
        owner.kill()
        if (tmp_path / "pids").exists():
            with contextlib.suppress(ProcessLookupError, ValueError, IndexError):
                os.kill(int((tmp_path / "pids").read_text().split()[1]), signal.SIGKILL)


def test_preload_imports_what_it_can_and_names_what_failed(tmp_path, monkeypatch):
    from batchjobs.engines import preload

    (tmp_path / "pre_core.py").write_text("")
    (tmp_path / "pre_broken.py").write_text("raise RuntimeError('broken at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("pre_core", "pre_broken"):
        monkeypatch.delitem(sys.modules, name, raising=False)

    failed = preload.preload(("pre_missing", "pre_broken", "pre_core"))
    assert failed == ["pre_missing", "pre_broken"]
    assert "pre_core" in sys.modules


def test_preload_defaults_to_vllms_engine_core(monkeypatch):
    from batchjobs import compat
    from batchjobs.engines import preload

    asked = []
    monkeypatch.setattr(preload, "_try_import", lambda name: asked.append(name) or True)
    assert preload.preload() == []
    assert asked == list(compat.vllm_engine_core_modules()) == ["vllm.v1.engine.core"]


def test_the_fork_server_is_told_to_run_the_preload():
    import importlib.util

    from batchjobs.engines import warmstart

    # Not imported here: importing it runs the preload (vLLM's engine core).
    (name,) = warmstart.PRELOAD
    assert importlib.util.find_spec(name) is not None
    assert "preload()" in Path(importlib.util.find_spec(name).origin).read_text()


def test_setup_hook_env_names_the_early_start_unless_turned_off():
    from ray._common.utils import load_class

    from batchjobs import compat
    from batchjobs.engines import warmstart

    var = compat.ray_setup_hook_env_var()
    env = warmstart.setup_hook_env({}, {})
    assert env == {var: "batchjobs.engines.warmstart.early_start"}
    assert load_class(env[var]) is warmstart.early_start  # what Ray's worker will call
    assert warmstart.setup_hook_env({"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}, {}) == {}
    # A job's own setup hook is left in place, not replaced in the engine actors.
    assert warmstart.setup_hook_env({}, {var: "mypkg.setup"}) == {}


def test_setup_hook_env_is_empty_when_ray_has_no_such_variable(monkeypatch, caplog):
    from batchjobs import compat
    from batchjobs.engines import warmstart

    def gone():
        raise compat.CompatError("batchjobs.compat.ray_setup_hook_env_var: gone")

    monkeypatch.setattr(compat, "ray_setup_hook_env_var", gone)
    assert warmstart.setup_hook_env({}, {}) == {}
    assert "ray_setup_hook_env_var: gone" in caplog.text


def test_engine_core_start_falls_back_to_vllms_own_start(monkeypatch, caplog):
    from batchjobs import compat
    from batchjobs.engines import warmstart

    def gone(choose):
        raise compat.CompatError("batchjobs.compat.vllm_engine_core_context: gone")

    monkeypatch.setattr(compat, "vllm_engine_core_context", gone)
    ran = []
    with warmstart.engine_core_start(True):
        ran.append(True)
    assert ran == [True] and "vllm_engine_core_context: gone" in caplog.text


def test_early_start_never_raises(monkeypatch, caplog):
    from batchjobs.engines import warmstart

    def boom():
        raise OSError("no fork server here")

    monkeypatch.setattr(warmstart, "prestart", boom)
    warmstart.early_start()
    assert "early warm start failed" in caplog.text
