{{/* Chart name, truncated to fit Kubernetes name limits. */}}
{{- define "l3fabric.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name: "l3fabric" for a release named l3fabric, else "<release>-l3fabric". */}}
{{- define "l3fabric.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "l3fabric.labels" -}}
app.kubernetes.io/name: {{ include "l3fabric.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{ include "l3fabric.releaseLabels" . }}
{{- end }}

{{/* The labels that change with the chart and its release (never in a selector). */}}
{{- define "l3fabric.releaseLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: l3fabric
{{- end }}

{{/* Selector labels of one component: include with (list $ "agent"). */}}
{{- define "l3fabric.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "l3fabric.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Labels of one component's pods: include with (list $ "agent"). */}}
{{- define "l3fabric.podLabels" -}}
{{ include "l3fabric.selectorLabels" . }}
{{ include "l3fabric.releaseLabels" (index . 0) }}
{{- end }}

{{- define "l3fabric.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "l3fabric.agentName" -}}
{{- printf "%s-agent" (include "l3fabric.fullname" .) }}
{{- end }}

{{- define "l3fabric.gcName" -}}
{{- printf "%s-ipam-gc" (include "l3fabric.fullname" .) }}
{{- end }}

{{/* The agent's socket on the host (and, mounted at the same path, in the agent). */}}
{{- define "l3fabric.socket" -}}
{{- printf "%s/agent.sock" .Values.agent.hostPaths.runDir }}
{{- end }}

{{/* Secrets named by bgp.peers[].passwordSecret, sorted and without duplicates. */}}
{{- define "l3fabric.passwordSecrets" -}}
{{- $names := list }}
{{- range .Values.bgp.peers }}
{{- if .passwordSecret }}
{{- $names = append $names .passwordSecret.name }}
{{- end }}
{{- end }}
{{- $names | uniq | sortAlpha | toJson }}
{{- end }}

{{/* A label selector in the CRDs' form: only the keys that are set. */}}
{{- define "l3fabric.selector" -}}
{{- $sel := dict }}
{{- if .matchLabels }}{{ $_ := set $sel "matchLabels" .matchLabels }}{{ end }}
{{- if .matchExpressions }}{{ $_ := set $sel "matchExpressions" .matchExpressions }}{{ end }}
{{- toYaml $sel }}
{{- end }}

{{/*
Checks that values.schema.json cannot express with a clear message. Rendered (to nothing)
by the objects that depend on them, so `helm template`, `install` and `upgrade` all fail.
*/}}
{{- define "l3fabric.validate" -}}
{{- $pools := dict }}
{{- range $i, $pool := .Values.ipPools }}
{{- if hasKey $pools $pool.name }}
{{- fail (printf "ipPools[%d].name: %q is used by two pools" $i $pool.name) }}
{{- end }}
{{- $_ := set $pools $pool.name true }}
{{- $ipip := $pool.ipipMode | default "Never" }}
{{- $vxlan := $pool.vxlanMode | default "Never" }}
{{- if and (ne $ipip "Never") (ne $vxlan "Never") }}
{{- fail (printf "ipPools[%d] (%s): ipipMode and vxlanMode cannot both be enabled on one pool" $i $pool.name) }}
{{- end }}
{{- end }}
{{- $peers := dict }}
{{- range $i, $peer := .Values.bgp.peers }}
{{- if hasKey $peers $peer.name }}
{{- fail (printf "bgp.peers[%d].name: %q is used by two peers" $i $peer.name) }}
{{- end }}
{{- $_ := set $peers $peer.name true }}
{{- if and $peer.keepaliveTime $peer.holdTime (gt (mul $peer.keepaliveTime 3) (int $peer.holdTime)) }}
{{- fail (printf "bgp.peers[%d].keepaliveTime: must be at most a third of holdTime (%d)" $i (int $peer.holdTime)) }}
{{- end }}
{{- end }}
{{- with .Values.bgp }}
{{- if and .keepaliveTime .holdTime (gt (mul .keepaliveTime 3) (int .holdTime)) }}
{{- fail (printf "bgp.keepaliveTime: must be at most a third of bgp.holdTime (%d)" (int .holdTime)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The route reflector selector: the values', else nodes labelled l3fabric.io/route-reflector=true. */}}
{{- define "l3fabric.rrSelector" -}}
{{- $sel := .Values.bgp.routeReflectors.nodeSelector | default dict }}
{{- if not (or $sel.matchLabels $sel.matchExpressions) }}
{{- $sel = dict "matchLabels" (dict "l3fabric.io/route-reflector" "true") }}
{{- end }}
{{- toJson $sel }}
{{- end }}
