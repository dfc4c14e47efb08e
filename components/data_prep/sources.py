"""Raw sources for data prep: resolve what `--input raw=...` names into shards, fingerprint them,
and stage S3 shards locally.

A raw input is a comma-separated list of any of:
  * a local file, directory (searched recursively) or glob (`data/**/*.jsonl.gz`)
  * an `s3://bucket/prefix` (every object under it) or `s3://bucket/key` (one object) — staged
    through kubellm's storage layer (`storage_for(uri).download`) into a temp dir, one shard at a
    time, each in a directory of its own (two objects with one base name never share a local file);
    never `datasets`' s3fs path (its aiobotocore pin fights boto3's)
  * `hf:<name>[:<config>]` — a Hugging Face Hub dataset streamed with
    `datasets.load_dataset(name, config, split=..., streaming=True)` (needs a network)

Formats by suffix, any case (optionally `.gz`): `.jsonl`/`.ndjson`/`.json` (JSON lines, or one JSON
array for `.json`), `.parquet`, `.txt`/`.text`/`.md`. A leading UTF-8 byte-order mark is ignored. A
directory written by `datasets`' `save_to_disk` (`state.json` + `dataset_info.json` + `*.arrow`, or a
DatasetDict's `dataset_dict.json` + one such directory per split) is one shard, read with
`datasets.load_from_disk` (a DatasetDict at `data_prep.hub_split`), wherever a scan finds it.

Directory and S3-prefix scans follow the same rules: paths with a part starting with `_` or `.`
(`_manifest.json`, `.hidden/`, `_tmp/`) are not inputs, and a file no reader knows the format of
(`.csv`, `.jsonl.zst`, a loose `.arrow`) is skipped with a warning naming it (data prep lists the
skipped files in its manifest and report); a glob skips such files the same way. A file named on its
own with an unknown format is an error, and so is an item with nothing readable ("no readable files
(skipped: ...)").

Reading the records of a shard is `kubellm.data_prep.readers` (one module per idea: `records` is
what a read yields, `json_array` the streamed JSON-array reader).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from kubellm.core.errors import ConfigError, InputDataError
from kubellm.core.storage import ObjectInfo, Storage, is_s3, storage_for

log = logging.getLogger(__name__)

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
           ".txt": "text", ".text": "text", ".md": "text"}
HUB_SCHEME = "hf:"
ARROW = "arrow"  # the format of a `datasets` save_to_disk directory (a Dataset or a DatasetDict)
_DATASET_STATE, _DATASET_INFO, _DATASET_DICT = "state.json", "dataset_info.json", "dataset_dict.json"
_SHOWN = 5  # names of skipped files shown in a warning or an error


@dataclasses.dataclass(frozen=True)
class Source:
    """One input shard: a file (local or S3) or a hub dataset. `fingerprint` changes with content."""

    uri: str
    format: str
    fingerprint: str


def format_of(name: str) -> str | None:
    """The format a file name's suffix says (any case, optionally `.gz`), or None."""
    name = name.lower()
    return FORMATS.get(Path(name.removesuffix(".gz")).suffix)


class SourceScan(NamedTuple):
    """What a raw input names: the shards to read, and the files a directory, glob or S3-prefix scan
    left out because no reader knows their format (see `scan_sources`)."""

    sources: list[Source]
    skipped: list[str]


def _ignored(parts: Sequence[str]) -> bool:
    """A path with a part starting with `.` or `_` (`_manifest.json`, `.hidden/`, `_tmp/`) found by a
    directory or S3-prefix scan is not an input."""
    return any(part.startswith((".", "_")) for part in parts)


def _under(rel: str, root: str) -> bool:
    """Whether the '/'-separated relative path `rel` is `root` or inside it ('' is the scanned root)."""
    return not root or rel == root or rel.startswith(root + "/")


def _dataset_roots(rels: Iterable[str]) -> list[str]:
    """The `datasets` save_to_disk directories among '/'-separated relative file paths: a directory
    holding `dataset_dict.json` (a DatasetDict), or `state.json` beside `dataset_info.json` (a
    Dataset). Outermost only: a DatasetDict's split directories are part of it."""
    files = set(rels)
    roots = set()
    for rel in files:
        parent, _, name = rel.rpartition("/")
        if name == _DATASET_DICT or (name == _DATASET_STATE
                                     and (f"{parent}/{_DATASET_INFO}" if parent else _DATASET_INFO) in files):
            roots.add(parent)
    return sorted(r for r in roots if not any(o != r and _under(r, o) for o in roots))


def _classify(rels: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """([(relative path, format)], skipped) for the files a scan found: files by suffix, each save_to_disk
    directory as one `ARROW` entry (its own files are part of it), and the files of no known format."""
    roots = _dataset_roots(rels)
    entries: list[tuple[str, str]] = [(r, ARROW) for r in roots]
    skipped: list[str] = []
    for rel in rels:
        if any(_under(rel, r) for r in roots):
            continue
        fmt = format_of(rel)
        if fmt is None:
            skipped.append(rel)
        else:
            entries.append((rel, fmt))
    return entries, skipped


def _local_dataset_root(path: Path) -> Path | None:
    """The save_to_disk directory a file (or directory) found by a glob belongs to, or None."""
    d = path if path.is_dir() else path.parent
    if (d / _DATASET_DICT).is_file():
        return d
    if (d / _DATASET_STATE).is_file() and (d / _DATASET_INFO).is_file():
        return d.parent if (d.parent / _DATASET_DICT).is_file() else d
    return None


def _digest(items: Any) -> str:
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode("utf-8")).hexdigest()[:32]


def directory_fingerprint(path: Path, skip: Any = None) -> str:
    """What a local directory holds, by its resolved path and its files' names, sizes and mtimes
    (`skip(parts)`: leave a file out by its relative path's parts). Changes when any file does."""
    files = []
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if f.is_file() and not (skip and skip(rel.parts)):
            st = f.stat()
            files.append([rel.as_posix(), st.st_size, st.st_mtime_ns])
    return f"{path.resolve()}@{_digest(files)}"


def _local_source(path: Path, fmt: str) -> Source:
    if fmt == ARROW:  # a save_to_disk directory
        return Source(str(path), fmt, directory_fingerprint(path, _ignored))
    st = path.stat()
    return Source(str(path), fmt, f"{path.resolve()}@{st.st_size}:{st.st_mtime_ns}")


def _s3_dataset_objects(st: Storage, root: str) -> list[ObjectInfo]:
    """The objects of a save_to_disk directory on S3 (its `_`/`.` paths and folder markers left out)."""
    return [o for o in st.list(root) if o.relpath and not o.relpath.endswith("/")
            and not _ignored(o.relpath.split("/"))]


def _s3_source(st: Storage, uri: str, fmt: str, obj: ObjectInfo | None) -> Source:
    if fmt == ARROW:
        objs = _s3_dataset_objects(st, uri)
        return Source(uri, fmt, f"{uri}@{_digest([[o.relpath, o.etag, o.size] for o in objs])}")
    assert obj is not None
    return Source(obj.uri, fmt, f"{obj.uri}@{obj.etag}:{obj.size}")


def _shown(names: Sequence[str]) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


_EXPECTED = f"expected suffixes {sorted(FORMATS)}, optionally .gz, or a `datasets` save_to_disk directory"


def parse_hub(spec: str) -> tuple[str, str | None, str | None]:
    """`hf:<name>[:<config>][@<revision>]` (or the same without `hf:`) -> (name, config, revision)."""
    spec = spec.removeprefix(HUB_SCHEME)
    spec, _, revision = spec.partition("@")
    name, _, config = spec.partition(":")
    return name, config or None, revision or None


_HUB_TIMEOUT_S = 10.0


def hub_source(item: str) -> Source:
    """A hub dataset source, pinned: its fingerprint names the commit the revision (default: the main
    branch) resolves to now, and the reader reads that commit, so a dataset updated on the hub under
    the same name is a new input (a new content address), not a stale cache hit. Where the hub cannot
    be asked (offline, `HF_HUB_OFFLINE=1`, no such dataset yet) the source stays unpinned, with a
    warning: its fingerprint is then its name, as for a dataset that never changes."""
    name, config, revision = parse_hub(item)
    try:
        from huggingface_hub import HfApi, constants

        if constants.HF_HUB_OFFLINE:
            raise OSError("HF_HUB_OFFLINE is set")
        sha = HfApi().dataset_info(name, revision=revision, timeout=_HUB_TIMEOUT_S).sha
    except Exception as e:  # network, auth, offline: huggingface_hub raises many types
        log.warning("%s: could not resolve the hub revision (%s: %s); reading it unpinned, so a change on "
                    "the hub under the same name is not detected", item, type(e).__name__, str(e)[:200])
        return Source(item, "hub", item)
    return Source(item, "hub", f"{HUB_SCHEME}{name}{':' + config if config else ''}@{sha}")


def _resolve_item(item: str, skipped: list[str]) -> list[Source]:
    """The shards one comma-separated item names (sorted); files a scan leaves out are added to `skipped`."""
    if item.startswith(HUB_SCHEME):
        return [hub_source(item)]
    if is_s3(item):
        st = storage_for(item)
        listed = st.list(item)
        key_name = item[len("s3://"):].rstrip("/").partition("/")[2].rpartition("/")[2]
        if not listed and "." in key_name:  # a file name: one object named by its key, not a prefix?
            obj = st.head(item)  # one request: listing the parent would list all its siblings
            if obj is not None:
                fmt = format_of(item)
                if fmt is None:  # named on its own: an error, not a skip (as a local file)
                    raise ConfigError(f"{item}: unknown format; {_EXPECTED}")
                return [_s3_source(st, item, fmt, obj)]
        # the local scan's rules: folder markers (`dir/`) are no files; `_`/`.` paths are no inputs
        visible = [o for o in listed if o.relpath and not o.relpath.endswith("/")
                   and not _ignored(o.relpath.split("/"))]
        entries, unknown = _classify([o.relpath for o in visible])
        by_rel = {o.relpath: o for o in visible}
        unknown_uris = [by_rel[r].uri for r in unknown]
        skipped += unknown_uris
        if not entries:
            why = ("no such object, and nothing is stored under it" if not listed else
                   f"skipped, no reader for their format: {_shown(unknown_uris)}" if unknown else
                   f"its {len(listed)} object(s) are folder markers or under `_`/`.` paths, never inputs")
            raise InputDataError(f"{item}: no readable objects under this S3 prefix ({why}); {_EXPECTED}")
        base = item.rstrip("/")
        return [_s3_source(st, f"{base}/{rel}" if rel else base, fmt, by_rel.get(rel))
                for rel, fmt in sorted(entries)]  # S3's order: by key string
    p = Path(item)
    if p.is_file():
        fmt = format_of(p.name)
        if fmt is None:  # named on its own: an error, not a skip
            root = _local_dataset_root(p)
            hint = f"; it is part of the `datasets` save_to_disk directory {root}: name that" if root else ""
            raise ConfigError(f"{p}: unknown format; {_EXPECTED}{hint}")
        return [_local_source(p, fmt)]
    found: dict[Path, str] = {}
    left_out: list[str] = []
    if p.is_dir():
        rels = sorted(f.relative_to(p) for f in p.rglob("*") if f.is_file())
        entries, names = _classify([r.as_posix() for r in rels if not _ignored(r.parts)])
        found = {p / rel: fmt for rel, fmt in entries}
        left_out = [str(p / n) for n in names]
    else:
        for m in sorted(Path(f) for f in glob.glob(item, recursive=True)):
            root = _local_dataset_root(m)
            if root is not None:
                found[root] = ARROW
            elif m.is_file():
                fmt = format_of(m.name)
                if fmt is None:
                    left_out.append(str(m))
                else:
                    found[m] = fmt
    skipped += left_out
    if not found:
        if left_out:
            raise InputDataError(f"{item}: no readable files (skipped, no reader for their format: "
                                 f"{_shown(left_out)}); {_EXPECTED}")
        if p.is_dir():
            raise InputDataError(f"{item}: no readable files in this directory (it holds none outside "
                                 f"`_`/`.` paths); {_EXPECTED}")
        raise InputDataError(f"{item}: no such file, directory or glob match ({_EXPECTED})")
    return [_local_source(f, fmt) for f, fmt in sorted(found.items())]


def scan_sources(raw: str, *, warn: bool = True) -> SourceScan:
    """Expand the raw input into an ordered list of shards (sorted within each item; a file that two
    items name is read once, where it is first named), and the files
    that directory, glob and S3-prefix scans left out because no reader knows their format (logged
    as a warning with the first few names; data prep records them in its manifest and report). A
    file named on its own with an unknown format is an error; an item with nothing readable is one
    too, naming what it skipped."""
    out: list[Source] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for item in (s.strip() for s in raw.split(",")):
        if not item:
            continue
        before = len(skipped)
        repeated = []
        for src in _resolve_item(item, skipped):
            # what the fingerprint names (a resolved local path, an S3 URI), not how the item spelled it:
            # `data/,data/a.jsonl` reads a.jsonl once; a hub dataset with its revision (two revisions are two)
            key = src.fingerprint if src.format == "hub" else src.fingerprint.rpartition("@")[0] or src.uri
            if key in seen:
                repeated.append(src.uri)
            else:
                seen.add(key)
                out.append(src)
        if warn and repeated:
            log.warning("%s: %d file(s) already named by an earlier input item are read once: %s", item,
                        len(repeated), _shown(repeated))
        if warn and len(skipped) > before:
            log.warning("%s: skipping %d file(s) that no reader knows the format of: %s (%s)", item,
                        len(skipped) - before, _shown(skipped[before:]), _EXPECTED)
    if not out:
        raise ConfigError(f"raw input {raw!r} names no sources")
    return SourceScan(out, skipped)


def resolve_sources(raw: str) -> list[Source]:
    """Expand the raw input into an ordered list of shards (sorted within each item); see `scan_sources`."""
    return scan_sources(raw).sources


def resolve_uri(uri: str) -> list[Source]:
    """The shards one source URI names (a `Source.uri`, taken whole: a comma in it is part of the name)."""
    return _resolve_item(uri, [])


def current_fingerprint(source: Source) -> str | None:
    """The fingerprint `source` has now (None when it is gone or no longer one shard), to compare with
    the one recorded when the input was listed."""
    if source.format == "hub":
        return source.fingerprint
    try:
        found = resolve_uri(source.uri)
    except (InputDataError, ConfigError):
        return None
    return found[0].fingerprint if len(found) == 1 and found[0].format == source.format else None


def check_unchanged(source: Source, recorded: str, when: str, *, now: str | None = "") -> None:
    """Raise InputDataError naming the file when its fingerprint is no longer `recorded` (the one the
    artifact's address was computed from, `when`). `now`: the current fingerprint when the caller has
    just resolved it (None: gone); looked up by default."""
    if now == "":
        now = current_fingerprint(source)
    if now != recorded:
        state = "is gone" if now is None else f"fingerprint {now!r} now"
        raise InputDataError(
            f"{source.uri}: changed since {when} (fingerprint {recorded!r} then, {state}); what was read "
            "would be published under the address of the old content. Re-run so that the input is "
            "listed again, and leave the input unchanged while data prep reads it.")


def stage_local(source: Source, tmp_dir: Path) -> Path:
    """A local path for the source: S3 objects (and save_to_disk directories) are downloaded through
    kubellm's storage layer. Each S3 source gets its own directory under `tmp_dir`, named by a hash of
    its URI, and keeps its base name there (`<tmp_dir>/<hash>/train.jsonl`): `s3://b/en/train.jsonl` and
    `s3://b/fr/train.jsonl` never land on the same file, and a file's suffix still says its format."""
    if not is_s3(source.uri):
        return Path(source.uri)
    name = Path(source.uri.split("://", 1)[1].rstrip("/")).name
    dest = tmp_dir / hashlib.sha256(source.uri.encode("utf-8")).hexdigest()[:20] / (
        name if name not in ("", ".", "..") else "object")
    st = storage_for(source.uri)
    if source.format != ARROW:
        st.download(source.uri, dest)
        return dest
    for o in _s3_dataset_objects(st, source.uri):
        parts = o.relpath.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise InputDataError(f"{o.uri}: key part {o.relpath!r} cannot be a local path; the "
                                 f"save_to_disk directory {source.uri} cannot be staged")
        st.download(o.uri, dest.joinpath(*parts))
    log.debug("staged %s -> %s", source.uri, dest)
    return dest

