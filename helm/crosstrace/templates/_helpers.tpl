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

{{/* repository:tag (tag defaults to appVersion); with a digest, repository@digest or repository:tag@digest. */}}
{{- define "crosstrace.image" -}}
{{- $image := .Values.image -}}
{{- if $image.digest -}}
{{ $image.repository }}{{ with $image.tag }}:{{ . }}{{ end }}@{{ $image.digest }}
{{- else -}}
{{ printf "%s:%s" $image.repository ($image.tag | default .Chart.AppVersion) }}
{{- end -}}
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

{{/*
The node agent's namespace: its own, apart from the controller's, because the agent needs the Pod Security
level "privileged" (a hostPath volume for the OVS sockets, uid 0) and the controller's namespace enforces
"restricted".
*/}}
{{- define "crosstrace.agentNamespace" -}}
{{ .Values.agent.namespace }}
{{- end -}}

{{/* The agent's user name, as the API server sees a request made with its ServiceAccount token. */}}
{{- define "crosstrace.agentUser" -}}
{{ printf "system:serviceaccount:%s:%s" (include "crosstrace.agentNamespace" .) (include "crosstrace.agentName" .) }}
{{- end -}}

{{/* The controller's user name, as the API server sees a request made with its ServiceAccount token. */}}
{{- define "crosstrace.controllerUser" -}}
{{ printf "system:serviceaccount:%s:%s" .Release.Namespace (include "crosstrace.controllerName" .) }}
{{- end -}}

{{/* Namespaces no layer touches, as a JSON list: the built-in ones, the release namespace, adminLimits'. */}}
{{- define "crosstrace.protectedNamespaces" -}}
{{ concat (list "kube-system" "kube-public" "kube-node-lease" .Release.Namespace) .Values.adminLimits.protectedNamespaces | uniq | toJson }}
{{- end -}}

{{/* The ConfigMap of admin limits (release namespace): read by the admission policy and the controller. */}}
{{- define "crosstrace.adminLimitsName" -}}
crosstrace-admin-limits
{{- end -}}

{{/*
CEL variables for one image field of a TracingPolicy, for the admission policy crosstrace-admin-limits:
<name>Image (the image, '' when unset), <name>Repository (without tag and digest) and <name>Digest ('' when
none). Pass (dict "name" "sidecar" "path" "object.spec.workloads.sidecar"). The repository is what comes
before a ':' that follows the last '/' (a ':' before it is a registry port).
*/}}
{{- define "crosstrace.celImageVariables" -}}
- name: {{ .name }}Image
  expression: >-
    {{ .guard }} && has({{ .path }}.image) ? {{ .path }}.image : ''
- name: {{ .name }}Named
  expression: "variables.{{ .name }}Image.split('@')[0]"
- name: {{ .name }}Repository
  expression: >-
    variables.{{ .name }}Named.lastIndexOf(':') > variables.{{ .name }}Named.lastIndexOf('/')
    ? variables.{{ .name }}Named.substring(0, variables.{{ .name }}Named.lastIndexOf(':'))
    : variables.{{ .name }}Named
- name: {{ .name }}Allowed
  expression: >-
    variables.{{ .name }}Image == '' || variables.{{ .name }}Images.exists(allowed,
    allowed == variables.{{ .name }}Repository
    || (variables.{{ .name }}Image.contains('@')
        && allowed == variables.{{ .name }}Repository + '@' + variables.{{ .name }}Image.split('@')[1]))
{{- end -}}

{{/*
CEL variables for the targets of one flow exporter: <name>Targets and <name>Outside (those whose host is not
an IP address inside one of the allowed collector networks; a host name is outside: it cannot be checked).
Pass (dict "name" "sflow" "path" "object.spec.network.sflow").
*/}}
{{- define "crosstrace.celTargetVariables" -}}
- name: {{ .name }}Targets
  expression: >-
    has(object.spec.network) && has({{ .path }}) ? {{ .path }}.targets : []
- name: {{ .name }}Outside
  expression: >-
    variables.{{ .name }}Targets.filter(target,
    !(isIP(target.substring(0, target.lastIndexOf(':')).replace('[', '').replace(']', ''))
      && variables.collectorNetworks.exists(network,
           cidr(network).containsIP(target.substring(0, target.lastIndexOf(':')).replace('[', '').replace(']', '')))))
{{- end -}}

{{/* The log settings every crosstrace container gets (a list of EnvVar, for env:). */}}
{{- define "crosstrace.logEnv" -}}
- name: CROSSTRACE_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
{{- with .Values.logLevel }}
- name: RUST_LOG
  value: {{ . | quote }}
{{- end }}
{{- end -}}

{{/* The pod and container security context of the Pod Security level "restricted" (the controller's and the hooks'). */}}
{{- define "crosstrace.restrictedPodSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "crosstrace.restrictedContainerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/*
The label on the pods of the chart's hooks (uninstall, test). Pass the hook's name. Besides naming them, it
is what the local e2e cluster's kwok leaves alone: there the hook pods are run by e2e/run-hook-pod.sh as
host processes instead of being marked done without running (see e2e/kwok/kwok.yaml).
*/}}
{{- define "crosstrace.hookPodLabel" -}}
crosstrace.dev/hook: {{ . }}
{{- end -}}
