{{/* Labels on every object of the release. */}}
{{- define "ambit.labels" -}}
app.kubernetes.io/part-of: ambit
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/* Image tag: the chart's appVersion unless image.tag says otherwise. */}}
{{- define "ambit.tag" -}}
{{ default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{/* The name istiod-lite's serving certificate carries and proxies check;
     also the Service's DNS name, so the same string dials and verifies. */}}
{{- define "ambit.controlPlaneName" -}}
istiod-lite.{{ .Release.Namespace }}.svc
{{- end }}
