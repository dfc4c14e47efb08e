"""No secret reaches compiled pipeline YAML or what `kubellm submit`/`schedule` send to KFP.

Fake credentials are planted in every environment variable a user might have set; the compiled IR
and every request body sent to a fake KFP API are scanned for them. (Credentials travel only as the
Authorization/Cookie header, which is where they belong; S3 keys reach pods by Secret reference.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "pipelines"))
from fake_kfp_server import FakeKfp  # noqa: E402

from kubellm.cli import main as cli_main  # noqa: E402

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEPLANTED0001",
    "AWS_SECRET_ACCESS_KEY": "fake/planted+SECRET+key/0123456789abcdef",
    "AWS_SESSION_TOKEN": "FakePlantedSessionToken0123",
    "KUBELLM_KFP_TOKEN": "fake-planted-bearer-token-xyz",
    "KUBELLM_KFP_COOKIE": "authservice_session=fake-planted-cookie-987",
    "HF_TOKEN": "hf_fakeplantedtoken123",
}


def _scan(blob: bytes, where: str) -> None:
    for name, value in SECRETS.items():
        for needle in {value, value.split("=", 1)[-1]}:
            assert needle.encode() not in blob, f"{name} leaked into {where}"


@pytest.fixture
def planted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_compiled_yaml_has_no_secrets(planted: None, tmp_path: Path) -> None:
    assert cli_main(["compile", "--preset", "debug", "--output", str(tmp_path / "out")]) == 0
    files = sorted((tmp_path / "out").glob("*.yaml"))
    assert len(files) == 2
    for f in files:
        text = f.read_bytes()
        _scan(text, str(f))
        assert b"secretName: kubellm-s3" in text  # credentials by reference instead


def test_submit_and_schedule_bodies_have_no_secrets(planted: None, capsys: pytest.CaptureFixture[str]) -> None:
    with FakeKfp(token=SECRETS["KUBELLM_KFP_TOKEN"]) as api:
        assert cli_main(["submit", "--endpoint", api.url, "--preset", "debug", "--git-sha", "a" * 40,
                         "--upload", "--pipeline-root", "s3://b/kfp", "--set", "storage.root=s3://b/kubellm",
                         "--set", "sources.raw=s3://b/raw/",
                         "--set", "sources.chat=s3://b/chat.jsonl",
                         "--set", "sources.preferences=s3://b/prefs.jsonl"]) == 0
        assert cli_main(["schedule", "--endpoint", api.url, "--preset", "debug", "--name", "report",
                         "--set", "storage.root=s3://b/kubellm", "--cron", "0 0 6 * * *"]) == 0
        assert api.requests
        for r in api.requests:
            _scan(r.body, f"{r.method} {r.path} body")
            _scan((r.path + str(r.query)).encode(), f"{r.method} {r.path} URL")
            assert r.headers.get("authorization") == f"Bearer {SECRETS['KUBELLM_KFP_TOKEN']}"  # header only
    out = capsys.readouterr()
    _scan((out.out + out.err).encode(), "command output")
