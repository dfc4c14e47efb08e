"""The projected ServiceAccount token the Helm chart's jobs mount ($KF_PIPELINES_SA_TOKEN_PATH) is sent to KFP.

kfp.Client loads ServiceAccountTokenVolumeCredentials by itself only when no host is given; `connect` always
gives one, so it must pass them explicitly. Checked against the fake KFP API (fake_kfp_server.py): the
Authorization header every request actually carries.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_kfp_server import SUBMIT_SOURCES, FakeKfp, isolate_kfp_env

from kubellm.cli import main as cli_main
from kubellm.pipelines import kfp_api
from kubellm.pipelines.kfp_api import KfpApiError, connect

SOURCES = SUBMIT_SOURCES


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    isolate_kfp_env(monkeypatch, tmp_path_factory)

def _token_file(tmp_path: Path, token: str) -> Path:
    path = tmp_path / "kfp-token" / "token"
    path.parent.mkdir(exist_ok=True)
    path.write_text(token + "\n")  # the kubelet writes no newline; a hand-made file often has one
    return path


def submit(api: FakeKfp, *extra: str) -> int:
    return cli_main(["submit", "--endpoint", api.url, "--preset", "debug", *SOURCES, *extra])


def test_default_path_matches_kfp() -> None:
    import kfp.client

    assert kfp_api.SA_TOKEN_ENV == kfp.client.KF_PIPELINES_SA_TOKEN_ENV
    assert "/var/run/secrets/kubeflow/pipelines/token" == kfp.client.KF_PIPELINES_SA_TOKEN_PATH


def test_submit_sends_the_projected_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(_token_file(tmp_path, "sa-tok-123")))
    with FakeKfp(token="sa-tok-123", multi_user=True) as api:
        assert submit(api, "--namespace", "team-ml") == 0, capsys.readouterr().err
        assert len(api.requests) >= 3  # healthz (preflight), experiment, run
        assert all(r.headers.get("authorization") == "Bearer sa-tok-123" for r in api.requests)
        assert len(api.runs) == 1
        assert [e["namespace"] for e in api.experiments.values()] == ["team-ml"]
    out = capsys.readouterr()
    assert "sa-tok-123" not in out.out + out.err  # never printed


def test_schedule_sends_the_projected_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(_token_file(tmp_path, "sa-tok-sched")))
    with FakeKfp(token="sa-tok-sched", multi_user=True) as api:
        assert cli_main(["schedule", "--endpoint", api.url, "--preset", "debug", "--set", "storage.root=s3://b/kubellm", "--name", "weekly",
                         "--cron", "0 0 6 * * 1", "--namespace", "team-ml"]) == 0
        assert len(api.recurring) == 1
        assert all(r.headers.get("authorization") == "Bearer sa-tok-sched" for r in api.requests)


def test_the_kfp_client_itself_sends_the_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Not only the preflight: every call made through the kfp.Client carries the file's token."""
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(_token_file(tmp_path, "client-tok")))
    monkeypatch.setattr(kfp_api, "preflight", lambda endpoint: {})
    with FakeKfp(token="client-tok", multi_user=True) as api:
        client = connect(api.url, "team-ml")
        client.create_experiment("exp", namespace="team-ml")
        assert [r.path for r in api.requests] == ["/apis/v2beta1/experiments"] * 2  # list (lookup), create
        assert all(r.headers.get("authorization") == "Bearer client-tok" for r in api.requests)


def test_token_file_is_reread_per_request(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The kubelet rotates a projected token; a long `--wait` must pick up the new one."""
    path = _token_file(tmp_path, "first")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(path))
    with FakeKfp(token="first", multi_user=True) as api:
        client = connect(api.url, "team-ml")
        cfg = client._existing_config
        assert cfg.refresh_api_key_hook is not None  # kfp's ServiceAccountTokenVolumeCredentials hook
        client.list_experiments(namespace="team-ml")
        path.write_text("second")
        api.token = "second"
        client.list_experiments(namespace="team-ml")
        assert [r.headers.get("authorization") for r in api.requests] == [
            "Bearer first", "Bearer first", "Bearer second"]  # healthz, list, list after rotation
        assert cfg.auth_settings()["Bearer"]["value"] == "Bearer second"


def test_kubellm_token_wins_over_the_token_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(_token_file(tmp_path, "sa-tok")))
    monkeypatch.setenv("KUBELLM_KFP_TOKEN", "explicit-tok")
    with FakeKfp(token="explicit-tok", multi_user=True) as api:
        assert submit(api, "--namespace", "team-ml") == 0
        assert api.requests and all(r.headers.get("authorization") == "Bearer explicit-tok" for r in api.requests)
        client = connect(api.url, "team-ml")
        assert client._existing_config.refresh_api_key_hook is None


def test_kfp_default_path_is_used_when_it_exists(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(kfp_api, "SA_TOKEN_DEFAULT_PATH", str(_token_file(tmp_path, "default-path-tok")),
                        raising=False)
    with FakeKfp(token="default-path-tok", multi_user=True) as api:
        assert submit(api, "--namespace", "team-ml") == 0
        assert api.requests and all(r.headers.get("authorization") == "Bearer default-path-tok"
                                    for r in api.requests)


def test_without_any_token_nothing_is_sent() -> None:
    with FakeKfp() as api:
        assert submit(api) == 0
        assert api.requests and not any("authorization" in r.headers for r in api.requests)
        assert connect(api.url)._existing_config.refresh_api_key_hook is None


def test_refused_token_file_is_named_not_printed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = _token_file(tmp_path, "stale-sa-tok")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(path))
    with FakeKfp(token="current", multi_user=True) as api:
        assert submit(api, "--namespace", "team-ml") == 1
    err = capsys.readouterr().err
    assert "HTTP 401" in err and str(path) in err and "were refused" in err
    assert "stale-sa-tok" not in err


def test_unreadable_token_file_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope" / "token"
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(missing))
    with FakeKfp(token="t", multi_user=True) as api:
        with pytest.raises(KfpApiError, match="cannot read the KFP ServiceAccount token file"):
            connect(api.url, "team-ml")
        assert submit(api, "--namespace", "team-ml") == 1
        assert not api.requests  # nothing sent without the credentials that were asked for
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err
