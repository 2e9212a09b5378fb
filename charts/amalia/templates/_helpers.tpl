{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "amalia-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource name prefix; the chart name is not repeated when the release already holds it. */}}
{{- define "amalia-serve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "amalia-serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "amalia-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "amalia-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "amalia-serve.labels" -}}
helm.sh/chart: {{ include "amalia-serve.chart" . }}
{{ include "amalia-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector of every Ray pod (head and workers) of this release. */}}
{{- define "amalia-serve.raySelectorLabels" -}}
{{ include "amalia-serve.selectorLabels" . }}
app.kubernetes.io/component: ray
{{- end }}

{{- define "amalia-serve.operatorSelectorLabels" -}}
{{ include "amalia-serve.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "amalia-serve.operatorName" -}}
{{- printf "%s-operator" (include "amalia-serve.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The operator pod's folders of golden-set ConfigMaps, `:`-separated (AMALIA_GOLDEN_SET_DIRS).
Usage: include "amalia-serve.goldenSetDirs" .Values.operator.goldenSetConfigMaps
*/}}
{{- define "amalia-serve.goldenSetDirs" -}}
{{- $dirs := list }}
{{- range . }}{{ $dirs = append $dirs (printf "/etc/amalia/goldensets/%s" .) }}{{ end }}
{{- join ":" $dirs }}
{{- end }}

{{- define "amalia-serve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Name of the front Serve application (the OpenAI ingress); ModelRollouts default to it. */}}
{{- define "amalia-serve.frontApp" -}}amalia{{- end }}

{{/*
The live traffic split as JSON: every variant gets its `serve.weights` entry or 0, so each one
is addressable by its model id; empty `serve.weights` sends everything to the first variant.
*/}}
{{- define "amalia-serve.weights" -}}
{{- $names := list }}
{{- range .Values.variants }}
{{- $names = append $names .name }}
{{- end }}
{{- $given := default dict .Values.serve.weights }}
{{- range $name, $_ := $given }}
{{- if not (has $name $names) }}
{{- fail (printf "serve.weights names %q, which is not a variant (variants: %s)" $name (join ", " $names)) }}
{{- end }}
{{- end }}
{{- $weights := dict }}
{{- $total := 0 }}
{{- range $name := $names }}
{{- $w := int (default 0 (index $given $name)) }}
{{- $_ := set $weights $name $w }}
{{- $total = add $total $w }}
{{- end }}
{{- if not $given }}
{{- $_ := set $weights (first $names) 100 }}
{{- else if eq (int $total) 0 }}
{{- fail "serve.weights must give at least one variant a weight > 0" }}
{{- end }}
{{- toJson $weights }}
{{- end }}

{{/*
The Serve config (RayService spec.serveConfigV2) as a YAML string, in the production layout: the
front application `amalia` (amalia_serve.app:build_app, args without variants) holds the OpenAI
ingress, and each variant is its own application named after it
(amalia_serve.app:build_variant_app, args = amalia_serve.config.VariantConfig). Serve redeploys
every deployment of an application whose args change, so this way adding, changing or removing
one variant restarts no other. The live weights are the ingress deployment's user_config, which
the ModelRollout operator patches. Built as a dict and rendered with toYaml: valid YAML with
sorted keys whatever the values hold.
*/}}
{{- define "amalia-serve.serveConfig" -}}
{{- $front := include "amalia-serve.frontApp" . }}
{{- $apps := list }}
{{- $names := list }}
{{- range $v := .Values.variants }}
{{- if eq $v.name $front }}
{{- fail (printf "variant name %q is taken by the front Serve application; pick another" $v.name) }}
{{- end }}
{{- if has $v.name $names }}
{{- fail (printf "variant name %q is used twice; each variant is its own Serve application" $v.name) }}
{{- end }}
{{- $names = append $names $v.name }}
{{- $actor := dict "num_gpus" $v.gpus }}
{{- if hasKey $v "cpus" }}
{{- $_ := set $actor "num_cpus" $v.cpus }}
{{- end }}
{{- $deployment := dict "ray_actor_options" $actor }}
{{- /* Only what the user set: anything else keeps the DeploymentOptions default. */}}
{{- $fields := dict "replicas" "num_replicas" "autoscaling" "autoscaling_config" "maxOngoingRequests" "max_ongoing_requests" "maxQueuedRequests" "max_queued_requests" }}
{{- range $key, $field := $fields }}
{{- if hasKey $v $key }}
{{- $_ := set $deployment $field (index $v $key) }}
{{- end }}
{{- end }}
{{- if not (or $v.replicas $v.autoscaling) }}
{{- fail (printf "variant %s: set replicas or autoscaling" $v.name) }}
{{- end }}
{{- $args := dict "name" $v.name "model_path" $v.modelPath "engine" (default dict $v.engine) "deployment" $deployment }}
{{- /* route_prefix null: reached only through the ingress, never over HTTP directly. */}}
{{- $apps = append $apps (dict "name" $v.name "route_prefix" nil "import_path" "amalia_serve.app:build_variant_app" "args" $args) }}
{{- end }}
{{- $ing := .Values.serve.ingress }}
{{- $ingressDeployment := dict "num_replicas" $ing.replicas "max_ongoing_requests" $ing.maxOngoingRequests "ray_actor_options" (dict "num_cpus" $ing.cpus) }}
{{- $ingress := dict "deployment" $ingressDeployment "max_request_bytes" $ing.maxRequestBytes "ready_timeout_s" $ing.readyTimeoutS }}
{{- with .Values.serve.apiKeys }}
{{- if .existingSecret }}
{{- $_ := set $ingress "auth" (dict "keys_file" (include "amalia-serve.apiKeysFile" $) "required" .required "reload_interval_s" .reloadIntervalS) }}
{{- end }}
{{- end }}
{{- if ne .Values.mesh.provider "none" }}
{{- $_ := set $ingress "mesh" (include "amalia-serve.ingressMesh" . | fromJson) }}
{{- end }}
{{- $args := dict "model_alias" .Values.serve.modelAlias "ingress" $ingress }}
{{- $weights := include "amalia-serve.weights" . | fromJson }}
{{- $live := dict "name" "AmaliaIngress" "user_config" (dict "weights" $weights) }}
{{- $app := dict "name" $front "import_path" "amalia_serve.app:build_app" "route_prefix" "/" "args" $args "deployments" (list $live) }}
{{- /* JSON replica logs carry each record's trace_id and span_id, so logs and traces join. */}}
{{- $logging := dict "encoding" "JSON" "log_level" "INFO" }}
{{- $config := dict "proxy_location" "EveryNode" "http_options" (dict "host" "0.0.0.0" "port" 8000) "logging_config" $logging "applications" (prepend $apps $app) }}
{{- toYaml $config }}
{{- end }}

{{/*
Env shared by every Ray container: offline Hugging Face, where the pod runs (the tracing module
reads POD_NAME, POD_NAMESPACE, NODE_NAME), and the OpenTelemetry exporter settings.
RAY_AUTH_MODE is absent on purpose: KubeRay sets it from rayCluster.auth.mode.
*/}}
{{- define "amalia-serve.rayEnv" -}}
- name: HF_HUB_OFFLINE
  value: "1"
- name: TRANSFORMERS_OFFLINE
  value: "1"
# Nothing phones home: Ray's usage statistics (which also probe the cloud metadata address) and
# vLLM's are off, and vLLM takes the pod's address instead of finding it by a socket towards 8.8.8.8.
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
# With usage statistics off, a `ray start` cluster (KubeRay's) still posts one "disabled" report to
# Ray's usage server at start (Ray 2.60, UsageStatsHead); this sends it to a closed loopback port.
- name: RAY_USAGE_STATS_REPORT_URL
  value: http://127.0.0.1:9/
- name: VLLM_NO_USAGE_STATS
  value: "1"
- name: DO_NOT_TRACK
  value: "1"
- name: VLLM_HOST_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: HF_HOME
  value: {{ printf "%s/.hf-home" .Values.models.mountPath | quote }}
# The root filesystem is read-only: every cache a library writes goes under the /tmp emptyDir.
- name: XDG_CACHE_HOME
  value: /tmp/cache
- name: TRITON_CACHE_DIR
  value: /tmp/cache/triton
- name: TORCHINDUCTOR_CACHE_DIR
  value: /tmp/cache/torchinductor
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
{{- with .Values.tracing }}
{{- if .enabled }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ .protocol | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ .sampler | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ .samplerArg | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ .serviceName | quote }}
{{- $attrs := list (printf "service.namespace=%s" $.Release.Namespace) }}
{{- range $key, $value := .resourceAttributes }}
{{- $attrs = append $attrs (printf "%s=%s" $key $value) }}
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ join "," $attrs | quote }}
{{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Writable scratch space of every Ray pod: /tmp (Ray's session dir) and the object store. */}}
{{- define "amalia-serve.rayScratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.rayCluster.tmpSizeLimit }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.rayCluster.sharedMemorySize }}
{{- end }}

{{- define "amalia-serve.rayScratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: dshm
  mountPath: /dev/shm
{{- end }}

{{/*
API keys (serve.apiKeys): the Secret as a volume of every Ray pod, since an ingress replica may land
on the head or on any worker. A whole-Secret mount, never subPath: the kubelet updates it by
swapping a `..data` symlink, which the ingress notices; a subPath mount never changes.
*/}}
{{- define "amalia-serve.apiKeysDir" -}}/etc/amalia/api-keys{{- end }}

{{- define "amalia-serve.apiKeysFile" -}}
{{- printf "%s/%s" (include "amalia-serve.apiKeysDir" .) .Values.serve.apiKeys.secretKey }}
{{- end }}

{{- define "amalia-serve.apiKeysVolume" -}}
{{- with .Values.serve.apiKeys.existingSecret -}}
- name: api-keys
  secret:
    secretName: {{ . }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "amalia-serve.apiKeysMount" -}}
{{- if .Values.serve.apiKeys.existingSecret -}}
- name: api-keys
  mountPath: {{ include "amalia-serve.apiKeysDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/* Volume holding the checkpoints; read-only unless the chart fills it itself. */}}
{{- define "amalia-serve.modelVolume" -}}
{{- $m := .Values.models }}
- name: models
{{- if eq $m.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ $m.pvc.claimName }}
    readOnly: true
{{- else if eq $m.source "hostPath" }}
  hostPath:
    path: {{ $m.hostPath.path }}
    type: Directory
{{- else }}
  emptyDir:
    sizeLimit: {{ $m.emptyDir.sizeLimit }}
{{- end }}
{{- end }}

{{/*
Init container that fills the emptyDir model volume with the user's command (e.g. a sync from
in-house S3) before Ray starts on the worker.
*/}}
{{- define "amalia-serve.modelFillInitContainer" -}}
{{- $m := .Values.models }}
{{- if eq $m.source "emptyDir" }}
- name: fill-models
  image: {{ required "models.fill.image is required when models.source is emptyDir" $m.fill.image }}
  command: {{ required "models.fill.command is required when models.source is emptyDir" $m.fill.command | toJson }}
  {{- with $m.fill.env }}
  env: {{ toYaml . | nindent 4 }}
  {{- end }}
  {{- with $m.fill.resources }}
  resources: {{ toYaml . | nindent 4 }}
  {{- end }}
  securityContext: {{ toYaml $.Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: models
      mountPath: {{ $m.mountPath }}
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end }}

{{/* Fails the render when the cluster lacks the RayService API (see kuberay.capabilityCheck). */}}
{{- define "amalia-serve.checkCapabilities" -}}
{{- $mode := .Values.kuberay.capabilityCheck }}
{{- $api := .Capabilities.APIVersions }}
{{- /* Every real API server serves apiregistration.k8s.io/v1; helm template's built-in list does not. */}}
{{- $talksToCluster := $api.Has "apiregistration.k8s.io/v1" }}
{{- $hasRay := or ($api.Has "ray.io/v1/RayService") ($api.Has "ray.io/v1") }}
{{- if and (not $hasRay) (or (eq $mode "always") (and (eq $mode "auto") $talksToCluster)) }}
{{- fail "this cluster does not serve ray.io/v1 RayService: install the KubeRay operator >= 1.3 first (https://docs.ray.io/en/latest/cluster/kubernetes/getting-started/kuberay-operator-installation.html), or pass --api-versions ray.io/v1/RayService to helm template" }}
{{- end }}
{{- end }}

{{/* Whether a monitoring.coreos.com/v1 object is rendered: usage: include "amalia-serve.monitoringEnabled" (dict "enabled" .Values.x.enabled "root" $) */}}
{{- define "amalia-serve.monitoringEnabled" -}}
{{- $enabled := .enabled | toString }}
{{- if or (eq $enabled "true") (and (eq $enabled "auto") (.root.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")) }}true{{ end }}
{{- end }}

{{/*
GPUs the variants hold with every variant at its fewest and at its most replicas, as JSON
{"min": n, "max": n}: min_replicas (default 1) and max_replicas of `autoscaling`, or the fixed
`replicas` both ways, times `gpus`. Worker groups that leave minReplicas/maxReplicas out are sized
from it, and amalia-serve.checkGpuCapacity compares it with what the groups allow.
*/}}
{{- define "amalia-serve.gpuDemand" -}}
{{- $min := 0 }}
{{- $max := 0 }}
{{- range .Values.variants }}
{{- $gpus := int .gpus }}
{{- if .autoscaling }}
{{- $low := ternary (int .autoscaling.min_replicas) 1 (hasKey .autoscaling "min_replicas") }}
{{- $min = add $min (mul $low $gpus) }}
{{- $max = add $max (mul (int .autoscaling.max_replicas) $gpus) }}
{{- else }}
{{- $min = add $min (mul (int .replicas) $gpus) }}
{{- $max = add $max (mul (int .replicas) $gpus) }}
{{- end }}
{{- end }}
{{- toJson (dict "min" $min "max" $max) }}
{{- end }}

{{/*
Pod counts of one worker group as JSON {"replicas", "minReplicas", "maxReplicas"}; what the values
leave out is derived from the variants' GPU demand (amalia-serve.gpuDemand): maxReplicas = the pods
that hold every variant at max_replicas, minReplicas = the pods that hold them at min_replicas when
this is the only group (0 when there are several: which group keeps warm pods is a choice), replicas
(the pods created before the autoscaler acts) = minReplicas.
Usage: include "amalia-serve.workerGroupScale" (dict "group" . "root" $)
*/}}
{{- define "amalia-serve.workerGroupScale" -}}
{{- $g := .group }}
{{- $demand := include "amalia-serve.gpuDemand" .root | fromJson }}
{{- $per := int $g.gpusPerWorker }}
{{- $derivedMax := div (add (int $demand.max) (sub $per 1)) $per }}
{{- $derivedMin := 0 }}
{{- if eq (len .root.Values.workerGroups) 1 }}
{{- $derivedMin = div (add (int $demand.min) (sub $per 1)) $per }}
{{- end }}
{{- $max := ternary (int $g.maxReplicas) (max 1 $derivedMax) (hasKey $g "maxReplicas") }}
{{- $min := ternary (int $g.minReplicas) (min $derivedMin $max) (hasKey $g "minReplicas") }}
{{- $replicas := ternary (int $g.replicas) $min (hasKey $g "replicas") }}
{{- toJson (dict "replicas" $replicas "minReplicas" $min "maxReplicas" $max) }}
{{- end }}

{{/*
Fails the render when the worker groups cannot hold every variant at max_replicas (the replicas
past the GPUs would wait for a node forever), or when a group sets idleTimeoutSeconds, which
KubeRay accepts only with autoscaler v2.
*/}}
{{- define "amalia-serve.checkGpuCapacity" -}}
{{- $demand := include "amalia-serve.gpuDemand" . | fromJson }}
{{- $capacity := 0 }}
{{- range .Values.workerGroups }}
{{- $scale := include "amalia-serve.workerGroupScale" (dict "group" . "root" $) | fromJson }}
{{- $capacity = add $capacity (mul (int $scale.maxReplicas) (int .gpusPerWorker)) }}
{{- if and (hasKey . "idleTimeoutSeconds") (ne $.Values.rayCluster.autoscalerVersion "v2") }}
{{- fail (printf "workerGroups %s: idleTimeoutSeconds needs rayCluster.autoscalerVersion v2" .name) }}
{{- end }}
{{- end }}
{{- if lt (int $capacity) (int $demand.max) }}
{{- fail (printf "the variants need %d GPUs at max_replicas but workerGroups allow %d (maxReplicas x gpusPerWorker): raise maxReplicas, or leave it out to derive it" (int $demand.max) (int $capacity)) }}
{{- end }}
{{- end }}
