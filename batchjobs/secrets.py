"""Credentials: where a job's come from, and keeping them out of everything batchjobs writes.

A job's credentials are the values of its storage options (``input.storage_options``,
``output.storage_options``), of its engine environment (``engine.env``, and a pilot
candidate's ``env``), the key and secret of an ``s3://KEY:SECRET@bucket/...`` URL, the
values of environment variables whose names say they hold one (``AWS_SECRET_ACCESS_KEY``,
``HF_TOKEN``, ``RAY_AUTH_TOKEN``...), and the Ray head's token wherever Ray keeps it.

* ``lift_url_credentials`` moves the key and secret of an ``s3://`` URL into the storage
  options (s3fs's ``key`` and ``secret``), so the URL that is listed, logged and recorded
  (shard sources, manifest, run records, error messages) never carries them. A URL of any
  other scheme with a password in it is refused: fsspec would keep it in every path.
* ``credential_env`` picks the ``engine.env`` variables named like credentials: the engine
  replica sets those in its own process instead of passing them through Ray's runtime
  environment, which Ray writes to its session logs (``runtime_env_agent.log``).
* ``redact`` masks a job's credentials in any text, and anything shaped like one
  (AWS access key ids, ``Authorization:`` headers, ``token=...``, ``scheme://user:pass@``).
  Every writer of text that may quote a spec, a URL or the environment goes through it:
  the run's log (``logs.py``), the run record's reason (``layout.exit_status``), the spec
  kept in the run record and the report (``public_spec``), spec errors and the CLI's
  error lines.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote

MASK = "***"
MIN_LEN = 4  # shorter values ("us", "1") would mask ordinary words
MIN_ENV_LEN = 8  # environment values are masked by their variable's name; short ones are flags

# Schemes whose URLs may carry KEY:SECRET (s3fs's key and secret).
S3_SCHEMES = ("s3", "s3a", "s3n")
_S3_CREDS = re.compile(
    r"^(?P<scheme>s3a?|s3n)://(?P<key>[^:/@]+):(?P<secret>.+?)@(?P<rest>[^/@]+(?:/.*)?)$",
    re.IGNORECASE | re.DOTALL,
)
_URL_PASSWORD = re.compile(r"^[a-z][a-z0-9+.\-]*://[^/@\s:]+:[^@\s]*@", re.IGNORECASE)

# Names of environment variables whose values are credentials.
SECRET_NAMES = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
# Credentials by their form: (pattern, what replaces it).
SECRET_PATTERNS = (
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), MASK),  # AWS access key ids
    (re.compile(r"(?i)(authorization:\s*(?:bearer|basic)\s+)\S+"), r"\1" + MASK),
    (
        re.compile(
            r"(?i)\b(secret_access_key|aws_session_token|password|passwd|api_key|token)"
            r"(\s*[=:]\s*)[^\s,;]+"
        ),
        r"\1\2" + MASK,
    ),
    # scheme://user:password@host, also inside longer text
    (
        re.compile(r"(?i)\b([a-z][a-z0-9+.\-]{0,15}://)[^\s/@:'\"]+:[^\s@'\"]+?@"),
        r"\1" + MASK + "@",
    ),
)


# ------------------------------------------------------------------ credentials in URLs


def lift_url_credentials(
    url: str, storage_options: Mapping[str, Any] | None = None, where: str = "path"
) -> tuple[str, dict[str, Any]]:
    """``url`` without credentials, and the storage options with them.

    ``s3://KEY:SECRET@bucket/key`` becomes ``s3://bucket/key`` with ``key`` and ``secret``
    added to the options (percent-escapes decoded: a secret with ``/`` is written ``%2F``).
    Raises ``ValueError`` (naming ``where``, never the values) when the options already hold
    a key or secret, or when a URL of another scheme carries a password."""
    options = dict(storage_options or {})
    if not isinstance(url, str) or "@" not in url or "://" not in url:
        return url, options
    m = _S3_CREDS.match(url)
    if m:
        taken = sorted({"key", "secret"} & set(options))
        if taken:
            raise ValueError(
                f"{where} carries credentials (s3://KEY:SECRET@bucket) and the storage options "
                f"set {', '.join(taken)} too: give them once, in the storage options"
            )
        options["key"] = unquote(m.group("key"))
        options["secret"] = unquote(m.group("secret"))
        return f"{m.group('scheme')}://{m.group('rest')}", options
    if _URL_PASSWORD.match(url):
        scheme = url.split("://", 1)[0]
        raise ValueError(
            f"{where}: a {scheme}:// URL with a password in it would be written wherever the "
            "path is (logs, manifest, records); put the credentials in the storage options "
            "instead (URL credentials are read for s3:// only)"
        )
    return url, options


def lift_section(data: Any, section: str) -> Any:
    """A spec section's raw mapping (``input:`` or ``output:``) with the credentials of its
    ``path`` moved into its ``storage_options`` (for a pydantic ``before`` validator)."""
    if not isinstance(data, Mapping) or not isinstance(data.get("path"), str):
        return data
    options = data.get("storage_options")
    if options is not None and not isinstance(options, Mapping):
        return data  # the model reports the wrong type
    path, lifted = lift_url_credentials(data["path"], options, where=f"{section}.path")
    if path == data["path"]:
        return data
    return {**data, "path": path, "storage_options": lifted}


# ------------------------------------------------------------------ which strings to mask


def credential_env(env: Mapping[str, str]) -> dict[str, str]:
    """The variables of an environment mapping whose names say they hold a credential
    (``SECRET_NAMES``: ``HF_TOKEN``, ``WANDB_API_KEY``, ``AWS_SECRET_ACCESS_KEY``...)."""
    return {k: v for k, v in env.items() if SECRET_NAMES.search(k)}


def secret_values(*mappings: Mapping[str, Any] | None) -> list[str]:
    """Every string value (nested too) of storage options or an env mapping."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, Mapping):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    for m in mappings:
        walk(m or {})
    return found


def secrets_of(values: Iterable[str], environ: Mapping[str, str] | None = None) -> list[str]:
    """The strings to mask, longest first: ``values`` (a job's storage options and engine
    env), the values of environment variables whose names say they hold a credential, and
    the Ray head's token from ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``."""
    env = os.environ if environ is None else environ
    found = {v for v in values if isinstance(v, str) and len(v) >= MIN_LEN}
    found |= {v for k, v in env.items() if SECRET_NAMES.search(k) and len(v) >= MIN_ENV_LEN}
    if environ is None:
        found |= _ray_token()
    return sorted(found, key=len, reverse=True)


def spec_secrets(spec: Any) -> list[str]:
    """The strings to mask for a validated ``JobSpec`` (see ``secrets_of``)."""
    envs = [spec.engine.env]
    if spec.pilot is not None:
        envs += [c.env for c in spec.pilot.candidates]
    return secrets_of(secret_values(spec.input.storage_options, spec.output.storage_options, *envs))


def raw_spec_secrets(raw: Any) -> list[str]:
    """The same for a spec that may not validate (a YAML mapping as written): the values
    under every ``storage_options`` and ``env`` key, and the credentials in every URL."""
    values: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                if k in ("storage_options", "env"):
                    values.extend(_leaves(v))  # a number too: an error would quote it
                else:
                    walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)
        elif isinstance(node, str):
            m = _S3_CREDS.match(node)
            if m:
                values.extend([m.group("key"), m.group("secret"), unquote(m.group("secret"))])

    walk(raw)
    return secrets_of(values)


def _leaves(node: Any) -> list[str]:
    """Every scalar under ``node`` (strings and numbers, not booleans) as text."""
    if isinstance(node, Mapping):
        return [leaf for v in node.values() for leaf in _leaves(v)]
    if isinstance(node, (list, tuple)):
        return [leaf for v in node for leaf in _leaves(v)]
    if isinstance(node, (str, int, float)) and not isinstance(node, bool):
        return [str(node)]
    return []


def _ray_token() -> set[str]:
    """The Ray head's token where Ray keeps it (``ops.auth``), if any."""
    from batchjobs.ops.auth import find_token

    try:
        token = find_token().token
    except Exception:  # noqa: BLE001 - a token we cannot read cannot leak either
        return set()
    return {token.value} if token is not None and len(token.value) >= MIN_LEN else set()


# ------------------------------------------------------------------ masking


def redact(text: str, secrets: Iterable[str], shapes: bool = True) -> str:
    """``text`` with every one of ``secrets`` masked (also as JSON escapes them), and with
    ``shapes`` anything shaped like a credential too."""
    for secret in sorted((s for s in secrets if len(s) >= MIN_LEN), key=len, reverse=True):
        text = text.replace(secret, MASK)
        quoted = json.dumps(secret)[1:-1]  # as it appears inside JSON text
        if quoted != secret:
            text = text.replace(quoted, MASK)
    if not shapes:
        return text
    for pattern, replacement in SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def public_spec(spec: Any) -> dict[str, Any]:
    """The spec as run records and reports keep it: storage options and engine env hidden
    (``JobSpec.redacted``), and their values masked wherever else they appear."""
    text = json.dumps(spec.redacted(), default=str)
    # Values only: a pattern could cut through the JSON's quotes.
    return json.loads(redact(text, spec_secrets(spec), shapes=False))
