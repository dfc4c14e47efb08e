"""The Training Operator's `init-pytorch` container, and a Pod Security `restricted` replacement.

Training Operator v1 (1.9 included) adds an init container to every Worker pod of a job that has a
Master: it waits until the master's Service resolves. Its built-in template has no securityContext,
so in a namespace enforcing Pod Security `restricted` the Worker pods are rejected. The operator reads
the template from `--pytorch-init-container-template-file` (default path `/etc/config/initContainer.yaml`)
— a Go `html/template` producing a YAML list of containers, with `{{.MasterAddr}}` and
`{{.InitContainerImage}}`. `RESTRICTED_INIT_CONTAINER_TEMPLATE` is that file, restricted-compliant;
the chart ships it in a ConfigMap mounted into the operator Deployment. Worker-only (elastic) jobs get
no init container at all (`topology: elastic`), which is the fallback when the operator cannot be
reconfigured.

`inject_init_containers(job, template)` reproduces what the operator does to a job's pod templates,
so tests can check the pods the cluster will actually run.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

# Only the two fields every v1.x operator passes to the template: an unknown field would make the
# operator's template execution fail for every job.
RESTRICTED_INIT_CONTAINER_TEMPLATE = """\
- name: init-pytorch
  image: {{.InitContainerImage}}
  imagePullPolicy: IfNotPresent
  resources:
    limits:
      cpu: 100m
      memory: 20Mi
    requests:
      cpu: 50m
      memory: 10Mi
  securityContext:
    runAsNonRoot: true
    runAsUser: 65534
    runAsGroup: 65534
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    capabilities:
      drop: ["ALL"]
    seccompProfile:
      type: RuntimeDefault
  command: ['sh', '-c', 'for i in $(seq 300); do nslookup {{.MasterAddr}} && exit 0; echo waiting for master; sleep 2; done; exit 1']
"""

# What v1.9 injects when no template file is mounted (for tests that show the problem).
DEFAULT_OPERATOR_TEMPLATE = """\
- name: init-pytorch
  image: {{.InitContainerImage}}
  imagePullPolicy: IfNotPresent
  resources:
    limits: {cpu: 100m, memory: 20Mi}
    requests: {cpu: 50m, memory: 10Mi}
  command: ['sh', '-c', 'until nslookup {{.MasterAddr}}; do echo waiting for master; sleep 2; done;']
"""


def render_init_containers(template: str, master_addr: str, image: str = "alpine:3.10") -> list[dict[str, Any]]:
    """The containers the operator renders from `template` (its two fields substituted)."""
    text = template.replace("{{.MasterAddr}}", master_addr).replace("{{.InitContainerImage}}", image)
    return list(yaml.safe_load(text) or [])


def inject_init_containers(job: dict[str, Any], template: str = DEFAULT_OPERATOR_TEMPLATE) -> dict[str, Any]:
    """A copy of `job` with the init containers the operator adds to Worker pods (only when a Master exists)."""
    out = copy.deepcopy(job)
    replicas = out["spec"]["pytorchReplicaSpecs"]
    if "Master" not in replicas or "Worker" not in replicas:
        return out
    pod = replicas["Worker"]["template"]["spec"]
    pod["initContainers"] = [*pod.get("initContainers", []),
                             *render_init_containers(template, f"{out['metadata']['name']}-master-0")]
    return out
