{{/*
Service-mesh helpers (mesh.provider: none | istio | istio-ambient | linkerd).

Only the OpenAI API (Serve's HTTP port 8000, serveConfig http_options) and Ray's metrics port 8080
(metrics-export-port in rayservice.yaml) are in the mesh. Ray's own ports (GCS, raylets, object
manager, dashboard and its agent, worker ports, NCCL between GPU workers) stay out of the sidecar
proxies, and the mesh policies leave them open: the README's "Service mesh" section says why.
*/}}

{{/* The pod ports the mesh carries inbound on Ray pods, as a JSON list of numbers. */}}
{{- define "amalia-serve.meshInboundPorts" -}}
{{- if .Values.mesh.metrics.plaintext }}[8000]{{ else }}[8000, 8080]{{ end }}
{{- end }}

{{/*
The ports Ray pods reach other mesh services on through their proxy, as a JSON list of numbers:
mesh.outboundPorts plus the OTLP collector's port when tracing is on. Everything else a Ray pod
opens (mostly Ray talking to Ray) bypasses the proxy.
*/}}
{{- define "amalia-serve.meshOutboundPorts" -}}
{{- $ports := list }}
{{- range .Values.mesh.outboundPorts }}
{{- $ports = append $ports (int .) }}
{{- end }}
{{- if .Values.tracing.enabled }}
{{- $url := urlParse .Values.tracing.endpoint }}
{{- $port := regexFind ":[0-9]+$" $url.host | trimPrefix ":" }}
{{- if not $port }}
{{- $port = ternary "443" "80" (eq $url.scheme "https") }}
{{- end }}
{{- $ports = append $ports (int $port) }}
{{- end }}
{{- $ports | uniq | toJson }}
{{- end }}

{{/*
"1-7999,8001-65535": every TCP port except the given ones, as the port ranges Linkerd's
skip-inbound-ports and skip-outbound-ports annotations take. Usage: include "amalia-serve.portsExcept" (list 8000)
*/}}
{{- define "amalia-serve.portsExcept" -}}
{{- $padded := list }}
{{- range . }}
{{- $padded = append $padded (printf "%05d" (int .)) }}
{{- end }}
{{- $ranges := list }}
{{- $from := 1 }}
{{- range sortAlpha $padded }}
{{- $port := atoi . }}
{{- if gt $port $from }}
{{- $ranges = append $ranges (ternary (toString $from) (printf "%d-%d" $from (sub $port 1)) (eq $from (sub $port 1))) }}
{{- end }}
{{- $from = max $from (add $port 1) }}
{{- end }}
{{- if le $from 65535 }}
{{- $ranges = append $ranges (ternary "65535" (printf "%d-65535" $from) (eq $from 65535)) }}
{{- end }}
{{- join "," $ranges }}
{{- end }}

{{/* Labels that put a pod into the mesh (Istio's injection and ambient opt-ins are labels). */}}
{{- define "amalia-serve.meshPodLabels" -}}
{{- $provider := .Values.mesh.provider }}
{{- if eq $provider "istio" }}
sidecar.istio.io/inject: "true"
{{- else if eq $provider "istio-ambient" }}
istio.io/dataplane-mode: ambient
{{- end }}
{{- end }}

{{/*
Annotations of a meshed pod: Linkerd's injection, the Ray pods' port split, and native sidecars
for the helm test pod (so its proxy stops when the test ends).
Usage: include "amalia-serve.meshPodAnnotations" (dict "workload" "ray|operator|test" "root" $)
*/}}
{{- define "amalia-serve.meshPodAnnotations" -}}
{{- $provider := .root.Values.mesh.provider }}
{{- if eq $provider "linkerd" }}
linkerd.io/inject: enabled
{{- end }}
{{- if eq .workload "ray" }}
{{- $inbound := include "amalia-serve.meshInboundPorts" .root | fromJsonArray }}
{{- $outbound := include "amalia-serve.meshOutboundPorts" .root | fromJsonArray }}
{{- if eq $provider "istio" }}
traffic.sidecar.istio.io/includeInboundPorts: {{ join "," $inbound | quote }}
# An empty list redirects no destination by address; only includeOutboundPorts go to the proxy.
traffic.sidecar.istio.io/includeOutboundIPRanges: ""
{{- with $outbound }}
traffic.sidecar.istio.io/includeOutboundPorts: {{ join "," . | quote }}
{{- end }}
{{- else if eq $provider "linkerd" }}
config.linkerd.io/skip-inbound-ports: {{ include "amalia-serve.portsExcept" $inbound | quote }}
config.linkerd.io/skip-outbound-ports: {{ include "amalia-serve.portsExcept" $outbound | quote }}
{{- end }}
{{- else if eq .workload "test" }}
{{- if eq $provider "istio" }}
sidecar.istio.io/nativeSidecar: "true"
{{- else if eq $provider "linkerd" }}
config.alpha.linkerd.io/proxy-enable-native-sidecar: "true"
{{- end }}
{{- end }}
{{- end }}

{{- define "amalia-serve.meshTestServiceAccount" -}}
{{- printf "%s-api-test" (include "amalia-serve.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "amalia-serve.waypointName" -}}
{{- printf "%s-waypoint" (include "amalia-serve.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Whether the API goes through an Istio ambient waypoint (validated: istio-ambient only). */}}
{{- define "amalia-serve.meshWaypoint" -}}
{{- $mesh := .Values.mesh }}
{{- if $mesh.waypoint.enabled }}
{{- if ne $mesh.provider "istio-ambient" }}
{{- fail (printf "mesh.waypoint.enabled needs mesh.provider istio-ambient, not %s" $mesh.provider) }}
{{- end }}
{{- if not .Values.service.enabled }}
{{- fail "mesh.waypoint.enabled needs service.enabled: the waypoint is bound to the chart's Service" }}
{{- end }}
{{- print "true" }}
{{- end }}
{{- end }}

{{/*
The API's callers as a JSON list of {namespace, serviceAccount?}: mesh.allowedCallers plus the helm
test pod and the operator (when deployed). Empty means any caller with a mesh identity.
*/}}
{{- define "amalia-serve.meshApiCallers" -}}
{{- $callers := .Values.mesh.allowedCallers }}
{{- if $callers }}
{{- $callers = concat $callers (list (dict "namespace" .Release.Namespace "serviceAccount" (include "amalia-serve.meshTestServiceAccount" .))) }}
{{- if .Values.operator.enabled }}
{{- /* The operator's evaluation steps call the API too. */}}
{{- $callers = append $callers (dict "namespace" .Release.Namespace "serviceAccount" (include "amalia-serve.operatorName" .)) }}
{{- end }}
{{- end }}
{{- toJson $callers }}
{{- end }}

{{/*
Istio rule sources for {namespace, serviceAccount?} callers: principals for workloads, namespaces
for whole namespaces; any mesh identity when there are none.
Usage: include "amalia-serve.istioSources" (dict "callers" $list "root" $)
*/}}
{{- define "amalia-serve.istioSources" -}}
{{- $principals := list }}
{{- $namespaces := list }}
{{- range .callers }}
{{- if .serviceAccount }}
{{- $principals = append $principals (printf "%s/ns/%s/sa/%s" $.root.Values.mesh.trustDomain .namespace .serviceAccount) }}
{{- else }}
{{- $namespaces = append $namespaces .namespace }}
{{- end }}
{{- end }}
{{- if not .callers }}
{{- $principals = list "*" }}
{{- end }}
{{- $sources := list }}
{{- with $principals }}
{{- $sources = append $sources (dict "source" (dict "principals" .)) }}
{{- end }}
{{- with $namespaces }}
{{- $sources = append $sources (dict "source" (dict "namespaces" .)) }}
{{- end }}
{{- toYaml $sources }}
{{- end }}

{{/*
Linkerd MeshTLSAuthentication spec for {namespace, serviceAccount?} callers; any meshed identity
when there are none. Usage: include "amalia-serve.linkerdAuthentication" (list of callers)
*/}}
{{- define "amalia-serve.linkerdAuthentication" -}}
{{- if . }}
identityRefs:
{{- range . }}
  - kind: ServiceAccount
    namespace: {{ .namespace }}
    {{- with .serviceAccount }}
    name: {{ . }}
    {{- end }}
{{- end }}
{{- else }}
identities: ["*"]
{{- end }}
{{- end }}

{{/*
`args.ingress.mesh` of the front Serve application (amalia_serve.config.MeshConfig), as JSON. In
istio-ambient without a waypoint nothing on the request path writes the identity header (ztunnel
works at L4), so the ingress must not trust it and the allowlist is the mesh's alone.
*/}}
{{- define "amalia-serve.ingressMesh" -}}
{{- $mesh := .Values.mesh }}
{{- $trusted := or (ne $mesh.provider "istio-ambient") (eq (include "amalia-serve.meshWaypoint" .) "true") }}
{{- $allowed := list }}
{{- if $trusted }}
{{- range include "amalia-serve.meshApiCallers" . | fromJsonArray }}
{{- $rule := dict "namespace" .namespace }}
{{- with .serviceAccount }}
{{- $_ := set $rule "service_account" . }}
{{- end }}
{{- $allowed = append $allowed $rule }}
{{- end }}
{{- end }}
{{- toJson (dict "provider" $mesh.provider "trust_identity_header" $trusted "trust_domain" $mesh.trustDomain "allowed_callers" $allowed "sticky_by_caller" $mesh.stickyByCaller) }}
{{- end }}

{{/*
Extra NetworkPolicy ports for the mesh: in Istio ambient every mTLS connection arrives at ztunnel's
HBONE port 15008, so each rule that admits a port must admit 15008 from the same peers.
*/}}
{{- define "amalia-serve.meshNetworkPolicyPorts" -}}
{{- if eq .Values.mesh.provider "istio-ambient" }}
- {port: 15008, protocol: TCP}
{{- end }}
{{- end }}

{{/* Service labels and annotations the mesh reads. */}}
{{- define "amalia-serve.meshServiceLabels" -}}
{{- if eq (include "amalia-serve.meshWaypoint" .) "true" }}
istio.io/use-waypoint: {{ include "amalia-serve.waypointName" . }}
{{- end }}
{{- end }}

{{- define "amalia-serve.meshServiceAnnotations" -}}
{{- if eq .Values.mesh.provider "linkerd" }}
# Linkerd has no route timeout unless asked; an explicit one documents the bound.
timeout.linkerd.io/request: {{ .Values.mesh.traffic.requestTimeout | quote }}
{{- end }}
{{- end }}
