"""The tasks of jobs on OpenAI Batch files: each row is one request line.

``OpenAIGenerateTask`` (``task: generate``) serves ``/v1/chat/completions`` lines (the
messages rendered with the chat template) and ``/v1/completions`` lines (the prompt as it
is); ``OpenAIEmbedTask`` (``task: embed``) serves ``/v1/embeddings`` lines, several inputs
per line if the line has them. A line the job cannot serve or refuses (``requests``)
becomes an error row without reaching the engine, with its HTTP status, error code and
field.

A field a line leaves out takes the job's ``sampling`` value, except ``max_tokens``, which
for ``/v1/completions`` is 16 as in OpenAI's API. ``max_tokens`` is cut to the room the
prompt leaves in the engine's context, as vLLM's server does.

Output columns: ``url``, ``status_code`` (200, or the error's), the first choice's
``text`` and ``finish_reason`` (generate) or the vectors ``embeddings`` (embed),
``prompt_tokens``, ``completion_tokens``, ``latency_s``, ``error`` (naming the file and
line), ``error_code``, ``error_param``, ``line`` (in the input file) and ``response``, the
response body as JSON without ``id`` and ``created`` (added by ``files`` when it writes the
batch output files; for embeddings also without the vectors, which are in ``embeddings``).
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from batchjobs.engines.base import Request, Result
from batchjobs.openai_batch import bodies, files
from batchjobs.openai_batch.requests import COMPLETION_MAX_TOKENS, Line, Refusal, parse
from batchjobs.openai_batch.spec import ID_COLUMN, accepted_names, served_name, writes_files
from batchjobs.readers import Columns
from batchjobs.tasks.base import Prepared, Task, request_id
from batchjobs.tasks.chat import ChatTask, load_tokenizer


@dataclass(frozen=True)
class Refused(Request):
    """A line refused before the engine: its message (the refusal's details are in the
    row's extras)."""

    message: str = ""


@dataclass(frozen=True)
class Parts(Request):
    """An embeddings line: one engine request per input."""

    parts: tuple[Request, ...] = ()


@dataclass
class Embedded(Result):
    """The vectors of an embeddings line, one per input."""

    vectors: list = field(default_factory=list)


def openai_task(spec) -> Task:
    return OpenAIEmbedTask(spec) if spec.task == "embed" else OpenAIGenerateTask(spec)


_LINE = re.compile(r" line (\d+):")

COMMON_FIELDS: dict[str, pa.DataType] = {
    "url": pa.string(),
    "status_code": pa.int32(),
}
TAIL_FIELDS: dict[str, pa.DataType] = {
    "error": pa.string(),
    "error_code": pa.string(),
    "error_param": pa.string(),
    "line": pa.int64(),
    "response": pa.string(),
}


class OpenAITask(Task):
    """What both tasks share: reading request lines, refusing them, the batch files."""

    def __init__(self, spec):
        super().__init__(spec)
        self.names = accepted_names(spec)
        self.served = served_name(spec)
        self.tokenizer = None
        self.max_len: int | None = None

    def input_columns(self) -> Columns:
        # Nothing required at read time: parse() names what a line lacks, per line.
        return Columns(
            fields={},
            id_column=ID_COLUMN,
            optional={"body": "body", "url": "url", "method": "method"},
            locate=True,
        )

    def columns(self) -> dict[str, str]:
        return {}

    async def setup(self, engine) -> None:
        self.tokenizer = load_tokenizer(self.spec)
        self.max_len = engine.max_model_len() or self.spec.engine.max_model_len

    def prepare_batch(self, ids, payloads, input_errors, params, wheres=None):
        """Each line prepared, or refused as an OpenAI error line (its file and line come in
        the payload, so ``wheres`` is not needed)."""
        from batchjobs.rowcheck import exception_text

        out: list[Prepared | str] = []
        for row_id, payload, error in zip(ids, payloads, input_errors):
            rid = request_id(row_id)
            if error is not None:
                found = _LINE.search(error)
                extra = {"line": int(found.group(1)) if found else None, "url": None}
                out.append(self._refused(rid, Refusal(400, "invalid_request", error), extra))
                continue
            values = json.loads(payload)
            extra = {"line": values.get("_line"), "source": values.get("_source")}
            extra["url"] = values.get("url") if isinstance(values.get("url"), str) else None
            try:
                line = parse(values, self.call, self.names)
                out.append(self.prepare_line(rid, line, extra))
            except Refusal as refusal:
                out.append(self._refused(rid, refusal, extra))
            except Exception as exc:  # noqa: BLE001 - one line's failure is that line's error
                why = f"cannot be prepared ({exception_text(exc)})"
                out.append(self._refused(rid, Refusal(400, "invalid_request", why), extra))
        return out

    def prepare_line(self, rid: str, line: Line, extra: dict) -> Prepared:
        raise NotImplementedError

    def _refused(self, rid: str, refusal: Refusal, extra: dict) -> Prepared:
        message = _located(refusal.message, extra)
        return Prepared(Refused(rid, message=message), {**extra, "refusal": refusal.to_dict()})

    async def run(self, engine, request: Request) -> Result:
        if isinstance(request, Refused):
            return Result.failed(request.message)
        return await getattr(engine, self.call)(request)

    def status(self, result: Result, extra: dict) -> tuple[int, str | None, str | None, str | None]:
        """A row's HTTP status, error code, field and message (with its file and line)."""
        refusal = extra.get("refusal")
        if refusal is not None:
            return refusal["status"], refusal["code"], refusal["param"], result.error
        if result.error is not None:
            refused = result.error.startswith(("rejected by engine", "invalid per-row"))
            code = "invalid_request_error" if refused else "server_error"
            return (400 if refused else 500), code, None, _located(result.error, extra)
        if result.finish_reason not in ("stop", "length") or any(
            s.finish_reason not in ("stop", "length") for s in result.samples or ()
        ):
            what = f"the engine ended the request ({result.finish_reason})"
            return 500, "server_error", None, _located(what, extra)
        return 200, None, None, None

    def tail(self, rows: list[tuple], extras, responses) -> dict[str, pa.Array]:
        """``error`` … ``response``, from (status, code, param, message) per row."""
        return {
            "error": pa.array([r[3] for r in rows], pa.string()),
            "error_code": pa.array([r[1] for r in rows], pa.string()),
            "error_param": pa.array([r[2] for r in rows], pa.string()),
            "line": pa.array([e.get("line") for e in extras], pa.int64()),
            "response": pa.array(responses, pa.string()),
        }

    # -- the batch files ----------------------------------------------------------------

    def begin(self, out) -> None:
        if writes_files(self.spec):
            files.job_created(out)

    def report(self, out, records) -> dict | None:
        if not writes_files(self.spec):
            return None
        return {"openai_batch": files.write_job_files(out, records)}


def _located(message: str, extra: dict) -> str:
    """A message with the file and line it is about, unless it names them already."""
    source, line = extra.get("source"), extra.get("line")
    if source is None or line is None or message.startswith(str(source)):
        return message
    return f"{source} line {line}: {message}"


# ---------------------------------------------------------------------- generate


class OpenAIGenerateTask(OpenAITask):
    name = "generate"
    call = "generate"

    def __init__(self, spec):
        super().__init__(spec)
        self.chat = ChatTask(spec)
        self.chat.lock = self.lock  # one tokenizer, one lock

    async def setup(self, engine) -> None:
        await super().setup(engine)
        self.chat.tokenizer = self.tokenizer
        self.chat.template = self.spec.chat.template

    def prepare_line(self, rid: str, line: Line, extra: dict) -> Prepared:
        if line.kind == "chat":
            try:
                ids = self.chat.render(line.messages)
            except Exception as exc:  # noqa: BLE001 - any template failure is this line's
                raise Refusal(
                    400, "invalid_request_error", f"chat template failed: {exc}", "messages"
                ) from None
        elif isinstance(line.prompt, str):
            with self.lock:
                ids = self.tokenizer(line.prompt, add_special_tokens=True)["input_ids"]
        else:
            ids = line.prompt
        room = self.max_len - len(ids) if self.max_len else None
        if room is not None and room < 1:
            raise Refusal(
                400,
                "context_length_exceeded",
                f"the prompt has {len(ids)} tokens and the model's context is {self.max_len} "
                "(engine.max_model_len): no room to generate",
                "messages" if line.kind == "chat" else "prompt",
            )
        default = COMPLETION_MAX_TOKENS if line.kind == "completion" else None
        wanted = line.max_tokens or default or self.spec.sampling.max_tokens
        temperature = line.params.get("temperature", self.spec.sampling.temperature)
        if line.n > 1 and temperature == 0:
            raise Refusal(
                400,
                "invalid_value",
                f"n: {line.n} choices need a temperature above 0 (greedy decoding gives one "
                "answer)",
                "n",
            )
        params = {**line.params, "max_tokens": min(wanted, room) if room else wanted}
        request = Request(rid, token_ids=list(ids), params=params, structured=line.structured)
        return Prepared(request, {**extra, "kind": line.kind, "logprobs": line.logprobs})

    def output_fields(self) -> dict[str, pa.DataType]:
        return {
            **COMMON_FIELDS,
            "text": pa.string(),
            "finish_reason": pa.string(),
            "prompt_tokens": pa.int32(),
            "completion_tokens": pa.int32(),
            "latency_s": pa.float32(),
            **TAIL_FIELDS,
        }

    def to_columns(self, results, extras) -> dict[str, pa.Array]:
        rows, responses = [], []
        for result, extra in zip(results, extras):
            row = self.status(result, extra)
            rows.append(row)
            body = None
            if row[0] == 200:
                build = bodies.chat_body if extra["kind"] == "chat" else bodies.completion_body
                body = json.dumps(build(result, self.served, extra["logprobs"]), allow_nan=False)
            responses.append(body)
        ok = [r[0] == 200 for r in rows]
        return {
            "url": pa.array([e.get("url") for e in extras], pa.string()),
            "status_code": pa.array([r[0] for r in rows], pa.int32()),
            "text": pa.array([r.text if k else None for r, k in zip(results, ok)], pa.string()),
            "finish_reason": pa.array(
                [r.finish_reason if k else "error" for r, k in zip(results, ok)], pa.string()
            ),
            "prompt_tokens": pa.array([r.prompt_tokens for r in results], pa.int32()),
            "completion_tokens": pa.array([r.completion_tokens for r in results], pa.int32()),
            "latency_s": pa.array([r.latency_s for r in results], pa.float32()),
            **self.tail(rows, extras, responses),
        }


# ---------------------------------------------------------------------- embed

VECTORS = pa.list_(pa.list_(pa.float32()))


class OpenAIEmbedTask(OpenAITask):
    name = "embed"
    call = "embed"

    def prepare_line(self, rid: str, line: Line, extra: dict) -> Prepared:
        parts, truncated = [], False
        for i, item in enumerate(line.inputs):
            if isinstance(item, str):
                with self.lock:
                    ids = self.tokenizer(item, add_special_tokens=True)["input_ids"]
            else:
                ids = item
            if self.max_len and len(ids) > self.max_len:
                if self.spec.embed.truncate == "error":
                    raise Refusal(
                        400,
                        "context_length_exceeded",
                        f"input{f'[{i}]' if len(line.inputs) > 1 else ''} has {len(ids)} "
                        f"tokens, more than the model's context of {self.max_len} "
                        "(engine.max_model_len)",
                        "input",
                    )
                truncated = True
                if isinstance(item, str):  # the tokenizer's own cut keeps its special tokens
                    with self.lock:
                        ids = self.tokenizer(
                            item, add_special_tokens=True, truncation=True, max_length=self.max_len
                        )["input_ids"]
                else:
                    ids = ids[: self.max_len]
            params = dict(line.params) or None
            parts.append(Request(f"{rid}.{i}", token_ids=list(ids), params=params))
        extra = {**extra, "encoding": line.encoding, "truncated": truncated}
        return Prepared(Parts(rid, parts=tuple(parts)), extra)

    async def run(self, engine, request: Request) -> Result:
        if not isinstance(request, Parts):
            return await super().run(engine, request)
        results = await asyncio.gather(*(engine.embed(p) for p in request.parts))
        prompt = sum(r.prompt_tokens for r in results)
        failed = next((r for r in results if r.error is not None), None)
        latency = max(r.latency_s for r in results)
        if failed is not None:
            return Result.failed(failed.error, latency, prompt)
        return Embedded(
            finish_reason="stop",
            prompt_tokens=prompt,
            latency_s=latency,
            cached_tokens=sum(r.cached_tokens for r in results),
            vectors=[r.embedding for r in results],
        )

    def output_fields(self) -> dict[str, pa.DataType]:
        return {
            **COMMON_FIELDS,
            "embeddings": VECTORS,
            "encoding_format": pa.string(),
            "truncated": pa.bool_(),
            "prompt_tokens": pa.int32(),
            "latency_s": pa.float32(),
            **TAIL_FIELDS,
        }

    def to_columns(self, results, extras) -> dict[str, pa.Array]:
        rows, responses, vectors = [], [], []
        for result, extra in zip(results, extras):
            row = self.status(result, extra)
            rows.append(row)
            ok = row[0] == 200
            vectors.append([np.asarray(v, np.float32) for v in result.vectors] if ok else None)
            body = {
                "object": "list",
                "model": self.served,
                "usage": bodies.usage(result.prompt_tokens),
            }
            responses.append(json.dumps(body) if ok else None)
        return {
            "url": pa.array([e.get("url") for e in extras], pa.string()),
            "status_code": pa.array([r[0] for r in rows], pa.int32()),
            "embeddings": pa.array(vectors, VECTORS),
            "encoding_format": pa.array([e.get("encoding") for e in extras], pa.string()),
            "truncated": pa.array([bool(e.get("truncated")) for e in extras], pa.bool_()),
            "prompt_tokens": pa.array([r.prompt_tokens for r in results], pa.int32()),
            "latency_s": pa.array([r.latency_s for r in results], pa.float32()),
            **self.tail(rows, extras, responses),
        }
