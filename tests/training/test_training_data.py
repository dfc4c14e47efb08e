"""The packed-window loader: rank split without overlap, seeded order, exact resume, bad shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kubellm.core.errors import InputDataError
from kubellm.tokenizer.shards import TokenShardWriter
from kubellm.training.data import PackedWindowLoader, open_shards, stage_artifact_files


def write_shard(path: Path, docs: list[list[int]], vocab: int = 512) -> str:
    with TokenShardWriter(path, vocab) as w:
        for d in docs:
            w.add_document(d)
    return str(path)


@pytest.fixture
def shards(tmp_path: Path) -> list[str]:
    # token value = its global position (mod vocab) so windows are identifiable
    a = write_shard(tmp_path / "train/a.tok", [list(range(0, 200)), list(range(200, 330))])
    b = write_shard(tmp_path / "train/b.tok", [list(range(330, 500))])
    return [a, b]


def loader(shards: list[str], rank: int = 0, world: int = 1, **kw) -> PackedWindowLoader:
    args = dict(seq_len=16, micro_batch_size=2, dp_rank=rank, dp_size=world, seed=7)
    args.update(kw)
    return PackedWindowLoader(open_shards(shards, 512), **args)


def take(ld: PackedWindowLoader, n: int) -> list[dict]:
    out = [next(ld) for _ in range(n)]
    ld.close()
    return out


def window_starts(batches: list[dict]) -> list[int]:
    return [int(row[0]) for b in batches for row in b["input_ids"]]


def test_windows_are_shifted_pairs(shards: list[str]) -> None:
    b = take(loader(shards), 1)[0]
    assert b["input_ids"].shape == b["labels"].shape == (2, 16)
    np.testing.assert_array_equal(b["input_ids"][:, 1:].numpy(), b["labels"][:, :-1].numpy())


def test_ranks_split_an_epoch_without_overlap(shards: list[str]) -> None:
    full = loader(shards)
    per_epoch = full.num_windows  # 329//16 + 169//16 = 20 + 10 = 30
    assert per_epoch == 30
    seen = []
    for rank in range(3):
        ld = loader(shards, rank, 3)
        seen.append(window_starts(take(ld, ld.per_rank // 2)))  # exactly one epoch of this rank
    sets = [set(s) for s in seen]
    assert all(len(s) == 10 for s in sets)
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    # together they are the 1-rank epoch, and each global step holds the same windows
    assert sets[0] | sets[1] | sets[2] == set(window_starts(take(loader(shards, micro_batch_size=6), 5)))


def test_same_windows_per_step_for_any_dp(shards: list[str]) -> None:
    one = window_starts(take(loader(shards, micro_batch_size=4), 3))  # global batch 4
    two = [window_starts(take(loader(shards, r, 2), 3)) for r in range(2)]  # 2 ranks × 2
    for step in range(3):
        assert set(one[4 * step: 4 * step + 4]) == set(two[0][2 * step: 2 * step + 2] + two[1][2 * step: 2 * step + 2])


def test_order_is_seeded_and_epochs_differ(shards: list[str]) -> None:
    a = window_starts(take(loader(shards), 30))
    b = window_starts(take(loader(shards), 30))
    c = window_starts(take(loader(shards, seed=8), 30))
    assert a == b and a != c
    assert a[:30] != a[30:]  # epoch 2 is a different permutation of the same windows
    assert sorted(a[:30]) == sorted(a[30:])


def test_state_dict_resumes_exactly_despite_prefetch(shards: list[str]) -> None:
    ld = loader(shards, prefetch=4)
    first = [next(ld) for _ in range(17)]  # crosses an epoch boundary (15 batches per epoch)
    state = ld.state_dict()
    rest = window_starts([next(ld) for _ in range(5)])
    ld.close()
    assert state["epoch"] == 1
    fresh = loader(shards)
    fresh.load_state_dict(state)
    assert window_starts(take(fresh, 5)) == rest
    assert len(first) == 17


def test_a_loader_error_is_raised_and_the_next_call_does_not_hang(shards: list[str]) -> None:
    # before: the producer thread exited after reporting the error but stayed "started", so the next
    # next() waited forever on its empty queue
    ld = loader(shards, prefetch=2)
    real, calls = ld._make_batch, []

    def flaky(pos):  # noqa: ANN001, ANN202
        calls.append(pos)
        if len(calls) == 1:
            raise OSError("simulated read error")
        return real(pos)

    ld._make_batch = flaky  # type: ignore[method-assign]
    with pytest.raises(OSError, match="simulated read error"):
        next(ld)
    again = next(ld)  # a fresh producer from the same position
    ld.close()
    assert window_starts([again]) == window_starts(take(loader(shards), 1))


def test_resume_refuses_other_layout(shards: list[str]) -> None:
    state = loader(shards).state_dict()
    with pytest.raises(InputDataError, match="dp_size"):
        loader(shards, 0, 2).load_state_dict(state)
    # the saved (epoch, offset) indexes the shuffled order: in file order it would repeat or skip windows
    with pytest.raises(InputDataError, match="shuffle=True but this run has shuffle=False"):
        loader(shards, shuffle=False).load_state_dict(state)


def test_shard_tails_no_window_reaches_are_warned_about(tmp_path: Path, shards: list[str],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    # 10 shards of 25 tokens at seq_len 16: one window each, 9 of every 25 tokens never trained on
    small = [write_shard(tmp_path / f"s/{i}.tok", [list(range(25))]) for i in range(10)]
    with caplog.at_level("WARNING", logger="kubellm.training.data"):
        PackedWindowLoader(open_shards(small, 512), seq_len=16, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0)
    assert "36.0% of the 250 tokens in 10 shard(s) are never trained on" in caplog.text
    assert "tokenizer.tokens_per_shard" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="kubellm.training.data"):
        loader(shards, seq_len=1)  # every token but each shard's last one starts a window
    assert caplog.text == ""


def test_resume_refuses_shards_added_removed_or_swapped(shards: list[str], tmp_path: Path) -> None:
    ld = loader(shards)
    take(ld, 3)
    state = ld.state_dict()
    # b.tok (169 windows-worth) replaced by c.tok with the same window count: num_windows agrees, so
    # this used to resume silently at a position in other data
    c = write_shard(tmp_path / "train/c.tok", [list(range(100, 270))])
    swapped = loader([shards[0], c])
    assert swapped.num_windows == ld.num_windows
    with pytest.raises(InputDataError, match=r"saved over 2 token shard\(s\) holding 500 tokens .* shards were "
                                             r"added, removed or changed"):
        swapped.load_state_dict(state)
    # a shard split in two with the same windows in all: also refused
    d1 = write_shard(tmp_path / "train/d1.tok", [list(range(330, 400))])
    d2 = write_shard(tmp_path / "train/d2.tok", [list(range(400, 500))])
    with pytest.raises(InputDataError, match="added, removed or changed"):
        loader([shards[0], d1, d2]).load_state_dict(state)
    # the same shards staged under another directory (an S3 cache) resume
    moved = tmp_path / "cache/train"
    moved.mkdir(parents=True)
    for p in shards:
        (moved / Path(p).name).write_bytes(Path(p).read_bytes())
    again = loader([str(moved / Path(p).name) for p in shards])
    again.load_state_dict(state)
    assert window_starts(take(again, 2)) == window_starts([next(ld) for _ in range(2)])
    ld.close()
    # a state saved before the fingerprint existed still loads
    old = {k: v for k, v in state.items() if not k.startswith("shard_")}
    loader(shards).load_state_dict(old)


def test_doc_masking_supplies_doc_ids_and_restarted_positions(tmp_path: Path) -> None:
    p = write_shard(tmp_path / "d.tok", [[1, 5, 6, 2], [1, 7, 8, 9, 2], [1, 3, 2]] * 10)
    b = take(PackedWindowLoader(open_shards([p], 512), seq_len=8, micro_batch_size=1, dp_rank=0, dp_size=1,
                                seed=0, shuffle=False, doc_masking=True), 1)[0]
    np.testing.assert_array_equal(b["doc_ids"][0].numpy(), [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(b["position_ids"][0].numpy(), [0, 1, 2, 3, 0, 1, 2, 3])


def test_doc_masking_positions_stay_inside_the_window_for_long_documents(tmp_path: Path) -> None:
    import torch

    from kubellm.model import Transformer
    from kubellm.model.config import get_preset
    from kubellm.model.transformer import positions_from_doc_ids

    # a 1900-token document then a short one: windows deep inside the long document gave positions
    # up to ~1900, an IndexError into the RoPE table (a device assert on CUDA) for max_seq_len=128
    p = write_shard(tmp_path / "long.tok", [[i % 500 for i in range(1900)], list(range(100))])
    ld = PackedWindowLoader(open_shards([p], 512), seq_len=128, micro_batch_size=1, dp_rank=0, dp_size=1,
                            seed=0, shuffle=False, doc_masking=True)
    batches = [next(ld) for _ in range(ld.per_rank)]
    ld.close()
    for b in batches:
        assert int(b["position_ids"].max()) < 128
        torch.testing.assert_close(b["position_ids"], positions_from_doc_ids(b["doc_ids"]))
    last = batches[-1]  # tokens 1792…1919: the end of the long document, then the short one from 0
    assert int(last["doc_ids"].max()) == 1 and int(last["position_ids"][0, -1]) == 19
    model = Transformer(get_preset("debug").with_(vocab_size=512, max_seq_len=128))
    loss = model(last["input_ids"], position_ids=last["position_ids"], doc_ids=last["doc_ids"],
                 labels=last["labels"])
    assert torch.isfinite(loss)


def test_bad_shards_fail_at_open_naming_the_file(tmp_path: Path) -> None:
    good = write_shard(tmp_path / "g.tok", [list(range(100))], vocab=512)
    data = Path(good).read_bytes()
    (tmp_path / "magic.tok").write_bytes(b"NOTATOK\0" + data[8:])
    with pytest.raises(InputDataError, match=r"magic\.tok: bad magic"):
        open_shards([tmp_path / "magic.tok"], 512)
    (tmp_path / "short.tok").write_bytes(data[:-16])
    with pytest.raises(InputDataError, match=r"short\.tok: file is .* bytes but its header"):
        open_shards([tmp_path / "short.tok"], 512)
    # ids valid for the shard's own vocab but not for the model's
    with pytest.raises(InputDataError, match=r"g\.tok: shard vocab_size 512 exceeds the model's vocab_size 64"):
        open_shards([good], 64)
    with pytest.raises(InputDataError, match="no token shards"):
        open_shards([], 512)
    # an id past the shard's own vocab is corrupt even where the model's vocab is larger
    shard = TokenShardWriter(tmp_path / "v.tok", 300)
    shard.add_document(list(range(100)))
    shard.close()
    raw = bytearray((tmp_path / "v.tok").read_bytes())
    from kubellm.tokenizer.shards import HEADER_SIZE

    raw[HEADER_SIZE + 2 * 7: HEADER_SIZE + 2 * 8] = (310).to_bytes(2, "little")
    (tmp_path / "v.tok").write_bytes(bytes(raw))
    with pytest.raises(InputDataError, match=r"v\.tok: token 7 has id 310 ≥ vocab_size 300"):
        open_shards([tmp_path / "v.tok"], 512)


def test_corrupt_document_offsets_fail_at_open_naming_the_file(tmp_path: Path) -> None:
    import struct

    from kubellm.tokenizer.shards import HEADER_SIZE

    good = write_shard(tmp_path / "g.tok", [list(range(100)), list(range(50)), list(range(30))])
    data = bytearray(Path(good).read_bytes())
    table = HEADER_SIZE + 180 * 2  # uint16 tokens, then offsets 0, 100, 150, 180
    last = bytearray(data)
    last[table + 24: table + 32] = struct.pack("<Q", 999)  # was accepted: doc masking read past the end
    (tmp_path / "last.tok").write_bytes(bytes(last))
    with pytest.raises(InputDataError, match=r"last\.tok: document offsets run 0 … 999, expected 0 … token_count=180"):
        open_shards([tmp_path / "last.tok"], 512)
    back = bytearray(data)
    back[table + 16: table + 24] = struct.pack("<Q", 20)  # 0, 100, 20, 180
    (tmp_path / "back.tok").write_bytes(bytes(back))
    with pytest.raises(InputDataError, match=r"back\.tok: document offset 2 is 20, below offset 1 = 100"):
        open_shards([tmp_path / "back.tok"], 512)


def test_too_little_data_for_the_batch_names_the_numbers(shards: list[str]) -> None:
    with pytest.raises(InputDataError, match="need at least 64"):
        loader(shards, 0, 2, micro_batch_size=32)


def test_zero_seq_len_or_micro_batch_is_refused_naming_it(shards: list[str]) -> None:
    # seq_len=0 was a ZeroDivisionError; micro_batch_size=0 built a loader whose first batch crashed
    with pytest.raises(ValueError, match="seq_len=0"):
        loader(shards, seq_len=0)
    with pytest.raises(ValueError, match="micro_batch_size=0"):
        loader(shards, micro_batch_size=0)


def test_s3_shards_are_fetched_to_a_local_cache(tmp_path: Path, s3_bucket: str) -> None:
    from kubellm.core.manifest import publish_dir

    src = tmp_path / "art"
    write_shard(src / "train/a.tok", [list(range(100))])
    (src / "tokenizer").mkdir()
    (src / "tokenizer/tokenizer.json").write_text("{}")
    m = publish_dir(src, f"{s3_bucket}/tok/x", kind="token_shards")
    root, paths = stage_artifact_files(m, ["train/"], tmp_path / "cache")
    assert paths == ["train/a.tok"] and str(root).startswith(str(tmp_path / "cache"))
    assert open_shards([root / paths[0]], 512)[0].token_count == 100
    local_root, _ = stage_artifact_files(m.model_copy(update={"uri": str(src)}), ["train/"])
    assert local_root == src  # a local artifact is read in place


def test_every_window_maps_to_its_shard_and_start_with_empty_shards_between(tmp_path: Path) -> None:
    # the old per-window tables, rebuilt here, against the O(shards) lookup; a shard too short for any
    # window (5 tokens at seq_len 16) sits between two others
    sizes = [70, 5, 49, 17]
    # token values differ per shard (shard k holds 100k, 100k+1, ...): the wrong shard at the right offset shows
    paths = [write_shard(tmp_path / f"m/{i}.tok", [list(range(100 * i, 100 * i + n))]) for i, n in enumerate(sizes)]
    ld = PackedWindowLoader(open_shards(paths, 512), seq_len=16, micro_batch_size=1, dp_rank=0, dp_size=1,
                            seed=0, shuffle=False)
    counts = [(n - 1) // 16 for n in sizes]
    expected = [(k, j * 16) for k, c in enumerate(counts) for j in range(c)]
    assert ld.num_windows == len(expected) == 8
    for item, (k, start) in enumerate(expected):
        w = ld._window(item)
        np.testing.assert_array_equal(w["input_ids"], 100 * k + start + np.arange(16))
    ld.close()
    # the int32 shuffle is the int64 one: the data order of earlier checkpoints is unchanged
    np.testing.assert_array_equal(ld._rank_items(0), np.arange(8))
    shuffled = PackedWindowLoader(open_shards(paths, 512), seq_len=16, micro_batch_size=1, dp_rank=0, dp_size=1, seed=3)
    np.testing.assert_array_equal(shuffled._rank_items(2), np.random.default_rng([3, 2]).permutation(8))


# Each rank opens the same four shards; the whole-shard scans are split between the ranks, and a bad
# shard found by one rank fails both.
_SPLIT_SCAN = """
import json, sys
import torch.distributed as dist
from kubellm.tokenizer.shards import TokenShardReader
from kubellm.training.data import open_shards

scanned = []
check = TokenShardReader.check_ids
def spy(self, vocab_size, **kw):
    scanned.append(self.path.name)
    return check(self, vocab_size, **kw)
TokenShardReader.check_ids = spy
dist.init_process_group("gloo")
try:
    shards = open_shards(sys.argv[1:], 512, rank=dist.get_rank(), world=dist.get_world_size())
    print(json.dumps({"scanned": scanned, "opened": [s.path.name for s in shards]}), flush=True)
except Exception as e:
    print(json.dumps({"scanned": scanned, "error": f"{type(e).__name__}: {e}"}), flush=True)
dist.destroy_process_group()
"""


def _open_on_two_ranks(paths: list[str]) -> list[dict]:
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
            "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _SPLIT_SCAN, *paths], env={**base, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def test_each_rank_scans_its_share_of_the_shards_and_a_bad_one_fails_every_rank(tmp_path: Path) -> None:
    paths = [write_shard(tmp_path / f"train/s{i}.tok", [list(range(i, i + 40))]) for i in range(4)]
    ok = _open_on_two_ranks(paths)
    assert [r["scanned"] for r in ok] == [["s0.tok", "s2.tok"], ["s1.tok", "s3.tok"]]
    assert all(r["opened"] == ["s0.tok", "s1.tok", "s2.tok", "s3.tok"] for r in ok)  # headers: every shard

    from kubellm.tokenizer.shards import HEADER_SIZE

    raw = bytearray(Path(paths[3]).read_bytes())  # s3 is rank 1's to scan: id 600 ≥ the shard's vocab 512
    raw[HEADER_SIZE + 2 * 5: HEADER_SIZE + 2 * 6] = (600).to_bytes(2, "little")
    Path(paths[3]).write_bytes(bytes(raw))
    bad = _open_on_two_ranks(paths)
    assert bad[1]["error"].startswith("InputDataError: ") and "s3.tok: token 5 has id 600" in bad[1]["error"]
    assert bad[0]["error"].startswith("InputDataError: token shard check failed on 1 rank(s): rank 1: InputDataError: ")
    assert "s3.tok: token 5 has id 600 ≥ vocab_size 512" in bad[0]["error"]
    assert "s3.tok" not in bad[0]["scanned"]  # rank 0 learned it from rank 1, without reading s3 itself
