"""Storage: local and S3 (moto's server on 127.0.0.1) behave the same behind one interface."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubellm.core.errors import StorageError
from kubellm.core.storage import S3Settings, S3Storage, join, split_s3, storage_for


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/prefix"


def test_round_trip_list_delete(root: str, tmp_path: Path) -> None:
    st = storage_for(root)
    st.write_bytes(join(root, "a/b.txt"), b"hello")
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 1000)
    st.upload(src, join(root, "c.bin"))
    assert st.read_bytes(join(root, "a/b.txt")) == b"hello"
    assert st.exists(join(root, "c.bin")) and not st.exists(join(root, "missing"))
    listed = st.list(root)
    assert [o.relpath for o in listed] == ["a/b.txt", "c.bin"]
    assert [o.size for o in listed] == [5, 1000]
    st.download(join(root, "c.bin"), tmp_path / "out" / "c.bin")
    assert (tmp_path / "out" / "c.bin").read_bytes() == b"x" * 1000
    st.delete(join(root, "a/b.txt"))
    assert [o.relpath for o in st.list(root)] == ["c.bin"]


def test_put_if_absent_never_overwrites(root: str) -> None:
    st = storage_for(root)
    uri = join(root, "_manifest.json")
    assert st.put_if_absent(uri, b"first") is True
    assert st.put_if_absent(uri, b"second") is False
    assert st.read_bytes(uri) == b"first"


def test_missing_object_error_names_uri(root: str) -> None:
    with pytest.raises(StorageError, match="nope"):
        storage_for(root).read_bytes(join(root, "nope"))


def test_multipart_upload_in_parallel(s3_bucket: str, tmp_path: Path) -> None:
    # A small threshold forces a multipart upload of several parts through s3transfer's threads.
    settings = S3Settings.from_env()
    settings = S3Settings(**{**settings.__dict__, "multipart_threshold": 5 * 1024 * 1024,
                             "multipart_chunksize": 5 * 1024 * 1024, "max_concurrency": 4})
    st = S3Storage(settings)
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * (13 * 1024 * 1024 // 256))
    st.upload(big, join(s3_bucket, "big.bin"))
    bucket, key = split_s3(join(s3_bucket, "big.bin"))
    head = st.client.head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] == big.stat().st_size
    assert "-" in head["ETag"]  # a multipart ETag is "<md5>-<parts>"
    st.download(join(s3_bucket, "big.bin"), tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()


def test_failed_multipart_upload_is_aborted(s3_bucket: str, tmp_path: Path) -> None:
    settings = S3Settings(**{**S3Settings.from_env().__dict__, "multipart_threshold": 5 * 1024 * 1024,
                             "multipart_chunksize": 5 * 1024 * 1024, "max_concurrency": 2,
                             "max_attempts": 1})
    st = S3Storage(settings)
    bucket, key = split_s3(join(s3_bucket, "torn.bin"))
    calls = {"n": 0}

    def fail_second_part(params, **kwargs):  # noqa: ANN001, ANN003
        calls["n"] += 1
        if calls["n"] == 2:
            raise ConnectionResetError("injected: connection reset during part upload")

    st.client.meta.events.register("before-call.s3.UploadPart", fail_second_part)
    big = tmp_path / "big.bin"
    big.write_bytes(b"\1" * (12 * 1024 * 1024))
    with pytest.raises(StorageError, match="torn.bin"):
        st.upload(big, join(s3_bucket, "torn.bin"))
    uploads = st.client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert uploads == []  # s3transfer aborted the multipart upload
    assert not st.exists(join(s3_bucket, "torn.bin"))


def test_s3_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBELLM_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("KUBELLM_S3_RETRY_MODE", "adaptive")
    s = S3Settings.from_env()
    assert (s.endpoint_url, s.region, s.retry_mode) == ("http://127.0.0.1:9000", "eu-west-1", "adaptive")
    monkeypatch.setenv("KUBELLM_S3_RETRY_MODE", "sometimes")
    with pytest.raises(StorageError, match="KUBELLM_S3_RETRY_MODE"):
        S3Settings.from_env()


def test_split_s3_rejects_non_s3() -> None:
    assert split_s3("s3://b/k/x") == ("b", "k/x")
    with pytest.raises(StorageError, match="not an S3 URI"):
        split_s3("/tmp/x")


def test_local_files_are_published_readable(tmp_path: Path) -> None:
    import os
    import stat

    st = storage_for(str(tmp_path))
    st.write_bytes(str(tmp_path / "a.txt"), b"x")
    assert st.put_if_absent(str(tmp_path / "b.txt"), b"y")
    mask = os.umask(0)
    os.umask(mask)
    for name in ("a.txt", "b.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask


def test_local_writes_reach_the_disk_before_their_name_is_published(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash after a rename must not leave a published name (a manifest) pointing at data still in
    the page cache: the temp file is fsync'ed before it is renamed or linked to its name, and the
    directory after."""
    import os

    import kubellm.core.storage as storage

    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync", "dir" if os.path.isdir(target) else Path(target).name))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append(("publish", Path(src).name))
        real_replace(src, dst)

    def link(src: str, dst: str) -> None:
        events.append(("publish", Path(src).name))
        real_link(src, dst)

    monkeypatch.setattr(storage.os, "fsync", fsync)
    monkeypatch.setattr(storage.os, "replace", replace)
    monkeypatch.setattr(storage.os, "link", link)
    st = storage_for(str(tmp_path))
    src = tmp_path / "src.bin"
    src.write_bytes(b"z" * 1000)
    for write in (lambda: st.write_bytes(str(tmp_path / "a.txt"), b"x"),
                  lambda: st.put_if_absent(str(tmp_path / "b.txt"), b"y"),
                  lambda: st.upload(src, str(tmp_path / "up" / "c.bin")),
                  lambda: st.download(str(tmp_path / "up" / "c.bin"), tmp_path / "down" / "d.bin")):
        events.clear()
        write()
        assert [kind for kind, _ in events] == ["fsync", "publish", "fsync"], events
        synced, published = events[0][1], events[1][1]
        assert synced == published and synced.endswith(".kubellm-tmp"), events  # the temp file itself
        assert events[2] == ("fsync", "dir"), events
    assert (tmp_path / "down" / "d.bin").read_bytes() == b"z" * 1000
