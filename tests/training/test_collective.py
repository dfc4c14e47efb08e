"""Failing together: what each rank raises when one or several ranks failed a check."""

from __future__ import annotations

import pytest

from kubellm.core.errors import InputDataError, IntegrityError, KubellmError
from kubellm.training import collective

TYPES = {"InputDataError": InputDataError, "IntegrityError": IntegrityError}


def _on_rank(monkeypatch: pytest.MonkeyPatch, rank: int, others: list[tuple[str, str] | None],
             error: BaseException | None) -> None:
    """Run `raise_if_any_failed` as `rank` of a job whose other ranks reported `others`."""
    gathered = list(others)
    gathered.insert(rank, None if error is None else (type(error).__name__, str(error)))
    monkeypatch.setattr(collective, "all_gather_objects", lambda obj: gathered)
    collective.raise_if_any_failed(error, "shard check", TYPES, KubellmError)


def test_no_failure_anywhere_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    _on_rank(monkeypatch, 0, [None, None], None)


def test_the_only_failing_rank_raises_its_own_error(monkeypatch: pytest.MonkeyPatch) -> None:
    own = InputDataError("s3.tok: token 5 has id 600")
    with pytest.raises(InputDataError) as got:
        _on_rank(monkeypatch, 1, [None], own)
    assert got.value is own


def test_a_peer_learns_which_rank_failed_and_why_as_that_error_type(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InputDataError, match=r"^shard check failed on 1 rank\(s\): rank 1: InputDataError: "
                                             r"s3\.tok: token 5 has id 600$"):
        _on_rank(monkeypatch, 0, [("InputDataError", "s3.tok: token 5 has id 600")], None)


def test_several_failures_of_different_kinds_are_listed_under_the_default_type(
        monkeypatch: pytest.MonkeyPatch) -> None:
    own = IntegrityError("a.bin: sha256 mismatch")
    with pytest.raises(KubellmError) as got:
        _on_rank(monkeypatch, 0, [("OSError", "b.bin: No such file")], own)
    assert type(got.value) is KubellmError and got.value.__cause__ is own
    assert str(got.value) == ("shard check failed on 2 rank(s): rank 0: IntegrityError: a.bin: sha256 mismatch; "
                              "rank 1: OSError: b.bin: No such file")


def test_an_unlisted_type_falls_back_to_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(KubellmError) as got:
        _on_rank(monkeypatch, 0, [("OSError", "b.bin: No such file")], None)
    assert type(got.value) is KubellmError
