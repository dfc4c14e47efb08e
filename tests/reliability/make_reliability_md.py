"""Run the reliability tests and write RELIABILITY.md: each promise, the tests that prove it, the result.

    .venv/bin/python tests/reliability/make_reliability_md.py            # runs pytest, writes ../../RELIABILITY.md
    .venv/bin/python tests/reliability/make_reliability_md.py --junit r.xml   # from an existing JUnit file

The promise -> test table is kept here (one place); results come from pytest's JUnit XML of the run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
R = "tests/reliability"

PROMISES: list[tuple[str, list[str]]] = [
    ("1. Kill and resume: a rank killed mid-run (exit 137) is restarted by torchrun `--max-restarts`, "
     "resumes from the last committed checkpoint, per-step losses and final weights identical to an "
     "uninterrupted run",
     [f"{R}/test_rel_kill_resume.py::test_rank_killed_mid_run_restarts_and_resumes_exactly"]),
    ("1. Kill and resume: the whole job killed, the stage re-run with the same run id (a KFP retry) resumes "
     "from the same run dir, identical losses and weights",
     [f"{R}/test_rel_kill_resume.py::test_whole_job_killed_then_rerun_resumes_from_the_same_run_dir"]),
    ("2. Torn checkpoints: a crash between upload and manifest commit (S3) resumes from the previous "
     "checkpoint; the torn one is never loaded; retention waits for a commit",
     [f"{R}/test_rel_torn_checkpoint.py::test_crash_between_upload_and_commit_resumes_from_previous",
      "tests/training/test_checkpoint_safety.py::test_latest_ignores_torn_and_retention_deletes_only_older"]),
    ("2. A zombie pod of an earlier attempt saving the same step after the new attempt committed it writes "
     "beside the committed files (each save has its own `attempt-<id>/` directory), its commit is refused, "
     "and the committed checkpoint still verifies and resumes",
     [f"{R}/test_rel_torn_checkpoint.py::test_a_zombie_attempt_never_overwrites_a_committed_checkpoint"]),
    ("2. … and a checkpoint committed in the earlier layout (files at the step prefix) still resumes exactly",
     [f"{R}/test_rel_torn_checkpoint.py::test_a_checkpoint_of_the_earlier_layout_still_resumes_exactly"]),
    ("3. NaN/Inf loss or gradient norm on any rank is seen by all ranks before the step; skipped (parameters "
     "bit-identical) and counted; loss spikes beyond N σ skipped and counted (ZeRO 0 and 1, 2 processes)",
     [f"{R}/test_rel_nonfinite.py::test_nan_and_spike_are_skipped_on_all_ranks[0]",
      f"{R}/test_rel_nonfinite.py::test_nan_and_spike_are_skipped_on_all_ranks[1]"]),
    ("3. `train.nonfinite=stop`: the run stops before the update, on every rank, with the last checkpoint intact",
     [f"{R}/test_rel_nonfinite.py::test_inf_loss_stops_before_the_update_with_the_checkpoint_intact"]),
    ("4. S3: throttling (503 SlowDown), 500s and connection resets are retried and succeed",
     [f"{R}/test_rel_s3_faults.py::test_throttling_5xx_and_resets_are_retried"]),
    ("4. S3: persistent faults fail with a clear error naming the operation and object",
     [f"{R}/test_rel_s3_faults.py::test_persistent_faults_fail_with_a_clear_error"]),
    ("4. S3: a body corrupted in transit is caught by the manifest's sha256",
     [f"{R}/test_rel_s3_faults.py::test_body_corrupted_in_transit_is_caught_by_the_manifest"]),
    ("4. S3: failed multipart uploads are aborted (throttled parts; connection reset)",
     [f"{R}/test_rel_s3_faults.py::test_multipart_upload_with_throttled_parts_is_aborted",
      "tests/core/test_storage.py::test_failed_multipart_upload_is_aborted"]),
    ("4. S3: an existing manifest is never overwritten (also without If-None-Match) and a refused publish "
     "leaves the committed files untouched",
     [f"{R}/test_rel_s3_faults.py::test_manifest_never_overwritten_even_without_conditional_puts"]),
    ("4. S3: readers refuse a prefix whose manifest never landed",
     [f"{R}/test_rel_s3_faults.py::test_reader_refuses_a_prefix_whose_manifest_never_landed"]),
    ("4. S3: concurrent writers (same content-addressed artifact, different artifacts) never clobber",
     [f"{R}/test_rel_s3_faults.py::test_concurrent_writers_never_clobber"]),
    ("5. Hostile corpus (invalid UTF-8, lone surrogate, NUL, empty/whitespace, 50 MB line, malformed "
     "jsonl): skipped+counted with file:line, or the stage fails naming them; a truncated gzip/parquet "
     "fails the stage naming the file",
     [f"{R}/test_rel_hostile_inputs.py::test_data_prep_skips_and_counts_or_fails_naming_the_record"]),
    ("5. Torn upstream artifact (no manifest) refused by the next stage",
     [f"{R}/test_rel_hostile_inputs.py::test_tokenizer_refuses_a_prefix_without_manifest"]),
    ("5. Token shards with a wrong header / truncated body / out-of-range ids refused naming the shard",
     [f"{R}/test_rel_hostile_inputs.py::test_pretrain_refuses_bad_token_shards_naming_the_file[{k}]"
      for k in ("wrong_header", "truncated_body", "out_of_range_ids")]),
    ("5. Chat records with an unknown role, preference pairs with identical texts refused naming file:line",
     [f"{R}/test_rel_hostile_inputs.py::test_sft_and_dpo_refuse_bad_records_naming_them"]),
    ("5. Run-config with a wrong type and an unknown key: both fields named, no traceback (CLI)",
     [f"{R}/test_rel_hostile_inputs.py::test_bad_run_config_names_the_fields_without_a_traceback"]),
    ("5. … and in every hostile case above, previously published artifacts stay byte-identical",
     [f"{R}/test_rel_hostile_inputs.py (fixture untouched, every test)"]),
    ("6. A checkpoint crafted to run code when unpickled (committed, manifest matching) never runs it",
     [f"{R}/test_rel_safe_loading.py::test_crafted_committed_checkpoint_never_runs_code",
      "tests/training/test_checkpoint_safety.py::test_crafted_pickle_is_refused_and_never_runs"]),
    ("6. … crafted in one rank's ZeRO shard only (ZeRO 1 and 3, 2 processes): every rank fails naming that "
     "rank and file, none waits in a collective, the code never runs",
     [f"{R}/test_rel_safe_loading.py::test_a_crafted_shard_of_one_rank_fails_every_rank[1]",
      f"{R}/test_rel_safe_loading.py::test_a_crafted_shard_of_one_rank_fails_every_rank[3]"]),
    ("6. Source scan: no pickle.load, torch.load without weights_only=True, trust_remote_code=True",
     ["tests/test_source_scan.py::test_package_source_loads_safely"]),
    ("7. Planted credentials appear in no log, bucket object, cache, compiled pipeline or PyTorchJob",
     [f"{R}/test_rel_secrets.py::test_no_planted_secret_in_any_output"]),
]


def _nodeid(case: ET.Element) -> str:
    path = case.get("classname", "").replace(".", "/") + ".py"
    return f"{path}::{case.get('name')}"


def results(junit: Path) -> dict[str, tuple[str, float]]:
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        status = "pass"
        for child in case:
            if child.tag in ("failure", "error"):
                status = "FAIL"
            elif child.tag == "skipped":
                status = "skipped"
        out[_nodeid(case)] = (status, float(case.get("time", 0)))
    return out


def _lookup(res: dict[str, tuple[str, float]], test: str) -> str:
    if test in res:
        status, t = res[test]
        return f"{status} ({t:.1f} s)"
    base = test.split(" ")[0]
    hits = [v for k, v in res.items() if k.startswith(base.split("::")[0]) and "(" in test]
    if hits:
        ok = all(s == "pass" for s, _ in hits)
        return f"{'pass' if ok else 'FAIL'} ({sum(t for _, t in hits):.1f} s, {len(hits)} tests)"
    return "not run"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--junit", help="read this JUnit XML instead of running pytest")
    ap.add_argument("--out", default=str(ROOT / "RELIABILITY.md"))
    args = ap.parse_args()
    junit = Path(args.junit) if args.junit else ROOT / "build" / "reliability-junit.xml"
    wall = None
    if not args.junit:
        junit.parent.mkdir(parents=True, exist_ok=True)
        extra = sorted({t.split("::")[0] for _, ts in PROMISES for t in ts if not t.startswith(R)})
        start = dt.datetime.now(dt.UTC)
        subprocess.run([sys.executable, "-m", "pytest", R, *extra, "-q", "-p", "no:cacheprovider",
                        f"--junitxml={junit}"], cwd=ROOT, env={**os.environ, "DS_ACCELERATOR": "cpu"})
        wall = (dt.datetime.now(dt.UTC) - start).total_seconds()
    res = results(junit)
    stamp = dt.datetime.fromtimestamp(junit.stat().st_mtime, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    rel_total = sum(t for k, (_, t) in res.items() if k.startswith(R))
    lines = [
        "# Reliability and security promises",
        "",
        "Every promise below is proven by a test that injects the fault. Regenerate this page with",
        "`.venv/bin/python tests/reliability/make_reliability_md.py` (runs the tests, then writes it).",
        "",
        f"Last run: {stamp} on {platform.machine()} / {os.cpu_count()} CPU(s), Python {platform.python_version()}; "
        f"tests/reliability total {rel_total:.0f} s of test time"
        + (f", {wall:.0f} s wall including the referenced unit tests" if wall else "") + ".",
        "",
        "| promise | test (path::name) | last result |",
        "|---|---|---|",
    ]
    for promise, tests in PROMISES:
        for i, test in enumerate(tests):
            lines.append(f"| {promise if i == 0 else '〃'} | `{test}` | {_lookup(res, test)} |")
    lines += [
        "",
        "## How faults are injected",
        "",
        "* **Process kills**: `KUBELLM_FAULT_KILL_AT_STEP=<step>:<rank|*>` (`kubellm.core.faults`) makes a rank "
        "`os._exit(137)` before that optimizer step, on the first torchrun attempt only.",
        "* **Checkpoint crash**: the test replaces `commit_manifest` inside the training process with one that "
        "exits after the files are uploaded.",
        "* **NaN / Inf / spikes / infinite gradients**: an objective wrapper (`tests/reliability/relkit.py`) "
        "replaces the loss at chosen (step, rank) pairs.",
        "* **S3**: botocore `before-send` hooks return fake 5xx/SlowDown/501 responses or raise "
        "`ConnectionClosedError`; an `after-call` hook corrupts GetObject bodies (`tests/reliability/s3faults.py`).",
        "* **Hostile inputs**: files written by the tests; previously published artifacts are hashed before and "
        "after each case.",
        "",
        "## Policies",
        "",
        "* `train.nonfinite: stop|skip` (default `stop`) — a NaN/Inf loss or gradient norm on any rank.",
        "* `train.spike_sigma` (default off), `train.spike_window` (default 50) — loss-spike skipping.",
        "* Skipped steps leave weights, optimizer state and the LR schedule unchanged and are counted as "
        "`skipped_nonfinite` / `skipped_spike` in metrics.jsonl, TensorBoard and the stage manifest's metrics.",
        "* Pipeline parallelism: the same checks run inside DeepSpeed's `train_batch`, after the last backward "
        "and before the update (ZeRO 0 and 1); the logged gradient norm is global over all stages and TP ranks.",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")
    failed = [k for k, (s, _) in res.items() if s == "FAIL"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
