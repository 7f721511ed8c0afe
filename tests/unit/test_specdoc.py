"""The spec reference: `batchjobs schema` (JSON Schema) and docs/spec.md, both from the models."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Literal

import pytest
import yaml
from cli_text import cli_text
from pydantic import BaseModel, ConfigDict, Field
from typer.testing import CliRunner

from batchjobs.cli import app
from batchjobs.spec import JobSpec
from batchjobs.specdoc import REGENERATE, json_schema, render_markdown

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def test_docs_spec_md_is_the_current_rendering():
    committed = (REPO / "docs" / "spec.md").read_text()
    assert committed == render_markdown(), (
        f"docs/spec.md is out of date with batchjobs/spec.py: run `{REGENERATE}`"
    )


def test_schema_command_prints_the_json_schema():
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0, cli_text(result)
    schema = json.loads(result.output)
    assert schema == json_schema()
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert set(schema["properties"]) == set(JobSpec.model_fields)


def test_schema_markdown_command_prints_the_reference_as_is():
    result = runner.invoke(app, ["schema", "--markdown"])
    assert result.exit_code == 0, cli_text(result)
    assert result.output == render_markdown()


def _models(model: type[BaseModel], seen: dict | None = None) -> dict[type[BaseModel], None]:
    """Every model reachable from ``model`` through its fields' annotations."""
    seen = {} if seen is None else seen
    seen[model] = None
    for field in model.model_fields.values():
        stack = [field.annotation]
        while stack:
            ann = stack.pop()
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                if ann not in seen:
                    _models(ann, seen)
            else:
                stack.extend(typing.get_args(ann))
    return seen


def test_markdown_documents_every_key_of_every_section():
    text = render_markdown()
    models = _models(JobSpec)
    assert len(models) > 3
    for model in models:
        for name, field in model.model_fields.items():
            assert f"| `{name}` |" in text, f"{model.__name__}.{name} missing from the markdown"
            if field.description:
                assert " ".join(field.description.split()) in text.replace("\\|", "|")


def test_schema_accepts_the_shipped_job_specs():
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json_schema())
    for path in sorted((REPO / "jobs").glob("*.yaml")):
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(path.read_text()))]
        assert not errors, f"{path.name}: {errors}"
    bad = {"name": "x", "input": {"path": "p"}, "output": {"path": "o"}, "engine": {"modle": "m"}}
    assert not validator.is_valid(bad)  # unknown key and missing engine.model


# A small spec, to pin down how each kind of field is rendered.
class _Inner(BaseModel):
    """Inner section.

    Second paragraph."""

    model_config = ConfigDict(extra="forbid")
    level: int = Field(default=3, ge=1, le=9, description="How much | how far.")


class _Item(BaseModel):
    tag: str = Field(pattern=r"^[a-z]+$")


class _Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Required,\n  spread over lines.")
    mode: Literal["fast", "slow"] = "fast"
    ratio: float | None = Field(default=None, gt=0, lt=1)
    tags: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    inner: _Inner = Field(default_factory=_Inner)
    other: _Inner | None = None
    items: list[_Item] = Field(default_factory=list, min_length=1)
    empty: str = ""


def _row(text: str, key: str) -> list[str]:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(f"| `{key}` |")]
    return [cell.strip() for cell in line.split(" | ")[1:]]


def test_rendering_of_each_kind_of_field():
    from batchjobs.specdoc import _SchemaWithFactoryDefaults

    text = render_markdown(_Outer.model_json_schema(schema_generator=_SchemaWithFactoryDefaults))
    assert REGENERATE in text
    assert _row(text, "name") == ["string", "**required**", "Required, spread over lines. |"]
    assert _row(text, "mode")[:2] == ["one of `fast`, `slow`", "`fast`"]
    assert _row(text, "ratio")[:2] == ["number (> 0, < 1), or null", "`null`"]
    assert _row(text, "tags")[:2] == ["list of string", "`[]`"]
    assert _row(text, "env")[:2] == ["mapping of key to string", "`{}`"]
    assert _row(text, "inner")[:2] == ["section [inner](#inner)", "its keys' defaults"]
    # a model used twice is documented once, where it is first used
    assert _row(text, "other")[:2] == ["section [inner](#inner), or null", "`null`"]
    assert "Also used at `other`." in text
    assert _row(text, "items")[0] == "list of section [items[]](#items) (at least 1 item)"
    assert _row(text, "empty")[1] == '`""`'
    # nested sections: an anchor, a heading, the model's docstring, their own table
    assert '<a id="inner"></a>\n\n## inner\n\nInner section.\n\nSecond paragraph.\n' in text
    assert _row(text, "level") == ["integer (≥ 1, ≤ 9)", "`3`", "How much \\| how far. |"]
    assert _row(text, "tag")[:2] == ["string (matching `^[a-z]+$`)", "**required**"]
    assert text.index("## inner") < text.index("## items")
    assert "Sections: [inner](#inner), [items[]](#items)." in text
