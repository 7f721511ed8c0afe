"""``task: chat``: a list of ``{role, content}`` messages in, the assistant's reply out.

The messages are rendered with the model's chat template (or ``chat.template``) into
token ids in the engine's process, by the tokenizer's own ``apply_chat_template``, which
renders in Jinja's immutable sandbox: a template cannot call Python code, reach object
internals or read files. Token counts and cost are those of the rendered prompt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from batchjobs.tasks.base import Prepared, RowError, joined_text
from batchjobs.tasks.generate import GenerateTask


class ChatTask(GenerateTask):
    """Output columns, generation controls and per-adapter sums as ``GenerateTask``'s."""

    name = "chat"
    call = "generate"

    def columns(self) -> dict[str, str]:
        return {"messages": self.spec.input.messages_column}

    def check_type(self, role: str, dtype: pa.DataType) -> str | None:
        if not (pa.types.is_list(dtype) or pa.types.is_large_list(dtype)) or not (
            pa.types.is_struct(dtype.value_type)
        ):
            return "expected list<struct<role, content>>"
        names = {dtype.value_type.field(i).name for i in range(dtype.value_type.num_fields)}
        missing = {"role", "content"} - names
        return f"its structs lack {', '.join(sorted(missing))}" if missing else None

    async def setup(self, engine) -> None:
        from batchjobs.rowcheck import engine_limit

        self.max_len = engine_limit(engine)  # a longer rendered prompt is an error row
        self.tokenizer = load_tokenizer(self.spec)
        self.template = self.spec.chat.template  # None: the tokenizer's own

    def render(self, messages: list[dict[str, Any]]) -> list[int]:
        """The token ids of the rendered conversation, as the tokenizer renders them."""
        chat = self.spec.chat
        conversation = [
            {
                k: joined_text(v) if k == "content" and isinstance(v, list) else v
                for k, v in m.items()
                if v is not None
            }
            for m in messages
        ]
        if chat.system_prompt is not None and conversation[0]["role"] != "system":
            conversation.insert(0, {"role": "system", "content": chat.system_prompt})
        with self.lock:
            ids = self.tokenizer.apply_chat_template(
                conversation,
                chat_template=self.template,
                add_generation_prompt=chat.add_generation_prompt,
                tokenize=True,
                return_dict=False,
                **chat.template_kwargs,
            )
        return list(ids)

    def prepare(self, request_id: str, values: dict[str, Any], params: dict | None) -> Prepared:
        from batchjobs.engines.base import Request

        try:
            ids = self.render(values["messages"])
        except Exception as exc:  # noqa: BLE001 - any template failure is this row's error
            raise RowError(f"chat template failed: {type(exc).__name__}: {exc}") from None
        if not ids:
            raise RowError("chat template rendered an empty prompt")
        return Prepared(Request(request_id, token_ids=ids, params=params))


def load_tokenizer(spec):
    """The job's tokenizer (``engine.tokenizer``, else the model's), from local files."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        spec.engine.tokenizer or spec.engine.model,
        trust_remote_code=spec.engine.trust_remote_code,
    )


def check_template(source: str) -> None:
    """Compile a chat template in Jinja's immutable sandbox; raise ValueError if it is
    not valid Jinja."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment(
            extensions=["jinja2.ext.loopcontrols"], undefined=jinja2.StrictUndefined
        ).from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(
            f"is not a valid Jinja template (line {exc.lineno}: {exc.message})"
        ) from None


def has_chat_template(tokenizer_dir: str) -> bool | None:
    """Whether a local tokenizer directory carries a chat template; None where it cannot
    be told (not a local directory)."""
    root = Path(tokenizer_dir).expanduser()
    if not root.is_dir():
        return None
    if (root / "chat_template.jinja").is_file() or (root / "chat_template.json").is_file():
        return True
    config = root / "tokenizer_config.json"
    if not config.is_file():
        return False
    try:
        return bool(json.loads(config.read_text()).get("chat_template"))
    except ValueError:
        return None
