"""The Ray head's token: where a client finds it, and one-line errors that say where it looked.

Ray 2.60 heads use token authentication: every request to the job API carries
``Authorization: Bearer <token>``. The token comes, in this order, from an explicit value
(an Airflow connection's password), ``RAY_AUTH_TOKEN``, the file in ``RAY_AUTH_TOKEN_PATH``,
or ``~/.ray/auth_token`` (Ray's own order after the explicit one). The token itself never
appears in a message, a log line, XCom or a record: only where it came from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from batchjobs.errors import BatchJobError

TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"


class ClusterError(BatchJobError):
    """The Ray head cannot be reached, refuses the token, or refuses a request (exit 1)."""

    exit_code = 1


@dataclass(frozen=True)
class Token:
    """A token and where it came from. ``repr`` and ``str`` never show the value."""

    value: str = field(repr=False)
    source: str

    def __str__(self) -> str:
        return f"<token from {self.source}>"

    def header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.value}"}


@dataclass(frozen=True)
class Lookup:
    """The result of looking for a token: the token (or None) and every place looked at."""

    token: Token | None
    looked: tuple[str, ...]

    def places(self) -> str:
        return "; ".join(self.looked)


def default_token_file() -> Path:
    return Path.home() / ".ray" / "auth_token"


def find_token(explicit: str | None = None, explicit_source: str | None = None) -> Lookup:
    """The first token found, in Ray's order after an explicit one, and where it looked.

    ``explicit_source`` names where ``explicit`` came from ("the Airflow connection
    ray_default's password"); an empty explicit value is noted and the search goes on."""
    looked: list[str] = []
    if explicit is not None or explicit_source is not None:
        explicit_source = explicit_source or "the token given"
        if explicit and explicit.strip():
            return Lookup(Token(explicit.strip(), explicit_source), (explicit_source,))
        looked.append(f"{explicit_source} (empty)")
    env = os.environ.get(TOKEN_ENV)
    if env and env.strip():
        return Lookup(Token(env.strip(), TOKEN_ENV), (*looked, TOKEN_ENV))
    looked.append(f"{TOKEN_ENV} (unset)")
    path_env = os.environ.get(TOKEN_PATH_ENV)
    if path_env:
        found = _read(Path(path_env).expanduser())
        where = f"{TOKEN_PATH_ENV}={path_env}"
        if found:
            return Lookup(Token(found, where), (*looked, where))
        looked.append(f"{where} (missing or empty)")
    else:
        looked.append(f"{TOKEN_PATH_ENV} (unset)")
    default = default_token_file()
    found = _read(default)
    if found:
        return Lookup(Token(found, str(default)), (*looked, str(default)))
    looked.append(f"{default} (no such file)" if not default.exists() else f"{default} (empty)")
    return Lookup(None, tuple(looked))


def _read(path: Path) -> str | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return text or None


def auth_error(address: str, status: int, lookup: Lookup) -> ClusterError:
    """One line for a 401 (no token sent) or 403 (a token the head refused)."""
    if lookup.token is None or status == 401:
        return ClusterError(
            f"the Ray head at {address} needs a token and none was found: looked in "
            f"{lookup.places()}. Copy the head's token (`ray get-auth-token` on the head) "
            f"into {TOKEN_ENV} or {default_token_file()}"
        )
    return ClusterError(
        f"the Ray head at {address} refused the token from {lookup.token.source} "
        f"(HTTP {status}): looked in {lookup.places()}. Use the head's token "
        "(`ray get-auth-token` on the head)"
    )


def scrub(text: str, lookup: Lookup | None) -> str:
    """``text`` with the token (if any) replaced by ``***``, for anything shown or stored."""
    if lookup is not None and lookup.token is not None and lookup.token.value:
        text = text.replace(lookup.token.value, "***")
    return text
