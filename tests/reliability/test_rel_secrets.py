"""Secrets never leak: a demo-sized run with fake credentials planted in the environment, then every
log, manifest, report, metrics file, checkpoint, compiled pipeline and generated PyTorchJob is
scanned for them.

    .venv/bin/python -m pytest tests/reliability/test_rel_secrets.py -q

The run is the real CLI in subprocesses (`kubellm demo-world`, `data-prep`, `tokenizer`, 3 steps of
`pretrain` in 1 process) writing to the moto S3 server, authenticated *with* the planted AWS keys,
so the credentials are actually used, not just present. Scanned: the processes' stdout/stderr,
every object in the bucket (manifests, Markdown reports, metrics.jsonl, TensorBoard events,
checkpoints, the HF export), every file under the local cache/staging dirs, the YAML of
`kubellm compile`, and the PyTorchJob that `build_pytorchjob` makes from the pretrain stage's AppDef.
A secret is searched as plain text, base64 and URL-encoded.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

FAKE = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKE" + secrets.token_hex(6).upper(),
    "AWS_SECRET_ACCESS_KEY": "fakeSecret" + secrets.token_urlsafe(24),
    "AWS_SESSION_TOKEN": "fakeSession" + secrets.token_urlsafe(24),
    "KUBELLM_KFP_TOKEN": "kfp-fake-" + secrets.token_hex(12),
    "HF_TOKEN": "hf_fake" + secrets.token_hex(12),
    "HUGGING_FACE_HUB_TOKEN": "hf_fakehub" + secrets.token_hex(12),
    "WANDB_API_KEY": "wandbfake" + secrets.token_hex(12),
}
FAST = ["pretrain.train.max_steps=3", "pretrain.train.checkpoint_every=2", "pretrain.launch.nproc_per_node=1",
        "pretrain.train.micro_batch_size=2", "pretrain.train.global_batch_size=2", "pretrain.train.seq_len=64",
        "pretrain.train.device=cpu", "tokenizer.vocab_size=512"]


def _needles() -> dict[str, list[bytes]]:
    out = {}
    for name, value in FAKE.items():
        raw = value.encode()
        out[name] = [raw, base64.b64encode(raw), urllib.parse.quote(value, safe="").encode()]
    return out


def _leaks(where: str, data: bytes) -> list[str]:
    return [f"{name} in {where}" for name, forms in _needles().items() if any(f in data for f in forms)]


def _cli(args: list[str], env: dict[str, str], log: Path) -> str:
    p = subprocess.run([sys.executable, "-m", "kubellm.cli", *args], env=env, capture_output=True, timeout=400)
    with open(log, "ab") as f:
        f.write(b"$ kubellm " + " ".join(args).encode() + b"\n" + p.stdout + p.stderr)
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    return p.stdout.decode()


@pytest.mark.integration
def test_no_planted_secret_in_any_output(s3_bucket: str, s3_server: str, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from kubellm.core.storage import reset_clients, storage_for

    leaked = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # a worker's, not ours
    env = {**{k: v for k, v in os.environ.items() if k not in leaked}, **FAKE, "KUBELLM_S3_ENDPOINT_URL": s3_server, "KUBELLM_CACHE_DIR": str(tmp_path / "cache"),
           "KUBELLM_CHECKPOINT_STAGING": str(tmp_path / "staging"), "KUBELLM_RUN_ID": "secrets-demo",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", ".cache/torch_extensions"),
           "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    log = tmp_path / "run.log"
    out = f"{s3_bucket}/kubellm"
    _cli(["demo-world", "--output", str(tmp_path / "world"), "--seed", "0", "--scale", "0.2"], env, log)
    common = ["--preset", "debug", *[a for s in FAST for a in ("--set", s)], "--output", out]
    data = json.loads(_cli(["data-prep", "--input", f"raw={tmp_path / 'world' / 'corpus'}", *common], env, log))
    # --verbose: kubellm's debug logging must not turn on the S3 client's (it logs signed headers)
    tok = json.loads(_cli(["--verbose", "tokenizer", "--input", f"dataset={data['uri']}", *common], env, log))
    model = json.loads(_cli(["pretrain", "--input", f"tokens={tok['uri']}", *common], env, log))
    assert model["kind"] == "model" and model["counts"]["steps"] == 3
    _cli(["compile", "--preset", "debug", "--output", str(tmp_path / "compiled")], env, log)

    # the generated PyTorchJob for this pretrain job, built with the secrets in this process' env
    from kubellm.pretrain.config import PretrainConfig
    from kubellm.training.appdef import build_appdef
    from kubellm.training.pytorchjob.settings import ClusterLaunchSettings
    from kubellm.training.pytorchjob.translate import JobContext, build_pytorchjob

    for k, v in FAKE.items():
        monkeypatch.setenv(k, v)
    launch = PretrainConfig().launch.model_copy(update={"nproc_per_node": 2, "backend": "pytorchjob"})
    appdef = build_appdef(f"{out}/runs/secrets-demo/job.json", launch, name="pretrain-secrets-demo")
    job = build_pytorchjob(appdef, name="pretrain-secrets-demo", namespace="team-a",
                           settings=ClusterLaunchSettings(s3_secret_name="kubellm-s3"),
                           ctx=JobContext("secrets-demo", "pretrain"))
    (tmp_path / "pytorchjob.json").write_text(json.dumps(job, indent=2))
    env_refs = [e for c in job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
                for e in c.get("env", [])]
    assert any(e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == "kubellm-s3" for e in env_refs)

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE["AWS_ACCESS_KEY_ID"])  # read the bucket as the run wrote it
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE["AWS_SECRET_ACCESS_KEY"])
    reset_clients()
    st = storage_for(s3_bucket)
    objects = st.list(s3_bucket)
    kinds = {o.relpath.rsplit("/", 1)[-1] for o in objects}
    assert {"_manifest.json", "metrics.jsonl", "model.safetensors"} <= kinds  # the scan saw the outputs
    assert any("/checkpoints/" in o.relpath for o in objects)
    leaks = []
    for o in objects:
        leaks += _leaks(o.uri, st.read_bytes(o.uri))
    local = [p for p in tmp_path.rglob("*") if p.is_file() and p.parent != tmp_path / "world"]
    assert log in local and any(p.suffix == ".yaml" for p in local)
    for p in local:
        leaks += _leaks(str(p), p.read_bytes())
    assert not leaks, leaks
    assert _leaks("control", b"x" + base64.b64encode(FAKE["HF_TOKEN"].encode()))  # the scanner does see one
