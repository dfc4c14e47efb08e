"""Dockerfile invariants for images/*.Dockerfile (no Docker needed: the files are parsed).

Pinned bases, numeric non-root USER as the final user, no remote ADD, no secret-like ARG/ENV,
kfp installed with the project's constraints, HOME and every cache pointed at the writable /tmp
volume, KUBELLM_CODE_VERSION passed through, and build.sh wired to the one registry/tag setting.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
DOCKERFILES = sorted(IMAGES.glob("*.Dockerfile"))
WRITABLE = "/tmp"
CACHE_ENV = ("HOME", "TMPDIR", "XDG_CACHE_HOME", "HF_HOME", "TORCH_EXTENSIONS_DIR", "MPLCONFIGDIR",
             "TRITON_CACHE_DIR", "KUBELLM_CACHE_DIR")
SECRET_WORDS = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|PRIVATE|ACCESS_KEY|API_KEY|AUTH)", re.I)


def instructions(path: Path) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        op, _, args = buf.partition(" ")
        out.append((op.upper(), args.strip()))
        buf = ""
    return out


def env_pairs(args: str) -> dict[str, str]:
    return dict(tok.split("=", 1) for tok in shlex.split(args) if "=" in tok)


def arg_defaults(ins: list[tuple[str, str]]) -> dict[str, str]:
    out = {}
    for op, args in ins:
        if op == "ARG" and "=" in args:
            key, _, value = args.partition("=")
            out[key] = value.strip('"')
    return out


def test_there_are_base_train_and_eval_images() -> None:
    assert {p.name for p in DOCKERFILES} == {"base.Dockerfile", "train.Dockerfile", "eval.Dockerfile"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned(path: Path) -> None:
    ins = instructions(path)
    args = arg_defaults(ins)
    stages: set[str] = set()
    for op, rest in ins:
        if op != "FROM":
            continue
        words = rest.split()
        ref = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
        if len(words) >= 3 and words[1].upper() == "AS":
            stages.add(words[2])
        if ref in stages:
            continue
        if "@sha256:" in ref:
            assert re.search(r"@sha256:[0-9a-f]{64}$", ref), f"{path.name}: malformed digest in FROM {ref}"
            continue
        name, _, tag = ref.rpartition(":")
        assert name and "/" not in tag, f"{path.name}: FROM {ref} has no tag or digest"
        assert tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), (
            f"{path.name}: FROM {ref} is not pinned to an exact version tag"
        )


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_numeric_non_root_user(path: Path) -> None:
    ins = instructions(path)
    users = [args for op, args in ins if op == "USER"]
    assert users, f"{path.name}: no USER instruction (would run as root)"
    # the last USER of the final stage decides; nothing after it may switch back
    last_from = max(i for i, (op, _) in enumerate(ins) if op == "FROM")
    final_users = [args for op, args in ins[last_from:] if op == "USER"]
    assert final_users, f"{path.name}: final stage sets no USER"
    uid, _, gid = final_users[-1].partition(":")
    assert uid.isdigit() and int(uid) >= 1000, f"{path.name}: USER {final_users[-1]} must be a numeric non-root UID"
    assert gid in ("", "0") or gid.isdigit(), f"{path.name}: USER group must be numeric"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_no_remote_add_and_no_secret_like_build_inputs(path: Path) -> None:
    text = path.read_text()
    for op, args in instructions(path):
        if op == "ADD":
            assert not re.search(r"(https?|git)://|git@", args), f"{path.name}: ADD from a URL: {args}"
        if op == "ARG":
            assert not SECRET_WORDS.search(args.split("=")[0]), f"{path.name}: secret-like build arg {args}"
        if op == "ENV":
            for key in env_pairs(args):
                assert not SECRET_WORDS.search(key), f"{path.name}: secret-like ENV {key}"
        if op == "RUN":
            assert "type=secret" not in args, f"{path.name}: build-time secret mount"
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_installs_kfp_and_the_package_with_project_constraints(path: Path) -> None:
    runs = " ".join(args for op, args in instructions(path) if op == "RUN")
    copies = " ".join(args for op, args in instructions(path) if op == "COPY")
    assert "requirements/constraints.txt" in copies
    pip_installs = re.findall(r"pip install ([^&]*)", runs)
    assert pip_installs
    for cmd in pip_installs:
        assert "constraints.txt" in cmd, f"{path.name}: unconstrained 'pip install {cmd}'"
    # kfp comes with the package (pyproject pins kfp==2.16.1) and the build imports it to prove it
    assert re.search(r"import [^\"']*\bkfp\b", runs), f"{path.name}: the build never checks that kfp imports"
    assert "pip check" in runs


def test_kfp_is_a_pinned_dependency_the_images_inherit() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    constraints = (ROOT / "requirements/constraints.txt").read_text()
    assert re.search(r'"kfp==\d', pyproject)
    assert re.search(r"^kfp==\d", constraints, re.M)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_home_and_caches_point_at_the_writable_volume(path: Path) -> None:
    ins = instructions(path)
    last_from = max(i for i, (op, _) in enumerate(ins) if op == "FROM")
    env: dict[str, str] = {}
    for op, args in ins[last_from:]:
        if op == "ENV":
            env.update(env_pairs(args))
    for key in CACHE_ENV:
        assert key in env, f"{path.name}: ENV {key} not set in the final stage"
        assert env[key] == WRITABLE or env[key].startswith(WRITABLE + "/"), f"{path.name}: {key}={env[key]}"
    assert env.get("KUBELLM_CODE_VERSION") == "${KUBELLM_CODE_VERSION}"
    assert any(op == "ARG" and args.startswith("KUBELLM_CODE_VERSION") for op, args in ins[last_from:])


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_the_commit_revision_is_declared_after_the_heavy_layers(path: Path) -> None:
    """Every RUN after an ARG misses the build cache when the ARG's value changes, and
    KUBELLM_CODE_VERSION changes with every commit: declared before the torch/apt/pip layers, it rebuilt
    them all each time. Only the final stage's closing, cheap steps may come after it."""
    ins = instructions(path)
    last_from = max(i for i, (op, _) in enumerate(ins) if op == "FROM")
    [at] = [i for i, (op, args) in enumerate(ins) if op == "ARG" and args.startswith("KUBELLM_CODE_VERSION")]
    assert at > last_from
    later_runs = [args for op, args in ins[at:] if op == "RUN"]
    assert all("pip install" not in r and "apt-get" not in r for r in later_runs), later_runs


def test_training_image_prebuilds_deepspeed_ops() -> None:
    runs = " ".join(args for op, args in instructions(IMAGES / "train.Dockerfile") if op == "RUN")
    assert "DS_BUILD_FUSED_ADAM=1" in runs and "ShareMemCommBuilder().load()" in runs
    assert "TORCH_CUDA_ARCH_LIST" in (IMAGES / "train.Dockerfile").read_text()


# Compiler flags DeepSpeed's op builders derive from the CPU of the machine that runs the build
# (OpBuilder.cpu_arch / simd_width): a binary built with them may not run on another node.
HOST_DETECTED_FLAG = re.compile(r"^-m(arch|cpu|tune)=native$|^-D__(AVX512|AVX256|SVE|NEON)__$")


def _prebuilt_op_builders() -> list[tuple[str, type]]:
    """(how, builder class) for every DeepSpeed op train.Dockerfile compiles at build time: the
    DS_BUILD_<OP>=1 variables of the pip install (resolved like DeepSpeed's setup.py does, through the
    RUN's DS_ACCELERATOR) and the builders a RUN loads itself (JIT prebuilds)."""
    import deepspeed.ops.op_builder as op_builder
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
    from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

    # candidate class names; each accelerator maps a name to its own builder class (or None)
    builder_names = [n for n in dir(op_builder) if n.endswith("Builder")]
    builder_names += ["CPUAdamBuilder", "CPUAdagradBuilder", "CPULionBuilder"]
    accelerators = {"cuda": CUDA_Accelerator, "cpu": CPU_Accelerator}
    ops_source = (ROOT / "components" / "training" / "ops.py").read_text()
    found: list[tuple[str, type]] = []
    for op, args in instructions(IMAGES / "train.Dockerfile"):
        if op != "RUN":
            continue
        m = re.search(r"\bDS_ACCELERATOR=(\w+)", args)
        accel = accelerators[m.group(1) if m else "cuda"]()
        for var in re.findall(r"\b(DS_BUILD_\w+)=1\b", args):
            if var == "DS_BUILD_OPS":
                continue
            classes = {accel.get_op_builder(n) for n in builder_names} - {None}
            match = [c for c in classes if getattr(c, "BUILD_VAR", None) == var]
            assert len(match) == 1, f"{var}: no single DeepSpeed builder for it ({match})"
            found.append((f"{var}=1", match[0]))
        names = set(re.findall(r"\b(\w+Builder)\b", args))
        if "kubellm.training.ops --build" in args:  # builds what components/training/ops.py imports
            names |= set(re.findall(r"\b(\w+Builder)\b", ops_source))
        for name in sorted(names):
            cls = accel.get_op_builder(name)
            assert cls is not None, f"{name} is not a DeepSpeed op builder"
            found.append((f"{name}().load()", cls))
    return found


def test_training_image_prebuilds_only_host_independent_ops() -> None:
    """A prebuilt op compiled with -march=native or a SIMD width of the build host SIGILLs on nodes
    whose CPU lacks those instructions; such ops must be JIT-compiled on the node instead."""
    prebuilt = _prebuilt_op_builders()
    assert {how for how, _ in prebuilt} >= {"DS_BUILD_FUSED_ADAM=1", "ShareMemCommBuilder().load()"}
    for how, cls in prebuilt:
        flags = cls().cxx_args()
        bad = [f for f in flags if HOST_DETECTED_FLAG.match(f)]
        assert not bad, f"train.Dockerfile prebuilds {cls.__module__}.{cls.__name__} ({how}) with build-host flags {bad}"


def test_training_image_can_jit_compile_ops_on_the_node() -> None:
    """cpu_adam is left to DeepSpeed's JIT build: the final stage needs a C++ compiler and ninja, and
    the prebuilt ops dir the worker seeds from must be the one the build stage filled."""
    ins = instructions(IMAGES / "train.Dockerfile")
    last_from = max(i for i, (op, _) in enumerate(ins) if op == "FROM")
    final = ins[last_from:]
    assert arg_defaults(final).get("GXX_PACKAGE", "").startswith("g++")
    assert any(op == "RUN" and "apt-get install" in a and "GXX_PACKAGE" in a for op, a in final)
    env: dict[str, str] = {}
    for op, args in final:
        if op == "ENV":
            env.update(env_pairs(args))
    prebuilt = env["KUBELLM_PREBUILT_TORCH_EXTENSIONS"]
    assert any(op == "COPY" and a.split()[-1] == prebuilt for op, a in final)
    assert any(op == "RUN" and f"TORCH_EXTENSIONS_DIR={prebuilt} " in a for op, a in ins[:last_from])


def test_build_script_uses_the_one_registry_tag_setting() -> None:
    script = (IMAGES / "build.sh").read_text()
    for var in ("KUBELLM_REGISTRY", "KUBELLM_TAG", "KUBELLM_CODE_VERSION", "KUBELLM_PUSH"):
        assert var in script
    for name in ("base", "train", "eval"):
        assert f"{name}" in script
    assert "--build-arg \"KUBELLM_CODE_VERSION=" in script
    assert "secret" not in script.lower().replace("no secret", "")
    makefile = (ROOT / "Makefile").read_text()
    assert "images/build.sh" in makefile


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_build_context_is_limited_by_a_dockerignore(path: Path) -> None:
    ignore = path.with_name(path.name + ".dockerignore")
    assert ignore.exists(), f"{ignore.name} missing (BuildKit reads it next to the Dockerfile)"
    lines = ignore.read_text().splitlines()
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "**", f"{ignore.name}: must exclude everything first, then re-include"
    copies = [args.split()[:-1] for op, args in instructions(path) if op == "COPY" and "--from" not in args]
    for sources in copies:
        for src in sources:
            assert f"!{src}" in lines or f"!{src}/**" in lines, f"{ignore.name} excludes {src}"


def _built_code_version(repo: Path) -> str:
    """Run build.sh with a stand-in `docker` that records its arguments; the KUBELLM_CODE_VERSION it passed."""
    import os
    import subprocess

    fake = repo / "fakebin"
    fake.mkdir(exist_ok=True)
    (fake / "docker").write_text('#!/bin/sh\necho "$@" >> "$(dirname "$0")/calls"\n')
    (fake / "docker").chmod(0o755)
    (fake / "calls").unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "KUBELLM_CODE_VERSION": ""}
    env.pop("KUBELLM_CODE_VERSION")
    subprocess.run(["bash", "images/build.sh", "base"], cwd=repo, env=env, check=True, capture_output=True)
    calls = (fake / "calls").read_text()
    return calls.split("KUBELLM_CODE_VERSION=", 1)[1].split()[0]


def test_an_uncommitted_tree_gets_a_code_version_per_change(tmp_path: Path) -> None:
    """`-dirty` alone gave every build of one commit with edits the same code version, which keys the
    content-addressed artifacts: another edit silently reused the first's."""
    import shutil
    import subprocess

    repo = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    shutil.copy(IMAGES / "build.sh", repo / "images" / "build.sh")  # this tree's script, committed there
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-am", "build.sh under test"], cwd=repo, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert _built_code_version(repo) == head
    target = repo / "components" / "data_prep" / "filters.py"
    target.write_text(target.read_text() + "\n# edit one\n")
    one = _built_code_version(repo)
    target.write_text(target.read_text() + "# edit two\n")
    two = _built_code_version(repo)
    (repo / "components" / "new_module.py").write_text("X = 1\n")  # an untracked file counts too
    three = _built_code_version(repo)
    assert len({one, two, three}) == 3 and all(v.startswith(f"{head}-dirty-") for v in (one, two, three))
