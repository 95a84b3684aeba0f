{{/* Names ------------------------------------------------------------------ */}}

{{- define "llm-proxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llm-proxy.fullname" -}}
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

{{- define "llm-proxy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels ----------------------------------------------------------------- */}}

{{- define "llm-proxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "llm-proxy.labels" -}}
helm.sh/chart: {{ include "llm-proxy.chart" . }}
{{ include "llm-proxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: llm-proxy
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The gateway pods: selector labels plus the component. */}}
{{- define "llm-proxy.gatewaySelectorLabels" -}}
{{ include "llm-proxy.selectorLabels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "llm-proxy.redisName" -}}
{{- printf "%s-redis" (include "llm-proxy.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llm-proxy.redisSelectorLabels" -}}
{{ include "llm-proxy.selectorLabels" . }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "llm-proxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llm-proxy.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Images ----------------------------------------------------------------- */}}

{{- define "llm-proxy.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "llm-proxy.redisImage" -}}
{{- $i := .Values.redis.standalone.image }}
{{- if $i.digest }}
{{- printf "%s@%s" $i.repository $i.digest }}
{{- else }}
{{- printf "%s:%s" $i.repository $i.tag }}
{{- end }}
{{- end }}

{{/* Secrets and config ----------------------------------------------------- */}}

{{/* The Secret whose keys become the gateway's environment. */}}
{{- define "llm-proxy.secretName" -}}
{{- default (include "llm-proxy.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{- define "llm-proxy.configMapName" -}}
{{- default (include "llm-proxy.fullname" .) .Values.gateway.existingConfigMap }}
{{- end }}

{{/* "true" when the chart gives the gateway a REDIS_URL. */}}
{{- define "llm-proxy.redisEnabled" -}}
{{- if or .Values.redis.url .Values.redis.existingSecret .Values.redis.standalone.enabled }}true{{ end }}
{{- end }}

{{/* "true" when the gateway may use Redis: the chart's, or a redis_url of the user's own config. */}}
{{- define "llm-proxy.usesRedis" -}}
{{- if or (include "llm-proxy.redisEnabled" .) .Values.gateway.existingConfigMap (hasKey (default dict .Values.gateway.config) "redis_url") }}true{{ end }}
{{- end }}

{{/* The gateway config as YAML, with redis_url / admin_key wired to the environment. */}}
{{- define "llm-proxy.config" -}}
{{- $cfg := deepCopy (default dict .Values.gateway.config) }}
{{- if and (include "llm-proxy.redisEnabled" .) (not (hasKey $cfg "redis_url")) }}
{{- $_ := set $cfg "redis_url" "${REDIS_URL}" }}
{{- end }}
{{- if not (hasKey $cfg "admin_key") }}
{{- if .Values.secrets.existingSecret }}
{{- /* the existing Secret may or may not hold an admin key: /admin/* is off without one */}}
{{- $_ := set $cfg "admin_key" "${LLM_PROXY_ADMIN_KEY:-}" }}
{{- else if .Values.secrets.adminKey.enabled }}
{{- $_ := set $cfg "admin_key" "${LLM_PROXY_ADMIN_KEY}" }}
{{- end }}
{{- end }}
{{- /* server.shutdown_grace: what terminationGracePeriodSeconds leaves after the preStop sleep and server.shutdown_delay, less a 5 s margin */}}
{{- $server := deepCopy (default dict (get $cfg "server")) }}
{{- if not (hasKey $server "shutdown_grace") }}
{{- $_ := set $server "shutdown_grace" (include "llm-proxy.drainSeconds" .Values | int) }}
{{- $_ := set $cfg "server" $server }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* The environment for egress: the proxy variables and SSL_CERT_FILE (env entries; empty when unused). */}}
{{- define "llm-proxy.egressEnv" -}}
{{- $proxy := .Values.egress.proxy }}
{{- range $name, $url := dict "HTTPS_PROXY" $proxy.https "HTTP_PROXY" $proxy.http }}
{{- if regexMatch "^http://[^/@]*:[^$/@][^/@]*@" (default "" $url) }}
{{- fail (printf "egress.proxy: a password would be readable in the Deployment; put it in secrets.env and write $(NAME) in its place (%s)" $name) }}
{{- end }}
{{- if $url }}
- name: {{ $name }}
  value: {{ $url | quote }}
{{- end }}
{{- end }}
{{- with $proxy.noProxy }}
- name: NO_PROXY
  value: {{ . | quote }}
{{- end }}
{{- if include "llm-proxy.caBundle" . }}
- name: SSL_CERT_FILE
  value: /etc/ssl/corporate/{{ .Values.egress.caBundle.key }}
{{- end }}
{{- end }}

{{/* "true" when egress.caBundle names a ConfigMap or a Secret. */}}
{{- define "llm-proxy.caBundle" -}}
{{- if and .Values.egress.caBundle.configMap .Values.egress.caBundle.secret }}
{{- fail "egress.caBundle: set configMap or secret, not both" }}
{{- end }}
{{- if or .Values.egress.caBundle.configMap .Values.egress.caBundle.secret }}true{{ end }}
{{- end }}

{{/* The forward proxies' ports, comma-separated (80 where a URL gives none), for the NetworkPolicy. */}}
{{- define "llm-proxy.proxyPorts" -}}
{{- $ports := list }}
{{- range (list .Values.egress.proxy.https .Values.egress.proxy.http) }}
{{- if . }}
{{- $host := (urlParse .).host }}
{{- $ports = append $ports (ternary (regexFind "[0-9]+$" $host) "80" (regexMatch ":[0-9]+$" $host)) }}
{{- end }}
{{- end }}
{{- join "," (uniq $ports) }}
{{- end }}

{{/* Seconds the gateway may spend finishing requests and streams after SIGTERM (values as context). */}}
{{- define "llm-proxy.drainSeconds" -}}
{{- $server := default dict (get (default dict .gateway.config) "server") }}
{{- $delay := int (ceil (default 5 (get $server "shutdown_delay"))) }}
{{- sub (sub (sub (int .terminationGracePeriodSeconds) (int .lifecycle.preStopSleepSeconds)) $delay) 5 }}
{{- end }}

{{/*
A value kept across upgrades: the existing Secret's key when the release
already has it (lookup; empty during `helm template`), else a new random one.
Args: list context secretName key length
*/}}
{{- define "llm-proxy.keepOrGenerate" -}}
{{- $ctx := index . 0 }}
{{- $existing := lookup "v1" "Secret" $ctx.Release.Namespace (index . 1) }}
{{- if and $existing (hasKey (default dict $existing.data) (index . 2)) }}
{{- index $existing.data (index . 2) | b64dec }}
{{- else }}
{{- randAlphaNum (index . 3) }}
{{- end }}
{{- end }}

{{/* "true" for a value that is neither null nor "" (0 is set). */}}
{{- define "llm-proxy.isSet" -}}
{{- if not (or (kindIs "invalid" .) (and (kindIs "string" .) (eq . ""))) }}true{{ end }}
{{- end }}

{{/* Checks that a schema cannot express. */}}
{{- define "llm-proxy.validate" -}}
{{- $replicas := ternary .Values.autoscaling.maxReplicas .Values.replicaCount .Values.autoscaling.enabled }}
{{- if and (gt (int $replicas) 1) (not (include "llm-proxy.usesRedis" .)) }}
{{- fail "more than one replica (replicaCount or autoscaling) needs Redis: set redis.url, redis.existingSecret or redis.standalone.enabled — without it each replica keeps its own quotas and issued keys" }}
{{- end }}
{{- $redisModes := 0 }}
{{- range (list .Values.redis.url .Values.redis.existingSecret .Values.redis.standalone.enabled) }}{{ if . }}{{ $redisModes = add1 $redisModes }}{{ end }}{{ end }}
{{- if gt $redisModes 1 }}
{{- fail "redis: set only one of redis.url, redis.existingSecret, redis.standalone.enabled" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- $server := default dict (get (default dict .Values.gateway.config) "server") }}
{{- if hasKey $server "shutdown_grace" }}
{{- $total := add (int .Values.lifecycle.preStopSleepSeconds) (int (ceil (default 5 (get $server "shutdown_delay")))) (int (ceil $server.shutdown_grace)) }}
{{- if ge $total (int .Values.terminationGracePeriodSeconds) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed lifecycle.preStopSleepSeconds + gateway.config.server.shutdown_delay + shutdown_grace (%d), or Kubernetes kills streams the gateway is still draining" (int .Values.terminationGracePeriodSeconds) $total) }}
{{- end }}
{{- else if lt (int (include "llm-proxy.drainSeconds" .Values)) 1 }}
{{- fail "terminationGracePeriodSeconds leaves no time to drain: raise it above lifecycle.preStopSleepSeconds + gateway.config.server.shutdown_delay (default 5) + 5" }}
{{- end }}
{{- with .Values.podDisruptionBudget }}
{{- if and .enabled (not (include "llm-proxy.isSet" .minAvailable)) (not (include "llm-proxy.isSet" .maxUnavailable)) }}
{{- fail "podDisruptionBudget: set minAvailable or maxUnavailable" }}
{{- end }}
{{- end }}
{{- if and (not .Values.gateway.existingConfigMap) (not .Values.gateway.config.upstreams) }}
{{- fail "gateway.config.upstreams must list at least one upstream" }}
{{- end }}
{{- end }}
