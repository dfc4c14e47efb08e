"""`kubellm schedule` replacing a recurring run: the new one is created before the old one is deleted (a
failed create leaves the schedule in place), and an up-to-date one paused in the UI is re-enabled."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fake_kfp_server import FakeKfp, isolate_kfp_env

from kubellm.cli import main as cli_main


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    isolate_kfp_env(monkeypatch, tmp_path_factory)


@pytest.fixture
def kfp_api() -> Iterator[FakeKfp]:
    with FakeKfp() as api:
        yield api


def schedule(api: FakeKfp, *extra: str) -> int:
    return cli_main(["schedule", "--endpoint", api.url, "--preset", "debug", "--name", "weekly-report",
                     "--set", "storage.root=s3://b/kubellm", *extra])


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
