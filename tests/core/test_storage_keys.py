"""Keys are taken verbatim (no URL parsing), and local and S3 list the same user files."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubellm.core.errors import StorageError
from kubellm.core.storage import join, local_path, s3_client, split_s3, storage_for

# characters a URL parser would cut or decode: fragment, query, escapes, '+', spaces, non-ASCII
ODD_KEYS = ["run#2/x.txt", "q?x=1/y", "a b/c d.txt", "pct%20/x%2Fy", "a+b/x", "ünï/ç.txt",
            "C#notes.txt", "a/x", "a-b/x"]


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/prefix"


def test_split_s3_takes_the_key_verbatim() -> None:
    assert split_s3("s3://b/a#frag/x") == ("b", "a#frag/x")
    assert split_s3("s3://b/q?x=1/y") == ("b", "q?x=1/y")
    assert split_s3("s3://b/a%20b/ü +") == ("b", "a%20b/ü +")
    assert split_s3("s3://b") == ("b", "")
    assert split_s3("s3://b/") == ("b", "")
    for bad in ("s3:///key", "s3://", "/tmp/x", "S3://b/k"):
        with pytest.raises(StorageError, match="not an S3 URI"):
            split_s3(bad)


def test_file_uri_path_is_verbatim() -> None:
    assert local_path("file:///tmp/x#y") == Path("/tmp/x#y")
    assert local_path("file:///tmp/q?x=1") == Path("/tmp/q?x=1")
    assert local_path("file:///tmp/a%20b") == Path("/tmp/a%20b")  # no URL decoding
    assert local_path("file://localhost/tmp/a") == Path("/tmp/a")
    assert local_path("/tmp/a#b") == Path("/tmp/a#b")


def test_odd_keys_round_trip(root: str) -> None:
    st = storage_for(root)
    for i, key in enumerate(ODD_KEYS):
        st.write_bytes(join(root, key), f"v{i}".encode())
    listed = st.list(root)
    assert [o.relpath for o in listed] == sorted(ODD_KEYS)  # same keys, same order, local and S3
    for o in listed:
        assert o.uri == join(root, o.relpath)
        assert st.exists(o.uri)
        assert st.read_bytes(o.uri) == f"v{ODD_KEYS.index(o.relpath)}".encode()
    assert not st.exists(join(root, "run")) and not st.exists(join(root, "q"))
    assert not st.exists(join(root, "C"))


def test_fragment_in_a_key_does_not_clobber_another_object(s3_bucket: str) -> None:
    st = storage_for(s3_bucket)
    st.write_bytes(join(s3_bucket, "run"), b"ORIGINAL")
    st.write_bytes(join(s3_bucket, "run#2/x"), b"NEW")
    st.write_bytes(join(s3_bucket, "q?v=1"), b"Q")
    assert st.read_bytes(join(s3_bucket, "run")) == b"ORIGINAL"
    assert st.read_bytes(join(s3_bucket, "run#2/x")) == b"NEW"
    bucket, _ = split_s3(s3_bucket)
    keys = [o["Key"] for o in s3_client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert sorted(keys) == ["q?v=1", "run", "run#2/x"]


def test_listing_shows_the_same_user_files_local_and_s3(root: str) -> None:
    """Local listing hides only the backend's own scratch files (temp files, put_if_match's lock
    sidecar) — never a user's `x.tmp` or `.lock` file, which S3 lists too."""
    st = storage_for(root)
    for name in ("p/keep.tmp", "p/.hidden.tmp", "p/data.lock", "p/ptr.json"):
        st.write_bytes(join(root, name), b"user data")
    _, etag = st.read_with_etag(join(root, "p/ptr.json"))
    assert st.put_if_match(join(root, "p/ptr.json"), b'{"a": 1}', etag)
    assert [o.relpath for o in st.list(join(root, "p"))] == [".hidden.tmp", "data.lock", "keep.tmp",
                                                            "ptr.json"]


def test_local_scratch_files_are_distinctive_and_hidden(tmp_path: Path) -> None:
    st = storage_for(str(tmp_path))
    st.write_bytes(str(tmp_path / "ptr.json"), b"{}")
    _, etag = st.read_with_etag(str(tmp_path / "ptr.json"))
    assert st.put_if_match(str(tmp_path / "ptr.json"), b"[]", etag)
    (tmp_path / ".big.bin.x1y2z3.kubellm-tmp").write_bytes(b"half a file")  # a crashed writer's temp
    on_disk = sorted(p.name for p in tmp_path.iterdir())
    assert on_disk == [".big.bin.x1y2z3.kubellm-tmp", ".ptr.json.kubellm-lock", "ptr.json"]
    assert [o.relpath for o in st.list(str(tmp_path))] == ["ptr.json"]
