"""Checks a generated PyTorchJob must pass: the CRD's openAPIV3Schema, the Training Operator's
admission rules, Pod Security `restricted` (kubellm.core.podsecurity) and the read-only-root layout.

The CRD file lives outside the repo (`../shared/schemas/kubeflow.org_pytorchjobs.v1.9.0.yaml`
relative to the repo root); `crd_schema()` returns None where it is absent and callers skip.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO.parent / "shared" / "schemas" / "kubeflow.org_pytorchjobs.v1.9.0.yaml"
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _strict(schema: Any) -> Any:
    """The schema with unknown fields refused: the API server silently prunes fields a structural
    schema does not list, which would drop a setting without an error; `kubectl --validate=strict`
    refuses them. Objects that list properties and do not preserve unknown fields get
    additionalProperties: false."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.lru_cache(maxsize=1)
def crd_schema() -> dict[str, Any] | None:
    if not CRD_PATH.exists():
        return None
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 680 kB: the C loader is ~10x faster
    crd = yaml.load(CRD_PATH.read_text(), Loader=loader)  # noqa: S506 — a safe loader
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))


def schema_errors(job: dict[str, Any]) -> list[str]:
    import jsonschema

    schema = crd_schema()
    assert schema is not None, f"CRD schema missing at {CRD_PATH}"
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(job)]


def admission_errors(job: dict[str, Any]) -> list[str]:
    """The Training Operator v1.9 PyTorchJob webhook's rules (validatePyTorchJob)."""
    errs = []
    name = job.get("metadata", {}).get("name", "")
    if not DNS1035.match(name) or len(name) > 63:
        errs.append(f"metadata.name {name!r}: must be a DNS-1035 label")
    spec = job.get("spec") or {}
    replicas = spec.get("pytorchReplicaSpecs") or {}
    if not replicas:
        errs.append("spec.pytorchReplicaSpecs: must be configured")
    for rtype, rspec in replicas.items():
        where = f"spec.pytorchReplicaSpecs.{rtype}"
        if rtype not in ("Master", "Worker"):
            errs.append(f"{where}: unknown replica type")
        containers = ((rspec.get("template") or {}).get("spec") or {}).get("containers") or []
        if not containers:
            errs.append(f"{where}.template.spec.containers: must have at least one container")
        if not any(c.get("name") == "pytorch" for c in containers):
            errs.append(f"{where}: must have a container named 'pytorch'")
        for c in containers:
            if not c.get("image"):
                errs.append(f"{where}: container {c.get('name')!r} must have an image")
        if rtype == "Master" and rspec.get("replicas", 1) != 1:
            errs.append(f"{where}.replicas: must be 1")
    elastic = spec.get("elasticPolicy")
    if elastic is None and "Master" not in replicas:
        errs.append("spec.pytorchReplicaSpecs.Master: exactly one Master replica is required without an elasticPolicy")
    if elastic is not None:
        if "Worker" not in replicas:
            errs.append("spec.pytorchReplicaSpecs.Worker: must be configured if elastic policy is used")
        if spec.get("nprocPerNode") is not None and elastic.get("nProcPerNode") is not None:
            errs.append("spec.elasticPolicy.nProcPerNode: must not be used with spec.nprocPerNode")
    return errs


def layout_errors(job: dict[str, Any], home: str = "/home/kubellm") -> list[str]:
    """Read-only root filesystem with writable /tmp, HOME and memory-backed /dev/shm."""
    errs = []
    for rtype, rspec in job["spec"]["pytorchReplicaSpecs"].items():
        pod = rspec["template"]["spec"]
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            if c.get("securityContext", {}).get("readOnlyRootFilesystem") is not True:
                errs.append(f"{rtype}/{c['name']}: readOnlyRootFilesystem must be true")
            mounts = {m["mountPath"]: vols.get(m["name"], {}) for m in c.get("volumeMounts", [])}
            for path in ("/tmp", home, "/dev/shm"):
                if "emptyDir" not in mounts.get(path, {}):
                    errs.append(f"{rtype}/{c['name']}: {path} must be a writable emptyDir")
            if mounts.get("/dev/shm", {}).get("emptyDir", {}).get("medium") != "Memory":
                errs.append(f"{rtype}/{c['name']}: /dev/shm must be memory-backed")
    return errs
