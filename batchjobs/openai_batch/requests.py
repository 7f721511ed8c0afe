"""One OpenAI Batch request line, checked field by field into what the engine runs.

A line is ``{custom_id, method, url, body}``. ``parse`` returns its endpoint, prompt and
sampling parameters, or raises ``Refusal``: an HTTP status, an error code, a message and
the field (``param``) it is about, as an OpenAI-compatible server answers a request it
refuses. A field batchjobs does not implement is refused by name, never ignored; a field
given as null counts as left out, as OpenAI reads it.

``preflight`` checks whole files before any engine starts: every line a JSON object with a
``custom_id`` string, and no ``custom_id`` twice (OpenAI refuses such files too).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from batchjobs.openai_batch import ENDPOINTS, SERVED_BY
from batchjobs.tasks.base import CHAT_ROLES, NotTextPart, joined_text

# Body fields each endpoint takes; "user" only labels the request (no effect on output).
# fmt: off
FIELDS = {
    "chat": {
        "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
        "seed", "stop", "n", "logprobs", "top_logprobs", "response_format",
        "presence_penalty", "frequency_penalty", "stream", "user",
    },
    "completion": {
        "model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "n",
        "logprobs", "presence_penalty", "frequency_penalty", "echo", "stream", "user",
    },
    "embedding": {"model", "input", "dimensions", "encoding_format", "user"},
}
# fmt: on
COMPLETION_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for /v1/completions
MAX_INPUTS = 2048  # inputs in one /v1/embeddings request, as OpenAI allows


class Refusal(Exception):
    """A request line that cannot run: the HTTP status and error an OpenAI-compatible
    server gives, and the field (``param``) it is about."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "code": self.code, "param": self.param}


def invalid(param: str, message: str) -> Refusal:
    return Refusal(400, "invalid_value", f"{param}: {message}", param)


@dataclass
class Line:
    """A request line as the engine will run it."""

    kind: str  # chat | completion | embedding
    url: str
    model: str | None  # as the body names it (None: left out)
    messages: list[dict[str, Any]] | None = None  # chat
    prompt: str | list[int] | None = None  # completion: text or token ids
    inputs: list[str | list[int]] = field(default_factory=list)  # embedding
    max_tokens: int | None = None  # as asked; None: the default
    params: dict[str, Any] = field(default_factory=dict)  # engine sampling/pooling parameters
    structured: dict[str, Any] | None = None  # response_format as a constraint
    n: int = 1
    logprobs: int | None = None  # top alternatives per token asked for; None: no logprobs
    encoding: str = "float"  # embedding: float | base64


def parse(values: dict[str, Any], call: str, names: set[str]) -> Line:
    """A read row (``method``, ``url``, ``body``) as a ``Line``, for a job whose engine
    serves ``call`` (generate | embed) under the model ``names``; raise ``Refusal``."""
    method = values.get("method")
    if method != "POST":
        raise Refusal(400, "invalid_method", f"method {method!r}: only POST is served", "method")
    url = values.get("url")
    kind = ENDPOINTS.get(url) if isinstance(url, str) else None
    if kind is None:
        raise Refusal(
            400,
            "invalid_url",
            f"url {url!r} is not an endpoint batchjobs serves ({', '.join(ENDPOINTS)})",
            "url",
        )
    if SERVED_BY[kind] != call:
        want = "task: embed" if kind == "embedding" else "task: generate"
        raise Refusal(
            400,
            "unsupported_endpoint",
            f"{url} needs an engine that can {SERVED_BY[kind]}, and this job's engine can "
            f"{call} (a job with {want} serves it; batchjobs run-batch runs each kind of line "
            "in a pass of its own)",
            "url",
        )
    body = values.get("body")
    if not isinstance(body, dict):
        raise Refusal(400, "invalid_body", f"body is {type(body).__name__}, expected an object")
    body = {k: v for k, v in body.items() if v is not None}
    unknown = sorted(set(body) - FIELDS[kind])
    if unknown:
        raise Refusal(
            400,
            "unsupported_parameter",
            f"{', '.join(unknown)}: not supported by batchjobs for {url} (it would not be "
            "ignored); remove it from the request",
            unknown[0],
        )
    model = body.get("model")
    if model is not None and model not in names:
        raise Refusal(404, "model_not_found", f"The model `{model}` does not exist.", "model")
    line = Line(kind=kind, url=url, model=model)
    if kind == "embedding":
        _embedding(body, line)
    else:
        _sampling(body, line)
        if kind == "chat":
            line.messages = messages(body.get("messages"))
            _chat_extras(body, line)
        else:
            line.prompt = _prompt(body.get("prompt"))
            _completion_extras(body, line)
    return line


# ------------------------------------------------------------------ generation


def _sampling(body: dict[str, Any], line: Line) -> None:
    p = line.params
    if body.get("stream") is True:
        raise Refusal(400, "unsupported_value", "stream: a batch answers in one piece", "stream")
    asked = body.get("max_completion_tokens", body.get("max_tokens"))
    if asked is not None:
        key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        line.max_tokens = _int(key, asked, 1)
    if "temperature" in body:
        p["temperature"] = _number("temperature", body["temperature"], 0.0, 2.0)
    if "top_p" in body:
        p["top_p"] = _number("top_p", body["top_p"], 0.0, 1.0, open_low=True)
    if "seed" in body:
        p["seed"] = _int("seed", body["seed"])
    for key in ("presence_penalty", "frequency_penalty"):
        if key in body:
            p[key] = _number(key, body[key], -2.0, 2.0)
    if "stop" in body:
        stop = body["stop"]
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
            raise invalid("stop", "expected a non-empty string or a list of them")
        if len(stop) > 4:
            raise invalid("stop", f"{len(stop)} sequences; at most 4")
        p["stop"] = stop
    if "n" in body:
        line.n = _int("n", body["n"], 1, 128)
        if line.n > 1:
            p["n"] = line.n


def _chat_extras(body: dict[str, Any], line: Line) -> None:
    wants = body.get("logprobs", False)
    if not isinstance(wants, bool):
        raise invalid("logprobs", "expected true or false")
    if "top_logprobs" in body:
        top = _int("top_logprobs", body["top_logprobs"], 0, 20)
        if not wants:
            raise invalid("top_logprobs", "needs logprobs: true")
    else:
        top = 0
    if wants:
        line.logprobs = line.params["logprobs"] = top
    line.structured = response_format(body.get("response_format"))


def _completion_extras(body: dict[str, Any], line: Line) -> None:
    if body.get("echo"):
        raise Refusal(400, "unsupported_value", "echo: not supported; leave it false", "echo")
    if "logprobs" in body:
        line.logprobs = line.params["logprobs"] = _int("logprobs", body["logprobs"], 0, 20)


def response_format(value: Any) -> dict[str, Any] | None:
    """``response_format`` as a structured-output constraint (``batchjobs.structured``):
    ``json_object`` any JSON object, ``json_schema`` its ``schema``; ``text`` none."""
    from batchjobs.structured import check_json_schema

    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_schema": {"type": "object"}}
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise invalid("response_format", "json_schema needs json_schema.schema, an object")
        try:
            check_json_schema(schema)
        except ValueError as exc:
            raise invalid("response_format", f"json_schema.schema {exc}") from None
        return {"json_schema": schema}
    raise invalid("response_format", f"type {kind!r}; expected text, json_object or json_schema")


def messages(value: Any) -> list[dict[str, Any]]:
    """Chat messages as the template takes them: ``role``, ``content`` (text; a list of
    text parts is joined with newlines, as vLLM does) and an optional ``name``."""
    if not isinstance(value, list) or not value:
        raise invalid("messages", "expected a non-empty list of messages")
    out = []
    for i, msg in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise invalid(where, f"is {type(msg).__name__}, expected an object")
        msg = {k: v for k, v in msg.items() if v is not None}
        extra = sorted(set(msg) - {"role", "content", "name"})
        if extra:
            raise Refusal(
                400,
                "unsupported_parameter",
                f"{where}.{extra[0]}: not supported by batchjobs (text messages only)",
                f"{where}.{extra[0]}",
            )
        role = msg.get("role")
        if role not in CHAT_ROLES:
            raise invalid(f"{where}.role", f"{role!r}; expected one of {', '.join(CHAT_ROLES)}")
        content = msg.get("content")
        if isinstance(content, list):
            content = _text_parts(content, where)
        if not isinstance(content, str):
            raise invalid(f"{where}.content", "expected a string or a list of text parts")
        entry = {"role": role, "content": content}
        if "name" in msg:
            if not isinstance(msg["name"], str):
                raise invalid(f"{where}.name", "expected a string")
            entry["name"] = msg["name"]
        out.append(entry)
    return out


def _text_parts(parts: list, where: str) -> str:
    try:
        return joined_text(parts)
    except NotTextPart as exc:
        param = f"{where}.content[{exc.index}]"
        raise Refusal(
            400,
            "unsupported_parameter",
            f"{param}: content of type {exc.kind!r} is not supported (text parts only)",
            param,
        ) from None


def _prompt(value: Any) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # one prompt in a list
    if isinstance(value, str):
        if not value:
            raise invalid("prompt", "is empty")
        return value
    if _token_ids(value):
        return list(value)
    if isinstance(value, list) and all(isinstance(v, (str, list)) for v in value) and value:
        raise Refusal(
            400,
            "unsupported_value",
            f"prompt: a list of {len(value)} prompts; give each prompt a line of its own",
            "prompt",
        )
    raise invalid("prompt", "expected a string or a list of token ids")


# ------------------------------------------------------------------ embeddings


def _embedding(body: dict[str, Any], line: Line) -> None:
    value = body.get("input")
    if isinstance(value, str) or _token_ids(value):
        inputs = [value]
    elif isinstance(value, list) and value:
        inputs = value
    else:
        raise invalid("input", "expected a string, a list of strings or of token-id lists")
    if len(inputs) > MAX_INPUTS:
        raise invalid("input", f"{len(inputs)} inputs; at most {MAX_INPUTS} per request")
    texts = isinstance(inputs[0], str)
    for i, item in enumerate(inputs):
        if isinstance(item, str) and texts:
            if not item.strip():
                raise invalid(f"input[{i}]" if len(inputs) > 1 else "input", "is empty")
        elif texts or not _token_ids(item):
            raise invalid(
                f"input[{i}]", "expected a string or a list of token ids; lists cannot mix them"
            )
    line.inputs = [list(x) if isinstance(x, list) else x for x in inputs]
    if "dimensions" in body:
        line.params["dimensions"] = _int("dimensions", body["dimensions"], 1)
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise invalid("encoding_format", f"{encoding!r}; expected float or base64")
    line.encoding = encoding


# ------------------------------------------------------------------ value checks


def _token_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    )


def _int(key: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise invalid(key, f"{value!r} is not an integer")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"from {low} to {high}"
        raise invalid(key, f"{value} is out of range ({bounds})")
    return value


def _number(key: str, value: Any, low: float, high: float, open_low: bool = False) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise invalid(key, f"{value!r} is not a number")
    if value > high or value < low or (open_low and value == low):
        bounds = f"above {low} and at most {high}" if open_low else f"from {low} to {high}"
        raise invalid(key, f"{value} is out of range ({bounds})")
    return float(value)


# ------------------------------------------------------------------ whole files


def preflight(shards: list, storage_options: dict | None = None) -> dict[str, int]:
    """Read every line of the request files: each must be a JSON object with a non-empty
    ``custom_id`` string, and no ``custom_id`` may appear twice (across the files too).
    Raise ``InputError`` naming the file and lines; return the lines per endpoint url."""
    from batchjobs.errors import InputError
    from batchjobs.readers import filesystem

    seen: dict[str, str] = {}
    dupes: list[str] = []
    urls: dict[str, int] = {}
    for shard in shards:
        fs, path = filesystem(shard.url, storage_options)
        with fs.open(path, "rb", compression="infer") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                where = f"{shard.url} line {lineno}"
                obj = check_line(raw, where)
                cid = obj["custom_id"]
                if cid in seen:
                    dupes.append(f"{cid!r} on {seen[cid]} and {where}")
                else:
                    seen[cid] = where
                url = obj.get("url") if isinstance(obj.get("url"), str) else "?"
                urls[url] = urls.get(url, 0) + 1
    if dupes:
        shown = "; ".join(dupes[:5])
        more = f" (and {len(dupes) - 5} more)" if len(dupes) > 5 else ""
        raise InputError(
            f"custom_id repeated: {shown}{more}; every request of a batch needs its own "
            "custom_id (OpenAI refuses such files too)"
        )
    return urls


def check_line(raw: bytes, where: str) -> dict[str, Any]:
    """A request line as a JSON object with a ``custom_id`` string, or ``InputError``."""
    from batchjobs.errors import InputError

    try:
        obj = json.loads(raw)
    except ValueError as exc:
        raise InputError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        got = "no custom_id" if cid is None else f"custom_id {cid!r}"
        raise InputError(f"{where}: {got}; every request line needs a custom_id string")
    return obj
