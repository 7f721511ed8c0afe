"""What a CLI run printed, for tests of `batchjobs` commands run through click's CliRunner.

Importable from both test folders: pytest puts tests/ on sys.path for tests/conftest.py.
"""

from __future__ import annotations


def cli_text(result) -> str:
    """stdout and stderr together, whether or not this click version mixes them."""
    out = result.output or ""
    try:
        err = result.stderr or ""
    except ValueError:  # older click: stderr not captured separately (already in output)
        err = ""
    return out if err and err in out else out + err
