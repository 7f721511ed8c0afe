"""What ``batchjobs submit`` uploads: the working directory as Ray's job API ships it, plus
the local files the job needs that git ignores (a model directory built into ``models/``).

``ray job submit --working-dir .`` leaves out everything .gitignore lists. A spec whose
``engine.model`` is a git-ignored local directory would then start on the cluster without
its model. Here git itself says what it ignores (``git ls-files --ignored``); those paths
are excluded as Ray would exclude them, except the model, tokenizer and input paths the
spec names, which go along when they are small enough (``limit_mb``). A larger one must be
put where the nodes can read it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchjobs.errors import SpecError
from batchjobs.ops import checks
from batchjobs.spec import JobSpec

DEFAULT_LIMIT_MB = 256  # Ray refuses a package over 512 MiB and warns from 256 MiB
IGNORE_GITIGNORE = "RAY_RUNTIME_ENV_IGNORE_GITIGNORE"


@dataclass
class Shipment:
    working_dir: Path
    spec_rel: str  # the spec's path inside the working directory, as the driver sees it
    excludes: list[str] = field(default_factory=list)
    shipped: list[tuple[str, int]] = field(default_factory=list)  # (path, bytes) git ignores
    git: bool = True  # False: not a git work tree, Ray's own .gitignore handling applies

    def runtime_env(self) -> dict[str, Any]:
        return {
            "working_dir": str(self.working_dir),
            "excludes": list(self.excludes),
            "env_vars": {
                checks.SUBMIT_HOST: socket.gethostname(),
                checks.SUBMIT_DIR: str(self.working_dir),
                checks.SUBMIT_SPEC: self.spec_rel,
                checks.SUBMIT_SPEC_SHA: checks.spec_sha256(self.working_dir / self.spec_rel),
            },
        }

    @contextmanager
    def upload_context(self) -> Iterator[None]:
        """Ray's client reads .gitignore files itself unless told not to; our excludes
        already hold what git ignores, less what ships."""
        if not self.git:
            yield
            return
        old = os.environ.get(IGNORE_GITIGNORE)
        os.environ[IGNORE_GITIGNORE] = "1"
        try:
            yield
        finally:
            if old is None:
                os.environ.pop(IGNORE_GITIGNORE, None)
            else:
                os.environ[IGNORE_GITIGNORE] = old


def plan(
    job: JobSpec, spec_path: Path, working_dir: Path, limit_mb: float = DEFAULT_LIMIT_MB
) -> Shipment:
    """Decide what to upload for ``job`` read from ``spec_path``; raise ``SpecError`` when
    the spec is outside the working directory or a git-ignored path is too large."""
    wd = working_dir.resolve()
    try:
        spec_rel = spec_path.resolve().relative_to(wd).as_posix()
    except ValueError:
        raise SpecError(
            f"the spec {spec_path} is outside the working directory {wd}, which is what the "
            "job gets: move it there or pass --working-dir"
        ) from None
    ignored = git_ignored(wd)
    if ignored is None:
        return Shipment(wd, spec_rel, excludes=["/.git"], git=False)
    wanted = []
    for key, value in [*checks.model_paths(job), ("input.path", _input_base(job.input.path))]:
        if not value or checks.is_url(value) or Path(value).expanduser().is_absolute():
            continue
        rel = Path(os.path.normpath(value)).as_posix()
        if rel.startswith("..") or not (wd / rel).exists():
            continue
        if any(_under(rel, e) for e in ignored):
            wanted.append((key, value, rel))
    shipped = []
    total = 0
    for key, value, rel in wanted:
        size = _size(wd / rel)
        total += size
        if total > limit_mb * 2**20:
            raise SpecError(
                f"{key} {value!r} is git-ignored and {size / 2**20:.0f} MiB: more than "
                f"batchjobs submit ships with the working directory ({limit_mb:.0f} MiB). Put "
                f"it where every node can read it and --set {key}=/path/on/nodes (or a URL)"
            )
        shipped.append((rel, size))
    excludes = ["/.git"]
    for entry in ignored:
        excludes += _excludes_for(wd, entry, [rel for rel, _ in shipped])
    return Shipment(wd, spec_rel, sorted(set(excludes)), shipped)


def git_ignored(wd: Path) -> list[str] | None:
    """What git ignores under ``wd`` (directories collapsed, relative, no trailing ``/``),
    or None where ``wd`` is not in a git work tree or git is not installed."""
    if shutil.which("git") is None:
        return None
    proc = subprocess.run(
        [
            "git",
            "-C",
            str(wd),
            "ls-files",
            "--others",
            "--ignored",
            "--exclude-standard",
            "--directory",
            "-z",
        ],
        capture_output=True,
        timeout=60,
    )
    if proc.returncode != 0:
        return None
    return [p.rstrip("/") for p in proc.stdout.decode().split("\0") if p.strip("/")]


def _input_base(value: str) -> str:
    return checks._glob_base(value)


def _under(rel: str, entry: str) -> bool:
    """Whether ``rel`` is ``entry`` or inside it."""
    return rel == entry or rel.startswith(entry + "/")


def _excludes_for(wd: Path, entry: str, shipped: list[str]) -> list[str]:
    """Anchored exclude patterns for the ignored ``entry``, leaving out ``shipped`` paths:
    a directory on the way to a shipped path is opened and its other children excluded."""
    if any(s == entry or entry.startswith(s + "/") for s in shipped):
        return []  # the entry is (inside) a shipped path
    if not any(s.startswith(entry + "/") for s in shipped):
        return ["/" + _escape(entry)]
    out = []
    for child in sorted((wd / entry).iterdir()):
        out += _excludes_for(wd, f"{entry}/{child.name}", shipped)
    return out


def _escape(path: str) -> str:
    return "".join("\\" + c if c in "\\*?[]!# " else c for c in path)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
