"""Checks of a written report page, shared by the unit test (a made-up output root) and the
integration test (a real CPU run's output root)."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser

VOID = {"meta", "img", "br", "hr", "link", "input", "col", "source"}
IMAGE = re.compile(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'")


class _Nesting(HTMLParser):
    """Every element closed in the order it was opened; the headings and images listed."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.headings: list[str] = []
        self.images = 0
        self._in_h2 = False
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images += 1
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            if value and not value.startswith("data:"):
                self.external.append(value)
        if tag == "h2":
            self._in_h2 = True
            self.headings.append("")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if tag == "h2":
            self._in_h2 = False
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()

    def handle_data(self, data):
        if self._in_h2:
            self.headings[-1] += data


def check_page(page: str, secrets: list[str] = ()) -> _Nesting:
    """Well-formed HTML (doctype, elements closed in order), nothing loaded from elsewhere,
    every embedded image a PNG that decodes, and none of ``secrets`` anywhere. Returns the
    parse (headings, image count) for further checks."""
    from PIL import Image

    assert page.lower().startswith("<!doctype html>")
    parsed = _Nesting()
    parsed.feed(page)
    parsed.close()
    assert not parsed.problems, parsed.problems[:5]
    assert not parsed.stack, f"not closed: {parsed.stack}"
    assert not parsed.external, parsed.external  # self-contained: no network
    pngs = IMAGE.findall(page)
    assert len(pngs) == parsed.images and pngs
    for data in pngs:
        raw = base64.b64decode(data, validate=True)
        assert raw.startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(io.BytesIO(raw)) as img:
            img.verify()
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            assert img.format == "PNG" and img.width >= 400 and img.height >= 150
    for secret in secrets:
        assert secret not in page, "a secret is in the report"
    return parsed


def check_run_outputs(out, stdout: str, stderr: str, secrets: list[str], rows: int) -> None:
    """What a real `batchjobs run` (not on a terminal) leaves for its user: plain lines
    without control codes or others' noise, the report, the progress samples and the log,
    none of them holding a secret."""
    import json

    assert "\x1b" not in stdout + stderr  # no colour or cursor code in a log
    for noise in (
        "core_worker.cc",
        "Triton",
        "FutureWarning",
        "NUMA",
        "safetensors",
        "Token authentication",
    ):
        assert noise not in stderr, noise
    assert "report: " in stdout and "logs: " in stdout
    page = (out / "_report.html").read_text()
    parsed = check_page(page, secrets)
    assert "Latency and length" in parsed.headings and "Errors" in parsed.headings
    assert "CPU-s" in page and "GPU-s" not in page  # a CPU run says CPU-seconds
    samples = [json.loads(line) for line in (out / "_progress.jsonl").read_text().splitlines()]
    assert samples and samples[-1]["rows"] == rows
    logs = list((out / "_logs").iterdir())
    assert logs, "no log under _logs/"
    text = "".join(p.read_text() for p in logs)
    assert "\x1b" not in text
    everything = page + text + (out / "_runs.jsonl").read_text() + stdout + stderr
    for secret in secrets:
        assert secret not in everything, "a secret was written out"
