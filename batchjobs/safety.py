"""A job spec is data: nothing in it runs as code, and nothing a job writes leaves its
output root.

- ``load_yaml``: specs and ``--set`` values are read with YAML's safe loader. A tag that
  would build a Python object (``!!python/object/apply:os.system``) or any other unknown
  tag is refused with the file and line; so are more aliases than a spec needs (an alias
  bomb expands to billions of nodes once validated).
- ``check_args`` / ``check_env``: engine arguments and environment variables that make the engine
  or Python import or load code named by a string (``worker_cls``, ``logits_processors``,
  ``LD_PRELOAD``, ``PYTHONPATH``, …) are refused; ``trust_remote_code`` is its own spec key
  (off unless set, and the run summary says when it is on), never an engine argument.
- ``check_roots``: an output root inside the input's root (the next run would read its own
  output) or around it (``--fresh`` would delete the input) is refused before anything
  is read or written.
- ``child``: a path under the output root from names that may come from outside (shard
  ids, manifest records): ``..``, absolute and empty parts are refused.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any

import yaml

from batchjobs.errors import OutputError, SpecError

MAX_ALIASES = 100  # YAML aliases (*name) in one spec

# Engine arguments (at any depth of engine.args) whose value names code to import or load.
CODE_ARGS = frozenset(
    {
        "worker_cls",
        "worker_extension_cls",
        "scheduler_cls",
        "logits_processors",
        "model_class_overrides",
        "io_processor_plugin",
        "reasoning_parser_plugin",
        "tool_parser_plugin",
        "kv_transfer_config",
        "ec_transfer_config",
        "kv_connector_module_path",
        "ec_connector_module_path",
        "module_path",
        "logging_config",
        "inductor_passes",
        "trust_remote_code",  # engine.trust_remote_code, which the run summary reports
    }
)
# Environment variables that make Python or the dynamic linker run code from a path.
CODE_ENV = frozenset(
    {
        "LD_PRELOAD",
        "LD_AUDIT",
        "DYLD_INSERT_LIBRARIES",
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONSTARTUP",
        "PYTHONBREAKPOINT",
        "PYTHONUSERBASE",
        "PYTHONINSPECT",
        "PYTHONWARNINGS",
        "VLLM_LOGGING_CONFIG_PATH",
    }
)
# "package.module:attribute", the form in which engines take a class or function by name.
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_][\w.]*$")


# ------------------------------------------------------------------ YAML


class _SpecLoader(yaml.SafeLoader):
    """YAML's safe loader, counting aliases."""

    aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"more than {MAX_ALIASES} aliases (*name): a spec needs far fewer",
                    self.peek_event().start_mark,
                )
        return super().compose_node(parent, index)


def load_yaml(text: str, source: str, lines: bool = True) -> Any:
    """The data of a YAML document; ``SpecError`` naming ``source`` (and with ``lines`` the
    line) for a tag that would build an object, too many aliases, or invalid YAML."""
    try:
        return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a safe loader (SafeLoader)
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark if lines else None
        tag = _tag_of(exc.problem or "")
        where = f"{source} line {mark.line + 1}" if mark else source
        raise SpecError(
            f"{where}: the YAML tag {tag} is refused: a job spec is data (mappings, lists, "
            "strings, numbers, booleans), and nothing in it is run or imported; remove the tag"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) if lines else None
        problem = getattr(exc, "problem", None) or str(exc)
        at = f"line {mark.line + 1}: " if mark else ""
        raise SpecError(f"{source} is not valid YAML: {at}{problem}") from None


def _tag_of(problem: str) -> str:
    found = re.search(r"tag '([^']*)'", problem)
    tag = found.group(1) if found else "?"
    return "!!" + tag[len("tag:yaml.org,2002:") :] if tag.startswith("tag:yaml.org,2002:") else tag


# ------------------------------------------------------------------ code named by a string


def check_args(args: dict[str, Any]) -> dict[str, Any]:
    """Raise ``ValueError`` for an engine or sampling argument (``engine.args``,
    ``sampling.args``) that makes the engine import or load code named by a string; a spec
    validator makes it the key's error. Returns ``args``."""
    _walk(args, "")
    return args


def check_env(env: dict[str, str]) -> dict[str, str]:
    """Raise ``ValueError`` for an environment variable of the engines (``engine.env``) that
    makes Python or the dynamic linker load code from a path. Returns ``env``."""
    for name in env:
        if name.upper() in CODE_ENV:
            raise ValueError(
                f"{name} is refused: it makes the engine's processes load code from a path, "
                "and a job spec cannot run code; install what you need in the engine's "
                "environment instead"
            )
    return env


def _walk(value: Any, key: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            name = str(k)
            sub = f"{key}.{name}".lstrip(".")
            if name in CODE_ARGS:
                hint = (
                    "set engine.trust_remote_code instead"
                    if name == "trust_remote_code"
                    else "a job spec cannot run code"
                )
                raise ValueError(f"{sub} is refused: it names code for the engine to load; {hint}")
            if name.endswith("backend") and isinstance(v, str) and "." in v:
                # a built-in backend has a plain name ("mp", "inductor", "FLASH_ATTN");
                # a dotted one is a class for the engine to import
                raise ValueError(
                    f"{sub} {v!r} is refused: a dotted name is a class to import, and a job "
                    "spec cannot run code; use one of the engine's built-in backends"
                )
            _walk(v, sub)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _walk(v, f"{key}[{i}]")
    elif isinstance(value, str) and _IMPORT_PATH.match(value.strip()):
        raise ValueError(
            f"{key} {value!r} is refused: it names code to import (module:attribute), and "
            "a job spec cannot run code"
        )


# ------------------------------------------------------------------ input and output roots


def input_root(path: str) -> str:
    """The part of ``input.path`` that holds every shard: the directory or file, or for a
    glob the directory before its first wildcard."""
    cut = min((path.find(c) for c in "*?[" if c in path), default=-1)
    if cut < 0:
        return path
    head = path[:cut]
    return head.rpartition("/")[0] or ("/" if head.startswith("/") else ".")


def check_roots(spec: Any) -> None:
    """Refuse an output root inside the input's root, or the input inside the output root
    (``SpecError``); where they are on different filesystems there is nothing to check."""
    inp = _place(input_root(spec.input.path), spec.input.storage_options)
    out = _place(spec.output.path, spec.output.storage_options)
    if inp is None or out is None or inp[0] != out[0]:
        return
    if _within(out[1], inp[1]):
        raise SpecError(
            f"output.path {spec.output.path!r} is inside the input ({inp[2]}): a rerun "
            "would read the job's own output as input; put the output root elsewhere"
        )
    if _within(inp[1], out[1]):
        raise SpecError(
            f"input.path {spec.input.path!r} is inside output.path {spec.output.path!r}: "
            "--fresh or output.mode: overwrite would delete the input; put the output root "
            "elsewhere"
        )


def _place(url: str, storage_options: dict | None) -> tuple[str, str, str] | None:
    """(filesystem, normalised absolute path, as shown) of a location, or None where it
    cannot be told without reaching it."""
    import os

    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except Exception:  # noqa: BLE001 - an unknown scheme, a missing package: not ours to judge
        return None
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if proto in ("file", "local"):
        real = os.path.realpath(path)  # symbolic links resolved: two names of one folder
        return "file", real, real
    return proto, posixpath.normpath("/" + path.strip("/")), f"{proto}://{path}"


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


# ------------------------------------------------------------------ names under the output root


def child(root: str, *parts: str) -> str:
    """``root/part/...``; ``OutputError`` for a part that would leave ``root`` (``..``, an
    absolute path, an empty name), such as a damaged manifest's shard id."""
    for part in parts:
        pieces = str(part).split("/")
        if not part or part.startswith("/") or any(p in ("..", "") for p in pieces):
            raise OutputError(
                f"refusing the name {part!r} under the output root {root!r}: it would leave it"
            )
    return posixpath.join(root, *parts)
