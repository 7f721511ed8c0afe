"""The task layer (batchjobs/tasks): what each task reads and refuses, how a row becomes an
engine request (chat templates in a sandbox, embedding cut to the context), the columns a
result becomes, and the spec checks of a task. No engine: a local tokenizer as
``make-model`` builds it, and fake engines where a replica is needed."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchjobs.cost import Weights
from batchjobs.engines.base import Engine, Request, Result
from batchjobs.errors import InputError, SpecError
from batchjobs.readers import list_shards, preflight, read_shard
from batchjobs.tasks import Prepared, RowError, task_for
from batchjobs.tasks.chat import ChatTask
from batchjobs.tasks.embed import EmbedTask, embedding_array

transformers = pytest.importorskip("transformers")

CONVERSATION = [
    {"role": "user", "content": "the model of the city?"},
    {"role": "assistant", "content": "data."},
    {"role": "user", "content": "and?"},
]
MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


@pytest.fixture(autouse=True)
def _offline(offline):
    pass


@pytest.fixture
def chat_task(task_spec):
    """chat_task(**chat_section) -> a ChatTask set up as in an engine replica."""

    def _task(**chat) -> ChatTask:
        task = task_for(task_spec("chat", chat=chat))
        asyncio.run(task.setup(None))
        return task

    return _task


def _ids(encoded) -> list[int]:
    """apply_chat_template's token ids, whether this transformers returns a list or a dict."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def _rows(shard, cols) -> list[dict]:
    return [r for b in read_shard(shard, cols, batch_rows=4) for r in b.to_pylist()]


# --------------------------------------------------------------------------- chat input


JSONL_MESSAGES = [
    (CONVERSATION, None),
    ("what is up?", "'conversation' is str, expected a list of {role, content} messages"),
    ([], "'conversation' is an empty list of messages"),
    ([{"role": "robot", "content": "beep"}], "'conversation' message 0 has role 'robot'"),
    ([{"role": "user"}], "'conversation' message 0 (user) has no content, expected a string"),
    (
        [{"role": "user", "content": 5}],
        "'conversation' message 0 (user) has content of type int, expected a string",
    ),
    (["hello"], "'conversation' message 0 is str, expected {role, content}"),
    (None, "'conversation' is null"),
    (
        [{"role": "system", "content": "s"}, {"role": "user", "content": ["a", "b"]}],
        "'conversation' message 1 (user) content part 0 is 'str'; only text parts",
    ),
]


def test_malformed_jsonl_messages_are_error_rows_naming_line_and_column(
    tmp_path, write_jsonl, read_columns, task_spec
):
    rows_in = [{"id": i, "conversation": m} for i, (m, _) in enumerate(JSONL_MESSAGES)]
    rows_in.append({"id": 99, "messages": CONVERSATION})  # the wrong column
    path = write_jsonl(tmp_path / "chat.jsonl", rows_in)
    (shard,) = list_shards(str(path))
    cols = task_for(
        task_spec("chat", input={"messages_column": "conversation", "id_column": "id"})
    ).input_columns()
    rows = _rows(shard, cols)
    assert len(rows) == len(rows_in)  # one row out per row in, good or bad
    assert [r["row_id"] for r in rows] == [str(r["id"]) for r in rows_in]
    for lineno, (row, (_, expected)) in enumerate(zip(rows, JSONL_MESSAGES), start=1):
        if expected is None:
            assert row["input_error"] is None
            assert json.loads(row["payload"]) == {"messages": CONVERSATION}
        else:
            assert row["input_error"].startswith(f"{shard.url} line {lineno}: {expected}"), row
            assert row["payload"] is None
    assert rows[-1]["input_error"] == f"{shard.url} line 10: no column 'conversation'"
    # an unknown role names the roles that are allowed
    assert "(allowed: system, user, assistant, tool, developer)" in rows[3]["input_error"]


def test_malformed_parquet_messages_are_error_rows_naming_row_and_column(tmp_path, task_spec):
    good = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    conversations = [
        good,
        [],
        [{"role": "robot", "content": "x"}],
        [{"role": "user", "content": None}],
        None,
        [None],
    ]
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"conversation": pa.array(conversations, MESSAGES_TYPE)}), path)
    (shard,) = list_shards(str(path))
    spec = task_spec("chat", input={"messages_column": "conversation"})
    cols = task_for(spec).input_columns()
    preflight(shard, cols)  # a list<struct<role, content>> column is what chat reads
    rows = _rows(shard, cols)
    errors = [r["input_error"] for r in rows]
    url = shard.url
    assert errors == [
        None,
        f"{url} row 1: 'conversation' is an empty list of messages",
        f"{url} row 2: 'conversation' message 0 has role 'robot' (allowed: system, user, "
        "assistant, tool, developer)",
        f"{url} row 3: 'conversation' message 0 (user) has no content, expected a string or a list of text parts",
        f"{url} row 4: 'conversation' is null",
        f"{url} row 5: 'conversation' message 0 is NoneType, expected {{role, content}}",
    ]
    assert json.loads(rows[0]["payload"]) == {"messages": good}


def test_parquet_messages_with_non_string_content_are_error_rows(tmp_path, task_spec):
    typ = pa.list_(pa.struct([("role", pa.string()), ("content", pa.int64())]))
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"messages": pa.array([[{"role": "user", "content": 7}]], typ)}), path)
    (shard,) = list_shards(str(path))
    cols = task_for(task_spec("chat")).input_columns()
    (row,) = _rows(shard, cols)
    assert row["input_error"] == (
        f"{shard.url} row 0: 'messages' message 0 (user) has content of type int, expected a string or a list of text parts"
    )


def test_preflight_refuses_a_messages_column_that_is_not_a_list_of_messages(tmp_path, task_spec):
    cols = task_for(task_spec("chat", input={"messages_column": "conversation"})).input_columns()
    text = tmp_path / "text.parquet"
    pq.write_table(pa.table({"conversation": ["hello"]}), text)
    (shard,) = list_shards(str(text))
    with pytest.raises(InputError) as info:
        preflight(shard, cols)
    assert str(info.value) == (
        f"{shard.url}: column 'conversation' has type string, expected list<struct<role, content>>"
    )
    no_content = tmp_path / "roles.parquet"
    pq.write_table(pa.table({"conversation": [[{"role": "user"}]]}), no_content)
    (shard,) = list_shards(str(no_content))
    with pytest.raises(InputError, match="column 'conversation' .* its structs lack content"):
        preflight(shard, cols)


def test_preflight_of_jsonl_chat_names_the_messages_column_key(tmp_path, write_jsonl, task_spec):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "not a chat"}])
    (shard,) = list_shards(str(path))
    with pytest.raises(InputError) as info:
        preflight(shard, task_for(task_spec("chat")).input_columns())
    assert f"{shard.url} line 1: no column 'messages'" in str(info.value)
    assert "set input.messages_column" in str(info.value)


# --------------------------------------------------------------------------- chat rendering


def test_chat_renders_the_token_ids_of_the_tokenizers_own_template(chat_task, tokenizer):
    assert tokenizer.chat_template  # make-model's ChatML template
    task = chat_task()
    expected = _ids(
        tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True)
    )
    assert task.render(CONVERSATION) == expected
    assert tokenizer.decode(expected).endswith("<|im_start|>assistant\n")
    # the request the engine gets is those ids, not text
    prepared = task.prepare("r-1", {"messages": CONVERSATION}, {"max_tokens": 3})
    assert prepared.request.token_ids == expected and prepared.request.prompt is None
    assert prepared.request.params == {"max_tokens": 3}


def test_chat_content_as_text_parts_renders_as_the_joined_text(chat_task, tokenizer):
    """OpenAI-style content parts: the text parts joined by newlines, as vLLM's server
    joins them; a part that is not text is the row's error when the row is read."""
    from batchjobs.tasks.base import check_messages

    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    as_parts = [{"role": "user", "content": parts}]
    assert check_messages(as_parts) is None
    joined = [{"role": "user", "content": "first\nsecond"}]
    assert chat_task().render(as_parts) == chat_task().render(joined)
    image = [{"role": "user", "content": [parts[0], {"type": "image_url", "image_url": {}}]}]
    assert check_messages(image) == (
        "message 0 (user) content part 1 is 'image_url'; "
        "only text parts ({type: text, text}) are supported"
    )


def test_chat_without_generation_prompt_ends_with_the_last_message(chat_task, tokenizer):
    ids = chat_task(add_generation_prompt=False).render(CONVERSATION)
    assert ids == _ids(
        tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=False, tokenize=True)
    )
    assert tokenizer.decode(ids).endswith("and?<|im_end|>\n")


def test_system_prompt_is_put_first_only_where_the_row_has_none(chat_task, tokenizer):
    task = chat_task(system_prompt="Be brief.")
    system = {"role": "system", "content": "Be brief."}

    def reference(messages):
        return _ids(
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        )

    assert task.render(CONVERSATION) == reference([system, *CONVERSATION])
    own = [{"role": "system", "content": "Answer in French."}, *CONVERSATION]
    assert task.render(own) == reference(own)
    assert "Be brief." not in tokenizer.decode(task.render(own))


def test_template_kwargs_reach_the_template(chat_task, tokenizer):
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
        "{% endif %}"
    )
    plain = chat_task(template=template).render(CONVERSATION)
    task = chat_task(template=template, template_kwargs={"enable_thinking": False})
    ids = task.render(CONVERSATION)
    assert ids != plain
    assert ids == _ids(
        tokenizer.apply_chat_template(
            CONVERSATION,
            chat_template=template,
            add_generation_prompt=True,
            tokenize=True,
            enable_thinking=False,
        )
    )
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n<think></think>")


def test_messages_read_from_parquet_render_like_the_plain_conversation(
    tmp_path, chat_task, tokenizer
):
    # Parquet structs carry every field of the column's type; unset ones come back null
    typ = pa.list_(
        pa.struct([("role", pa.string()), ("content", pa.string()), ("name", pa.string())])
    )
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"messages": pa.array([CONVERSATION], typ)}), path)
    (shard,) = list_shards(str(path))
    task = chat_task()
    (row,) = _rows(shard, task.input_columns())
    (prepared,) = task.prepare_batch(["r"], [row["payload"]], [row["input_error"]], [None])
    assert prepared.request.token_ids == task.render(CONVERSATION)


# --------------------------------------------------------------------------- chat sandbox


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.popen('echo pwned').read() }}",
        "{{ self.__init__.__globals__ }}",
        "{% include '/etc/passwd' %}",
        "{% import '/etc/passwd' as p %}{{ p }}",
        "{{ messages.append({'role': 'user', 'content': 'x'}) }}",
    ],
)
def test_a_template_cannot_run_code_or_read_files(chat_task, template):
    task = chat_task(template=template)
    payloads = [json.dumps({"messages": CONVERSATION})] * 2
    out = task.prepare_batch(["a", "b"], payloads, [None, None], [None, None])
    assert len(out) == 2  # every row becomes an error row; nothing raises
    for row_id, row in zip(["a", "b"], out):
        assert isinstance(row, str), row
        assert row.startswith(f"row {row_id}: chat template failed: ")
        assert "root:" not in row and "pwned" not in row
    with pytest.raises(RowError, match="chat template failed"):
        task.prepare("r", {"messages": CONVERSATION}, None)


def test_a_template_that_renders_nothing_is_an_error_row(chat_task):
    (row,) = chat_task(template="{% for m in messages %}{% endfor %}").prepare_batch(
        ["a"], [json.dumps({"messages": CONVERSATION})], [None], [None]
    )
    assert row == "row a: chat template rendered an empty prompt"


def test_an_invalid_template_is_refused_at_validation(task_spec):
    with pytest.raises(SpecError) as info:
        task_spec("chat", chat={"template": "{% for m in messages %}{{ m.content }"})
    msg = str(info.value)
    assert "chat.template" in msg and "is not a valid Jinja template (line 1" in msg


def test_a_template_may_be_a_file(tmp_path, task_spec):
    path = tmp_path / "chat.jinja"
    path.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert task_spec("chat", chat={"template": str(path)}).chat.template == path.read_text()
    with pytest.raises(SpecError) as info:
        task_spec("chat", chat={"template": str(tmp_path / "missing.jinja")})
    msg = str(info.value)
    assert "chat.template" in msg and "neither a Jinja template nor a readable file" in msg


# --------------------------------------------------------------------------- spec checks


def _refused(make, *args, **kwargs) -> str:
    with pytest.raises(SpecError) as info:
        make(*args, **kwargs)
    return str(info.value)


def test_a_task_the_engine_cannot_run_is_refused_naming_both(make_spec):
    msg = _refused(make_spec, task="embed", engine={"kind": "trtllm"})
    assert "task 'embed'" in msg and "engine.kind 'trtllm'" in msg
    assert "use engine.kind: vllm" in msg
    assert make_spec(task="generate", engine={"kind": "trtllm"}).engine.kind == "trtllm"


def test_token_ids_column_does_not_apply_to_chat(task_spec):
    msg = _refused(task_spec, "chat", input={"token_ids_column": "ids"})
    assert "input.token_ids_column does not apply to task chat" in msg
    assert task_spec("embed", input={"token_ids_column": "ids"}).input.token_ids_column == "ids"


def test_sampling_columns_do_not_apply_to_embed(make_spec):
    msg = _refused(make_spec, task="embed", input={"sampling_columns": {"max_tokens": "mt"}})
    assert "input.sampling_columns does not apply to task embed" in msg


def test_matryoshka_dimensions_only_for_a_model_trained_for_them(make_spec, model_dir):
    msg = _refused(make_spec, task="embed", embed={"dimensions": 64})
    assert "embed.dimensions" in msg and "does not support Matryoshka dimensions" in msg
    (model_dir / "config.json").write_text('{"is_matryoshka": true}')
    assert make_spec(task="embed", embed={"dimensions": 64}).embed.dimensions == 64
    (model_dir / "config.json").write_text('{"matryoshka_dimensions": [64, 128]}')
    assert make_spec(task="embed", embed={"dimensions": 128}).embed.dimensions == 128
    msg = _refused(make_spec, task="embed", embed={"dimensions": 100})
    assert "embed.dimensions 100 is not one the model supports ([64, 128])" in msg


def test_chat_needs_a_chat_template(make_spec, model_dir):
    (model_dir / "tokenizer_config.json").write_text('{"model_max_length": 512}')
    msg = _refused(make_spec, task="chat")
    assert f"the tokenizer in {model_dir} has no chat template; set chat.template" in msg
    assert make_spec(task="chat", chat={"template": "{{ messages[0].content }}"}).task == "chat"


def test_chat_uses_engine_tokenizer_for_the_template_check(make_spec, tiny_tokenizer_dir):
    # the model directory has no template, the tokenizer named by engine.tokenizer has one
    spec = make_spec(task="chat", engine={"tokenizer": str(tiny_tokenizer_dir)})
    assert spec.engine.tokenizer == str(tiny_tokenizer_dir)


def test_fingerprint_of_a_task_covers_its_own_section_only(make_spec):
    generate = make_spec().fingerprint()
    assert make_spec(chat={"system_prompt": "Be brief."}).fingerprint() == generate
    assert make_spec(embed={"normalize": False, "truncate": "error"}).fingerprint() == generate
    assert make_spec(sampling={"max_tokens": 7}).fingerprint() != generate

    embed = make_spec(task="embed").fingerprint()
    assert embed != generate
    assert make_spec(task="embed", embed={"normalize": False}).fingerprint() != embed
    assert make_spec(task="embed", embed={"truncate": "error"}).fingerprint() != embed
    # sampling does not change a vector
    assert make_spec(task="embed", sampling={"max_tokens": 7}).fingerprint() == embed


def test_fingerprint_of_chat_covers_the_chat_section(task_spec):
    chat = task_spec("chat").fingerprint()
    assert task_spec("chat", chat={"system_prompt": "Be brief."}).fingerprint() != chat
    assert task_spec("chat", input={"messages_column": "conv"}).fingerprint() != chat


# --------------------------------------------------------------------------- embed


class FakeEmbedEngine(Engine):
    """Embeds a request as a vector of its length (so tests can tell rows apart)."""

    kind = "fake"

    def __init__(self, max_len: int | None = 8, dim: int = 4):
        self.max_len, self.dim = max_len, dim

    async def generate(self, request: Request) -> Result:
        raise AssertionError("an embed task never generates")

    async def embed(self, request: Request) -> Result:
        n = len(request.token_ids)
        vector = np.full(self.dim, float(n), dtype=np.float32)
        return Result(finish_reason="stop", prompt_tokens=n, embedding=vector)

    def close(self) -> None:
        pass

    def max_model_len(self) -> int | None:
        return self.max_len


@pytest.fixture
def embed_task(task_spec):
    """embed_task(truncate=..., max_len=..., **input) -> an EmbedTask set up on a fake engine."""

    def _task(truncate: str = "end", max_len: int | None = 8, **input_keys) -> EmbedTask:
        spec = task_spec("embed", embed={"truncate": truncate}, input=input_keys)
        task = task_for(spec)
        asyncio.run(task.setup(FakeEmbedEngine(max_len)))
        return task

    return _task


LONG = "the quick brown fox jumps over the lazy dog " * 3


def test_embed_setup_learns_the_vector_size_and_context(embed_task):
    task = embed_task(max_len=8)
    assert task.dim == 4 and task.max_len == 8
    assert task.output_fields()["embedding"] == pa.list_(pa.float32(), 4)
    assert task.schema_metadata() == {"batchjobs.task": "embed", "batchjobs.embedding_dim": "4"}


def test_a_long_document_is_cut_to_the_context_and_flagged(embed_task, tokenizer):
    task = embed_task("end", max_len=8)
    full = tokenizer(LONG, add_special_tokens=True)["input_ids"]
    assert len(full) > 8
    cut, truncated = task.fit(full, LONG)
    assert truncated and len(cut) == 8 and cut == full[:8]  # the end is cut
    short = tokenizer("a fox", add_special_tokens=True)["input_ids"]
    assert task.fit(short, "a fox") == (short, False)
    # pre-tokenized documents are cut the same way
    assert task.fit(list(range(1, 12)), None) == (list(range(1, 9)), True)


def test_a_long_document_is_an_error_row_with_truncate_error(embed_task, tokenizer):
    task = embed_task("error", max_len=8)
    full = tokenizer(LONG, add_special_tokens=True)["input_ids"]
    with pytest.raises(RowError) as info:
        task.fit(full, LONG)
    assert f"document has {len(full)} tokens, more than the engine's max_model_len 8" in str(
        info.value
    )
    assert task.fit(full[:8], None) == (full[:8], False)  # exactly the context fits


def test_without_a_known_context_nothing_is_cut(embed_task):
    task = embed_task("error", max_len=None)
    assert task.fit(list(range(100)), None) == (list(range(100)), False)


def test_prepare_batch_keeps_order_and_one_entry_per_row(embed_task, tokenizer):
    task = embed_task("error", max_len=8)
    docs = ["a fox", None, LONG, "the dog", "lazy"]
    errors = [None, "f line 2: 'prompt' is empty", None, None, None]
    payloads = [json.dumps({"prompt": d}) if d else None for d in docs]
    ids = ["d0", "d1", "d2", "d3", "d4"]
    out = task.prepare_batch(ids, payloads, errors, [None] * 5)
    assert len(out) == 5
    assert out[1] == "f line 2: 'prompt' is empty"  # the input error, as read
    assert out[2].startswith("row d2: document has ")
    for i in (0, 3, 4):
        assert isinstance(out[i], Prepared)
        assert out[i].request.request_id.startswith(f"{ids[i]}#")
        assert list(out[i].request.token_ids) == tokenizer(docs[i])["input_ids"]
        assert out[i].extra == {"truncated": False}
    # request ids stay unique when a retried batch sends the same rows again
    again = task.prepare_batch(ids, payloads, errors, [None] * 5)
    assert again[0].request.request_id != out[0].request.request_id


def test_prepare_batch_of_token_ids_cuts_and_flags(embed_task):
    task = embed_task("end", max_len=8, token_ids_column="ids")
    assert task.tokenizer is None  # pre-tokenized: no tokenizer needed
    payloads = [json.dumps({"token_ids": list(range(1, n + 1))}) for n in (3, 12)]
    short, long = task.prepare_batch(["a", "b"], payloads, [None, None], [None, None])
    assert list(short.request.token_ids) == [1, 2, 3] and short.extra == {"truncated": False}
    assert list(long.request.token_ids) == list(range(1, 9)) and long.extra == {"truncated": True}


def test_embedding_array_is_fixed_size_float32_with_nulls_for_error_rows():
    arr = embedding_array([[0.6, 0.8, 0.0], None, np.array([1, 0, 0], dtype=np.float64)], 3)
    assert arr.type == pa.list_(pa.float32(), 3)
    assert arr.is_null().to_pylist() == [False, True, False]
    values = arr.to_pylist()
    assert values[0] == pytest.approx([0.6, 0.8, 0.0]) and values[2] == [1.0, 0.0, 0.0]
    assert embedding_array([None, None], 5).null_count == 2
    assert len(embedding_array([], 5)) == 0


def test_embed_result_columns_are_typed_as_declared(embed_task):
    task = embed_task("end", max_len=8)
    results = [
        Result(finish_reason="stop", prompt_tokens=3, latency_s=0.1, embedding=[1, 0, 0, 0]),
        Result.failed("row d1: document is empty"),
    ]
    cols = task.to_columns(results, [{"truncated": True}, {}])
    table = pa.table(cols)
    assert table.schema == pa.schema(list(task.output_fields().items()))
    assert table.to_pylist() == [
        {
            "embedding": [1.0, 0.0, 0.0, 0.0],
            "prompt_tokens": 3,
            "truncated": True,
            "latency_s": pytest.approx(0.1),
            "error": None,
        },
        {
            "embedding": None,
            "prompt_tokens": 0,
            "truncated": False,
            "latency_s": 0.0,
            "error": "row d1: document is empty",
        },
    ]


# --------------------------------------------------------------------------- the engine stage


class FakeGenerateEngine(Engine):
    """Answers every request with the number of prompt tokens it got."""

    kind = "fake"

    async def generate(self, request: Request) -> Result:
        n = len(request.token_ids) if request.token_ids is not None else len(request.prompt)
        return Result.finished(f"got {n}", 2, "stop", {"stop": "stop"}, n, 0.01)

    def close(self) -> None:
        pass

    def max_concurrency(self) -> int | None:
        return 4


class FakeBoard:
    """Stands in for the ReplicaBoard actor handle: ``board.report.remote(...)``."""

    def __init__(self):
        self.reports: list[tuple[str, dict]] = []
        self.report = NS(
            remote=lambda replica, figures, windows: self.reports.append((replica, figures))
        )


def _through_replica(spec, path: Path, engine: Engine):
    from batchjobs.actor import EngineReplica

    board = FakeBoard()
    replica = EngineReplica(spec, lambda _: engine, board)
    try:
        (shard,) = list_shards(str(path))
        outs = [replica(b) for b in read_shard(shard, task_for(spec).input_columns(), 3)]
    finally:
        replica.close()
    return shard, pa.concat_tables(outs), board


def test_a_chat_job_through_a_replica_one_row_out_per_row_in(
    tmp_path, write_jsonl, task_spec, tokenizer
):
    rows = [{"id": f"c{i}", "messages": CONVERSATION[: i + 1]} for i in range(3)]
    rows.insert(1, {"id": "bad", "messages": []})
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    spec = task_spec("chat", input={"id_column": "id"})
    shard, out, board = _through_replica(spec, path, FakeGenerateEngine())
    task = task_for(spec)
    assert out.column_names == [
        "row_id",
        "shard_id",
        "row_index",
        "shard_rows",
        *task.output_fields(),
        "_cached_tokens",
    ]
    assert out.schema.field("completion_tokens").type == pa.int32()
    assert out.column("row_id").to_pylist() == ["c0", "bad", "c1", "c2"]
    errors = out.column("error").to_pylist()
    assert errors[1] == f"{shard.url} line 2: 'messages' is an empty list of messages"
    assert [errors[i] for i in (0, 2, 3)] == [None, None, None]
    # token counts are those of the rendered prompt
    for i, n in ((0, 1), (2, 2), (3, 3)):
        rendered = _ids(
            tokenizer.apply_chat_template(
                CONVERSATION[:n], add_generation_prompt=True, tokenize=True
            )
        )
        assert out.column("prompt_tokens")[i].as_py() == len(rendered)
    assert out.column("text").to_pylist()[1] is None
    # the replica's figures go to the board, not onto the rows
    replica, figures = board.reports[-1]
    assert figures["rows"] == 4 and figures["limit"] == 8  # twice what the engine runs
    assert not any(c.startswith("_replica") for c in out.column_names)


def test_an_embed_job_through_a_replica_writes_fixed_size_vectors(tmp_path, write_jsonl, task_spec):
    from batchjobs.sink import output_table

    rows = [{"doc": "a fox"}, {"doc": ""}, {"doc": LONG}, {"doc": "the dog"}]
    path = write_jsonl(tmp_path / "docs.jsonl", rows)
    spec = task_spec("embed", input={"prompt_column": "doc"})
    _, out, board = _through_replica(spec, path, FakeEmbedEngine(max_len=8, dim=4))
    assert out.num_rows == 4
    assert out.schema.field("embedding").type == pa.list_(pa.float32(), 4)
    assert out.column("error").is_null().to_pylist() == [True, False, True, True]
    assert out.column("truncated").to_pylist() == [False, False, True, False]
    assert out.column("embedding")[2].as_py() == [8.0] * 4  # cut to the engine's 8 tokens
    assert out.column("embedding")[1].as_py() is None
    written = output_table(out, "row_id", task_for(spec).schema_metadata())
    assert written.schema.metadata[b"batchjobs.embedding.dim"] == b"4"
    assert "text" not in written.column_names and "completion_tokens" not in written.column_names
    assert board.reports[-1][1]["rows"] == 4


def test_replica_summary_of_reported_figures():
    from batchjobs.actor import ReplicaBoard
    from batchjobs.tracker import replica_summary

    board = ReplicaBoard()
    raw = {
        "startup_s": 3.0,
        "ready_at": 1000.0,
        "idle_s": 2.0,
        "busy_s": 8.0,
        "inflight_s": 24.0,
        "rows": 10,
        "prompt_tokens": 400,
        "cached_tokens": 100,
        "completion_tokens": 60,
        "limit": 512,
    }
    board.report("rep-a", {**raw, "rows": 4}, [(2.0, 6.0, 100, 20)])
    board.report("rep-a", raw, [(2.5, 7.0, 150, 30)])  # running totals: the latest is all
    assert board.snapshot() == ({"rep-a": raw}, [(2.0, 6.0, 100, 20), (2.5, 7.0, 150, 30)])
    assert board.snapshot(1) == ({"rep-a": raw}, [(2.5, 7.0, 150, 30)])
    weights = Weights(0.01, 0.05, "fit")  # 300 prefill × 0.01 + 60 decode × 0.05 = 6 s
    assert replica_summary(raw, weights) == {
        "engine_s": pytest.approx(6.0),
        "underfill_s": pytest.approx(2.0),
        "startup_s": 3.0,
        "ready_at": 1000.0,
        "idle_s": 2.0,
        "busy_s": 8.0,
        "mean_inflight": 3.0,
        "busy_share": 0.8,
        "inflight_limit": 512,
        "prompt_tokens": 400,
        "cached_tokens": 100,
        "prefix_cache_hit": 0.25,
    }
    idle = replica_summary(
        {**raw, "busy_s": 0.0, "idle_s": 0.0, "prompt_tokens": 0, "cached_tokens": 0}, weights
    )
    assert idle["mean_inflight"] == 0.0 and idle["busy_share"] is None
    assert idle["prefix_cache_hit"] is None
