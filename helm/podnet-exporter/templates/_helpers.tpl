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

{{/* config.requests as the exporter spells it: true / false, the values of earlier chart
versions, mean http / off. */}}
{{- define "podnet.requests" -}}
{{- $r := .Values.config.requests -}}
{{- if kindIs "bool" $r }}{{ ternary "http" "off" $r }}{{ else }}{{ default "http" $r }}{{ end -}}
{{- end -}}

{{/* config.tls as the exporter spells it (true / false mean openssl / off). */}}
{{- define "podnet.tlsCapture" -}}
{{- $t := .Values.config.tls -}}
{{- if kindIs "bool" $t }}{{ ternary "openssl" "off" $t }}{{ else }}{{ default "off" $t }}{{ end -}}
{{- end -}}

{{/* The container's securityContext (YAML, empty when none): securityContext, plus SYS_PTRACE
with config.tls=openssl (finding libssl in other containers through /proc/<pid>/maps and
/proc/<pid>/root is a ptrace access check). */}}
{{- define "podnet.securityContext" -}}
{{- $sc := deepCopy (default (dict) .Values.securityContext) -}}
{{- if eq (include "podnet.tlsCapture" .) "openssl" -}}
{{- $caps := default (dict) $sc.capabilities -}}
{{- $add := default (list) $caps.add -}}
{{- if not (has "SYS_PTRACE" $add) -}}
{{- $_ := set $caps "add" (append $add "SYS_PTRACE") -}}
{{- end -}}
{{- $_ := set $sc "capabilities" $caps -}}
{{- end -}}
{{- with $sc }}{{ toYaml . }}{{ end -}}
{{- end -}}

{{/* Fail early on combinations the schema cannot express. */}}
{{- define "podnet.validate" -}}
{{- if and (eq (include "podnet.tlsCapture" .) "openssl") (has (include "podnet.requests" .) (list "turns" "off")) -}}
{{- fail (printf "config.tls=openssl needs config.requests http or http1, not %s: the decrypted payloads are read only to recognise HTTP; set config.requests=http, or config.tls=off" (include "podnet.requests" .)) -}}
{{- end -}}
{{- if and .Values.serviceMonitor.enabled .Values.podMonitor.enabled -}}
{{- fail "serviceMonitor.enabled and podMonitor.enabled are both true: each exporter would be scraped twice and every dashboard sum doubled; enable only one" -}}
{{- end -}}
{{- if and .Values.otlp.headers .Values.otlp.headersSecret.name -}}
{{- fail "otlp.headers and otlp.headersSecret.name are both set: the secret's headers would replace the others; put all headers in the secret, or use only otlp.headers" -}}
{{- end -}}
{{- include "podnet.validateWeb" . -}}
{{- end -}}

{{/* The web.* settings: bind address, TLS, basic auth. */}}
{{- define "podnet.validateWeb" -}}
{{- $w := .Values.web -}}
{{- if not (has $w.listen (list "all" "nodeIP" "loopback")) -}}
{{- fail (printf "web.listen must be all, nodeIP or loopback, not %q" (toString $w.listen)) -}}
{{- end -}}
{{- if and (ne $w.listen "all") (not .Values.hostNetwork) -}}
{{- fail (printf "web.listen=%s needs hostNetwork=true: in the pod's own network namespace %s is not an address the kubelet's probes or a scraper can reach; use web.listen=all with hostNetwork=false" $w.listen (ternary "the node's IP" "127.0.0.1" (eq $w.listen "nodeIP"))) -}}
{{- end -}}
{{- if and (eq $w.listen "loopback") (or .Values.serviceMonitor.enabled .Values.podMonitor.enabled) -}}
{{- fail "web.listen=loopback with a ServiceMonitor or PodMonitor: Prometheus scrapes the pod IP, where nothing listens; only an agent on the node can scrape 127.0.0.1. Disable the monitor or use web.listen=nodeIP" -}}
{{- end -}}
{{- $tls := $w.tls -}}
{{- $verifying := ne $tls.clientAuthType "NoClientCert" -}}
{{- if $w.existingConfigSecret -}}
{{- if or $tls.secretName $tls.clientCASecretName $w.basicAuth.users -}}
{{- fail "web.existingConfigSecret is set together with web.tls.secretName, web.tls.clientCASecretName or web.basicAuth.users: the chart generates no web config when you bring your own; put TLS and users in your web-config.yml (its files in the same Secret), and set only web.tls.enabled and web.tls.clientAuthType to match it" -}}
{{- end -}}
{{- else -}}
{{- if and $tls.enabled (not $tls.secretName) -}}
{{- fail "web.tls.enabled needs web.tls.secretName: an existing kubernetes.io/tls Secret (tls.crt, tls.key) in the release namespace, e.g. from cert-manager" -}}
{{- end -}}
{{- if and $tls.secretName (not $tls.enabled) -}}
{{- fail "web.tls.secretName is set but web.tls.enabled is false: set web.tls.enabled=true to serve HTTPS, or unset the secret" -}}
{{- end -}}
{{- if and $tls.enabled $verifying (not $tls.clientCASecretName) -}}
{{- fail (printf "web.tls.clientAuthType=%s needs a CA for the client certificates: set web.tls.clientCASecretName to the Secret whose ca.crt holds it (web.tls.secretName itself when its ca.crt is that CA)" $tls.clientAuthType) -}}
{{- end -}}
{{- if and $tls.clientCASecretName (not $verifying) -}}
{{- fail "web.tls.clientCASecretName is set but web.tls.clientAuthType is NoClientCert: no client certificate would be asked for; set clientAuthType to VerifyClientCertIfGiven or RequireAndVerifyClientCert, or unset clientCASecretName" -}}
{{- end -}}
{{- end -}}
{{- if and $verifying (not $tls.enabled) -}}
{{- fail (printf "web.tls.clientAuthType=%s needs web.tls.enabled: client certificates exist only with TLS" $tls.clientAuthType) -}}
{{- end -}}
{{- end -}}

{{/* "true" when the exporter serves HTTPS (generated config or an existing one that turns TLS on). */}}
{{- define "podnet.tls" -}}
{{- if .Values.web.tls.enabled }}true{{ end -}}
{{- end -}}

{{/* "true" when the chart generates the web config Secret. */}}
{{- define "podnet.webConfigGenerated" -}}
{{- if and (not .Values.web.existingConfigSecret) (or .Values.web.tls.enabled .Values.web.basicAuth.users) }}true{{ end -}}
{{- end -}}

{{/* Name of the Secret holding web-config.yml; empty when there is none. */}}
{{- define "podnet.webConfigSecret" -}}
{{- if .Values.web.existingConfigSecret -}}
{{- .Values.web.existingConfigSecret -}}
{{- else if include "podnet.webConfigGenerated" . -}}
{{- printf "%s-web-config" (include "podnet.fullname" . | trunc 52 | trimSuffix "-") -}}
{{- end -}}
{{- end -}}

{{/* Mount points of the web config, the TLS Secret and the client CA Secret. */}}
{{- define "podnet.webConfigDir" -}}/etc/podnet-web{{- end -}}
{{- define "podnet.tlsDir" -}}/etc/podnet-web-tls{{- end -}}
{{- define "podnet.clientCADir" -}}/etc/podnet-web-client-ca{{- end -}}

{{/* The client CA file: in the TLS Secret's mount when it is the same Secret. */}}
{{- define "podnet.clientCAFile" -}}
{{- if eq .Values.web.tls.clientCASecretName .Values.web.tls.secretName -}}
{{ include "podnet.tlsDir" . }}/ca.crt
{{- else -}}
{{ include "podnet.clientCADir" . }}/ca.crt
{{- end -}}
{{- end -}}

{{/* The generated exporter-toolkit web config (node_exporter's --web.config.file format). */}}
{{- define "podnet.webConfig" -}}
{{- $w := .Values.web -}}
{{- $cfg := dict -}}
{{- if $w.tls.enabled -}}
{{- $tls := dict
  "cert_file" (printf "%s/tls.crt" (include "podnet.tlsDir" .))
  "key_file" (printf "%s/tls.key" (include "podnet.tlsDir" .))
  "client_auth_type" $w.tls.clientAuthType
  "min_version" $w.tls.minVersion
-}}
{{- if $w.tls.clientCASecretName -}}
{{- $_ := set $tls "client_ca_file" (include "podnet.clientCAFile" .) -}}
{{- end -}}
{{- $_ := set $cfg "tls_server_config" $tls -}}
{{- end -}}
{{- with $w.basicAuth.users -}}
{{- $_ := set $cfg "basic_auth_users" . -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* A probe with the web settings applied: HTTPS with TLS, a TCP check when the kubelet would
need a client certificate, host 127.0.0.1 with web.listen=loopback. Keys the user set win.
Use: include "podnet.probe" (dict "root" $ "probe" .Values.livenessProbe) */}}
{{- define "podnet.probe" -}}
{{- $root := .root -}}
{{- $p := deepCopy .probe -}}
{{- if and $p.httpGet (eq $root.Values.web.tls.clientAuthType "RequireAndVerifyClientCert") -}}
{{- $tcp := dict "port" $p.httpGet.port -}}
{{- with $p.httpGet.host }}{{ $_ := set $tcp "host" . }}{{ end -}}
{{- $_ := unset $p "httpGet" -}}
{{- $_ := set $p "tcpSocket" $tcp -}}
{{- end -}}
{{- if and $p.httpGet (include "podnet.tls" $root) (not (hasKey $p.httpGet "scheme")) -}}
{{- $_ := set $p.httpGet "scheme" "HTTPS" -}}
{{- end -}}
{{- if eq $root.Values.web.listen "loopback" -}}
{{- range $kind := list "httpGet" "tcpSocket" -}}
{{- $action := get $p $kind -}}
{{- if and $action (not (hasKey $action "host")) -}}
{{- $_ := set $action "host" "127.0.0.1" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toYaml $p -}}
{{- end -}}

{{/* The monitors' scrape scheme. Use: include "podnet.scheme" (dict "root" $ "scheme" .scheme) */}}
{{- define "podnet.scheme" -}}
{{- default (ternary "https" "http" (eq (include "podnet.tls" .root) "true")) .scheme -}}
{{- end -}}

{{/* PromQL label matchers of this release's exporter targets (for the alerts). */}}
{{- define "podnet.alertSelector" -}}
{{- $v := .Values -}}
{{- if $v.prometheusRule.selector -}}
{{- $v.prometheusRule.selector -}}
{{- else if $v.serviceMonitor.enabled -}}
{{- /* A ServiceMonitor's job label is the Service name. */ -}}
{{- printf "job=%q,namespace=%q" (include "podnet.fullname" .) .Release.Namespace -}}
{{- else if $v.podMonitor.enabled -}}
{{- /* A PodMonitor's job label is <its namespace>/<its name>. */ -}}
{{- printf "job=%q,namespace=%q" (printf "%s/%s" (default .Release.Namespace $v.podMonitor.namespace) (include "podnet.fullname" .)) .Release.Namespace -}}
{{- end -}}
{{- end -}}
