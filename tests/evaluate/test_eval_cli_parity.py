"""The stage and the `lm_eval` command line give the same numbers on the same export and task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from evalkit import eval_config

from kubellm.evaluate import stage
from kubellm.evaluate.taskdata import TASKS_DIR


def test_lm_eval_cli_matches_stage(hf_exports, tmp_path: Path) -> None:
    export = hf_exports["a"]
    cfg = eval_config(tasks=["kubellm_knowledge", "kubellm_preference"], chat_tasks=[], limit=6, gate={"enabled": False})
    m = stage.run(cfg, {"models": f"a:{export}"}, str(tmp_path / "art"))
    ours = json.loads((Path(m.uri) / "results.json").read_text())["models"][0]["scores"]

    lm_eval = Path(sys.executable).with_name("lm_eval")
    out = tmp_path / "cli"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    subprocess.run(
        [str(lm_eval), "--model", "hf", "--model_args", f"pretrained={export},dtype=float32",
         "--tasks", "kubellm_knowledge,kubellm_preference", "--include_path", str(TASKS_DIR),
         "--batch_size", "4", "--limit", "6", "--seed", "1234", "--device", "cpu",
         "--output_path", str(out)],
        check=True, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    (result_file,) = out.rglob("results_*.json")
    cli = json.loads(result_file.read_text())["results"]
    for task in ("kubellm_knowledge", "kubellm_preference"):
        for metric in ("acc", "acc_norm"):
            assert cli[task][f"{metric},none"] == ours[task][metric], (task, metric)
        # stderr of a mean is analytic, so it matches too (the CLI has no --bootstrap_iters)
        assert cli[task]["acc_stderr,none"] == ours[task]["acc_stderr"]
