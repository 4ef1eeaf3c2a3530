{{/* Chart name, truncated to the DNS label limit. */}}
{{- define "kiosk-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name, plus the chart name unless already in it. */}}
{{- define "kiosk-operator.fullname" -}}
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

{{- define "kiosk-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kiosk-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kiosk-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The chart's own labels (without commonLabels). */}}
{{- define "kiosk-operator.ownLabels" -}}
helm.sh/chart: {{ include "kiosk-operator.chart" . }}
{{ include "kiosk-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kiosk
{{- end }}

{{/*
Labels of an object: the chart's own, then the object's `extra` labels (component, a pool's
labels), then commonLabels. Earlier ones win on a clash, so commonLabels never break a selector.
Call with (dict "ctx" $ "extra" (dict ...)); "kiosk-operator.labels" is the no-extra form.
*/}}
{{- define "kiosk-operator.labelsWith" -}}
{{- $own := fromYaml (include "kiosk-operator.ownLabels" .ctx) }}
{{- toYaml (merge (dict) $own (.extra | default dict) (.ctx.Values.commonLabels | default dict)) }}
{{- end }}

{{- define "kiosk-operator.labels" -}}
{{- include "kiosk-operator.labelsWith" (dict "ctx" .) }}
{{- end }}

{{/* Labels of the operator pod: selector and component first, then podLabels, then commonLabels. */}}
{{- define "kiosk-operator.podLabels" -}}
{{- $own := fromYaml (include "kiosk-operator.selectorLabels" .) }}
{{- $_ := set $own "app.kubernetes.io/component" "operator" }}
{{- toYaml (merge $own (.Values.podLabels | default dict) (.Values.commonLabels | default dict)) }}
{{- end }}

{{- define "kiosk-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kiosk-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Namespaces the operator watches when not cluster-wide, as a JSON list. */}}
{{- define "kiosk-operator.watchNamespaces" -}}
{{- if .Values.watchNamespaces }}
{{- .Values.watchNamespaces | uniq | toJson }}
{{- else }}
{{- list .Release.Namespace | toJson }}
{{- end }}
{{- end }}

{{/* The operator's permission set: files/rbac_rules.yaml, the same file the operator tests use. */}}
{{- define "kiosk-operator.rbacRules" -}}
{{- $raw := .Files.Get "files/rbac_rules.yaml" }}
{{- if not $raw }}
{{- fail "files/rbac_rules.yaml is missing from the chart (it links to operator/kiosk_operator/rbac_rules.yaml)" }}
{{- end }}
{{- $rules := (fromYaml $raw).rules }}
{{- if not $rules }}
{{- fail "files/rbac_rules.yaml has no rules" }}
{{- end }}
{{- toYaml $rules }}
{{- end }}

{{- define "kiosk-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The ConsumerPool CRD file the chart carries (crds/consumerpool.yaml, a link to the one source). */}}
{{- define "kiosk-operator.crdFile" -}}
{{- $raw := .Files.Get "crds/consumerpool.yaml" }}
{{- if not $raw }}
{{- fail "crds/consumerpool.yaml is missing from the chart (it links to operator/kiosk_operator/crd/consumerpool.yaml)" }}
{{- end }}
{{- $raw }}
{{- end }}
