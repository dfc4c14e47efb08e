"""`kubellm compile`: golden IR YAML, run-config values as parameter defaults, images, caching.

Regenerate the golden files after an intended change:
    KUBELLM_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/pipelines/test_pipeline_compile.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubellm.cli import main as cli_main
from kubellm.runconfig import STAGES, load_run_config

GOLDEN = Path(__file__).parent / "golden"
SECTION_PLACEHOLDER = "<run-config section {stage}: see test_run_config_values_are_defaults>"


@pytest.fixture(autouse=True)
def _no_image_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith(("KUBELLM_REGISTRY", "KUBELLM_TAG", "KUBELLM_IMAGE_", "KUBELLM_S3_SECRET", "KUBELLM_S3_CONFIG_MAP")):
            monkeypatch.delenv(k)


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _params(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["root"]["inputDefinitions"]["parameters"]


def normalise(path: Path) -> str:
    """The compiled YAML minus what legitimately varies: the SDK version, and the stage sections'
    JSON defaults (they change whenever any stage owner adds a config field; their equality with the
    run-config is pinned by test_run_config_values_are_defaults instead)."""
    docs = _docs(path)
    spec = docs[0]
    spec.pop("sdkVersion", None)
    for name, p in _params(spec).items():
        if name.endswith("_config") and name[: -len("_config")] in STAGES:
            p["defaultValue"] = SECTION_PLACEHOLDER.format(stage=name[: -len("_config")])
    return yaml.safe_dump_all(docs, sort_keys=True, width=110)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compiled")
    old = {k: os.environ.pop(k) for k in list(os.environ)
           if k in ("KUBELLM_REGISTRY", "KUBELLM_TAG", "KUBELLM_S3_SECRET_NAME", "KUBELLM_S3_CONFIG_MAP")}
    try:
        assert cli_main(["compile", "--preset", "debug", "--tag", "golden", "--registry", "",
                         "--output", str(out)]) == 0
    finally:
        os.environ.update(old)
    return out


@pytest.mark.parametrize("name", ["llm_from_scratch", "evaluation_report"])
def test_golden(compiled: Path, name: str) -> None:
    got = normalise(compiled / f"{name}.yaml")
    golden = GOLDEN / f"{name}.yaml"
    if os.environ.get("KUBELLM_UPDATE_GOLDEN") == "1" or not golden.exists():
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(got)
        if os.environ.get("KUBELLM_UPDATE_GOLDEN") != "1":
            pytest.fail(f"{golden} did not exist; written now — review and commit it")
    assert got == golden.read_text(), (
        f"compiled {name} differs from {golden}; if intended, regenerate with KUBELLM_UPDATE_GOLDEN=1")


def test_run_config_values_are_defaults(compiled: Path) -> None:
    cfg = load_run_config(preset="debug")
    params = _params(_docs(compiled / "llm_from_scratch.yaml")[0])
    for stage in STAGES:
        assert json.loads(params[f"{stage}_config"]["defaultValue"]) == cfg.section(stage).model_dump(mode="json")
    assert params["storage_root"]["defaultValue"] == cfg.storage.root
    assert params["promoted_pointer"]["defaultValue"] == f"{cfg.storage.root}/registry/kubellm/promoted.json"
    report = _params(_docs(compiled / "evaluation_report.yaml")[0])
    want = cfg.section("evaluate").model_dump(mode="json")
    want["gate"]["promote"] = False  # a scheduled report judges, never promotes
    assert json.loads(report["evaluate_config"]["defaultValue"]) == want
    assert set(report) == {"storage_root", "model_uris", "promoted_pointer", "tokens", "evaluate_config"}


def test_set_and_param_override_defaults(tmp_path: Path) -> None:
    rc = tmp_path / "run.yaml"
    rc.write_text("name: t\nstorage: {root: s3://bucket/kubellm}\n")
    assert cli_main(["compile", "--run-config", str(rc), "--preset", "debug", "--set",
                     "pretrain.train.max_steps=7", "--param", "raw_source=s3://bucket/raw/",
                     "--param", 'model_uris=["s3://bucket/m"]', "--output", str(tmp_path)]) == 0
    params = _params(_docs(tmp_path / "llm_from_scratch.yaml")[0])
    assert json.loads(params["pretrain_config"]["defaultValue"])["train"]["max_steps"] == 7
    assert params["raw_source"]["defaultValue"] == "s3://bucket/raw/"
    assert params["storage_root"]["defaultValue"] == "s3://bucket/kubellm"
    report = _params(_docs(tmp_path / "evaluation_report.yaml")[0])
    assert report["model_uris"]["defaultValue"] == ["s3://bucket/m"]


def test_unknown_param_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["compile", "--preset", "debug", "--param", "nope=1", "--output", str(tmp_path)]) == 1
    assert "unknown pipeline parameter 'nope'" in capsys.readouterr().err


def test_images_from_one_setting(tmp_path: Path) -> None:
    assert cli_main(["compile", "--preset", "debug", "--registry", "reg.example.com/ml", "--tag", "abc123",
                     "--pipeline", "llm_from_scratch", "--output", str(tmp_path)]) == 0
    spec = _docs(tmp_path / "llm_from_scratch.yaml")[0]
    images = {name: e["container"]["image"] for name, e in spec["deploymentSpec"]["executors"].items()}
    assert images["exec-data-prep"] == "reg.example.com/ml/kubellm-base:abc123"
    assert images["exec-pretrain"] == images["exec-sft"] == images["exec-dpo"] == "reg.example.com/ml/kubellm-train:abc123"
    assert images["exec-evaluate"] == "reg.example.com/ml/kubellm-eval:abc123"
    assert all(i.startswith("reg.example.com/ml/") for i in images.values())
    assert not (tmp_path / "evaluation_report.yaml").exists()
    # a training step's PyTorchJob runs the image the step runs (inside the pod nothing else knows the
    # registry and tag: the workers used to get `kubellm-train:<version>` from Docker Hub) and reaches
    # S3 through the same Secret and ConfigMap, named (never their contents)
    for name in ("exec-pretrain", "exec-sft", "exec-dpo"):
        env = {e["name"]: e["value"] for e in spec["deploymentSpec"]["executors"][name]["container"]["env"]}
        assert env == {**env, "KUBELLM_TRAIN_IMAGE": images[name], "KUBELLM_S3_SECRET_NAME": "kubellm-s3",
                       "KUBELLM_S3_SECRET_KEYS": "AWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY",
                       "KUBELLM_S3_CONFIG_MAP": "kubellm-env"}, name
    assert "env" not in spec["deploymentSpec"]["executors"]["exec-data-prep"]["container"]


def test_components_are_thin_lightweight_and_never_pip_install(compiled: Path) -> None:
    spec = _docs(compiled / "llm_from_scratch.yaml")[0]
    for name, e in spec["deploymentSpec"]["executors"].items():
        cmd = " ".join(e["container"]["command"])
        assert "kfp.dsl.executor_main" in cmd, name  # lightweight: runs under kfp.local too
        assert "pip install" not in cmd, name  # install_kfp_package=False
        src = e["container"]["command"][-1]
        assert len(src.splitlines()) < 30, f"{name}: component body should stay thin"


def test_caching_fingerprints_uncached_stages_cached(compiled: Path) -> None:
    spec = _docs(compiled / "llm_from_scratch.yaml")[0]
    tasks = spec["root"]["dag"]["tasks"]
    cached = {n: t.get("cachingOptions", {}).get("enableCache", False) for n, t in tasks.items()}
    assert cached["fingerprint-source"] is cached["resolve-promoted"] is False
    for n in ("data-prep", "tokenizer", "pretrain", "sft", "dpo", "evaluate"):
        assert cached[n] is True, n
    # the fingerprint feeds the cached stage as a parameter (so a changed source busts its cache)
    dp = tasks["data-prep"]["inputs"]["parameters"]
    assert dp["raw_fingerprint"]["taskOutputParameter"]["producerTask"] == "fingerprint-source"
    # each stage sees only its own section: a DPO knob cannot bust upstream cache keys
    for n in ("data-prep", "tokenizer", "pretrain", "sft", "dpo", "evaluate"):
        cfg_param = tasks[n]["inputs"]["parameters"]["config"]["componentInputParameter"]
        assert cfg_param == n.replace("-", "_") + "_config"
    report = _docs(compiled / "evaluation_report.yaml")[0]["root"]["dag"]["tasks"]
    assert report["resolve-models"].get("cachingOptions", {}).get("enableCache", False) is False
    # a report re-evaluates: a recurring run made from the UI (not `kubellm schedule`) gets no cache hit
    assert report["evaluate-models"].get("cachingOptions", {}).get("enableCache", False) is False


def test_s3_credentials_by_reference_only(compiled: Path) -> None:
    platform = _docs(compiled / "llm_from_scratch.yaml")[1]["platforms"]["kubernetes"]["deploymentSpec"]
    for name, ex in platform["executors"].items():
        assert ex["secretAsEnv"][0]["secretName"] == "kubellm-s3" and ex["configMapAsEnv"][0]["configMapName"] == "kubellm-env" and ex["secretAsEnv"][0]["optional"], name
    pre = platform["executors"]["exec-pretrain"]["fieldPathAsEnv"]
    assert {f["name"] for f in pre} >= {"KUBELLM_KFP_RUN_ID", "KUBELLM_POD_NAME", "KUBELLM_NAMESPACE"}


def test_image_pull_secrets_reach_every_step_and_its_training_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KUBELLM_IMAGE_PULL_SECRETS", "from-env")
    assert cli_main(["compile", "--preset", "debug", "--output", str(tmp_path / "a"),
                 "--image-pull-secret", "regcred", "--image-pull-secret", "regcred2"]) == 0
    platform = _docs(tmp_path / "a" / "llm_from_scratch.yaml")[1]["platforms"]["kubernetes"]["deploymentSpec"]
    for name, ex in platform["executors"].items():
        assert [s["secretName"] for s in ex["imagePullSecret"]] == ["regcred", "regcred2"], name
    pre = _docs(tmp_path / "a" / "llm_from_scratch.yaml")[0]["deploymentSpec"]["executors"]["exec-pretrain"]["container"]
    assert {"name": "KUBELLM_IMAGE_PULL_SECRETS", "value": "regcred,regcred2"} in pre["env"]
    # the chart's env ConfigMap sets the default; without either, no pull Secret
    assert cli_main(["compile", "--preset", "debug", "--output", str(tmp_path / "b")]) == 0
    platform = _docs(tmp_path / "b" / "llm_from_scratch.yaml")[1]["platforms"]["kubernetes"]["deploymentSpec"]
    assert all([s["secretName"] for s in ex["imagePullSecret"]] == ["from-env"] for ex in platform["executors"].values())
    monkeypatch.delenv("KUBELLM_IMAGE_PULL_SECRETS")
    assert cli_main(["compile", "--preset", "debug", "--output", str(tmp_path / "c")]) == 0
    platform = _docs(tmp_path / "c" / "llm_from_scratch.yaml")[1]["platforms"]["kubernetes"]["deploymentSpec"]
    assert not any("imagePullSecret" in ex for ex in platform["executors"].values())
    assert cli_main(["compile", "--preset", "debug", "--output", str(tmp_path / "d"),
                     "--image-pull-secret", "Bad_Name"]) == 1
    assert "image pull Secret 'Bad_Name'" in capsys.readouterr().err


def test_sources_default_from_the_run_config_and_flags_win(tmp_path: Path) -> None:
    import argparse

    from kubellm.pipelines.definitions import PipelineSettings, parameter_defaults
    from kubellm.pipelines.local_run import pipeline_arguments

    cfg = load_run_config(preset="debug", overrides=["sources.raw=s3://b/raw/", "sources.chat=s3://b/chat.jsonl",
                                                     "sources.preferences=s3://b/prefs.jsonl"])
    full = parameter_defaults(cfg, PipelineSettings())["llm_from_scratch"]
    assert (full["raw_source"], full["chat_source"], full["preferences_source"]) == (
        "s3://b/raw/", "s3://b/chat.jsonl", "s3://b/prefs.jsonl")
    assert parameter_defaults(cfg, PipelineSettings(raw_source="/data/raw"))["llm_from_scratch"]["raw_source"] == "/data/raw"
    # kubellm run --local: --raw/--chat/--preferences, else the run-config's sources (no demo world made)
    args = argparse.Namespace(pipeline="llm_from_scratch", raw=None, chat="/mine/chat.jsonl", preferences=None,
                              param=[], demo_scale=1.0)
    got = pipeline_arguments(args, str(tmp_path / "art"), tmp_path / "work", cfg)
    assert (got["raw_source"], got["chat_source"], got["preferences_source"]) == (
        "s3://b/raw/", "/mine/chat.jsonl", "s3://b/prefs.jsonl")
    assert not (tmp_path / "work").exists()
    with pytest.raises(Exception, match="sources.raww"):
        load_run_config(preset="debug", overrides=["sources.raww=x"])


def test_output_that_is_a_file_is_refused_naming_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "f").write_text("mine")
    for out in (tmp_path / "f", tmp_path / "f" / "sub"):
        assert cli_main(["compile", "--preset", "debug", "--output", str(out)]) == 1
        err = capsys.readouterr().err
        assert "--output" in err and "is not a directory" in err and "Traceback" not in err
    assert (tmp_path / "f").read_text() == "mine"
    (tmp_path / "o" / "evaluation_report.yaml").mkdir(parents=True)
    assert cli_main(["compile", "--preset", "debug", "--output", str(tmp_path / "o")]) == 1
    assert "evaluation_report.yaml is a directory" in capsys.readouterr().err
    assert not (tmp_path / "o" / "llm_from_scratch.yaml").exists()  # nothing written


@pytest.mark.parametrize(("flag", "value", "var"), [("--tag", "bad tag!", "KUBELLM_TAG"),
                                                   ("--registry", "Bad Reg", "KUBELLM_REGISTRY")])
def test_bad_image_flag_is_named_not_the_env_var(tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str,
                                                 value: str, var: str) -> None:
    assert cli_main(["compile", "--preset", "debug", flag, value, "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert f"{flag} {value!r} is not" in err and var not in err
    assert not (tmp_path / "o").exists()


def test_config_param_as_json_object_is_a_checked_string(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_run_config(preset="debug")
    section = cfg.section("tokenizer").model_dump(mode="json")
    assert cli_main(["compile", "--preset", "debug", "--pipeline", "llm_from_scratch", "--output", str(tmp_path),
                     "--param", "tokenizer_config=" + json.dumps(section)]) == 0
    got = _params(_docs(tmp_path / "llm_from_scratch.yaml")[0])["tokenizer_config"]["defaultValue"]
    assert isinstance(got, str) and json.loads(got) == section
    capsys.readouterr()
    # a bad field is refused at compile time naming it (it used to be a TypeError traceback)
    assert cli_main(["compile", "--preset", "debug", "--output", str(tmp_path / "bad"),
                     "--param", 'sft_config={"bogus": 1}']) == 1
    err = capsys.readouterr().err
    assert "--param sft_config" in err and "sft.bogus: unknown key" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def test_list_param_needs_a_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["compile", "--preset", "debug", "--output", str(tmp_path / "o"),
                     "--param", "model_uris=s3://b/m"]) == 1
    assert "--param model_uris='s3://b/m': expected a JSON list" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
