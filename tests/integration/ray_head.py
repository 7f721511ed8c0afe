"""A real Ray head for tests of job submission: ``ray start --head --block`` with the
dashboard's job API on 127.0.0.1, token authentication, free ports and its own temp dir, so
it never meets another test's or another engineer's Ray on this machine. ``stop`` ends every
process it started (only those), whatever state the test left it in.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    def __init__(self) -> None:
        # Short: Ray's unix sockets live under the temp dir (108-character limit).
        self.tmp = Path(tempfile.mkdtemp(prefix="bjh-", dir="/tmp"))
        self.token = secrets.token_hex(32)
        self.token_file = self.tmp / "token"
        self.token_file.write_text(self.token)
        self.port = free_port()
        self.address = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = self.tmp / "head.log"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a client (and of the head): the venv's commands on the PATH
        as after `source .venv/bin/activate`, the head's token in RAY_AUTH_TOKEN_PATH."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(
            PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token_file),
            RAY_USAGE_STATS_ENABLED="0",
            VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        )
        env.update(extra)
        return env

    def start(self) -> RayHead:
        cmd = [
            str(VENV_BIN / "ray"), "start", "--head", "--block",
            "--node-ip-address", "127.0.0.1",
            "--port", str(free_port()),
            "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(self.port),
            "--dashboard-agent-listen-port", str(free_port()),
            "--ray-client-server-port", str(free_port()),
            "--num-cpus", "8",  # logical CPUs, as batchjobs' own local cluster has
            "--temp-dir", str(self.tmp / "ray"),
            "--disable-usage-stats",
        ]  # fmt: skip
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        headers = {"Authorization": f"Bearer {self.token}"}
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}:\n{self.tail()}")
            try:
                r = requests.get(f"{self.address}/api/jobs/", headers=headers, timeout=5)
                if r.status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(
            f"the head's job API did not come up in {START_TIMEOUT_S}s:\n{self.tail()}"
        )

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _ours(self) -> list[psutil.Process]:
        """Every process of this head: the `ray start` process, its descendants, and any
        process whose command line names this head's temp dir (workers re-parented)."""
        found: dict[int, psutil.Process] = {}
        if self.proc is not None:
            try:
                root = psutil.Process(self.proc.pid)
                found[root.pid] = root
                found.update({p.pid: p for p in root.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
        marker = str(self.tmp)
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(marker in part for part in p.info["cmdline"] or []):
                    found[p.pid] = p
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        found.pop(os.getpid(), None)
        return list(found.values())

    def stop(self) -> None:
        """End the head: SIGINT to `ray start` (it shuts its processes down), then SIGKILL
        to whatever of ours is left after 30 s."""
        procs = self._ours()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
        _, alive = psutil.wait_procs(procs, timeout=5)
        for p in alive + self._ours():
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(self._ours(), timeout=10)
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.contextmanager
def running_head() -> Iterator[RayHead]:
    """A started head, stopped on leaving (also when it failed to start)."""
    head = RayHead()
    try:
        yield head.start()
    finally:
        head.stop()
