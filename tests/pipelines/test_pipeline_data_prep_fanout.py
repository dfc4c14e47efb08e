"""Data-prep fan-out: list-shards -> dsl.ParallelFor(prepare-shard) -> dedup-reduce.

    .venv/bin/python -m pytest tests/pipelines/test_pipeline_data_prep_fanout.py -q

* the compiled IR has the ParallelFor (`parameterIterator` over list-shards' output, `iteratorPolicy.
  parallelismLimit`), the reduce gathers the map with `dsl.Collected`, and the tokenizer reads the reduce;
* the fan-out publishes the same documents in each split as the single-step data prep, on a small
  demo world (4 shards) plus a fifth shard of cross-shard exact and near duplicates.

kfp.local 2.16.1 runs a `dsl.ParallelFor` (its enhanced orchestrator) but cannot run a task that
depends on one in the same DAG (its topological sort raises KeyError on the `for-loop-N` task), and
its plain orchestrator cannot run a loop nested in a sub-pipeline. So the local test runs list-shards
and the ParallelFor map through kfp.local (real subprocesses, the real loop-item wiring) and calls the
reduce component's `python_func` on their outputs; the S3 test calls all three `python_func`s in
sequence.
"""

# No `from __future__ import annotations`: kfp reads the test pipeline's annotations as types.

import builtins
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from kfp import dsl, local

from kubellm.cli import main as cli_main
from kubellm.core.manifest import Manifest, fetch, load_manifest_ref
from kubellm.data_prep.config import DataPrepConfig
from kubellm.data_prep.demo_world import generate
from kubellm.data_prep.stage import run as data_prep_run
from kubellm.pipelines import components as c
from kubellm.pipelines.definitions import section_json
from kubellm.runconfig import load_run_config


def _compile(tmp_path: Path, *extra: str) -> dict[str, Any]:
    assert cli_main(["compile", "--preset", "debug", "--tag", "t", "--registry", "", "--pipeline",
                     "llm_from_scratch", "--output", str(tmp_path), *extra]) == 0
    return next(d for d in yaml.safe_load_all((tmp_path / "llm_from_scratch.yaml").read_text()) if d)


def test_fan_out_compiles_to_parallel_for_with_collected_reduce(tmp_path: Path) -> None:
    spec = _compile(tmp_path, "--set", "data_prep.fan_out=true", "--set", "data_prep.fan_out_parallelism=3")
    tasks = spec["root"]["dag"]["tasks"]
    assert "data-prep" not in tasks and {"list-shards", "dedup-reduce"} <= set(tasks)
    loop_name = next(n for n in tasks if n.startswith("for-loop-"))
    loop = tasks[loop_name]
    assert loop["iteratorPolicy"] == {"parallelismLimit": 3}
    items = loop["parameterIterator"]["items"]["inputParameter"]
    assert loop["inputs"]["parameters"][items]["taskOutputParameter"]["producerTask"] == "list-shards"
    body = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert set(body) == {"prepare-shard"}
    assert body["prepare-shard"]["inputs"]["parameters"]["shard"]["componentInputParameter"] == \
        loop["parameterIterator"]["itemInput"]
    # the reduce gathers every map output (dsl.Collected) and so runs after the whole loop
    red = tasks["dedup-reduce"]
    assert red["inputs"]["parameters"]["prepared"]["taskOutputParameter"]["producerTask"] == loop_name
    assert loop_name in red["dependentTasks"]
    assert red["inputs"]["parameters"]["shards"]["taskOutputParameter"]["producerTask"] == "list-shards"
    assert tasks["tokenizer"]["inputs"]["artifacts"]["dataset"]["taskOutputArtifact"] == {
        "outputArtifactKey": "dataset", "producerTask": "dedup-reduce"}
    # caching: the uncached fingerprint keys the cached list-shards (a changed source re-lists)
    ls = tasks["list-shards"]
    assert ls["inputs"]["parameters"]["raw_fingerprint"]["taskOutputParameter"]["producerTask"] == "fingerprint-source"
    assert ls["cachingOptions"]["enableCache"] is True
    assert tasks["fingerprint-source"].get("cachingOptions", {}).get("enableCache", False) is False
    # thin lightweight components, all three on the data-prep image
    for name in ("exec-list-shards", "exec-prepare-shard", "exec-dedup-reduce"):
        e = spec["deploymentSpec"]["executors"][name]["container"]
        assert "kfp.dsl.executor_main" in " ".join(e["command"]) and "pip install" not in " ".join(e["command"])
        assert len(e["command"][-1].splitlines()) < 30, name
        assert e["image"] == "kubellm-base:t"
    # list-shards derives the run-scoped work prefix from the KFP run id (env, outside the cache key)
    platform = next(d for d in list(yaml.safe_load_all((tmp_path / "llm_from_scratch.yaml").read_text()))[1:])
    env = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-list-shards"]["fieldPathAsEnv"]
    assert {"name": "KUBELLM_KFP_RUN_ID", "fieldPath": "metadata.labels['pipeline/runid']"} in env


def test_fan_out_setting_overrides_run_config(tmp_path: Path) -> None:
    on = _compile(tmp_path / "on", "--param", "data_prep_parallelism=4")["root"]["dag"]["tasks"]
    loop = next(t for n, t in on.items() if n.startswith("for-loop-"))
    assert loop["iteratorPolicy"] == {"parallelismLimit": 4}
    off = _compile(tmp_path / "off", "--set", "data_prep.fan_out=true", "--param", "data_prep_parallelism=1")
    assert "data-prep" in off["root"]["dag"]["tasks"] and "list-shards" not in off["root"]["dag"]["tasks"]
    # the default (the local demo's) is one step
    assert "data-prep" in _compile(tmp_path / "default")["root"]["dag"]["tasks"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demo world at scale 0.1 (4 shards) + a 5th shard repeating documents of the others: exact
    copies (other case/spacing) and near copies (last word changed) only a *global* dedup removes."""
    out = tmp_path_factory.mktemp("world")
    generate(out, seed=0, scale=0.1)
    corpus = out / "corpus"
    docs = [json.loads(ln)["text"] for p in sorted(corpus.glob("*.jsonl")) for ln in p.read_text().splitlines()[:12]]
    dups = [d.upper().replace(" ", "  ") for d in docs[0::4]] + [d.rsplit(" ", 1)[0] + " zebra." for d in docs[1::4]]
    (corpus / "part-00099.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in dups))
    return corpus


@pytest.fixture(scope="module")
def single_step(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    m = data_prep_run(DataPrepConfig(), {"raw": str(corpus)}, str(tmp_path_factory.mktemp("single")))
    assert m.counts["sources"] == 5
    assert m.counts["removed_exact_duplicate"] > 0 and m.counts["removed_near_duplicate"] > 0
    return m


def _splits(m: Manifest, tmp: Path) -> dict[str, list[str]]:
    fetch(m, tmp)
    return {s: [t for f in sorted((tmp / s).glob("*.parquet")) for t in pq.read_table(f).column("text").to_pylist()]
            for s in ("train", "validation")}


def _artifacts(tmp: Path) -> dict[str, Any]:
    return {"dataset": dsl.Dataset(uri=str(tmp / "dataset")), "metrics": dsl.Metrics(uri=str(tmp / "metrics")),
            "report": dsl.Markdown(uri=str(tmp / "report"))}


def _assert_same(fan: Manifest, single: Manifest, tmp: Path) -> None:
    assert _splits(fan, tmp / "fan") == _splits(single, tmp / "single")  # same documents, same order
    assert fan.counts == single.counts
    assert fan.metadata["report"] == single.metadata["report"]
    # the same content address (fan-out knobs are not part of the data-prep config hash)
    assert fan.uri.rsplit("/", 2)[-2:] == single.uri.rsplit("/", 2)[-2:]
    assert fan.config_hash == single.config_hash


def test_fan_out_through_kfp_local_equals_single_step(corpus: Path, single_step: Manifest, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # kfp.local runs the ParallelFor's tasks on threads, and each swaps `builtins.print` for an indenting
    # one and back (`logging_utils.indented_print`); two at once can leave the indenting one installed
    # for the rest of the session (it indented a later test's captured output in CI). Put it back.
    monkeypatch.setattr(builtins, "print", builtins.print)
    cfg = load_run_config(preset="debug")
    config = section_json(cfg, "data_prep")
    root = str(tmp_path / "artifacts")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"),
               raise_on_error=True)
    shards = c.list_shards(config=config, storage_root=root, raw=str(corpus), raw_fingerprint="fp").output
    assert [json.loads(s)["index"] for s in shards] == [0, 1, 2, 3, 4]

    @dsl.pipeline(name="data-prep-map")
    def data_prep_map(shards: list, config: str) -> list[str]:
        with dsl.ParallelFor(shards, parallelism=2) as shard:
            prepared = c.prepare_shard(config=config, shard=shard)
        return dsl.Collected(prepared.output)  # type: ignore[return-value]

    prepared = data_prep_map(shards=shards, config=config).output
    assert sorted(json.loads(p)["index"] for p in prepared) == [0, 1, 2, 3, 4]
    work = json.loads(shards[0])["work"]
    assert len(list(Path(work).glob("shard-*/minhash.bin"))) == 5  # the map wrote to the run's work prefix
    out = _artifacts(tmp_path)
    c.dedup_reduce.python_func(config=config, storage_root=root, shards=shards, prepared=prepared, **out)
    fan = load_manifest_ref(out["dataset"].path)
    _assert_same(fan, single_step, tmp_path)
    assert out["dataset"].metadata["uri"] == fan.uri and out["dataset"].metadata["fan_out_shards"] == "5"
    assert "Data prep report" in Path(out["report"].path).read_text()
    assert not Path(work).exists()  # scratch removed after publishing


def test_fan_out_on_s3_equals_single_step(corpus: Path, single_step: Manifest, tmp_path: Path,
                                          s3_bucket: str) -> None:
    config = section_json(load_run_config(preset="debug", overrides=["data_prep.fan_out=true"]), "data_prep")
    root = f"{s3_bucket}/kubellm"
    shards = c.list_shards.python_func(config=config, storage_root=root, raw=str(corpus), raw_fingerprint="fp")
    prepared = [c.prepare_shard.python_func(config=config, shard=s) for s in reversed(shards)]  # any order
    out = _artifacts(tmp_path)
    c.dedup_reduce.python_func(config=config, storage_root=root, shards=shards, prepared=prepared, **out)
    fan = load_manifest_ref(out["dataset"].path)
    assert fan.uri.startswith(f"{root}/data_prep/")
    _assert_same(fan, single_step, tmp_path)
    from kubellm.core.storage import storage_for
    assert storage_for(root).list(f"{root}/_work") == []  # scratch removed
    # a second run finds the artifact: the map skips, the reduce returns it unchanged
    again = c.list_shards.python_func(config=config, storage_root=root, raw=str(corpus), raw_fingerprint="fp")
    assert all(json.loads(s)["done"] for s in again)
    skipped = [c.prepare_shard.python_func(config=config, shard=s) for s in again]
    assert all(json.loads(p).get("skipped") for p in skipped)
    out2 = _artifacts(tmp_path / "again")
    c.dedup_reduce.python_func(config=config, storage_root=root, shards=again, prepared=skipped, **out2)
    assert load_manifest_ref(out2["dataset"].path).digest() == fan.digest()
