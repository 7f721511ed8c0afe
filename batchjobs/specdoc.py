"""The job spec's reference, generated from the pydantic models in ``batchjobs/spec.py``.

``json_schema()`` is the JSON Schema that ``batchjobs schema`` prints (editors use it for
completion and checks); ``render_markdown()`` turns the same schema into ``docs/spec.md``:
one table per section (key, type and allowed values, default, description), nested
sections linked. Nothing here names a spec field, so a new field is documented by adding
it to the model.
"""

from __future__ import annotations

import json
import re
from collections import deque
from typing import Any

from pydantic.json_schema import GenerateJsonSchema, NoDefault

REGENERATE = ".venv/bin/batchjobs schema --markdown > docs/spec.md"


class _SchemaWithFactoryDefaults(GenerateJsonSchema):
    """pydantic leaves out defaults made by ``default_factory`` (``{}``, ``[]``, a section's
    own defaults); a reader wants to see them, so they are filled in."""

    def get_default_value(self, schema: Any) -> Any:
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            try:
                return factory()
            except Exception:  # a factory that needs context: show no default
                return NoDefault
        return super().get_default_value(schema)


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a job spec, defaults included."""
    from batchjobs.spec import JobSpec

    schema = JobSpec.model_json_schema(schema_generator=_SchemaWithFactoryDefaults)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def render_markdown(schema: dict[str, Any] | None = None) -> str:
    """The markdown reference of ``schema`` (default: the job spec's)."""
    schema = json_schema() if schema is None else schema
    return _Renderer(schema).render()


class _Renderer:
    def __init__(self, schema: dict[str, Any]):
        self.schema = schema
        self.defs: dict[str, Any] = schema.get("$defs", {})
        self.section_of: dict[str, str] = {}  # $ref -> path of the section documenting it
        self.also_at: dict[str, list[str]] = {}
        self.queue: deque[tuple[str, dict[str, Any]]] = deque()

    # ---------------------------------------------------------------- document
    def render(self) -> str:
        root_table = self._table("", self.schema)  # queues the top-level sections
        sections: list[tuple[str, dict[str, Any], list[str]]] = []
        while self.queue:
            path, model = self.queue.popleft()
            sections.append((path, model, self._table(path, model)))
        out = [
            "# Job spec reference",
            "",
            "<!-- Generated from the pydantic models in batchjobs/spec.py: do not edit. -->",
            f"Generated from the job spec's models; regenerate with `{REGENERATE}`.",
            "",
            "A job spec is a YAML mapping with the keys below. Any key can be overridden on "
            "the command line: `--set section.key=value` (the value is read as YAML).",
        ]
        if self.schema.get("additionalProperties") is False:
            out.append(
                "Unknown keys are refused with their path and the closest known key, so a "
                "typo fails `batchjobs validate` instead of being ignored."
            )
        out += [
            "",
            "The same models as JSON Schema, for completion and checks in an editor: "
            "`batchjobs schema > job.schema.json`, then put "
            "`# yaml-language-server: $schema=job.schema.json` on the first line of a job file "
            "(editors with the YAML language server).",
            "",
        ]
        if sections:
            links = ", ".join(f"[{p}](#{_anchor(p)})" for p, _, _ in sections)
            out += [f"Sections: {links}.", ""]
        out += ["## Top level", "", *self._description(self.schema), *root_table]
        for path, model, table in sections:
            out += ["", f'<a id="{_anchor(path)}"></a>', "", f"## {path}", ""]
            out += self._description(model)
            ref = self._ref_of(model)
            if ref and self.also_at.get(ref):
                others = ", ".join(f"`{p}`" for p in self.also_at[ref])
                out += [f"Also used at {others}.", ""]
            out += table
        return "\n".join(out) + "\n"

    def _description(self, model: dict[str, Any]) -> list[str]:
        text = model.get("description")
        if not text:
            return []
        paragraphs = [" ".join(p.split()) for p in text.split("\n\n")]
        return [line for p in paragraphs for line in (p, "")]

    def _table(self, path: str, model: dict[str, Any]) -> list[str]:
        props: dict[str, Any] = model.get("properties", {})
        required = set(model.get("required", []))
        rows = ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]
        for key, field in props.items():
            where = f"{path}.{key}" if path else key
            typ = self._type(field, where)
            default = "**required**" if key in required else self._default(field)
            desc = field.get("description", "")
            rows.append(f"| `{key}` | {_cell(typ)} | {_cell(default)} | {_cell(desc)} |")
        extra = model.get("additionalProperties")
        if isinstance(extra, dict):
            rows.append(f"| *any key* | {_cell(self._type(extra, path + '.*'))} | | |")
        return rows

    # ---------------------------------------------------------------- types
    def _resolve(self, node: dict[str, Any]) -> dict[str, Any]:
        ref = node.get("$ref")
        if ref and ref.startswith("#/$defs/"):
            return self.defs.get(ref.removeprefix("#/$defs/"), {})
        return node

    def _ref_of(self, model: dict[str, Any]) -> str | None:
        for ref, target in self.defs.items():
            if target is model:
                return f"#/$defs/{ref}"
        return None

    def _section_link(self, ref: str, path: str) -> str:
        """A link to the section documenting ``ref``; the first place that uses it names it."""
        if ref not in self.section_of:
            self.section_of[ref] = path
            self.queue.append((path, self._resolve({"$ref": ref})))
        elif self.section_of[ref] != path:
            self.also_at.setdefault(ref, []).append(path)
        target = self.section_of[ref]
        return f"section [{target}](#{_anchor(target)})"

    def _type(self, node: dict[str, Any], path: str) -> str:
        ref = node.get("$ref")
        if ref:
            target = self._resolve(node)
            if "properties" in target:
                return self._section_link(ref, path)
            return self._type({**target, **{k: v for k, v in node.items() if k != "$ref"}}, path)
        for key in ("anyOf", "oneOf"):
            if key in node:
                alts = node[key]
                nullable = any(a.get("type") == "null" for a in alts)
                # Models told apart by a key (eval.scorers' kind): a section for each.
                disc = node.get("discriminator") or {}
                tags = {
                    r: f" ({disc['propertyName']}: {v})" for v, r in disc.get("mapping", {}).items()
                }
                parts = [
                    self._type(a, path + tags.get(a.get("$ref"), ""))
                    for a in alts
                    if a.get("type") != "null"
                ]
                text = " or ".join(dict.fromkeys(parts))
                return f"{text}, or null" if nullable else text
        if "allOf" in node and len(node["allOf"]) == 1:
            return self._type({**node["allOf"][0]}, path)
        if "const" in node:
            return f"`{_scalar(node['const'])}`"
        if "enum" in node:
            values = ", ".join(f"`{_scalar(v)}`" for v in node["enum"])
            return f"one of {values}" if len(node["enum"]) > 1 else values
        typ = node.get("type")
        if isinstance(typ, list):
            return " or ".join(typ)
        if typ == "array":
            items = node.get("items")
            inner = self._type(items, path + "[]") if items else "any"
            text = f"list of {inner}"
        elif typ == "object" and "properties" not in node:
            values = node.get("additionalProperties", True)
            if isinstance(values, dict) and values:
                text = f"mapping of key to {self._type(values, path + '.*')}"
            else:
                text = "mapping"
        else:
            text = typ or "any"
        bounds = _bounds(node)
        return f"{text} ({bounds})" if bounds else text

    def _default(self, field: dict[str, Any]) -> str:
        if "default" not in field:
            return ""
        value = field["default"]
        target = self._resolve(field)
        if isinstance(value, dict) and value and "properties" in target:
            return "its keys' defaults"
        return f"`{_scalar(value)}`"


def _bounds(node: dict[str, Any]) -> str:
    parts = []
    for key, word in (
        ("minimum", "≥"),
        ("exclusiveMinimum", ">"),
        ("maximum", "≤"),
        ("exclusiveMaximum", "<"),
    ):
        if key in node:
            parts.append(f"{word} {_scalar(node[key])}")
    for key, words in (
        ("minLength", "at least {} character"),
        ("maxLength", "at most {} character"),
        ("minItems", "at least {} item"),
        ("maxItems", "at most {} item"),
    ):
        if key in node:
            parts.append(words.format(node[key]) + ("" if node[key] == 1 else "s"))
    if "pattern" in node:
        parts.append(f"matching `{node['pattern']}`")
    return ", ".join(parts)


def _scalar(value: Any) -> str:
    """A value as it is written in YAML: strings bare, the rest as JSON."""
    return value if isinstance(value, str) and value else json.dumps(value)


def _cell(text: str) -> str:
    """Text that fits in one markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _anchor(path: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-")
