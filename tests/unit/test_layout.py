"""The output root's names and record versions in one place."""

from __future__ import annotations

import signal

import pytest

from batchjobs import layout
from batchjobs.errors import EngineError, OutputError, SpecError
from batchjobs.stopping import Stopped


def test_every_name_at_the_root_is_hidden_from_readers_and_distinct():
    names = [
        layout.MANIFEST,
        layout.MANIFEST_DELTAS,
        layout.RUNS,
        layout.STAGING,
        layout.SUCCESS,
        layout.PILOT_JSON,
        layout.PILOT_DIR,
        layout.PROGRESS,
    ]
    assert all(n.startswith("_") for n in names)
    assert len(set(names)) == len(names)


def test_users_of_the_names_take_them_from_layout():
    from batchjobs import pilot, pipeline, sink

    assert sink.STAGING is layout.STAGING and sink.SUCCESS is layout.SUCCESS
    assert pilot.PILOT_JSON is layout.PILOT_JSON and pilot.PILOT_DIR is layout.PILOT_DIR
    assert pipeline.RUNS is layout.RUNS


@pytest.mark.parametrize("kind", [layout.MANIFEST, layout.RUNS, layout.PILOT_JSON])
def test_stamp_and_read_back(kind):
    rec = layout.stamped(kind, {"a": 1})
    assert rec == {"a": 1, "v": layout.VERSIONS[kind]}
    assert layout.unstamped(kind, rec, "x") == {"a": 1}
    assert layout.unstamped(kind, {"a": 1}, "x") == {"a": 1}  # written before versions


@pytest.mark.parametrize("v", [99, "1", None])
def test_newer_or_odd_versions_are_refused_with_the_place(v):
    with pytest.raises(OutputError, match=r"out/_manifest.jsonl line 3 has schema version"):
        layout.unstamped(layout.MANIFEST, {"v": v}, "out/_manifest.jsonl line 3")


def test_run_record_of_a_success():
    rec = layout.run_record({"rows": 3}, started_at=1.0, ended_at=2.5)
    assert rec == {
        "rows": 3,
        "status": "succeeded",
        "exit_code": 0,
        "reason": None,
        "started_at": 1.0,
        "ended_at": 2.5,
        "v": layout.RUN_V,
    }


@pytest.mark.parametrize(
    ("exc", "code", "reason"),
    [
        (EngineError("replica r: out of memory\nmore detail"), 4, "replica r: out of memory"),
        (SpecError("bad key"), 2, "bad key"),
        (RuntimeError("boom"), 1, "RuntimeError: boom"),
        (ValueError(), 1, "ValueError:"),
    ],
)
def test_run_record_of_a_failure(exc, code, reason):
    rec = layout.run_record({}, started_at=1.0, ended_at=2.0, failure=exc)
    assert (rec["status"], rec["exit_code"], rec["reason"]) == ("failed", code, reason)


@pytest.mark.parametrize(
    ("exc", "code", "reason"),
    [
        (KeyboardInterrupt(), 130, "interrupted"),
        (Stopped(signal.SIGTERM), 143, "stopped by SIGTERM: committed shards are kept; rerun"),
        (Stopped(signal.SIGINT), 130, "stopped by SIGINT: committed shards are kept; rerun"),
    ],
)
def test_run_record_of_a_stop(exc, code, reason):
    rec = layout.run_record({}, started_at=1.0, ended_at=2.0, failure=exc)
    assert (rec["status"], rec["exit_code"]) == ("stopped", code)
    assert rec["reason"].startswith(reason)


def test_reason_masks_secrets_and_stays_short():
    secrets = layout.secret_values(
        {"key": "AKIAEXAMPLE", "client_kwargs": {"endpoint_url": "http://minio:9000"}},
        None,
        {"HF_TOKEN": "hf_abcdef", "X": "1"},
    )
    assert set(secrets) == {"AKIAEXAMPLE", "http://minio:9000", "hf_abcdef", "1"}
    exc = OutputError(
        "cannot write http://minio:9000/b/x with AKIAEXAMPLE and hf_abcdef 1" + "x" * 600
    )
    code, reason = layout.exit_status(exc, secrets)
    assert code == 5
    assert "AKIAEXAMPLE" not in reason and "minio" not in reason and "hf_abcdef" not in reason
    assert reason.startswith("cannot write ***/b/x with *** and *** 1")  # "1": too short to mask
    assert len(reason) == layout.MAX_REASON and reason.endswith("...")
