"""The promoted pointer: conditional moves on S3 (moto server) and locally, and the gate's rules."""

from __future__ import annotations

import threading

import pytest

from kubellm.core.storage import storage_for
from kubellm.evaluate.config import GateRule
from kubellm.evaluate.registry import Promoted, PromotionConflictError, Registry, judge


def entry(label: str, acc: float) -> Promoted:
    return Promoted(name="kubellm", model_uri=f"s3://b/{label}", model_digest=label * 8, label=label,
                    scores={"kubellm_knowledge": {"acc": acc}, "perplexity": {"perplexity": 40.0}})


@pytest.fixture(params=["local", "s3"])
def registry_root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "registry")
    return request.getfixturevalue("s3_bucket") + "/kubellm/registry"


def test_put_if_match(registry_root: str) -> None:
    uri = registry_root + "/obj.json"
    st = storage_for(uri)
    assert st.put_if_absent(uri, b"v1")
    data, etag = st.read_with_etag(uri)
    assert data == b"v1"
    assert st.put_if_match(uri, b"v2", etag)
    assert not st.put_if_match(uri, b"v3", etag)  # stale ETag: refused
    assert st.read_bytes(uri) == b"v2"
    assert not st.put_if_match(registry_root + "/missing.json", b"x", etag)


def test_first_promotion_then_update_then_conflict(registry_root: str) -> None:
    reg = Registry(registry_root, "kubellm")
    assert reg.current() is None
    reg.promote(entry("aaaa", 0.5), None)
    with pytest.raises(PromotionConflictError, match=r"another gate moved the promoted pointer .*aaaa"):
        reg.promote(entry("bbbb", 0.6), None)  # a second "first" promotion loses
    cur = reg.current()
    assert cur is not None and cur.entry.label == "aaaa"
    reg.promote(entry("cccc", 0.7), cur)
    with pytest.raises(PromotionConflictError, match=r"now points at cccc"):
        reg.promote(entry("dddd", 0.8), cur)  # stale read: the pointer already moved on
    now = reg.current()
    assert now is not None and now.entry.label == "cccc"
    assert Registry.from_pointer(reg.pointer_uri).pointer_uri == reg.pointer_uri
    hist = storage_for(registry_root).list(registry_root + "/kubellm/history")
    assert len(hist) == 2


def test_concurrent_gates_only_one_moves_the_pointer(registry_root: str) -> None:
    reg = Registry(registry_root, "kubellm")
    reg.promote(entry("base", 0.5), None)
    seen = reg.current()
    results: dict[str, str] = {}

    def gate(label: str) -> None:
        try:
            reg.promote(entry(label, 0.6), seen)
            results[label] = "promoted"
        except PromotionConflictError:
            results[label] = "conflict"

    threads = [threading.Thread(target=gate, args=(lbl,)) for lbl in ("xxxx", "yyyy", "zzzz")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [k for k, v in results.items() if v == "promoted"]
    assert len(winners) == 1 and sorted(results.values()) == ["conflict", "conflict", "promoted"]
    assert reg.current().entry.label == winners[0]


def test_rules() -> None:
    base = entry("base", 0.60)
    head = {"kubellm_knowledge": "acc", "perplexity": "perplexity"}
    rules = {"kubellm_knowledge": GateRule(max_drop=0.05, min=0.3), "perplexity": GateRule(max_drop=5.0, max=100)}
    hib = {"kubellm_knowledge": {"acc": True, "acc_norm": True}}  # lm-eval's higher_is_better
    ok = judge({"kubellm_knowledge": {"acc": 0.56}, "perplexity": {"perplexity": 44.0}}, base, rules, head,
               directions=hib)
    assert ok.passed and len(ok.checks) == 4
    bad = judge({"kubellm_knowledge": {"acc": 0.50}, "perplexity": {"perplexity": 46.0}}, base, rules, head,
                directions=hib)
    assert not bad.passed
    msgs = [c.describe() for c in bad.failures]
    assert msgs == ["kubellm_knowledge acc 0.5000 vs baseline 0.6000: dropped (worse) by 0.1000 "
                    "(allowed worsening 0.0500; higher is better)",
                    "perplexity perplexity 46.0000 vs baseline 40.0000: rose (worse) by 6.0000 "
                    "(allowed worsening 5.0000; lower is better)"]
    # first promotion: no baseline, so only the absolute bounds apply
    first = judge({"kubellm_knowledge": {"acc": 0.2}, "perplexity": {"perplexity": 50.0}}, None, rules, head,
                  directions=hib)
    assert [c.kind for c in first.checks] == ["min", "max"] and [c.passed for c in first.checks] == [False, True]
