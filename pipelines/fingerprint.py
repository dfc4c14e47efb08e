"""Fingerprints of inputs that can change under the same name (ARCHITECTURE §3, caching).

KFP caches on parameter values and artifact identities, never on content: a cached data-prep step
fed `s3://bucket/raw/` would be skipped even after new files land there. So a small *uncached* step
resolves the source into a fingerprint — sorted object keys + ETags/sizes hashed with sha256 — and
passes it as a parameter to the cached step. Same objects → same fingerprint → cache hit; one changed
object → a new fingerprint → that step and everything downstream re-runs.

    from kubellm.pipelines.fingerprint import fingerprint, resolve_promoted
    fingerprint("s3://bucket/raw/")              # 'sha256:…' over every object under the prefix
    fingerprint("/data/corpus/*.jsonl")          # a local glob
    fingerprint("a/corpus,b/extra.jsonl")        # several sources, comma separated
    resolve_promoted("s3://bucket/kubellm/registry/kubellm/promoted.json")
                                                 # -> Promoted(pointer, uri, fingerprint)

Local files have no ETag; `kubellm.core.storage` reports mtime+size in its place, so rewriting a file
(even with the same bytes) counts as a change — conservative, never stale.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import re
from pathlib import Path

from kubellm.core.errors import InputDataError, KubellmError
from kubellm.core.manifest import load_manifest_ref
from kubellm.core.storage import ObjectInfo, is_s3, join, local_path, storage_for

GLOB_CHARS = "*?["
POINTER_NAME = "promoted.json"
_LABEL = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*:(?!//)")


def split_sources(source: str) -> list[str]:
    """`a,b` -> [`a`, `b`]; blanks dropped."""
    return [s.strip() for s in source.split(",") if s.strip()]


def _split_glob(source: str) -> tuple[str, str | None]:
    """`s3://b/raw/*.jsonl` -> (`s3://b/raw`, `*.jsonl`); no glob -> (source, None)."""
    idx = min((source.find(c) for c in GLOB_CHARS if c in source), default=-1)
    if idx < 0:
        return source, None
    base = source[:idx].rsplit("/", 1)[0] if "/" in source[:idx] else "."
    pattern = source[len(base) + 1 :] if base != "." else source
    return base, pattern


def _single_object(source: str) -> list[ObjectInfo]:
    """A source that names one object (a local file, or an S3 key that is not a prefix)."""
    if not is_s3(source):
        p = local_path(source)
        if p.is_file():
            st = p.stat()
            return [ObjectInfo(source, p.name, st.st_size, f"{st.st_mtime_ns}-{st.st_size}")]
        return []
    parent, _, name = source.rstrip("/").rpartition("/")
    if parent.endswith(":/"):  # s3://bucket alone has no parent to list
        return []
    return [o for o in storage_for(parent).list(parent) if o.relpath == name]


def list_source(source: str) -> list[ObjectInfo]:
    """Every object one source names: a prefix/directory (recursively), a glob, or a single object.
    Hidden files and in-progress `.tmp` files are ignored; a kubellm `_manifest.json` is kept (it is
    what changes when an artifact prefix is re-committed)."""
    base, pattern = _split_glob(source)
    if pattern is None:
        objs = storage_for(source).list(source) or _single_object(source)
    else:
        objs = [o for o in storage_for(base).list(base) if fnmatch.fnmatchcase(o.relpath, pattern)]
    return [o for o in objs if not any(part.startswith(".") for part in o.relpath.split("/"))
            or o.relpath.endswith("_manifest.json")]


def fingerprint(source: str) -> str:
    """sha256 over (source, sorted relative keys, sizes, ETags) of every object `source` names.

    Raises InputDataError naming the source when it matches nothing (a typo must not silently
    fingerprint an empty set and cache an empty dataset)."""
    sources = split_sources(source)
    if not sources:
        raise InputDataError("empty source: expected a local path/glob or an s3:// prefix")
    h = hashlib.sha256()
    for src in sources:
        objs = list_source(src)
        if not objs:
            raise InputDataError(
                f"{src}: matched no objects (expected a directory, file, glob or s3:// prefix with data)"
            )
        h.update(json.dumps({"source": src, "objects": [[o.relpath, o.size, o.etag]
                                                         for o in sorted(objs, key=lambda o: o.relpath)]},
                            separators=(",", ":")).encode())
    return "sha256:" + h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Promoted:
    """What a promoted-model pointer resolved to: the pointer itself, its target ("" when nothing is
    promoted yet) and a fingerprint that changes whenever the pointer moves."""

    pointer: str
    uri: str
    fingerprint: str


def default_pointer(storage_root: str, registry: str | None = None, name: str = "kubellm") -> str:
    """The evaluate stage's promoted-model pointer: `<registry>/<name>/promoted.json`, the registry
    defaulting to `<storage_root>/registry` (kubellm.evaluate.config.GateConfig)."""
    return join(registry or join(storage_root, "registry"), name, POINTER_NAME)


def strip_label(ref: str) -> str:
    """`sft:s3://b/sft/ab` -> `s3://b/sft/ab` (the evaluate stage's `[label:]ref` model syntax)."""
    m = _LABEL.match(ref)
    return ref[m.end():] if m else ref


def resolve_promoted(pointer: str, *, required: bool = False) -> Promoted:
    """Read the promoted-model pointer (the JSON the evaluate stage's gate writes) and fingerprint its
    target (the target's manifest digest).

    A pointer that does not exist yet (no model promoted) gives Promoted(pointer, "", "none") — the
    pointer is kept, so the first promotion lands where it names — unless `required`. A pointer that is
    not the gate's JSON, or names a prefix with no committed manifest, is an error."""
    from kubellm.evaluate.registry import Registry

    if not pointer:
        return Promoted("", "", "none")
    current = Registry.from_pointer(pointer).current()
    if current is None:
        if required:
            raise InputDataError(f"{pointer}: no promoted model yet (the gate has never promoted one)")
        return Promoted(pointer, "", "none")
    target = current.entry.model_uri
    try:
        manifest = load_manifest_ref(target)
    except KubellmError as e:
        raise InputDataError(f"{pointer}: its model_uri {target} is not a committed artifact: {e}") from e
    return Promoted(pointer, manifest.uri, "sha256:" + hashlib.sha256(
        f"{manifest.uri}\n{manifest.digest()}".encode()).hexdigest())


def resolve_models(model_uris: list[str], pointer: str) -> tuple[list[str], Promoted]:
    """The models an evaluation report covers: `model_uris` if any, else the promoted model.
    Returns (model refs, promoted) — the promoted model is also the baseline."""
    promoted = resolve_promoted(pointer)
    models = [u for u in (m.strip() for m in model_uris) if u]
    if not models:
        if not promoted.uri:
            raise InputDataError(
                f"no models to evaluate: pass model URIs, or promote a model first (pointer {pointer or '<unset>'} "
                "is empty or missing)"
            )
        models = [promoted.uri]
    for m in map(strip_label, models):
        if not is_s3(m) and not Path(m).exists():
            raise InputDataError(f"{m}: model artifact not found (expected an artifact prefix or manifest file)")
    return models, promoted


def fingerprint_models(models: list[str]) -> str:
    """Fingerprint of a list of model artifacts: their manifests' digests."""
    h = hashlib.sha256()
    for m in models:
        manifest = load_manifest_ref(strip_label(m))
        h.update(f"{manifest.uri}\n{manifest.digest()}\n".encode())
    return "sha256:" + h.hexdigest()
