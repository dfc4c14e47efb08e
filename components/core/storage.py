"""One storage interface for `s3://bucket/key` URIs and local paths.

    from kubellm.core.storage import storage_for, join
    st = storage_for("s3://bucket/runs")          # or "/tmp/artifacts", or "file:///tmp/a"
    st.write_bytes(join("s3://bucket/runs", "x.txt"), b"hello")

Every S3 read and write in kubellm goes through here: one boto3 client factory (`s3_client`),
parallel multipart transfers via boto3's TransferConfig (s3transfer aborts a failed multipart
upload itself), and `put_if_absent` — a conditional put (`IfNoneMatch="*"`) used to commit
manifests so a committed artifact is never overwritten.

URIs: `s3://BUCKET/KEY` — the key is everything after the first `/` following the bucket, taken
verbatim (`#`, `?`, `%`, `+`, spaces and non-ASCII are part of the key, never a URL fragment, query or
escape). `file:///abs/path` is the local path `/abs/path`, also verbatim.

Conditional writes and what is guaranteed without them:
  * `put_if_absent` and `put_if_match` first look at the object (HEAD) and refuse when it already
    exists / its ETag is no longer the expected one; only then do they put with `IfNoneMatch="*"` /
    `IfMatch`. On AWS S3 and current MinIO the conditional put is the guard against a writer racing
    in between: concurrent writers are safe.
  * A store that answers HTTP 501 NotImplemented to a conditional put gets a plain put after the
    check (both `put_if_absent` and `put_if_match`).
  * A conditional put that fails its precondition is ours when the object now holds exactly our bytes:
    botocore retries a put whose response was lost (timeout, reset) though the store applied it, and
    the retry then fails the condition the first attempt satisfied.
  * A store that silently ignores the conditional headers (answers 200: older MinIO, some Ceph RGW)
    cannot be detected. There, writers that run one after the other are safe (the check refuses the
    second one, and `kubellm.core.manifest.commit_manifest` never puts over an existing manifest), but
    two writers racing between check and put can both "win" — concurrent writers of one object need
    a store with conditional-write support.

S3 settings come from the environment (never from pipeline YAML). Every value is checked in
`S3Settings.from_env`; a bad one is a StorageError naming the variable, its value and what is allowed.
An empty variable counts as unset.
  KUBELLM_S3_ENDPOINT_URL / AWS_ENDPOINT_URL   MinIO/Ceph endpoint, http(s)://host[:port] (unset for AWS)
  AWS_REGION / AWS_DEFAULT_REGION              region (default us-east-1)
  AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY    credentials (or any boto3 credential source)
  KUBELLM_S3_RETRY_MODE                        standard | adaptive (default standard; botocore's old
                                               `legacy` mode is refused: kubellm's retry behaviour is
                                               specified and tested for these two only)
  KUBELLM_S3_MAX_ATTEMPTS                      total attempts per call, integer >= 1 (default 8)
  KUBELLM_S3_ADDRESSING_STYLE                  path | virtual | auto (default path: MinIO/Ceph)
  KUBELLM_S3_MULTIPART_THRESHOLD               bytes from which uploads are multipart, >= 1 (default 64 MiB)
  KUBELLM_S3_MULTIPART_CHUNKSIZE               part size in bytes, 5 MiB..5 GiB (S3's limits; default 16 MiB)
  KUBELLM_S3_MAX_CONCURRENCY                   parallel transfer threads, integer >= 1 (default 8)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from kubellm.core.errors import ConfigError, StorageError

CHUNK = 8 * 1024 * 1024
MiB = 1024 * 1024
GiB = 1024 * MiB

# The local backend's own scratch files: `.<name>.<random>.kubellm-tmp` (a write in progress, renamed
# onto <name> when complete) and `.<name>.kubellm-lock` (put_if_match's lock sidecar). Distinctive so
# that listing hides exactly these and never a user's file (S3 lists every user object, `x.tmp` too).
TMP_SUFFIX = ".kubellm-tmp"
LOCK_SUFFIX = ".kubellm-lock"


def _is_scratch(name: str) -> bool:
    return name.startswith(".") and (name.endswith(TMP_SUFFIX) or name.endswith(LOCK_SUFFIX))


_USERINFO = re.compile(r"(?<=://)[^/\s]*@")  # up to the last @ before the host: a password may hold '@'
# an http(s) endpoint's userinfo up to the last '@' of the URL: a password may hold '/' too (unescaped, it
# ends the authority for a URL parser, but not for whoever reads the log); over-redacts a path with '@'
_HTTP_USERINFO = re.compile(r"(?i)(?<=http://)[^\s\"']*@|(?<=https://)[^\s\"']*@")
# credentials in a query string: presigned S3 URLs, SAS tokens, access tokens
_QUERY_SECRET = re.compile(r"(?i)([?&](?:x-amz-(?:signature|credential|security-token)|token|access_token|sig|"
                           r"signature|password|secret|api_key|apikey)=)[^&\s\"']+")


def redact(text: str) -> str:
    """`text` with any `user:password@` of a URL in it replaced by `***@`, and the values of credential
    query parameters (`X-Amz-Signature`, `token`, `sig`, …) by `***` (endpoint URLs can carry
    credentials; they never go into a log or an error)."""
    text = _HTTP_USERINFO.sub("***@", text)
    text = _USERINFO.sub("***@", text)
    return _QUERY_SECRET.sub(r"\1***", text)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its full URI, the key relative to the listed prefix, size and ETag."""

    uri: str
    relpath: str
    size: int
    etag: str


def endpoint_problem(endpoint: str) -> str | None:
    """What is wrong with an S3 endpoint URL, or None."""
    try:
        parts = urlsplit(endpoint)
        _ = parts.port  # a port that is not a number raises ValueError
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and not any(c.isspace() for c in endpoint)
    except ValueError:
        ok = False
    return None if ok else "expected an http:// or https:// URL with a host, e.g. http://minio.minio.svc:9000"


@dataclasses.dataclass(frozen=True)
class S3Settings:
    """How to reach the object store. Built from the environment by `from_env`."""

    endpoint_url: str | None = None
    region: str = "us-east-1"
    retry_mode: str = "standard"
    max_attempts: int = 8
    addressing_style: str = "path"
    multipart_threshold: int = 64 * MiB
    multipart_chunksize: int = 16 * MiB
    max_concurrency: int = 8

    def __post_init__(self) -> None:
        for name, (_, lo, hi) in _INT_SETTINGS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi and value > hi):
                raise StorageError(f"S3Settings.{name}={value!r}: expected {_int_range(lo, hi)}")
        for name, (_, allowed) in _ENUM_SETTINGS.items():
            if getattr(self, name) not in allowed:
                raise StorageError(f"S3Settings.{name}={getattr(self, name)!r}: expected one of "
                                   f"{', '.join(allowed)}")

    @classmethod
    def from_env(cls) -> S3Settings:
        """The settings the environment gives (see the module docstring); a bad value is a
        StorageError naming the variable, its value and what is allowed."""
        env = os.environ

        def get(var: str) -> str | None:
            value = env.get(var, "").strip()
            return value or None

        kw: dict[str, Any] = {}
        for name, (var, allowed) in _ENUM_SETTINGS.items():
            raw = get(var)
            if raw is not None:
                if raw.lower() not in allowed:
                    extra = (" (botocore's old 'legacy' mode is not supported)"
                             if name == "retry_mode" and raw.lower() == "legacy" else "")
                    raise StorageError(f"{var}={raw!r}: expected one of {', '.join(allowed)}{extra}")
                kw[name] = raw.lower()
        for name, (var, lo, hi) in _INT_SETTINGS.items():
            raw = get(var)
            if raw is not None:
                try:
                    value = int(raw)
                except ValueError:
                    value = None
                if value is None or value < lo or (hi and value > hi):
                    raise StorageError(f"{var}={raw!r}: expected {_int_range(lo, hi)}")
                kw[name] = value
        endpoint_var = "KUBELLM_S3_ENDPOINT_URL" if get("KUBELLM_S3_ENDPOINT_URL") else "AWS_ENDPOINT_URL"
        endpoint = get(endpoint_var)
        if endpoint is not None:
            if problem := endpoint_problem(endpoint):
                raise StorageError(f"{endpoint_var}={redact(endpoint)!r}: {problem}")
            kw["endpoint_url"] = endpoint
        region_var = "AWS_REGION" if get("AWS_REGION") else "AWS_DEFAULT_REGION"
        region = get(region_var)
        if region is not None:
            if not _REGION.fullmatch(region):
                raise StorageError(f"{region_var}={region!r}: expected a region name such as us-east-1 "
                                   "(letters, digits and '-')")
            kw["region"] = region
        return cls(**kw)


# field -> (environment variable, minimum, maximum or 0 for none)
_INT_SETTINGS: dict[str, tuple[str, int, int]] = {
    "max_attempts": ("KUBELLM_S3_MAX_ATTEMPTS", 1, 0),
    "multipart_threshold": ("KUBELLM_S3_MULTIPART_THRESHOLD", 1, 0),
    # S3's part size limits (s3transfer would silently change a smaller one)
    "multipart_chunksize": ("KUBELLM_S3_MULTIPART_CHUNKSIZE", 5 * MiB, 5 * GiB),
    "max_concurrency": ("KUBELLM_S3_MAX_CONCURRENCY", 1, 0),
}
# field -> (environment variable, allowed values)
_ENUM_SETTINGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "retry_mode": ("KUBELLM_S3_RETRY_MODE", ("standard", "adaptive")),
    "addressing_style": ("KUBELLM_S3_ADDRESSING_STYLE", ("path", "virtual", "auto")),
}
S3_ENV_VARS: tuple[str, ...] = ("KUBELLM_S3_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION",
                                *(e[0] for e in _ENUM_SETTINGS.values()), *(i[0] for i in _INT_SETTINGS.values()))
"""What a pipeline step takes from the S3 ConfigMap (the Helm chart's `<fullname>-env` sets every one):
each variable `S3Settings.from_env` reads except the credentials (from a Secret) and AWS_ENDPOINT_URL
(the AWS SDKs' own name for what KUBELLM_S3_ENDPOINT_URL sets), so steps and training workers reach S3
alike."""
# botocore's own check for a region name (it raises InvalidRegionError on anything else)
_REGION = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9\-]{0,61}[a-zA-Z0-9])?")


def _int_range(lo: int, hi: int) -> str:
    if hi and lo >= MiB:
        return f"an integer from {lo} to {hi} bytes ({lo // MiB} MiB to {hi // GiB} GiB)"
    return f"an integer from {lo} to {hi}" if hi else f"an integer >= {lo}"


def s3_client(settings: S3Settings | None = None) -> Any:
    """The one boto3 S3 client factory.

    Checksums: boto3 ≥ 1.36 adds CRC32 checksums to every request by default, which several
    S3-compatible stores (older MinIO, Ceph RGW) reject; `when_required` keeps them for the calls that
    need them and works against AWS and those stores alike.
    """
    import boto3
    from botocore.config import Config

    s = settings or S3Settings.from_env()
    cfg = Config(
        region_name=s.region,
        retries={"mode": s.retry_mode, "total_max_attempts": s.max_attempts},  # total, not retries
        s3={"addressing_style": s.addressing_style},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        max_pool_connections=max(10, s.max_concurrency * 2),
    )
    return boto3.session.Session().client("s3", endpoint_url=s.endpoint_url, config=cfg)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> (`bucket`, `a/b`). The key is everything after the first `/` that follows
    the bucket, verbatim: `#`, `?`, `%`, `+`, spaces and non-ASCII are part of it (no URL parsing)."""
    if not uri.startswith("s3://"):
        raise StorageError(f"not an S3 URI: {uri!r} (expected s3://bucket/key)")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(f"not an S3 URI: {uri!r} (expected s3://bucket/key)")
    return bucket, key


def local_path(uri: str) -> Path:
    """The local path a URI names: `file:///abs/path` (or `file://localhost/abs/path`) -> `/abs/path`,
    verbatim (no URL decoding: `%20` stays `%20`, `#` and `?` are part of the name); anything else is
    a path already."""
    if uri.startswith("file://"):
        rest = uri[len("file://"):]
        if rest.startswith("localhost/"):
            rest = rest[len("localhost"):]
        return Path(rest)
    return Path(uri)


def join(uri: str, *parts: str) -> str:
    """Join URI parts with `/` (never `os.path.join`: S3 keys are not paths)."""
    out = uri.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


class Storage(Protocol):
    """What every backend offers. URIs are absolute (`s3://…` or a local path)."""

    def read_bytes(self, uri: str) -> bytes: ...
    def write_bytes(self, uri: str, data: bytes) -> None: ...
    def put_if_absent(self, uri: str, data: bytes) -> bool: ...
    def read_with_etag(self, uri: str) -> tuple[bytes, str]: ...
    def put_if_match(self, uri: str, data: bytes, etag: str) -> bool: ...
    def upload(self, local: Path, uri: str) -> None: ...
    def download(self, uri: str, local: Path) -> None: ...
    def exists(self, uri: str) -> bool: ...
    def head(self, uri: str) -> ObjectInfo | None: ...
    def list(self, prefix: str) -> list[ObjectInfo]: ...
    def delete(self, uri: str) -> None: ...


def _sync_dir(d: Path) -> None:
    """Make a rename or link in directory `d` survive a crash (where the OS can sync a directory)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a directory; the file itself was synced
    finally:
        os.close(fd)


class LocalStorage:
    """Local filesystem backend. Writes go to a temp file in the same directory
    (`.<name>.<random>.kubellm-tmp`), synced to disk, then renamed (and the directory synced), so a
    reader never sees half a file, and a crash or power loss never leaves a published name (a
    manifest above all) pointing at data that was still in the page cache; `put_if_absent` uses an
    exclusive link, atomic on POSIX. `list` hides the backend's own scratch files (temp files and
    put_if_match's `.<name>.kubellm-lock` sidecar) and nothing else."""

    def read_bytes(self, uri: str) -> bytes:
        p = local_path(uri)
        try:
            return p.read_bytes()
        except FileNotFoundError as e:
            raise StorageError(f"{uri}: no such object") from e

    def _atomic_write(self, dest: Path, writer: Any) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=TMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                writer(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, _FILE_MODE)  # mkstemp creates 0600; published files are readable like any file
            os.replace(tmp, dest)
            _sync_dir(dest.parent)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def write_bytes(self, uri: str, data: bytes) -> None:
        self._atomic_write(local_path(uri), lambda f: f.write(data))

    def put_if_absent(self, uri: str, data: bytes) -> bool:
        dest = local_path(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=TMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, _FILE_MODE)
            try:
                os.link(tmp, dest)  # fails if dest exists: the conditional put
            except FileExistsError:
                return False
            _sync_dir(dest.parent)
            return True
        finally:
            Path(tmp).unlink(missing_ok=True)

    def read_with_etag(self, uri: str) -> tuple[bytes, str]:
        """The object and its ETag (md5 of the content, as S3 gives for a single-part put)."""
        data = self.read_bytes(uri)
        return data, hashlib.md5(data, usedforsecurity=False).hexdigest()

    def put_if_match(self, uri: str, data: bytes, etag: str) -> bool:
        """Replace the object only if its ETag is still `etag` (compare-and-swap under an exclusive
        lock on a sidecar file, so concurrent local writers serialise). False if it changed or is gone."""
        import fcntl

        dest = local_path(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest.with_name(f".{dest.name}{LOCK_SUFFIX}"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if not dest.is_file() or self.read_with_etag(uri)[1] != etag:
                    return False
                self.write_bytes(uri, data)
                return True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def upload(self, local: Path, uri: str) -> None:
        dest = local_path(uri)
        if Path(local).resolve() == dest.resolve():
            return

        def copy(f: Any) -> None:
            with open(local, "rb") as src:
                shutil.copyfileobj(src, f, CHUNK)

        self._atomic_write(dest, copy)

    def download(self, uri: str, local: Path) -> None:
        src = local_path(uri)
        if not src.exists():
            raise StorageError(f"{uri}: no such object")
        local = Path(local)
        if src.resolve() == local.resolve():
            return

        def copy(f: Any) -> None:
            with open(src, "rb") as s:
                shutil.copyfileobj(s, f, CHUNK)

        self._atomic_write(local, copy)

    def exists(self, uri: str) -> bool:
        return local_path(uri).is_file()

    def head(self, uri: str) -> ObjectInfo | None:
        """One file's entry as `list` would give it (relpath: its name), None when there is none."""
        p = local_path(uri)
        if not p.is_file() or _is_scratch(p.name):
            return None
        st = p.stat()
        return ObjectInfo(uri, p.name, st.st_size, f"{st.st_mtime_ns}-{st.st_size}")

    def list(self, prefix: str) -> list[ObjectInfo]:
        root = local_path(prefix)
        if not root.is_dir():
            return []
        out = []
        for p in root.rglob("*"):
            if p.is_file() and not _is_scratch(p.name):
                st = p.stat()
                rel = p.relative_to(root).as_posix()
                out.append(ObjectInfo(join(prefix, rel), rel, st.st_size, f"{st.st_mtime_ns}-{st.st_size}"))
        return sorted(out, key=lambda o: o.relpath)  # by key string, as S3 lists

    def delete(self, uri: str) -> None:
        local_path(uri).unlink(missing_ok=True)


class S3Storage:
    """S3 backend over one boto3 client (thread-safe; shared by the transfer threads)."""

    def __init__(self, settings: S3Settings | None = None, client: Any = None) -> None:
        self.settings = settings or S3Settings.from_env()
        self.client = client if client is not None else s3_client(self.settings)

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        s = self.settings
        return TransferConfig(
            multipart_threshold=s.multipart_threshold,
            multipart_chunksize=s.multipart_chunksize,
            max_concurrency=s.max_concurrency,
            use_threads=True,
        )

    def _err(self, op: str, uri: str, e: Exception) -> StorageError:
        """The error to raise `from None`: its message carries `e` redacted, while botocore's own
        exception (kept as the cause, it would be printed in every traceback) can hold the endpoint
        URL with its `user:password@`."""
        return StorageError(redact(f"S3 {op} {uri} failed: {e}"))

    def _get(self, bucket: str, key: str) -> tuple[bytes, str]:
        """(body, ETag) of one GET. botocore retries the request but not reading its streamed body, so a
        connection that drops mid-body is retried here, up to `max_attempts` GETs in all (idempotent)."""
        from botocore.exceptions import (
            ConnectionClosedError,
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
        )

        attempt = 0
        while True:
            attempt += 1
            resp = self.client.get_object(Bucket=bucket, Key=key)
            try:
                return resp["Body"].read(), resp.get("ETag", "").strip('"')
            except (ResponseStreamingError, IncompleteReadError, ReadTimeoutError, ConnectionClosedError):
                if attempt >= max(self.settings.max_attempts, 1):
                    raise
                time.sleep(min(0.1 * 2 ** attempt, 5.0))

    def read_bytes(self, uri: str) -> bytes:
        bucket, key = split_s3(uri)
        try:
            return self._get(bucket, key)[0]
        except Exception as e:
            raise self._err("get", uri, e) from None

    def write_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = split_s3(uri)
        try:
            self.client.put_object(Bucket=bucket, Key=key, Body=data)
        except Exception as e:
            raise self._err("put", uri, e) from None

    def put_if_absent(self, uri: str, data: bytes) -> bool:
        """Create the object unless it exists. False when it already exists.

        The HEAD first is what keeps a store that ignores `IfNoneMatch` (answers 200) from
        overwriting an existing object; the conditional put then guards against a writer racing in
        between, where the store supports it (module docstring)."""
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        if self.exists(uri):
            return False
        try:
            self.client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return self._holds(uri, data)  # a retried put whose first attempt was applied: ours
            if code in ("NotImplemented",) or status == 501:
                # A store without conditional writes: check-then-put is the best it allows.
                if self.exists(uri):
                    return False
                self.write_bytes(uri, data)
                return True
            raise self._err("conditional put", uri, e) from None
        except Exception as e:  # connection errors, timeouts: their text can hold the endpoint's credentials
            raise self._err("conditional put", uri, e) from None

    def read_with_etag(self, uri: str) -> tuple[bytes, str]:
        bucket, key = split_s3(uri)
        try:
            return self._get(bucket, key)
        except Exception as e:
            raise self._err("get", uri, e) from None

    def put_if_match(self, uri: str, data: bytes, etag: str) -> bool:
        """Replace the object only if its ETag is still `etag` (S3 `IfMatch` conditional write).
        False when another writer got there first (412/409) or the object is gone (404).

        The HEAD first refuses a stale ETag also on a store that ignores `IfMatch`; the conditional
        put guards against a writer racing in between, where the store supports it."""
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        etag = etag.strip('"')
        head = self._head_object(uri)
        if head is None or str(head["ETag"]).strip('"') != etag:
            return False
        try:
            self.client.put_object(Bucket=bucket, Key=key, Body=data, IfMatch=f'"{etag}"')
            return True
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") \
                    or status in (404, 409, 412):
                # botocore retries a put whose response was lost (timeout, reset) although the store
                # applied it; the retry then fails its own precondition. Ours if it holds our bytes.
                return self._holds(uri, data)
            if code == "NotImplemented" or status == 501:
                # a store without If-Match: the HEAD above was the check (racing writers are not
                # excluded there, as for put_if_absent's fallback)
                self.write_bytes(uri, data)
                return True
            raise self._err("conditional put (If-Match)", uri, e) from None
        except Exception as e:
            raise self._err("conditional put (If-Match)", uri, e) from None

    def _holds(self, uri: str, data: bytes) -> bool:
        try:
            return self.read_bytes(uri) == data
        except StorageError:
            return False

    def upload(self, local: Path, uri: str) -> None:
        bucket, key = split_s3(uri)
        try:
            self.client.upload_file(str(local), bucket, key, Config=self._transfer_config())
        except Exception as e:
            raise self._err("upload", uri, e) from None

    def download(self, uri: str, local: Path) -> None:
        bucket, key = split_s3(uri)
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{threading.get_ident()}{TMP_SUFFIX}")
        try:
            self.client.download_file(bucket, key, str(tmp), Config=self._transfer_config())
            os.replace(tmp, local)
        except Exception as e:
            tmp.unlink(missing_ok=True)
            raise self._err("download", uri, e) from None

    def _head_object(self, uri: str) -> dict[str, Any] | None:
        """HEAD of one object; None when there is none (404), any other failure a StorageError."""
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            return dict(self.client.head_object(Bucket=bucket, Key=key))
        except ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise self._err("head", uri, e) from None
        except Exception as e:
            raise self._err("head", uri, e) from None

    def exists(self, uri: str) -> bool:
        return self._head_object(uri) is not None

    def head(self, uri: str) -> ObjectInfo | None:
        """One object's entry as `list` would give it (relpath: the key's last part), by one HEAD
        request; None when there is no such object."""
        r = self._head_object(uri)
        if r is None:
            return None
        bucket, key = split_s3(uri)
        return ObjectInfo(f"s3://{bucket}/{key}", key.rpartition("/")[2], int(r["ContentLength"]),
                          str(r["ETag"]).strip('"'))

    def _iter(self, prefix: str) -> Iterator[ObjectInfo]:
        bucket, key = split_s3(prefix)
        key_prefix = key.rstrip("/") + "/" if key else ""
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=key_prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(key_prefix) :]
                yield ObjectInfo(f"s3://{bucket}/{obj['Key']}", rel, obj["Size"], obj["ETag"].strip('"'))

    def list(self, prefix: str) -> list[ObjectInfo]:
        try:
            return sorted(self._iter(prefix), key=lambda o: o.relpath)
        except Exception as e:
            raise self._err("list", prefix, e) from None

    def delete(self, uri: str) -> None:
        bucket, key = split_s3(uri)
        try:
            self.client.delete_object(Bucket=bucket, Key=key)
        except Exception as e:
            raise self._err("delete", uri, e) from None


_S3_LOCK = threading.Lock()
_S3_CACHE: dict[S3Settings, S3Storage] = {}


def storage_for(uri: str) -> Storage:
    """The backend for a URI: S3 for `s3://`, the local filesystem otherwise."""
    if is_s3(uri):
        settings = S3Settings.from_env()
        with _S3_LOCK:
            if settings not in _S3_CACHE:
                _S3_CACHE[settings] = S3Storage(settings)
            return _S3_CACHE[settings]
    return LocalStorage()


def reset_clients() -> None:
    """Forget cached S3 clients (tests change the environment between cases)."""
    with _S3_LOCK:
        _S3_CACHE.clear()


def check_output_dir(out: Path, flag: str = "--output") -> None:
    """Refuse an output directory that is a file (or under one) before anything is written."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"{flag} {str(out)!r}: {str(p)!r} exists and is not a directory")
            return
