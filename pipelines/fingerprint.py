"""Fingerprints of inputs that can change under the same name (ARCHITECTURE §3, caching).

KFP caches on parameter values and artifact identities, never on content: a cached data-prep step
fed `s3://bucket/raw/` would be skipped even after new files land there. So a small *uncached* step
resolves the source into a fingerprint and passes it as a parameter to the cached step. Same
objects → same fingerprint → cache hit; one changed object → a new fingerprint → that step and
everything downstream re-runs.

The files are found exactly as the stages that read them find them: raw, chat and preference sources
are all read through `kubellm.data_prep.sources.scan_sources`, so the fingerprint hashes that scan's
shards (`Source.fingerprint`: an S3 object's key + ETag + size, a local file's path + size + mtime, a
`datasets` save_to_disk directory's files) and the files it skipped for their format. A glob is
expanded by that scan too (`glob.glob(..., recursive=True)`: `data/**/*.jsonl` includes
`data/a.jsonl`).

    from kubellm.pipelines.fingerprint import fingerprint, resolve_promoted
    fingerprint("s3://bucket/raw/")              # 'sha256:…' over every object under the prefix
    fingerprint("/data/corpus/**/*.jsonl")       # a local glob
    fingerprint("a/corpus,b/extra.jsonl")        # several sources, comma separated
    fingerprint("hf:wikitext:wikitext-2-raw-v1") # a hub dataset: the hub commit it resolves to
    resolve_promoted("s3://bucket/kubellm/registry/kubellm/promoted.json")
                                                 # -> Promoted(pointer, uri, fingerprint)

Local files have no ETag: their mtime+size stand in, so rewriting a file (even with the same bytes)
counts as a change — conservative, never stale. A hub dataset (`hf:<name>[:<config>][@<revision>]`)
is fingerprinted by the commit its revision (default: main) resolves to on the hub now
(`kubellm.data_prep.sources.hub_source`; data prep then reads that commit), so a push to the hub is a
change. Offline (`HF_HUB_OFFLINE=1`, no network) the spec string alone stands in, with a warning: a
change on the hub is then not detected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

from kubellm.core.errors import ConfigError, InputDataError, KubellmError
from kubellm.core.manifest import is_plain_hf_dir, load_manifest_ref
from kubellm.core.storage import is_s3, join, redact

GLOB_CHARS = "*?["
POINTER_NAME = "promoted.json"
_LABEL = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*:(?!//)")


def split_sources(source: str) -> list[str]:
    """`a,b` -> [`a`, `b`]; blanks dropped."""
    return [s.strip() for s in source.split(",") if s.strip()]


def refuse_s3_glob(item: str, name: str = "source") -> None:
    """Data prep (and SFT/DPO) list an `s3://` source as a prefix or one key, never as a glob: refuse
    `s3://b/raw/*.jsonl` up front rather than read nothing (or a key that happens to hold a `*`)."""
    if is_s3(item) and any(c in item for c in GLOB_CHARS):
        prefix = item[:min(item.find(c) for c in GLOB_CHARS if c in item)].rsplit("/", 1)[0]
        raise ConfigError(redact(
            f"{name} {item!r}: glob patterns are not supported on s3:// (an S3 source is a prefix, read "
            f"recursively, or one object): name the prefix ({prefix}/) or list the objects comma separated"))


def fingerprint(source: str, name: str = "source") -> str:
    """sha256 over, per comma-separated item, the shards `scan_sources` finds for it (the very files
    data prep, SFT and DPO read) and the files it skips for their format. `name` (e.g. `chat_source`)
    is what errors call the source.

    Raises InputDataError/ConfigError naming the source when it is empty or an item matches nothing (a
    typo must not silently fingerprint an empty set and cache an empty dataset)."""
    from kubellm.data_prep.sources import scan_sources

    items = split_sources(source)
    if not items:
        raise InputDataError(f"{name} is empty: expected a local path/glob, an s3:// prefix or hf:<name>")
    h = hashlib.sha256()
    for item in items:
        refuse_s3_glob(item, name)
        try:
            scan = scan_sources(item, warn=False)
        except KubellmError as e:
            raise type(e)(f"{name}: {e}") from e
        h.update(json.dumps({"source": item,
                             "shards": [[s.uri, s.format, s.fingerprint] for s in scan.sources],
                             "skipped": sorted(scan.skipped)}, separators=(",", ":")).encode())
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


def model_identity(ref: str) -> tuple[str, str]:
    """(uri, content digest) of a model reference: a committed artifact's manifest URI and digest, or
    for a plain local HF directory its resolved path and `directory_fingerprint` (files' names, sizes,
    mtimes — as the training stages fingerprint such a directory; re-exporting into it is a change)."""
    if is_plain_hf_dir(ref):
        from kubellm.data_prep.sources import directory_fingerprint

        return str(Path(ref).resolve()), directory_fingerprint(Path(ref))
    manifest = load_manifest_ref(ref)
    return manifest.uri, manifest.digest()


def resolve_promoted(pointer: str, *, required: bool = False) -> Promoted:
    """Read the promoted-model pointer (the JSON the evaluate stage's gate writes) and fingerprint its
    target (the target's manifest digest; a plain local HF directory's `directory_fingerprint`).

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
        uri, digest = model_identity(target)
    except KubellmError as e:
        raise InputDataError(f"{pointer}: its model_uri {target} is neither a committed artifact nor an HF model directory: {e}") from e
    return Promoted(pointer, uri, "sha256:" + hashlib.sha256(f"{uri}\n{digest}".encode()).hexdigest())


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
    """Fingerprint of a list of model artifacts: their manifests' digests (a plain local HF directory:
    its files' paths, sizes and mtimes, see `model_identity`)."""
    h = hashlib.sha256()
    for m in models:
        uri, digest = model_identity(strip_label(m))
        h.update(f"{uri}\n{digest}\n".encode())
    return "sha256:" + h.hexdigest()
