{{/* Object name prefix. */}}
{{- define "kubellm.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "kubellm.labels" -}}
app.kubernetes.io/name: {{ default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Namespaces that run pipelines: the profile namespaces (multi-user) or the release namespace. */}}
{{- define "kubellm.pipelineNamespaces" -}}
{{- if .Values.pipelineRunner.multiUser.enabled -}}
{{- if not .Values.pipelineRunner.multiUser.namespaces -}}
{{- fail "pipelineRunner.multiUser.enabled needs pipelineRunner.multiUser.namespaces: the profile namespaces whose pipeline runs launch training jobs (none listed would install no Role, RoleBinding or kfp-launcher config at all)" -}}
{{- end -}}
{{- toJson .Values.pipelineRunner.multiUser.namespaces -}}
{{- else -}}
{{- toJson (list .Release.Namespace) -}}
{{- end -}}
{{- end -}}

{{/* The namespaces the schedule and GitOps jobs submit to (JSON list). Multi-user: each must be one of
the profile namespaces the chart configures (its -env ConfigMap, launcher Role), or the runs there
would start without the S3 settings (the steps read the ConfigMap as optional) and could not launch
training jobs. */}}
{{- define "kubellm.jobTargetNamespaces" -}}
{{- $targets := list -}}
{{- if .Values.schedule.enabled -}}
{{- $targets = append $targets (default .Release.Namespace .Values.schedule.namespace) -}}
{{- end -}}
{{- if .Values.gitops.enabled -}}
{{- $targets = append $targets (default .Release.Namespace .Values.gitops.namespace) -}}
{{- end -}}
{{- if .Values.pipelineRunner.multiUser.enabled -}}
{{- $configured := include "kubellm.pipelineNamespaces" . | fromJsonArray -}}
{{- range $ns := $targets -}}
{{- if not (has $ns $configured) -}}
{{- fail (printf "the schedule/GitOps jobs submit runs to namespace %q, which is not in pipelineRunner.multiUser.namespaces %s: its runs would have no %s-env ConfigMap (S3 endpoint) and no Role to launch training jobs. Add it to pipelineRunner.multiUser.namespaces, or set schedule.namespace / gitops.namespace to one of those" $ns (toJson $configured) (include "kubellm.fullname" $)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $targets | uniq | sortAlpha | toJson -}}
{{- end -}}

{{/* The account KFP runs pipelines as. */}}
{{- define "kubellm.runnerServiceAccount" -}}
{{- if .Values.pipelineRunner.multiUser.enabled -}}
{{- .Values.pipelineRunner.multiUser.serviceAccount -}}
{{- else -}}
{{- .Values.pipelineRunner.serviceAccount -}}
{{- end -}}
{{- end -}}

{{- define "kubellm.serviceAccountName" -}}
{{- default (include "kubellm.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* The account the chart's jobs (schedule and GitOps hooks) run as, in the release namespace.
Multi-user Kubeflow: the runner account (default-editor) exists only in profile namespaces, so a
release outside them must name an account that exists there (jobs.serviceAccountName) or create one
(serviceAccount.create); anything else would render a Job whose pod can never be created. */}}
{{- define "kubellm.jobServiceAccount" -}}
{{- $sa := "" -}}
{{- if .Values.jobs.serviceAccountName -}}
{{- $sa = .Values.jobs.serviceAccountName -}}
{{- else if .Values.serviceAccount.create -}}
{{- $sa = include "kubellm.serviceAccountName" . -}}
{{- else -}}
{{- $sa = include "kubellm.runnerServiceAccount" . -}}
{{- end -}}
{{- $mu := .Values.pipelineRunner.multiUser -}}
{{- $created := and .Values.serviceAccount.create (eq $sa (include "kubellm.serviceAccountName" .)) -}}
{{- if and $mu.enabled (eq $sa $mu.serviceAccount) (not $created) (not (has .Release.Namespace $mu.namespaces)) -}}
{{- fail (printf "pipelineRunner.multiUser.enabled: the schedule/GitOps jobs run in the release namespace %q, where the ServiceAccount %q does not exist (Kubeflow's profile controller creates it only in the profile namespaces %s). Set serviceAccount.create=true (a kubellm account in %q, which also carries workload-identity annotations) or jobs.serviceAccountName to an existing account there, or install the release into one of the profile namespaces" .Release.Namespace $sa (join ", " $mu.namespaces) .Release.Namespace) -}}
{{- end -}}
{{- $sa -}}
{{- end -}}

{{/* Image reference, built exactly like kubellm.core.images.image_for. Argument: (list $ "base"). */}}
{{- define "kubellm.image" -}}
{{- $root := index . 0 -}}
{{- $image := index . 1 -}}
{{- $tag := default $root.Chart.AppVersion $root.Values.images.tag -}}
{{- $ref := printf "kubellm-%s:%s" $image $tag -}}
{{- with $root.Values.images.registry -}}
{{- $ref = printf "%s/%s" (trimSuffix "/" .) $ref -}}
{{- end -}}
{{- with (index $root.Values.images.digests $image) -}}
{{- $ref = printf "%s@%s" $ref . -}}
{{- end -}}
{{- $ref -}}
{{- end -}}

{{/* Pod-level securityContext: Pod Security "restricted". A null jobs.runAsUser / runAsGroup /
fsGroup leaves the field out, for platforms that assign them (OpenShift restricted-v2 gives each
namespace a UID range and refuses a fixed UID or fsGroup outside it). `int64`: Helm reads numbers
in values as float64, which would print a large UID as 1.00065e+09. */}}
{{- define "kubellm.podSecurityContext" -}}
runAsNonRoot: true
{{- if not (kindIs "invalid" .Values.jobs.runAsUser) }}
runAsUser: {{ .Values.jobs.runAsUser | int64 }}
{{- end }}
{{- if not (kindIs "invalid" .Values.jobs.runAsGroup) }}
runAsGroup: {{ .Values.jobs.runAsGroup | int64 }}
{{- end }}
{{- if not (kindIs "invalid" .Values.jobs.fsGroup) }}
fsGroup: {{ .Values.jobs.fsGroup | int64 }}
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Container-level securityContext: Pod Security "restricted" plus a read-only root filesystem. */}}
{{- define "kubellm.containerSecurityContext" -}}
runAsNonRoot: true
{{- if not (kindIs "invalid" .Values.jobs.runAsUser) }}
runAsUser: {{ .Values.jobs.runAsUser | int64 }}
{{- end }}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Environment of the chart's jobs (`kubellm submit` / `kubellm schedule`): the S3 and image settings
the pipeline is compiled with (the S3 Secret by name, for the steps), and the KFP API. The jobs only
call the KFP API, so they carry no S3 credentials themselves. */}}
{{- define "kubellm.env" -}}
envFrom:
  - configMapRef:
      name: {{ include "kubellm.fullname" . }}-env
env:
  - name: KUBELLM_KFP_ENDPOINT
    value: {{ .Values.kfp.endpoint | quote }}
{{- if .Values.kfp.projectedToken }}
  - name: KF_PIPELINES_SA_TOKEN_PATH
    value: /var/run/secrets/kubeflow/pipelines/token
{{- end }}
{{- end -}}

{{/* Writable volumes (root filesystem is read-only) and the KFP API token. */}}
{{- define "kubellm.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.jobs.tmpSizeLimit }}
{{- if .Values.kfp.projectedToken }}
- name: kfp-token
  projected:
    sources:
      - serviceAccountToken:
          path: token
          audience: pipelines.kubeflow.org
          expirationSeconds: 3600
{{- end }}
{{- end -}}

{{- define "kubellm.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.kfp.projectedToken }}
- name: kfp-token
  mountPath: /var/run/secrets/kubeflow/pipelines
  readOnly: true
{{- end }}
{{- end -}}

{{/* Scheduling and pull secrets shared by the jobs' pod specs. */}}
{{- define "kubellm.podScheduling" -}}
{{- with .Values.images.pullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- with .Values.jobs.nodeSelector }}
nodeSelector:
{{ toYaml . | indent 2 }}
{{- end }}
{{- with .Values.jobs.tolerations }}
tolerations:
{{ toYaml . | indent 2 }}
{{- end }}
{{- with .Values.jobs.affinity }}
affinity:
{{ toYaml . | indent 2 }}
{{- end }}
{{- end -}}
