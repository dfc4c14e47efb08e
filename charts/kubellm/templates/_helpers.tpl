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

{{/* The account the chart's jobs run as. */}}
{{- define "kubellm.jobServiceAccount" -}}
{{- if .Values.jobs.serviceAccountName -}}
{{- .Values.jobs.serviceAccountName -}}
{{- else if .Values.serviceAccount.create -}}
{{- include "kubellm.serviceAccountName" . -}}
{{- else -}}
{{- include "kubellm.runnerServiceAccount" . -}}
{{- end -}}
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

{{/* Pod-level securityContext: Pod Security "restricted". */}}
{{- define "kubellm.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.jobs.runAsUser }}
runAsGroup: {{ .Values.jobs.runAsGroup }}
fsGroup: {{ .Values.jobs.runAsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Container-level securityContext: Pod Security "restricted" plus a read-only root filesystem. */}}
{{- define "kubellm.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.jobs.runAsUser }}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Environment of every kubellm container: S3 and image settings, credentials by reference only. */}}
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
{{- with .Values.s3.credentials.existingSecret }}
  - name: AWS_ACCESS_KEY_ID
    valueFrom:
      secretKeyRef:
        name: {{ . }}
        key: {{ $.Values.s3.credentials.accessKeyIdKey }}
  - name: AWS_SECRET_ACCESS_KEY
    valueFrom:
      secretKeyRef:
        name: {{ . }}
        key: {{ $.Values.s3.credentials.secretAccessKeyKey }}
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
