"""A spec cannot run code, and nothing a job writes leaves its output root: YAML tags,
aliases, engine arguments and environment variables that name code, chat templates in
Jinja's sandbox, no import by a name from a spec, trust_remote_code reported, output and
input roots apart, names under the output root contained."""

from __future__ import annotations

import ast
import asyncio
import json
import re
from pathlib import Path

import pytest
import yaml

from batchjobs.errors import OutputError, SpecError
from batchjobs.spec import load_spec, parse_spec

PACKAGE = Path(__file__).resolve().parents[2] / "batchjobs"


# ------------------------------------------------------------------ YAML


@pytest.mark.parametrize(
    "tag",
    [
        "!!python/object/apply:os.system [touch {marker}]",
        "!!python/object/new:subprocess.Popen [[touch, {marker}]]",
        "!!python/name:os.system",
        "!!python/module:os",
        "!mytag {marker}",
    ],
)
def test_a_yaml_tag_that_builds_objects_is_refused_naming_file_and_line(
    tmp_path, spec_dict, write_yaml, tag
):
    marker = tmp_path / "ran"
    text = yaml.safe_dump(spec_dict, sort_keys=False).replace("unit-job", tag.format(marker=marker))
    line = next(i for i, x in enumerate(text.splitlines(), start=1) if "!" in x)
    path = write_yaml(text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    msg = str(info.value)
    assert msg.startswith(f"{path} line {line}: the YAML tag !") and "is refused" in msg
    assert not marker.exists()


def test_a_tag_in_a_set_value_is_refused(spec_dict, write_yaml, tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(SpecError) as info:
        load_spec(write_yaml(spec_dict), [f"name=!!python/object/apply:os.system [touch {marker}]"])
    assert "the YAML tag !!python/object/apply:os.system is refused" in str(info.value)
    assert not marker.exists()


def test_an_alias_bomb_is_refused(spec_dict, write_yaml):
    layers = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 12):
        layers.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    text = json.dumps(spec_dict)[:-1] + ', "engine": {"model": "%s", "args": {"bomb": *a11}}}'
    text = "\n".join(["x:"] + ["  " + line for line in layers]) + "\n" + text
    path = write_yaml(text % spec_dict["engine"]["model"])
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert "more than 100 aliases" in str(info.value)


# ------------------------------------------------------------------ code named by a string


@pytest.mark.parametrize(
    ("args", "key"),
    [
        ({"worker_cls": "evil.Worker"}, "worker_cls"),
        ({"worker_extension_cls": "evil.Ext"}, "worker_extension_cls"),
        ({"logits_processors": ["evil:Proc"]}, "logits_processors"),
        ({"scheduler_cls": "evil.Scheduler"}, "scheduler_cls"),
        ({"kv_transfer_config": {"kv_connector_module_path": "evil"}}, "kv_transfer_config"),
        ({"distributed_executor_backend": "evil.Executor"}, "distributed_executor_backend"),
        ({"compilation_config": {"backend": "evil.compile"}}, "compilation_config.backend"),
        ({"hf_overrides": {"thing": "evil.module:factory"}}, "hf_overrides.thing"),
        ({"trust_remote_code": True}, "trust_remote_code"),
    ],
)
def test_engine_args_that_name_code_are_refused(spec_dict, args, key):
    spec_dict["engine"]["args"] = args
    with pytest.raises(SpecError) as info:
        parse_spec(spec_dict)
    msg = str(info.value)
    assert "engine.args: value error, " in msg and f"{key}" in msg and "is refused" in msg


def test_ordinary_engine_args_pass(spec_dict):
    spec_dict["engine"]["args"] = {
        "enforce_eager": True,
        "distributed_executor_backend": "mp",
        "compilation_config": {"mode": 3, "backend": "inductor"},
        "attention_config": {"backend": "FLASH_ATTN"},
        "structured_outputs_config": {"backend": "xgrammar"},
        "generation_config": "generation_config.json",
        "hf_overrides": {"architectures": ["LlamaForCausalLM"]},
    }
    assert parse_spec(spec_dict).engine.args["distributed_executor_backend"] == "mp"


@pytest.mark.parametrize("name", ["LD_PRELOAD", "PYTHONPATH", "PYTHONSTARTUP", "pythonwarnings"])
def test_engine_env_that_loads_code_is_refused(spec_dict, name):
    spec_dict["engine"]["env"] = {"VLLM_CPU_KVCACHE_SPACE": "1", name: "/tmp/evil"}
    with pytest.raises(SpecError) as info:
        parse_spec(spec_dict)
    assert f"engine.env: value error, {name} is refused" in str(info.value)


def test_sampling_args_and_pilot_candidates_are_checked_too(spec_dict):
    raw = {**spec_dict, "sampling": {"args": {"logits_processors": ["evil:P"]}}}
    with pytest.raises(SpecError, match="sampling.args: value error, logits_processors"):
        parse_spec(raw)
    raw = {**spec_dict, "pilot": {"candidates": [{"name": "c", "args": {"worker_cls": "x.Y"}}]}}
    with pytest.raises(SpecError, match=r"pilot.candidates\[0\].args: value error, worker_cls"):
        parse_spec(raw)


def test_nothing_imports_by_a_name_the_spec_could_set():
    """Every dynamic import or eval in the package is one of the reviewed places, each
    importing a name from batchjobs' own tables: a new one must be reviewed and added."""
    reviewed = {
        ("engines/__init__.py", "import_module"),  # ENGINES[kind].module; kind: a Literal
        ("engines/preload.py", "import_module"),  # compat.vllm_engine_core_modules()
        ("compat.py", "import_module"),  # "vllm.v1.engine.utils"
    }
    found = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__", "eval", "exec", "locate", "run_path"):
                found.add((path.relative_to(PACKAGE).as_posix(), name))
    assert found == reviewed


def test_the_engine_is_chosen_from_the_registry_only(spec_dict):
    spec_dict["engine"]["kind"] = "os.system"
    with pytest.raises(SpecError, match="engine.kind: input should be 'vllm' or 'trtllm'"):
        parse_spec(spec_dict)


# ------------------------------------------------------------------ chat templates


def test_a_chat_template_cannot_reach_python(tmp_path, make_spec, tiny_tokenizer_dir):
    from batchjobs.tasks import task_for

    marker = tmp_path / "pwned"
    attempts = [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        f"{{{{ cycler.__init__.__globals__.os.system('touch {marker}') }}}}",
        f"{{{{ joiner.__init__.__globals__['os'].popen('touch {marker}').read() }}}}",
        "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
        "{{ raise_exception.__globals__ }}{{ messages.__class__ }}{{ self.__dict__ }}x",
        "{{ range.__self__ }}{{ namespace.__init__ }}x",
    ]
    payload = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    for template in attempts:
        spec = make_spec(
            task="chat", engine={"model": str(tiny_tokenizer_dir)}, chat={"template": template}
        )
        task = task_for(spec)
        asyncio.run(task.setup(None))
        (row,) = task.prepare_batch(["r"], [payload], [None], [None])
        if isinstance(row, str):  # refused by the sandbox: an error row
            assert row.startswith("row r: chat template failed: SecurityError: access to "), row
            assert "is unsafe" in row
        else:  # an unsafe attribute at the end of an expression renders as nothing
            assert task.tokenizer.decode(row.request.token_ids) == "x"
    assert not marker.exists()


# ------------------------------------------------------------------ trust_remote_code


def test_trust_remote_code_is_off_unless_set_and_reported_when_on(spec_dict):
    from batchjobs.engines.vllm import engine_args
    from batchjobs.pipeline import RunSummary

    spec = parse_spec(spec_dict)
    assert spec.engine.trust_remote_code is False
    assert engine_args(spec)["trust_remote_code"] is False
    on = parse_spec({**spec_dict, "engine": {**spec_dict["engine"], "trust_remote_code": True}})
    assert engine_args(on)["trust_remote_code"] is True
    summary = RunSummary("j", "out", "fp", 1, 0, 1, trust_remote_code=True)
    assert summary.to_dict()["trust_remote_code"] is True


def test_the_run_summary_says_when_trust_remote_code_is_on(capsys):
    from batchjobs.cli import TRUST_REMOTE_CODE, _print_summary
    from batchjobs.pipeline import RunSummary

    _print_summary(RunSummary("j", "out", "fp", 1, 0, 1))
    assert "trust_remote_code" not in capsys.readouterr().out
    _print_summary(RunSummary("j", "out", "fp", 1, 0, 1, trust_remote_code=True))
    assert TRUST_REMOTE_CODE in capsys.readouterr().out
    assert "the model directory's own Python code runs" in TRUST_REMOTE_CODE


# ------------------------------------------------------------------ output and input roots


@pytest.mark.parametrize(
    ("inp", "out", "refused"),
    [
        ("in", "in/out", "is inside the input"),
        ("in/*.jsonl", "in/results", "is inside the input"),
        ("in/**/*.jsonl", "in", "is inside the input"),
        ("in", "in", "is inside the input"),
        ("data/in/*.jsonl", "data", "is inside output.path"),
        ("in/a.jsonl", "in/a.jsonl/out", "is inside the input"),
        ("in", "in2", None),
        ("in/a.jsonl", "in/out", None),
        ("in", "memory://in/out", None),
    ],
)
def test_output_and_input_roots_apart(tmp_path, monkeypatch, spec_dict, inp, out, refused):
    from batchjobs.safety import check_roots

    monkeypatch.chdir(tmp_path)
    spec = parse_spec({**spec_dict, "input": {"path": inp}, "output": {"path": out}})
    if refused is None:
        check_roots(spec)
        return
    with pytest.raises(SpecError, match=re.escape(refused)):
        check_roots(spec)


def test_an_output_root_reached_through_a_symlink_into_the_input_is_refused(
    tmp_path, spec_dict, write_jsonl
):
    from batchjobs.planning import plan_job

    write_jsonl(tmp_path / "in" / "a.jsonl", [{"prompt": "a"}])
    (tmp_path / "alias").symlink_to(tmp_path / "in")
    raw = {**spec_dict, "input": {"path": str(tmp_path / "in")}}
    raw["output"] = {"path": str(tmp_path / "alias" / "out"), "mode": "overwrite"}
    with pytest.raises(SpecError, match="is inside the input"):
        plan_job(parse_spec(raw), fresh=True)
    assert not (tmp_path / "in" / "out").exists()  # refused before anything was written


def test_validate_refuses_an_output_root_inside_the_input(
    tmp_path, spec_dict, write_yaml, write_jsonl
):
    from typer.testing import CliRunner

    from batchjobs.cli import app

    write_jsonl(tmp_path / "in" / "a.jsonl", [{"prompt": "a"}])
    raw = {**spec_dict, "input": {"path": str(tmp_path / "in")}}
    raw["output"] = {"path": str(tmp_path / "in" / "out")}
    result = CliRunner().invoke(app, ["validate", str(write_yaml(raw))])
    assert result.exit_code == 2 and "is inside the input" in result.output


# ------------------------------------------------------------------ names under the output root


@pytest.mark.parametrize("name", ["..", "../x", "/etc", "", "a/../../b", "a//b"])
def test_a_name_that_would_leave_the_output_root_is_refused(tmp_path, name):
    from batchjobs.sink import OutputRoot

    root = OutputRoot(str(tmp_path / "out"))
    with pytest.raises(OutputError, match="it would leave it"):
        root.clear_shard(name)  # a damaged manifest's shard id, say
    assert tmp_path.exists()


@pytest.mark.parametrize(
    "rel", ["../../etc/passwd.jsonl", "/abs/path.jsonl", "..", "$(rm -rf ~).jsonl", "a b/'c'.pq"]
)
def test_shard_ids_from_any_file_name_stay_inside(tmp_path, rel):
    from batchjobs.readers import shard_id_for
    from batchjobs.safety import child

    sid = shard_id_for(rel, 10, "1")
    assert re.fullmatch(r"[A-Za-z0-9._-]+", sid) and not sid.startswith(".")
    assert child(str(tmp_path), "_staging", sid).startswith(f"{tmp_path}/_staging/")
