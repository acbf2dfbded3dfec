{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "podnet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: <release>-<chart>, or the release name when it already contains the chart name. */}}
{{- define "podnet.fullname" -}}
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

{{- define "podnet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: stable for the life of a release (a DaemonSet selector is immutable). */}}
{{- define "podnet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "podnet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "podnet.labels" -}}
helm.sh/chart: {{ include "podnet.chart" . }}
{{ include "podnet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: podnet
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* YAML of the common annotations merged with .extra (which wins); empty when there are none.
Use: {{- with include "podnet.annotations" (dict "root" $ "extra" $map) }} annotations: ... */}}
{{- define "podnet.annotations" -}}
{{- $all := merge (deepCopy (default (dict) .extra)) (deepCopy (default (dict) .root.Values.commonAnnotations)) -}}
{{- with $all }}{{ toYaml . }}{{ end -}}
{{- end -}}

{{- define "podnet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "podnet.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "podnet.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* Where the ConfigMap's config.yaml is mounted. */}}
{{- define "podnet.configDir" -}}/etc/podnet{{- end -}}

{{/* Mount point of the host's cgroup hierarchy. */}}
{{- define "podnet.hostCgroupDir" -}}/host/sys/fs/cgroup{{- end -}}

{{/* Fail early on combinations the schema cannot express. */}}
{{- define "podnet.validate" -}}
{{- if and .Values.serviceMonitor.enabled .Values.podMonitor.enabled -}}
{{- fail "serviceMonitor.enabled and podMonitor.enabled are both true: each exporter would be scraped twice and every dashboard sum doubled; enable only one" -}}
{{- end -}}
{{- if and .Values.otlp.headers .Values.otlp.headersSecret.name -}}
{{- fail "otlp.headers and otlp.headersSecret.name are both set: the secret's headers would replace the others; put all headers in the secret, or use only otlp.headers" -}}
{{- end -}}
{{- end -}}
