"""`kubellm submit` and `kubellm schedule` against a fake KFP API on 127.0.0.1 (fake_kfp_server.py)."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from fake_kfp_server import SUBMIT_SOURCES, FakeKfp, isolate_kfp_env

from kubellm.cli import main as cli_main
from kubellm.core.errors import ConfigError
from kubellm.pipelines.schedule import validate_cron
from kubellm.runconfig import load_run_config

SHA = "0123456789abcdef0123456789abcdef01234567"
# the llm_from_scratch run's input data, as a run-config kept in git names it
SOURCES = SUBMIT_SOURCES


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    isolate_kfp_env(monkeypatch, tmp_path_factory)

@pytest.fixture
def kfp_api() -> Iterator[FakeKfp]:
    with FakeKfp() as api:
        yield api


def submit(api: FakeKfp, *extra: str) -> int:
    return cli_main(["submit", "--endpoint", api.url, "--preset", "debug", "--poll-interval", "0.01", *SOURCES,
                     *extra])


def _run_bodies(api: FakeKfp) -> list[dict]:
    return [json.loads(r.body) for r in api.calls("POST", "/runs")]


def test_submit_prints_url_and_waits(kfp_api: FakeKfp, capsys: pytest.CaptureFixture[str]) -> None:
    rc = submit(kfp_api, "--wait", "--experiment", "exp1", "--run-name", "r1", "--pipeline-root", "s3://b/kfp",
                "--service-account", "pipeline-runner", "--arg", "raw_source=s3://b/raw/", "--tag", "v1")
    out = capsys.readouterr().out
    assert rc == 0, out
    (run,) = kfp_api.runs.values()
    assert f"{kfp_api.url}/#/runs/details/{run['run_id']}" in out
    assert "RUNNING" in out and "SUCCEEDED" in out  # the state transitions were printed
    (body,) = _run_bodies(kfp_api)
    assert body["display_name"] == "r1" and body["service_account"] == "pipeline-runner"
    assert body["runtime_config"] == {"pipeline_root": "s3://b/kfp", "parameters": {"raw_source": "s3://b/raw/"}}
    assert _spec(body)["pipelineInfo"]["name"] == "llm-from-scratch"
    assert [e["display_name"] for e in kfp_api.experiments.values()] == ["exp1"]
    assert "kubellm-train:v1" in json.dumps(body)


def test_wait_reports_failure(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeKfp(run_states=["PENDING", "RUNNING", "FAILED"]) as api:
        assert submit(api, "--wait") == 1
    out = capsys.readouterr().out
    assert "failed: task 'pretrain' failed: NotImplementedStageError" in out


def _spec(body: dict) -> dict:
    spec = body["pipeline_spec"]
    return spec.get("pipeline_spec", spec)


def test_sources_come_from_the_run_config_and_an_empty_one_is_refused_before_submitting(
        kfp_api: FakeKfp, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "retrain.yaml"
    cfg.write_text("name: retrain\nstorage:\n  root: s3://b/kubellm\nsources:\n  raw: s3://b/raw/\n  chat: s3://b/chat.jsonl\n")
    base = ["submit", "--endpoint", kfp_api.url, "--run-config", str(cfg), "--git-sha", SHA]
    assert cli_main(base) == 1  # no preferences anywhere: refused, nothing sent
    err = capsys.readouterr().err
    assert "preferences_source: set sources.preferences in the run-config" in err and "raw_source" not in err
    assert kfp_api.runs == {} and kfp_api.experiments == {}
    assert cli_main([*base, "--param", "preferences_source=s3://b/prefs.jsonl"]) == 0
    (body,) = _run_bodies(kfp_api)
    params = _spec(body)["root"]["inputDefinitions"]["parameters"]
    assert params["raw_source"]["defaultValue"] == "s3://b/raw/"  # the run-config's value is the default
    assert params["chat_source"]["defaultValue"] == "s3://b/chat.jsonl"
    assert params["preferences_source"]["defaultValue"] == "s3://b/prefs.jsonl"  # --param wins over nothing
    assert cli_main(["submit", "--endpoint", kfp_api.url, "--pipeline", "evaluation_report", "--preset", "debug",
                     "--set", "storage.root=s3://b/kubellm",
                     "--arg", 'model_uris=["s3://b/m"]']) == 0  # the report reads no raw data


def test_caching_default_and_no_cache(kfp_api: FakeKfp) -> None:
    assert submit(kfp_api) == 0
    assert submit(kfp_api, "--no-cache") == 0
    default, nocache = (_spec(b)["root"]["dag"]["tasks"] for b in _run_bodies(kfp_api))
    assert default["tokenizer"]["cachingOptions"] == {"enableCache": True}
    assert default["fingerprint-source"].get("cachingOptions", {}).get("enableCache", False) is False
    # proto3 drops a false bool, so "off" arrives as an empty cachingOptions
    assert not any(t.get("cachingOptions", {}).get("enableCache", False) for t in nocache.values())


def test_gitops_one_run_per_commit(kfp_api: FakeKfp, capsys: pytest.CaptureFixture[str]) -> None:
    assert submit(kfp_api, "--git-sha", SHA, "--upload") == 0
    first = capsys.readouterr().out
    assert submit(kfp_api, "--git-sha", SHA, "--upload") == 0
    second = capsys.readouterr().out
    assert len(kfp_api.runs) == 1  # exactly one run for the commit
    (run,) = kfp_api.runs.values()
    assert re.fullmatch(f"kubellm-debug-llm-from-scratch-{SHA[:12]}-[0-9a-f]{{8}}", run["display_name"])
    assert run["pipeline_version_reference"]["pipeline_version_id"] in kfp_api.versions
    assert f"runs/details/{run['run_id']}" in first
    assert f"already has run {run['run_id']}" in second and f"runs/details/{run['run_id']}" in second
    names = [v["display_name"] for v in kfp_api.versions.values()]
    assert names[0] == "llm-from-scratch" and re.fullmatch(f"{SHA[:12]}-[0-9a-f]{{8}}", names[1]) and len(names) == 2
    # a different commit is a new run
    assert submit(kfp_api, "--git-sha", "f" * 40) == 0
    assert len(kfp_api.runs) == 2
    assert submit(kfp_api, "--git-sha", "not-a-sha") == 1


def test_gitops_two_run_configs_at_one_commit_each_get_their_run(kfp_api: FakeKfp,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Two chart releases (or a CI matrix) deploy different run-configs with the same (default) name
    from one commit: each is submitted, once, under its own version; an --arg is part of the identity."""
    for extra in ([], ["--set", "dpo.beta=0.3"], [], ["--set", "dpo.beta=0.3"], ["--arg", "promoted_pointer=s3://b/other/promoted.json"]):
        assert submit(kfp_api, "--git-sha", SHA, "--upload", *extra) == 0
    assert len(kfp_api.runs) == 3
    assert capsys.readouterr().out.count("already has run") == 2
    assert len({r["display_name"] for r in kfp_api.runs.values()}) == 3
    assert len([v for v in kfp_api.versions.values() if v["display_name"].startswith(SHA[:12])]) == 2


def test_upload_reuses_identical_version_and_refuses_conflict(kfp_api: FakeKfp,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert submit(kfp_api, "--upload", "--version-name", "v1") == 0
    assert submit(kfp_api, "--upload", "--version-name", "v1") == 0  # same content: reused
    assert "already uploaded with this content" in capsys.readouterr().out
    assert [v["display_name"] for v in kfp_api.versions.values()].count("v1") == 1
    assert len(kfp_api.runs) == 2
    rc = submit(kfp_api, "--upload", "--version-name", "v1", "--set", "dpo.beta=0.3")
    err = capsys.readouterr().err
    assert rc == 1 and "pipeline version conflict" in err and "'v1'" in err
    assert len(kfp_api.runs) == 2  # nothing submitted


def test_bearer_token_from_env(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with FakeKfp(token="tok-123", multi_user=True) as api:
        assert submit(api, "--namespace", "team-ml") == 1  # no credentials
        err = capsys.readouterr().err
        assert "HTTP 401" in err and "KUBELLM_KFP_TOKEN" in err
        monkeypatch.setenv("KUBELLM_KFP_TOKEN", "wrong")
        assert submit(api, "--namespace", "team-ml") == 1
        assert "were refused" in capsys.readouterr().err
        monkeypatch.setenv("KUBELLM_KFP_TOKEN", "tok-123")
        n = len(api.requests)
        assert submit(api, "--namespace", "team-ml") == 0
        sent = api.requests[n:]
        assert sent and all(r.headers.get("authorization") == "Bearer tok-123" for r in sent)
        assert [e["namespace"] for e in api.experiments.values()] == ["team-ml"]
        out = capsys.readouterr()
        assert "tok-123" not in out.out + out.err  # never printed


def test_session_cookie_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeKfp(cookie="authservice_session=abc") as api:
        monkeypatch.setenv("KUBELLM_KFP_COOKIE", "authservice_session=abc")
        assert submit(api) == 0
        assert all("authservice_session=abc" in r.headers.get("cookie", "") for r in api.requests)


def test_unreachable_endpoint(capsys: pytest.CaptureFixture[str]) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    rc = cli_main(["submit", "--endpoint", f"http://127.0.0.1:{port}", "--preset", "debug", *SOURCES])
    err = capsys.readouterr().err
    assert rc == 1 and f"cannot reach KFP at http://127.0.0.1:{port}" in err
    assert cli_main(["submit", "--preset", "debug", *SOURCES]) == 1
    assert "no KFP endpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------- schedule

def schedule(api: FakeKfp, *extra: str) -> int:
    return cli_main(["schedule", "--endpoint", api.url, "--preset", "debug", "--name", "weekly-report",
                     "--set", "storage.root=s3://b/kubellm", *extra])


def test_schedule_create_then_update_idempotently(kfp_api: FakeKfp, capsys: pytest.CaptureFixture[str]) -> None:
    assert schedule(kfp_api, "--cron", "0 0 6 * * 1", "--pipeline-root", "s3://b/kfp",
                    "--service-account", "default-editor") == 0
    (rr,) = kfp_api.recurring.values()
    assert rr["display_name"] == "weekly-report" and rr["trigger"]["cron_schedule"]["cron"] == "0 0 6 * * 1"
    assert rr["no_catchup"] is True and int(rr["max_concurrency"]) == 1 and rr["mode"] == "ENABLE"
    assert rr["service_account"] == "default-editor" and rr["runtime_config"]["pipeline_root"] == "s3://b/kfp"
    spec = _spec(rr)
    assert spec["pipelineInfo"]["name"] == "evaluation-report"
    assert not any(t.get("cachingOptions", {}).get("enableCache", False) for t in spec["root"]["dag"]["tasks"].values())
    assert "created recurring run weekly-report" in capsys.readouterr().out

    # same desired state: nothing changes
    assert schedule(kfp_api, "--cron", "0 0 6 * * 1", "--pipeline-root", "s3://b/kfp",
                    "--service-account", "default-editor") == 0
    assert "is up to date" in capsys.readouterr().out
    assert len(kfp_api.calls("POST", "/recurringruns")) == 1 and len(kfp_api.calls("DELETE", "/recurringruns/.*")) == 0

    # a new cron and models: replaced, still exactly one recurring run with that name
    assert schedule(kfp_api, "--cron", "0 30 7 * * *", "--max-concurrency", "2", "--models", "s3://b/m1,s3://b/m2") == 0
    (rr2,) = kfp_api.recurring.values()
    assert rr2["recurring_run_id"] != rr["recurring_run_id"]
    assert rr2["trigger"]["cron_schedule"]["cron"] == "0 30 7 * * *" and int(rr2["max_concurrency"]) == 2
    assert rr2["runtime_config"]["parameters"] == {"model_uris": ["s3://b/m1", "s3://b/m2"]}
    assert "updated recurring run weekly-report" in capsys.readouterr().out


def test_schedule_refuses_five_field_cron(kfp_api: FakeKfp, capsys: pytest.CaptureFixture[str]) -> None:
    assert schedule(kfp_api, "--cron", "0 6 * * 1") == 1
    err = capsys.readouterr().err
    assert "5 fields" in err and "SIX, seconds first" in err and "'0 0 6 * * 1'" in err
    assert not kfp_api.requests  # refused before contacting the API


@pytest.mark.parametrize("expr", ["0 0 6 * * 1", "*/30 * * * * *", "0 0 0 1 jan-mar ?", "0 15 10 ? * mon-fri",
                                  "@daily", "@every 1h30m", "0 0,30 8-18/2 * * *"])
def test_valid_crons(expr: str) -> None:
    assert validate_cron(expr) == expr


@pytest.mark.parametrize("expr,msg", [("0 60 * * * *", "minute 60 out of range 0-59"),
                                      ("0 0 25 * * *", "hour 25 out of range"),
                                      ("0 0 0 * * funday", "day-of-week field has 'funday'"),
                                      ("0 0 0 * *", "5 fields"), ("* * * * * * *", "7 fields"),
                                      ("0 0 0 * * 5-1", "runs backwards"), ("0 */0 * * * *", "step"),
                                      ("? * * * * *", "only allowed in day-of-month"),
                                      ("0 0 6 * * 1-", "has no end")])
def test_invalid_crons(expr: str, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg.replace("*", r"\*").replace("?", r"\?")):
        validate_cron(expr)


@pytest.mark.parametrize(("arg", "message"), [
    ("nosuch=1", "--arg nosuch: not a parameter of evaluation_report"),
    ("model_uris=s3://b/m", "--arg model_uris='s3://b/m': expected a JSON list"),
    ('evaluate_config={"bogus": 1}', "evaluate.bogus: unknown key"),
])
def test_schedule_and_submit_check_arg_before_contacting_the_api(kfp_api: FakeKfp, capsys: pytest.CaptureFixture[str],
                                                                 arg: str, message: str) -> None:
    assert schedule(kfp_api, "--cron", "0 0 6 * * 1", "--arg", arg) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert submit(kfp_api, "--pipeline", "evaluation_report", "--arg", arg) == 1
    assert message in capsys.readouterr().err
    assert not kfp_api.requests  # refused before contacting the API


def test_schedule_arg_config_as_json_object_is_sent_as_its_string(kfp_api: FakeKfp) -> None:
    cfg = load_run_config(preset="debug").evaluate.model_dump(mode="json")
    cfg["gate"]["promote"] = False  # the evaluation report never promotes; asking it to is refused
    assert schedule(kfp_api, "--cron", "0 0 6 * * 1", "--arg", "evaluate_config=" + json.dumps(cfg)) == 0
    (rr,) = kfp_api.recurring.values()
    sent = rr["runtime_config"]["parameters"]["evaluate_config"]
    assert isinstance(sent, str) and json.loads(sent) == cfg


def test_endpoint_credentials_never_printed(capsys: pytest.CaptureFixture[str]) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    for endpoint in (f"http://user:s3cr3t@127.0.0.1:{port}", "ftp://user:s3cr3t@host"):
        assert cli_main(["submit", "--endpoint", endpoint, "--preset", "debug", *SOURCES]) == 1
        captured = capsys.readouterr()
        assert "s3cr3t" not in captured.err + captured.out and "***@" in captured.err


# a replaced schedule: the new recurring run is created before the old one is deleted (a failed
# create leaves the schedule in place), and an up-to-date one paused in the UI is re-enabled

def test_failed_create_keeps_the_old_schedule(kfp_api: FakeKfp, capsys: pytest.CaptureFixture[str]) -> None:
    assert schedule(kfp_api, "--cron", "0 0 6 * * 1") == 0
    (old_id,) = kfp_api.recurring
    orig = kfp_api._recurring

    def failing_create(method: str, seg: list[str], q: dict[str, str], body: bytes) -> tuple[int, Any]:
        if method == "POST" and len(seg) == 1:
            return 400, {"message": "invalid service account"}
        return orig(method, seg, q, body)

    kfp_api._recurring = failing_create  # type: ignore[method-assign]
    assert schedule(kfp_api, "--cron", "0 30 7 * * *", "--service-account", "typo") == 1
    assert list(kfp_api.recurring) == [old_id]  # was: deleted first, leaving no schedule at all
    assert "invalid service account" in capsys.readouterr().err

    kfp_api._recurring = orig  # type: ignore[method-assign]
    assert schedule(kfp_api, "--cron", "0 30 7 * * *") == 0
    (new_id,) = kfp_api.recurring
    assert new_id != old_id
    posts = [i for i, r in enumerate(kfp_api.requests) if r.method == "POST" and r.path.endswith("/recurringruns")]
    deletes = [i for i, r in enumerate(kfp_api.requests) if r.method == "DELETE" and old_id in r.path]
    assert deletes and posts[-1] < deletes[0]  # created, then the old one deleted


def test_up_to_date_but_paused_in_the_ui_is_re_enabled(kfp_api: FakeKfp, capsys: pytest.CaptureFixture[str]) -> None:
    assert schedule(kfp_api, "--cron", "0 0 6 * * 1") == 0
    (rid,) = kfp_api.recurring
    kfp_api.recurring[rid].update(mode="DISABLE", status="DISABLED")  # paused in the UI
    capsys.readouterr()
    assert schedule(kfp_api, "--cron", "0 0 6 * * 1") == 0
    out = capsys.readouterr().out
    assert "is up to date" in out and "re-enabled it" in out, out
    assert kfp_api.recurring[rid]["mode"] == "ENABLE" and list(kfp_api.recurring) == [rid]
    assert len(kfp_api.calls("POST", f"/recurringruns/{rid}:enable")) == 1
    # and left alone when it already is as asked
    assert schedule(kfp_api, "--cron", "0 0 6 * * 1") == 0
    assert "re-enabled" not in capsys.readouterr().out
    assert len(kfp_api.calls("POST", f"/recurringruns/{rid}:enable")) == 1


def test_gitops_a_failed_run_for_the_commit_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    """A re-run of the CI job for a commit whose run failed printed that run and exited 0: a green job
    for a commit that trained nothing."""
    with FakeKfp(run_states=["FAILED"]) as api:
        assert submit(api, "--git-sha", SHA) == 0
        (run,) = api.runs.values()
        api.runs[run["run_id"]]["state"] = "FAILED"  # what KFP lists once it has failed
        assert submit(api, "--git-sha", SHA) == 1
        assert len(api.runs) == 1  # nothing new submitted
    captured = capsys.readouterr()
    assert f"already has run {run['run_id']} (FAILED)" in captured.out
    assert "did not succeed (FAILED): retry it in the KFP UI" in captured.err


def test_schedule_delete_removes_only_that_recurring_run(kfp_api: FakeKfp, capsys: pytest.CaptureFixture[str]) -> None:
    """What the chart's pre-delete hook runs: `helm uninstall` left the recurring run firing nightly."""
    assert schedule(kfp_api, "--cron", "0 0 6 * * 1") == 0
    assert cli_main(["schedule", "--endpoint", kfp_api.url, "--preset", "debug", "--name", "other-report",
                     "--set", "storage.root=s3://b/kubellm", "--cron", "0 0 7 * * 1"]) == 0
    capsys.readouterr()
    assert cli_main(["schedule", "--endpoint", kfp_api.url, "--name", "weekly-report", "--delete"]) == 0
    assert [r["display_name"] for r in kfp_api.recurring.values()] == ["other-report"]
    assert "deleted recurring run weekly-report" in capsys.readouterr().out
    assert cli_main(["schedule", "--endpoint", kfp_api.url, "--name", "weekly-report", "--delete"]) == 0  # again: no-op
    assert "nothing to delete" in capsys.readouterr().out
    assert cli_main(["schedule", "--endpoint", kfp_api.url, "--name", "weekly-report"]) == 1  # no cron, no delete
    assert "--cron is required (unless --delete)" in capsys.readouterr().err
