"""`kubellm submit --upload` in a profile namespace of multi-user KFP, commit after commit.

The fake KFP API of test_pipeline_submit.py keeps every pipeline in one list; multi-user KFP does not: a
pipeline uploaded with a namespace lives in that namespace, a list without a namespace returns only the
shared pipelines, and a name is unique per namespace (a second upload of it answers HTTP 409).
`NamespacedPipelinesKfp` behaves like that (and pages its lists), so the GitOps flow — one `--upload` per
commit into the same pipeline — is checked against what the server really does.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fake_kfp_server import SUBMIT_SOURCES, FakeKfp, _match_filter, isolate_kfp_env

from kubellm.cli import main as cli_main

SHA1 = "0123456789abcdef0123456789abcdef01234567"
SHA2 = "89abcdef0123456789abcdef0123456789abcdef"
SOURCES = SUBMIT_SOURCES


class NamespacedPipelinesKfp(FakeKfp):
    """FakeKfp whose pipelines are namespaced like multi-user KFP's (see the module docstring)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.hide_lists = 0  # the next N pipeline lists return nothing (a concurrent submit's upload is unseen)
        self.apply_filter = True  # False: ignore the list filter (every pipeline of the namespace, paged)

    def _pipelines(self, method: str, seg: list[str], q: dict[str, str], body: bytes) -> tuple[int, Any]:
        ns = q.get("namespace") or ""
        if method == "POST" and seg[1:] == ["upload"]:
            name = q.get("name")
            if any(p["display_name"] == name and p["namespace"] == ns for p in self.pipelines.values()):
                return 409, {"message": f"Failed to create a pipeline: pipeline {name} already exists "
                                        f"in namespace {ns!r}", "code": 6}
            pid = str(uuid.uuid4())
            p = {"pipeline_id": pid, "display_name": name, "description": q.get("description"), "namespace": ns}
            self.pipelines[pid] = p
            self._add_version(pid, name or "", "")
            return 200, p
        if method == "GET" and len(seg) == 1:
            items = [p for p in self.pipelines.values() if p["namespace"] == ns]  # "" = shared only
            if self.apply_filter:
                items = _match_filter(items, q.get("filter"))
            if self.hide_lists:
                self.hide_lists -= 1
                items = []
            start = int(q.get("page_token") or 0)
            size = int(q.get("page_size") or 10)
            page = items[start:start + size]
            more = start + size < len(items)
            return 200, {"pipelines": page, "total_size": len(items),
                         "next_page_token": str(start + size) if more else ""}
        return super()._pipelines(method, seg, q, body)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    isolate_kfp_env(monkeypatch, tmp_path_factory)


@pytest.fixture
def kfp_ns() -> Iterator[NamespacedPipelinesKfp]:
    api = NamespacedPipelinesKfp(multi_user=True)
    with api:
        yield api


def submit(api: FakeKfp, *extra: str) -> int:
    return cli_main(["submit", "--endpoint", api.url, "--preset", "debug", *SOURCES, *extra])


def _commit(version_name: str) -> str:
    """`<sha12>-<spec hash 8>` (a --git-sha upload's version) -> `<sha12>`; other names unchanged."""
    m = re.fullmatch(r"([0-9a-f]{12})-[0-9a-f]{8}", version_name)
    return m.group(1) if m else version_name


def _versions(api: FakeKfp, pid: str) -> list[str]:
    return [_commit(v["display_name"]) for v in api.versions.values() if v["pipeline_id"] == pid]


def test_fake_behaves_like_multi_user_kfp(kfp_ns: NamespacedPipelinesKfp) -> None:
    """The premise: the old lookup (kfp.Client.get_pipeline_id, no namespace) cannot see a profile's pipeline."""
    import kfp

    with pytest.warns(FutureWarning):
        client = kfp.Client(host=kfp_ns.url)
    kfp_ns.pipelines["p1"] = {"pipeline_id": "p1", "display_name": "llm-from-scratch", "namespace": "team-ml"}
    assert client.get_pipeline_id("llm-from-scratch") is None
    assert [p.pipeline_id for p in client.list_pipelines(namespace="team-ml").pipelines] == ["p1"]


def test_two_commits_upload_two_versions_of_one_namespaced_pipeline(
        kfp_ns: NamespacedPipelinesKfp, capsys: pytest.CaptureFixture[str]) -> None:
    assert submit(kfp_ns, "--namespace", "team-ml", "--git-sha", SHA1, "--upload") == 0, capsys.readouterr().err
    assert submit(kfp_ns, "--namespace", "team-ml", "--git-sha", SHA2, "--upload") == 0, capsys.readouterr().err
    (pipeline,) = kfp_ns.pipelines.values()  # one pipeline, in the profile namespace
    assert pipeline["display_name"] == "llm-from-scratch" and pipeline["namespace"] == "team-ml"
    assert _versions(kfp_ns, pipeline["pipeline_id"]) == ["llm-from-scratch", SHA1[:12], SHA2[:12]]
    runs = list(kfp_ns.runs.values())
    assert len(runs) == 2
    by_version = {_commit(kfp_ns.versions[r["pipeline_version_reference"]["pipeline_version_id"]]["display_name"])
                  for r in runs}
    assert by_version == {SHA1[:12], SHA2[:12]}
    assert {r["pipeline_version_reference"]["pipeline_id"] for r in runs} == {pipeline["pipeline_id"]}
    # the lookups named the namespace; no upload was refused
    lists = kfp_ns.calls("GET", "/pipelines")
    assert lists and all(r.query.get("namespace") == "team-ml" for r in lists)
    assert len(kfp_ns.calls("POST", "/pipelines/upload")) == 1
    # the same commit again: its run is found, nothing uploaded or submitted
    assert submit(kfp_ns, "--namespace", "team-ml", "--git-sha", SHA2, "--upload") == 0
    assert len(kfp_ns.runs) == 2 and len(kfp_ns.versions) == 3


def test_shared_pipeline_without_namespace(capsys: pytest.CaptureFixture[str]) -> None:
    with NamespacedPipelinesKfp() as api:
        assert submit(api, "--git-sha", SHA1, "--upload") == 0
        assert submit(api, "--git-sha", SHA2, "--upload") == 0, capsys.readouterr().err
        (pipeline,) = api.pipelines.values()
        assert pipeline["namespace"] == ""
        assert _versions(api, pipeline["pipeline_id"]) == ["llm-from-scratch", SHA1[:12], SHA2[:12]]
        assert all("namespace" not in r.query for r in api.calls("GET", "/pipelines"))


def test_a_same_named_shared_pipeline_is_not_the_profiles(kfp_ns: NamespacedPipelinesKfp,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    kfp_ns.pipelines["shared"] = {"pipeline_id": "shared", "display_name": "llm-from-scratch", "namespace": ""}
    assert submit(kfp_ns, "--namespace", "team-ml", "--git-sha", SHA1, "--upload") == 0, capsys.readouterr().err
    (mine,) = [p for p in kfp_ns.pipelines.values() if p["namespace"] == "team-ml"]
    assert _versions(kfp_ns, "shared") == []  # nothing uploaded into the shared pipeline
    assert _versions(kfp_ns, mine["pipeline_id"]) == ["llm-from-scratch", SHA1[:12]]


def test_upload_conflict_re_resolves_the_existing_pipeline(kfp_ns: NamespacedPipelinesKfp,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Another submit created the pipeline between our lookup and our upload: HTTP 409, then use it."""
    assert submit(kfp_ns, "--namespace", "team-ml", "--git-sha", SHA1, "--upload") == 0
    (pid,) = kfp_ns.pipelines
    kfp_ns.hide_lists = 1  # the lookup misses it
    assert submit(kfp_ns, "--namespace", "team-ml", "--git-sha", SHA2, "--upload") == 0, capsys.readouterr().err
    uploads = kfp_ns.calls("POST", "/pipelines/upload")
    assert len(uploads) == 2  # the second one answered 409 ...
    assert list(kfp_ns.pipelines) == [pid]  # ... and its pipeline got the version
    assert _versions(kfp_ns, pid) == ["llm-from-scratch", SHA1[:12], SHA2[:12]]
    assert len(kfp_ns.runs) == 2


def test_lookup_pages_through_the_list(kfp_ns: NamespacedPipelinesKfp) -> None:
    """A server that returns non-matching pipelines first (e.g. a filter it does not apply) is paged through."""
    import kfp

    from kubellm.pipelines.submit import find_pipeline

    for i in range(150):
        kfp_ns.pipelines[f"x{i}"] = {"pipeline_id": f"x{i}", "display_name": f"other-{i}", "namespace": "team-ml"}
    kfp_ns.pipelines["mine"] = {"pipeline_id": "mine", "display_name": "llm-from-scratch", "namespace": "team-ml"}
    with pytest.warns(FutureWarning):
        client = kfp.Client(host=kfp_ns.url)
    kfp_ns.apply_filter = False
    assert find_pipeline(client, "llm-from-scratch", "team-ml") == "mine"
    assert find_pipeline(client, "absent", "team-ml") is None
    assert len(kfp_ns.calls("GET", "/pipelines")) == 4  # two pages of 100 each time
