"""Credentials: lifted out of s3:// URLs, kept out of Ray's runtime environment, and masked
wherever a spec, a URL or the environment could be written (secrets.py)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from batchjobs import layout
from batchjobs.cli import app
from batchjobs.errors import OutputError, SpecError
from batchjobs.secrets import (
    credential_env,
    lift_url_credentials,
    public_spec,
    raw_spec_secrets,
    redact,
    secrets_of,
    spec_secrets,
)
from batchjobs.sink import OutputRoot
from batchjobs.spec import parse_spec

KEY = "AKIAABCDEFGHIJKLMNOP"
SECRET = "wJalr/XUtnFEMI+K7MDENG"  # / and + as AWS secrets have them
QUOTED = "wJalr%2FXUtnFEMI%2BK7MDENG"


@pytest.mark.parametrize(
    ("url", "clean", "secret"),
    [
        (f"s3://{KEY}:{QUOTED}@bucket/in/*.parquet", "s3://bucket/in/*.parquet", SECRET),
        (f"s3a://{KEY}:{SECRET}@bucket/in/a@b.parquet", "s3a://bucket/in/a@b.parquet", SECRET),
        (f"s3://{KEY}:{QUOTED}@bucket", "s3://bucket", SECRET),
    ],
)
def test_s3_url_credentials_become_storage_options(url, clean, secret):
    path, options = lift_url_credentials(url, {"client_kwargs": {"region_name": "eu-west-1"}})
    assert path == clean
    assert options == {"client_kwargs": {"region_name": "eu-west-1"}, "key": KEY, "secret": secret}


@pytest.mark.parametrize(
    "url",
    ["s3://bucket/a@b.parquet", "s3://bucket/user:x@y/z", "/data/in", "memory://x", "gs://b/p"],
)
def test_urls_without_credentials_are_left_alone(url):
    assert lift_url_credentials(url, None) == (url, {})


def test_credentials_given_twice_or_in_other_urls_are_refused_without_quoting_them():
    with pytest.raises(ValueError) as err:
        lift_url_credentials(f"s3://{KEY}:{QUOTED}@bucket/x", {"secret": "other"}, "input.path")
    assert "input.path" in str(err.value) and "once" in str(err.value)
    with pytest.raises(ValueError) as err:
        lift_url_credentials("https://user:hunter2hunter2@host/x.jsonl", None, "input.path")
    assert "storage options" in str(err.value)
    for e in (err.value,):
        assert SECRET not in str(e) and QUOTED not in str(e) and "hunter2hunter2" not in str(e)


def test_spec_paths_lose_their_credentials_and_keep_the_fingerprint(spec_dict):
    plain = parse_spec(
        {
            **spec_dict,
            "input": {"path": "s3://in-bucket/p/*.parquet"},
            "output": {"path": "s3://ob/o"},
        }
    )
    spec = parse_spec(
        {
            **spec_dict,
            "input": {"path": f"s3://{KEY}:{QUOTED}@in-bucket/p/*.parquet"},
            "output": {"path": f"s3://{KEY}:{QUOTED}@ob/o", "storage_options": {"anon": False}},
        }
    )
    assert spec.input.path == "s3://in-bucket/p/*.parquet" and spec.output.path == "s3://ob/o"
    assert spec.input.storage_options == {"key": KEY, "secret": SECRET}
    assert spec.output.storage_options == {"anon": False, "key": KEY, "secret": SECRET}
    assert spec.fingerprint() == plain.fingerprint()  # rotating credentials keeps the results
    blob = json.dumps(public_spec(spec)) + json.dumps(spec.redacted())
    assert KEY not in blob and SECRET not in blob and "s3://ob/o" in blob


def test_spec_errors_never_quote_credentials(spec_dict):
    cases = [
        # credentials in the URL and in storage_options
        {"input": {"path": f"s3://{KEY}:{QUOTED}@b/x.parquet", "storage_options": {"key": "k"}}},
        # a wrong type next to a URL with credentials: the error quotes the path
        {"output": {"path": f"s3://{KEY}:{QUOTED}@b/out", "mode": f"{KEY}:{SECRET}"}},
        # a number where the env wants text: the error quotes the value
        {"engine": {**spec_dict["engine"], "env": {"HF_TOKEN": 987654321012}}},
    ]
    for case in cases:
        with pytest.raises(SpecError) as err:
            parse_spec({**spec_dict, **case})
        text = str(err.value)
        for secret in (KEY, SECRET, QUOTED, "987654321012"):
            assert secret not in text, text


def test_raw_spec_secrets_covers_urls_options_env_and_candidates():
    raw = {
        "input": {"path": f"s3://{KEY}:{QUOTED}@b/x", "storage_options": {"token": "tok-12345"}},
        "engine": {"env": {"HF_TOKEN": "hf_abcdefgh", "N": 1}},
        "pilot": {"candidates": [{"name": "a", "env": {"API_KEY": "cand-key-1"}}]},
    }
    found = set(raw_spec_secrets(raw))
    assert {KEY, QUOTED, SECRET, "tok-12345", "hf_abcdefgh", "cand-key-1"} <= found
    assert "1" not in found


def test_redact_masks_values_json_escapes_and_credential_shapes():
    value = "p\\q-x"  # a value with a backslash, which JSON writes doubled
    spec_text = json.dumps({"v": value})
    text = (
        f"cannot open s3://{KEY}:{QUOTED}@bucket/x.parquet; spec {spec_text} "
        "https://bob:pa55word@host/a token=abc123 Authorization: Bearer xyz"
    )
    masked = redact(text, [value])
    for leak in (KEY, QUOTED, "pa55word", "bob:", "abc123", "xyz", value, spec_text[7:-2]):
        assert leak not in masked, masked
    assert "s3://***@bucket/x.parquet" in masked and "https://***@host/a" in masked


def test_run_record_reason_masks_url_credentials():
    exc = OutputError(f"cannot write s3://{KEY}:{QUOTED}@bucket/out/_runs.jsonl: boom")
    code, reason = layout.exit_status(exc, ())
    assert code == 5 and KEY not in reason and QUOTED not in reason and "bucket/out" in reason


def test_output_root_shows_and_records_no_credentials():
    out = OutputRoot(f"s3://{KEY}:{QUOTED}@bucket/out", {"client_kwargs": {"region_name": "x"}})
    assert out.url == "s3://bucket/out" and out.root == "bucket/out"
    assert out.fs.key == KEY and out.fs.secret == SECRET
    with pytest.raises(OutputError) as err:
        OutputRoot("ftp://user:hunter2hunter2@host/out")
    assert "hunter2hunter2" not in str(err.value)


def test_engine_env_credentials_stay_out_of_rays_runtime_env(spec_dict):
    from batchjobs.replicas import engine_env

    spec = parse_spec(
        {
            **spec_dict,
            "engine": {
                **spec_dict["engine"],
                "env": {"HF_TOKEN": "hf_x12345678", "WANDB_API_KEY": "w" * 12, "VLLM_X": "1"},
            },
        }
    )
    assert credential_env(spec.engine.env) == {
        "HF_TOKEN": "hf_x12345678",
        "WANDB_API_KEY": "w" * 12,
    }
    env = engine_env(spec, "cpu", engine_factory=lambda s: None)
    assert env["VLLM_X"] == "1" and "HF_TOKEN" not in env and "WANDB_API_KEY" not in env
    assert set(spec_secrets(spec)) >= {"hf_x12345678", "w" * 12}


def test_secrets_of_finds_the_ray_token_where_ray_keeps_it(tmp_path, monkeypatch):
    token = tmp_path / "token"
    token.write_text("ray-head-token-0123456789\n")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    monkeypatch.setenv("MY_SERVICE_PASSWORD", "p4ssw0rd-long")
    found = secrets_of(["short", "no"])
    assert "ray-head-token-0123456789" in found and "p4ssw0rd-long" in found
    assert "short" in found and "no" not in found


def test_cli_errors_never_show_credentials(write_yaml, spec_dict):
    raw = {
        **spec_dict,
        "input": {"path": f"s3://{KEY}:{QUOTED}@bucket/x.parquet", "storage_options": {"key": "k"}},
    }
    result = CliRunner().invoke(app, ["validate", str(write_yaml(raw))])
    assert result.exit_code == 2
    assert "give them once" in result.output
    for leak in (KEY, SECRET, QUOTED):
        assert leak not in result.output
