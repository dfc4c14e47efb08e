"""The one manifest type for every artifact, and atomic publish / verified fetch.

An artifact is a prefix (local dir or `s3://…`) holding data files and one `_manifest.json`. The
manifest is written last with a conditional put: a prefix without it does not exist, a crashed
writer leaves garbage but never a half-visible artifact, and a committed manifest is never
overwritten. The same manifest JSON is what a KFP artifact (`Dataset`, `Model`, …) holds.

Committing never puts over an existing manifest: `commit_manifest` first reads the manifest already
at the prefix, if any, and returns it when it describes the same files, else raises
ManifestConflictError; `publish_dir` uploads no data file to an already-committed prefix. The
conditional put (`IfNoneMatch="*"`, kubellm.core.storage) is then only the guard against another
writer committing between that check and the put. What that gives per store:
  * AWS S3, current MinIO (conditional writes supported): sequential and concurrent writers are safe.
  * A store answering HTTP 501 to a conditional put: storage falls back to check-then-put.
  * A store that ignores `IfNoneMatch` (answers 200: older MinIO, some Ceph RGW): sequential writers
    are safe (a second publish of different content is refused before anything is written), but
    two writers racing between check and put can both write — concurrent writers of one prefix need
    conditional-write support.

    m = publish_dir(local_dir, content_prefix(root, "tokenizer", cfg_hash, parents),
                    kind="tokenizer", config_hash=cfg_hash, parents=parents, counts={...})
    m = read_manifest(m.uri)            # refuses a prefix with no manifest
    fetch(m, "/tmp/tok")                # downloads and checks every sha256
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import math
import os
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kubellm import __version__
from kubellm.core.errors import IntegrityError, ManifestConflictError, ManifestMissingError
from kubellm.core.storage import is_s3, join, local_path, sha256_file, storage_for

MANIFEST_NAME = "_manifest.json"
SCHEMA_VERSION = 1


def code_version() -> str:
    """The code version recorded in manifests and mixed into content addresses.

    Images set KUBELLM_CODE_VERSION (the git sha at build time, `-dirty-<hash of the changes>` for an
    uncommitted tree); an image built without it (`unknown`) and everything else use the package version plus a hash of the installed package's files, so a local
    re-run after a code change computes new artifacts instead of reusing ones the old code made; the
    first call exports it as KUBELLM_CODE_VERSION for the processes this one starts."""
    version = os.environ.get("KUBELLM_CODE_VERSION")
    if not version or version == UNSET_CODE_VERSION:  # an image built without the build arg: hash the code
        # computed once and exported, so every process this one starts (workers, kfp.local steps)
        # records the same version even if a file is edited while the run goes on
        version = os.environ["KUBELLM_CODE_VERSION"] = f"kubellm-{__version__}+{_source_hash()[:12]}"
    return version


UNSET_CODE_VERSION = "unknown"
"""What the images' KUBELLM_CODE_VERSION build argument defaults to: not a version (every image built
without it would share it, and reuse each other's artifacts)."""


@functools.cache
def _source_hash() -> str:
    """`tree_hash` of the installed package, and of `kubellm.pipelines` where it lives outside it (an
    editable install maps it to the repository's `pipelines/`)."""
    import importlib.util

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.find_spec("kubellm.pipelines")
    extra = [Path(p).resolve() for p in (spec.submodule_search_locations or [])] if spec else []
    outside = [p for p in extra if not p.is_relative_to(root)]
    if not outside:
        return tree_hash(root)
    return hashlib.sha256("\0".join([tree_hash(root), *(tree_hash(p) for p in outside)]).encode()).hexdigest()


def _in_code_version(rel: str) -> bool:
    """Whether a package file (path relative to the package) is part of the code version. Not the
    presets (`configs/`: their values reach each stage through its own config hash) nor the bundled
    evaluation tasks' YAML and data (the evaluate stage, which alone reads them, re-runs every time
    and records their hashes): editing `dpo.beta` in a preset must not re-run data prep."""
    if rel.startswith("configs/"):
        return False
    return not (rel.startswith("evaluate/tasks/") and not rel.endswith(".py"))


def tree_hash(root: Path) -> str:
    """sha256 over the relative paths and bytes of the source and data files under `root` that make
    up the code version (`_in_code_version`)."""
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()
                    and not any(part.startswith((".", "__pycache__")) for part in p.relative_to(root).parts)
                    and p.suffix in (".py", ".yaml", ".yml", ".json", ".jsonl", ".jinja", ".txt")
                    and _in_code_version(p.relative_to(root).as_posix())):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def stable_hash(obj: Any) -> str:
    """sha256 of canonical JSON (sorted keys, no whitespace) of a JSON-able object."""
    data = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(data).hexdigest()


class FileEntry(BaseModel):
    """One data file of an artifact, relative to the artifact's prefix."""

    model_config = ConfigDict(extra="forbid")
    path: str
    size: int
    sha256: str

    @field_validator("path")
    @classmethod
    def _inside_the_artifact(cls, v: str) -> str:
        # fetch() writes each file to <local_dir>/<path>: '..', an absolute path or an empty segment
        # would put it elsewhere
        if not v or v.startswith("/") or "\\" in v or any(p in ("", ".", "..") for p in v.split("/")):
            raise ValueError(f"file path {v!r}: expected a relative path inside the artifact "
                             "(no leading '/', no '.' or '..' segments, '/' as separator)")
        return v


class Manifest(BaseModel):
    """What an artifact is: where its files are, what they hash to, and where it came from."""

    model_config = ConfigDict(extra="forbid")
    schema_version: int = SCHEMA_VERSION
    kind: str = Field(description="dataset | tokenizer | token_shards | model | checkpoint | eval | ...")
    uri: str = Field(description="The artifact's prefix (local dir or s3://bucket/key).")
    files: list[FileEntry] = Field(default_factory=list)
    counts: dict[str, int] = Field(default_factory=dict, description="records, tokens, documents, ...")
    metrics: dict[str, float] = Field(default_factory=dict)
    config_hash: str = ""
    code_version: str = Field(default_factory=code_version)
    parents: dict[str, str] = Field(
        default_factory=dict, description="input name -> parent manifest digest (lineage)"
    )
    created_at: str = Field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat())
    metadata: dict[str, Any] = Field(default_factory=dict, description="small stage-specific extras")
    report_markdown: str | None = Field(default=None, description="human report shown in the KFP UI")

    @model_validator(mode="after")
    def _finite_metrics(self) -> Manifest:
        """Strict JSON has no NaN/Infinity, and pydantic writes them into `metrics` as null, which its
        float values then refuse to read back: a committed manifest would be unreadable for good (a run
        whose last logged loss was NaN under `train.nonfinite=skip`). Such a metric moves to
        `metadata["nonfinite_metrics"]` as "nan", "inf" or "-inf"."""
        bad = {k: v for k, v in self.metrics.items() if not math.isfinite(v)}
        if bad:
            self.metrics = {k: v for k, v in self.metrics.items() if k not in bad}
            named = dict(self.metadata.get("nonfinite_metrics") or {})
            named.update({k: "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") for k, v in bad.items()})
            self.metadata = {**self.metadata, "nonfinite_metrics": named}
        return self

    def digest(self) -> str:
        """Content hash of what the artifact *is* (not when it was made)."""
        body = self.model_dump(exclude={"created_at", "report_markdown"})
        return stable_hash(body)

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise IntegrityError(f"{self.uri}: manifest lists no file {path!r}")

    def file_uri(self, path: str) -> str:
        return join(self.uri, path)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "<manifest>") -> Manifest:
        try:
            return cls.model_validate_json(text)
        except Exception as e:
            raise IntegrityError(f"{source}: not a valid kubellm manifest: {e}") from e


def absolute_uri(uri: str) -> str:
    """`uri` with a local path made absolute (S3 URIs as they are, without a trailing '/'): what a
    manifest records as its prefix, so a reader in another working directory finds the files."""
    if is_s3(uri):
        return uri.rstrip("/")
    return os.path.abspath(local_path(uri))


def content_prefix(root: str, stage: str, config_hash: str, parents: Mapping[str, str] | None = None) -> str:
    """Content-addressed output prefix: hash of inputs' manifests + config + code version."""
    key = stable_hash({"stage": stage, "config": config_hash, "parents": dict(parents or {}),
                       "code": code_version()})
    return join(absolute_uri(root), stage, key[:20])


def read_manifest(prefix: str) -> Manifest:
    """The committed manifest at `prefix`; refuses a prefix that has none.

    The manifest's `uri` is the prefix it was read from: an artifact copied or moved elsewhere
    (a run directory copied to resume from, a bucket synced to another) reads, verifies and fetches
    its own files, never those at the place it was first published."""
    st = storage_for(prefix)
    uri = join(prefix, MANIFEST_NAME)
    if not st.exists(uri):
        raise ManifestMissingError(
            f"{prefix}: no {MANIFEST_NAME} — not a committed artifact (an unfinished or crashed write?)"
        )
    m = Manifest.from_json(st.read_bytes(uri), source=uri)
    here = absolute_uri(prefix)
    return m if absolute_uri(m.uri) == here else m.model_copy(update={"uri": here})


def commit_manifest(manifest: Manifest) -> Manifest:
    """Commit `manifest` at its prefix. If an identical artifact is already committed there
    (content-addressed prefixes make that the normal case for a re-run), return it; a *different*
    committed manifest is never overwritten (ManifestConflictError).

    An existing manifest is compared with, never put over — also on a store that ignores conditional
    headers; the conditional put only guards against a writer committing in between (module
    docstring)."""
    st = storage_for(manifest.uri)
    uri = join(manifest.uri, MANIFEST_NAME)
    if not st.exists(uri) and st.put_if_absent(uri, manifest.to_json().encode()):
        return manifest
    existing = Manifest.from_json(st.read_bytes(uri), source=uri)
    if existing.digest() == manifest.digest() or (
        {(f.path, f.sha256) for f in existing.files} == {(f.path, f.sha256) for f in manifest.files}
        and existing.kind == manifest.kind
    ):
        # where it is committed now (a copied artifact records the location it was first published at)
        here = absolute_uri(manifest.uri)
        return existing if absolute_uri(existing.uri) == here else existing.model_copy(update={"uri": here})
    raise ManifestConflictError(
        f"{uri}: a different manifest is already committed there (digest {existing.digest()[:12]}); "
        "refusing to overwrite it"
    )


def _walk(local_dir: Path) -> list[Path]:
    return sorted(p for p in local_dir.rglob("*") if p.is_file())


LEASE_NAME = "_publishing.lease"
LEASE_TTL_S = 120.0
"""A publisher that has not renewed its lease for this long is taken for dead (renewed every third)."""
LEASE_READ_TRIES = 6
"""Consecutive failed reads of a lease that exists before its error is raised (backing off 0.4–5 s)."""


class _PublishLease:
    """Who is uploading an artifact's files: one publisher per prefix at a time.

    Two runs of one stage on the same inputs publish to the same content address, and their files
    differ byte for byte (timings in metrics, event files). Without a lease the second one's uploads
    land on the files of the artifact the first has just committed, and it then fails verification
    forever. The lease is a small object beside the manifest, taken with a conditional put, renewed by
    a thread while files upload, taken over only once it has expired (its publisher died), and
    removed after the commit. A publisher that finds it held waits for the manifest (then uploads
    nothing) or for the lease to expire. On a store that ignores conditional headers, two publishers
    racing for the lease can both take it (module docstring of kubellm.core.storage)."""

    def __init__(self, prefix: str, ttl: float | None = None) -> None:
        self.uri, self.ttl = join(prefix, LEASE_NAME), LEASE_TTL_S if ttl is None else ttl
        self.manifest_uri = join(prefix, MANIFEST_NAME)
        self.st = storage_for(prefix)
        self.owner = uuid.uuid4().hex
        self.etag = ""
        self.renewed = time.monotonic()  # when the last successful take or renewal began
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires": time.time() + self.ttl}).encode()

    def acquire(self) -> bool:
        """True once this publisher holds the lease; False when the artifact got committed meanwhile."""
        unreadable = 0
        while True:
            self.renewed = time.monotonic()
            if self.st.exists(self.manifest_uri):
                return False
            if self.st.put_if_absent(self.uri, self._body()):
                break
            try:
                data, etag = self.st.read_with_etag(self.uri)
                unreadable = 0
            except Exception:
                if not self.st.exists(self.uri):
                    continue  # released between our put and this read: try again
                unreadable += 1  # there, but it cannot be read: back off, then say why
                if unreadable >= LEASE_READ_TRIES:
                    raise
                time.sleep(min(5.0, 0.2 * 2 ** unreadable))
                continue
            try:
                expires = float(json.loads(data)["expires"])
            except (ValueError, KeyError, TypeError):
                expires = 0.0  # unreadable: as good as expired
            if time.time() >= expires and self.st.put_if_match(self.uri, self._body(), etag):
                break
            time.sleep(min(5.0, max(0.2, expires - time.time())))
        if self.st.exists(self.manifest_uri):
            # committed, and its publisher's lease released, between our look and our put: upload nothing
            self.release()
            return False
        self.etag = self.st.read_with_etag(self.uri)[1]
        self._thread = threading.Thread(target=self._renew, name="kubellm-publish-lease", daemon=True)
        self._thread.start()
        return True

    def _renew(self) -> None:
        """Renew every ttl/3. The lease is lost when another publisher holds it, or when no renewal
        has succeeded for a whole ttl: by then it has expired and another may have taken it over, so
        this publisher stops uploading (`check`) even while it cannot reach the store to find out."""
        while not self._stop.wait(self.ttl / 3):
            started = time.monotonic()  # the new expiry is at least this + ttl
            body = self._body()
            try:
                ok = self.st.put_if_match(self.uri, body, self.etag)
                if ok:
                    self.renewed = started
                    self.etag = self.st.read_with_etag(self.uri)[1]
            except Exception:  # a failed renewal is retried while the lease lasts
                ok = True
            if not ok or time.monotonic() - self.renewed >= self.ttl:
                self.lost.set()
                return

    def check(self, prefix: str) -> None:
        """Raise before an upload or the commit once the lease is lost — also while a renewal hangs:
        the lease then counts as expired one ttl after the last renewal began."""
        if self.lost.is_set() or time.monotonic() - self.renewed >= self.ttl:
            raise ManifestConflictError(
                f"{prefix}: this publisher lost the artifact's publishing lease ({LEASE_NAME}): another "
                f"publisher took it over, or renewals failed for {self.ttl:.0f}s; not uploading or committing")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            data, _ = self.st.read_with_etag(self.uri)
            if json.loads(data).get("owner") == self.owner:
                self.st.delete(self.uri)
        except Exception:  # best effort: an expired lease is harmless
            pass


def publish_dir(local_dir: Path | str, prefix: str, *, kind: str, workers: int = 8,
                **fields: Any) -> Manifest:
    """Upload every file under `local_dir` to `prefix` (in parallel), then commit the manifest.
    One publisher uploads to a prefix at a time (`_PublishLease`)."""
    local_dir = Path(local_dir)
    files = _walk(local_dir)
    prefix = absolute_uri(prefix)
    # Already committed: upload nothing. Re-uploading first would overwrite a *different* committed
    # artifact's files before the conditional put refuses its manifest (tests/reliability found it);
    # commit_manifest returns the existing one if identical, else raises ManifestConflictError —
    # without putting anything, so a store that ignores IfNoneMatch cannot end up with a new
    # manifest over the old files.
    lease = _PublishLease(prefix)
    already = not lease.acquire()
    try:
        return _upload_and_commit(local_dir, files, prefix, already, lease, kind, workers, fields)
    finally:
        if not already:
            lease.release()


def _upload_and_commit(local_dir: Path, files: list[Path], prefix: str, already: bool, lease: _PublishLease,
                       kind: str, workers: int, fields: dict[str, Any]) -> Manifest:
    st = storage_for(prefix)

    def put(p: Path) -> FileEntry:
        rel = p.relative_to(local_dir).as_posix()
        if rel == MANIFEST_NAME:
            raise IntegrityError(f"{p}: {MANIFEST_NAME} is reserved for the manifest")
        before = p.stat()
        entry = FileEntry(path=rel, size=before.st_size, sha256=sha256_file(p))  # what is uploaded next
        if not already:
            lease.check(prefix)  # a publisher whose lease expired must not overwrite its successor's files
            st.upload(p, join(prefix, rel))
        after = p.stat()
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            raise IntegrityError(f"{p}: changed while it was published ({before.st_size} → {after.st_size} bytes); "
                                 "its recorded sha256 would not match what was stored. Publish files no writer "
                                 "still holds open")
        return entry

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        entries = list(pool.map(put, files))
    if not already:
        lease.check(prefix)
    manifest = Manifest(kind=kind, uri=prefix, files=entries, **fields)
    return commit_manifest(manifest)


def verify_file(manifest: Manifest, entry: FileEntry, local: Path) -> None:
    size = local.stat().st_size
    if size != entry.size:
        raise IntegrityError(
            f"{manifest.file_uri(entry.path)}: size {size} but the manifest records {entry.size}"
        )
    digest = sha256_file(local)
    if digest != entry.sha256:
        raise IntegrityError(
            f"{manifest.file_uri(entry.path)}: sha256 {digest[:12]}… but the manifest records "
            f"{entry.sha256[:12]}… (corrupt or replaced file)"
        )


def read_verified(manifest: Manifest, path: str) -> bytes:
    """One small file of the artifact, read into memory and checked against the manifest's size and
    sha256 (what `fetch` does for files it writes to disk)."""
    entry = manifest.file(path)
    data = storage_for(manifest.uri).read_bytes(manifest.file_uri(path))
    if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise IntegrityError(f"{manifest.file_uri(path)}: {len(data)} bytes that do not match the manifest "
                             f"({entry.size} bytes, sha256 {entry.sha256[:12]}…): replaced or corrupt since it "
                             "was committed")
    return data


def fetch(manifest: Manifest, local_dir: Path | str, paths: Iterable[str] | None = None,
          workers: int = 8) -> Path:
    """Download the artifact's files (or `paths` of them) into `local_dir`, verifying each against the
    manifest. A local artifact is verified in place and its own directory returned when
    `local_dir` is that directory."""
    local_dir = Path(local_dir)
    wanted = set(paths) if paths is not None else None
    entries = [e for e in manifest.files if wanted is None or e.path in wanted]
    if wanted is not None:
        missing = wanted - {e.path for e in entries}
        if missing:
            raise IntegrityError(f"{manifest.uri}: manifest lists no file(s) {sorted(missing)}")
    st = storage_for(manifest.uri)

    def get(e: FileEntry) -> None:
        dest = local_dir / e.path
        src = manifest.file_uri(e.path)
        if not st.exists(src):
            raise IntegrityError(f"{src}: listed in the manifest but missing from storage")
        if not is_s3(src) and local_path(src).resolve() == dest.resolve():  # the artifact itself
            verify_file(manifest, e, dest)
            return
        # verified under a temporary name, then renamed: a file that fails verification never sits at
        # its final path, where a cache that checks only sizes would take it for fetched
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            st.download(src, tmp)
            verify_file(manifest, e, tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(get, entries))
    return local_dir


def write_manifest_file(manifest: Manifest, path: Path | str) -> None:
    """Write the manifest JSON into a KFP artifact file (or anywhere local)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(manifest.to_json())


def is_plain_hf_dir(ref: str) -> bool:
    """A local Hugging Face model directory (`config.json`, no `_manifest.json`): what the stages and
    CLIs accept besides a committed model artifact. A directory with `_manifest.json` is an artifact
    even when its HF files sit at its root: it is fetched and sha256-verified, never read as is."""
    p = Path(ref)
    return not is_s3(ref) and p.is_dir() and (p / "config.json").is_file() and not (p / MANIFEST_NAME).exists()


def load_manifest_ref(ref: str) -> Manifest:
    """Resolve what a stage gets as an input: a local manifest JSON file (a KFP input artifact's
    path), a directory holding one (artifact dir), or a committed artifact prefix."""
    p = Path(ref)
    if not ref.startswith("s3://") and p.is_file():
        return Manifest.from_json(p.read_text(), source=ref)
    if not ref.startswith("s3://") and p.is_dir() and (p / MANIFEST_NAME).is_file() is False:
        # a KFP artifact directory: the manifest JSON is the only thing in it (a folder that merely
        # holds one .json among other files, e.g. a demo world, is not an artifact)
        entries = [q for q in p.iterdir() if not q.name.startswith(".")]
        if len(entries) == 1 and entries[0].is_file() and entries[0].suffix == ".json":
            return Manifest.from_json(entries[0].read_text(), source=str(entries[0]))
    return read_manifest(ref)
