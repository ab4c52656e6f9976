{{/*
Object names are fixed: users, docs, tests and the Lease rely on them, and the CRDs are cluster-wide, so
the chart is installed once per cluster.
*/}}
{{- define "crosstrace.name" -}}
crosstrace
{{- end -}}

{{- define "crosstrace.controllerName" -}}
crosstrace-controller
{{- end -}}

{{- define "crosstrace.agentName" -}}
crosstrace-agent
{{- end -}}

{{- define "crosstrace.chart" -}}
{{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{- define "crosstrace.image" -}}
{{ printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end -}}

{{/* Labels that select pods: stable across upgrades. Pass (dict "ctx" $ "component" "controller"). */}}
{{- define "crosstrace.selectorLabels" -}}
app.kubernetes.io/name: {{ include "crosstrace.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Labels on every object. Pass (dict "ctx" $ "component" "controller"). */}}
{{- define "crosstrace.labels" -}}
{{ include "crosstrace.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: crosstrace
helm.sh/chart: {{ include "crosstrace.chart" .ctx }}
{{- end -}}

{{/* The agent's user name, as the API server sees a request made with its ServiceAccount token. */}}
{{- define "crosstrace.agentUser" -}}
{{ printf "system:serviceaccount:%s:%s" .Release.Namespace (include "crosstrace.agentName" .) }}
{{- end -}}
