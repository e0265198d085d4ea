{{/* Chart name, truncated to the 63 characters Kubernetes allows in names. */}}
{{- define "walcar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped name for every object (the usual fullname rule). */}}
{{- define "walcar.fullname" -}}
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

{{- define "walcar.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "walcar.labels" -}}
helm.sh/chart: {{ include "walcar.chart" . }}
{{ include "walcar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "walcar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "walcar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Names of the parts. */}}
{{- define "walcar.injectorName" -}}
{{- printf "%s-injector" (include "walcar.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "walcar.drainName" -}}
{{- printf "%s-drain" (include "walcar.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "walcar.configName" -}}
{{- printf "%s-config" (include "walcar.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "walcar.tlsSecretName" -}}
{{- printf "%s-injector-tls" (include "walcar.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "walcar.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The DNS names the API server may use to reach the injector Service. */}}
{{- define "walcar.injectorDNSNames" -}}
{{- $svc := include "walcar.injectorName" . -}}
{{- $ns := .Release.Namespace -}}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) | toJson }}
{{- end }}

{{/* Role of the injected sidecars: only ingest when the drain Deployment applies the journal. */}}
{{- define "walcar.sidecarRole" -}}
{{- if eq .Values.sidecar.role "auto" }}
{{- if .Values.drain.enabled }}ingress{{ else }}all{{ end }}
{{- else }}
{{- .Values.sidecar.role }}
{{- end }}
{{- end }}

{{/* Native sidecars from Kubernetes 1.29 (auto), or as set; true below 1.29 would break every injected pod. */}}
{{- define "walcar.nativeSidecar" -}}
{{- $native := semverCompare ">=1.29.0-0" .Capabilities.KubeVersion.Version }}
{{- $value := .Values.sidecar.nativeSidecar }}
{{- if eq (toString $value) "auto" }}{{ $native }}
{{- else if and $value (not $native) }}
{{- fail (printf "sidecar.nativeSidecar=true needs Kubernetes >= 1.29 (this cluster is %s): below it the API server drops restartPolicy from init containers and rejects every injected pod; use auto or false" .Capabilities.KubeVersion.Version) }}
{{- else }}{{ $value }}
{{- end }}
{{- end }}

{{- define "walcar.adminTokenSecretName" -}}
{{- default (printf "%s-admin-token" (include "walcar.fullname" .) | trunc 63 | trimSuffix "-") .Values.adminToken.existingSecret }}
{{- end }}

{{- define "walcar.adminTokenDir" -}}/var/run/secrets/walcar/admin{{- end }}

{{/* Where the sidecar and the drain Deployment find the NATS credentials (sidecar/inject/render.py). */}}
{{- define "walcar.natsCredsDir" -}}/var/run/secrets/walcar/nats{{- end }}

{{/* Where the NATS TLS Secret is mounted (a directory: kubelet updates it when the Secret is renewed). */}}
{{- define "walcar.natsTlsDir" -}}/var/run/secrets/walcar/nats-tls{{- end }}

{{/* The control plane document (values.config plus what the chart owns), as YAML. */}}
{{- define "walcar.controlPlane" -}}
{{- $cfg := deepCopy (default dict .Values.config) }}
{{- $sidecar := deepCopy (default dict (get $cfg "sidecar")) }}
{{- $_ := set $sidecar "nats_url" .Values.nats.url }}
{{- if .Values.nats.credentialsSecret }}
{{- $_ := set $sidecar "nats_creds" (printf "%s/nats.creds" (include "walcar.natsCredsDir" .)) }}
{{- end }}
{{- with .Values.nats.tls }}
{{- if .secret }}
{{- $dir := include "walcar.natsTlsDir" $ }}
{{- $tls := dict "ca_file" (printf "%s/ca.crt" $dir) }}
{{- if .clientCertificate }}
{{- $_ := set $tls "cert_file" (printf "%s/tls.crt" $dir) }}
{{- $_ := set $tls "key_file" (printf "%s/tls.key" $dir) }}
{{- end }}
{{- if .serverName }}
{{- $_ := set $tls "server_name" .serverName }}
{{- end }}
{{- if .handshakeFirst }}
{{- $_ := set $tls "handshake_first" true }}
{{- end }}
{{- $_ := set $sidecar "nats_tls" $tls }}
{{- end }}
{{- end }}
{{- $_ := set $sidecar "admin" (printf "127.0.0.1:%d" (int .Values.sidecar.ports.admin)) }}
{{- $_ := set $sidecar "admin_token_file" (printf "%s/%s" (include "walcar.adminTokenDir" .) .Values.adminToken.key) }}
{{- $_ := set $sidecar "metrics" (printf "0.0.0.0:%d" (int .Values.sidecar.ports.metrics)) }}
{{- $_ := set $sidecar "shutdown_deadline" (printf "%ds" (int .Values.sidecar.drainDeadlineSeconds)) }}
{{- $_ := set $cfg "sidecar" $sidecar }}
{{- $_ := set $cfg "listeners" list }}
{{- toYaml $cfg }}
{{- end }}

{{/* The injector's own settings (sidecar/inject/settings.py). */}}
{{- define "walcar.injectorSettings" -}}
bind: "0.0.0.0:{{ .Values.injector.port }}"
cert_file: /etc/walcar-injector/tls/tls.crt
key_file: /etc/walcar-injector/tls/tls.key
control_plane: /etc/walcar/walcar.yaml
image: {{ include "walcar.image" . | quote }}
image_pull_policy: {{ .Values.image.pullPolicy }}
nats_url: {{ .Values.nats.url | quote }}
{{- if .Values.nats.credentialsSecret }}
nats_creds_secret: {{ .Values.nats.credentialsSecret | quote }}
nats_creds_key: {{ .Values.nats.credentialsKey | quote }}
{{- end }}
{{- if .Values.nats.tls.secret }}
nats_tls_secret: {{ .Values.nats.tls.secret | quote }}
nats_tls_client_cert: {{ .Values.nats.tls.clientCertificate }}
{{- if .Values.nats.tls.serverName }}
nats_tls_server_name: {{ .Values.nats.tls.serverName | quote }}
{{- end }}
nats_tls_handshake_first: {{ .Values.nats.tls.handshakeFirst }}
{{- end }}
role: {{ include "walcar.sidecarRole" . }}
native_sidecar: {{ include "walcar.nativeSidecar" . }}
drain_deadline: {{ int .Values.sidecar.drainDeadlineSeconds }}
startup_timeout: {{ int .Values.sidecar.startupTimeoutSeconds }}
protocols: {{ toJson .Values.sidecar.protocols }}
log_level: {{ .Values.sidecar.logLevel }}
ports:
  {{- toYaml .Values.sidecar.ports | nindent 2 }}
resources:
  requests: {{ toJson (default dict .Values.sidecar.resources.requests) }}
  limits: {{ toJson (default dict .Values.sidecar.resources.limits) }}
secret_mounts: {{ toJson .Values.sidecar.secretMounts }}
run_as_user: {{ int .Values.sidecar.runAsUser }}
failure_policy: {{ .Values.webhook.failurePolicy }}
{{- end }}

{{/* Volumes and mounts shared by the drain Deployment: control plane, admin token, NATS creds, target secrets. */}}
{{- define "walcar.runtimeVolumes" -}}
- name: config
  configMap:
    name: {{ include "walcar.configName" . }}
    items:
      - key: walcar.yaml
        path: walcar.yaml
- name: admin-token
  secret:
    secretName: {{ include "walcar.adminTokenSecretName" . }}
    defaultMode: 0400
{{- if .Values.nats.credentialsSecret }}
- name: nats-creds
  secret:
    secretName: {{ .Values.nats.credentialsSecret }}
    items:
      - key: {{ .Values.nats.credentialsKey }}
        path: nats.creds
{{- end }}
{{- if .Values.nats.tls.secret }}
- name: nats-tls
  secret:
    secretName: {{ .Values.nats.tls.secret }}
{{- end }}
{{- range $i, $m := .Values.sidecar.secretMounts }}
- name: secret-{{ $i }}
  secret:
    secretName: {{ $m.secret }}
{{- end }}
{{- end }}

{{- define "walcar.runtimeMounts" -}}
- name: config
  mountPath: /etc/walcar
  readOnly: true
- name: admin-token
  mountPath: {{ include "walcar.adminTokenDir" . }}
  readOnly: true
{{- if .Values.nats.credentialsSecret }}
- name: nats-creds
  mountPath: {{ include "walcar.natsCredsDir" . }}
  readOnly: true
{{- end }}
{{- if .Values.nats.tls.secret }}
- name: nats-tls
  mountPath: {{ include "walcar.natsTlsDir" . }}
  readOnly: true
{{- end }}
{{- range $i, $m := .Values.sidecar.secretMounts }}
- name: secret-{{ $i }}
  mountPath: {{ $m.path }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "walcar.securityContext" -}}
runAsNonRoot: true
runAsUser: {{ int .Values.sidecar.runAsUser }}
runAsGroup: {{ int .Values.sidecar.runAsUser }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}
