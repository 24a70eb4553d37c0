{{/*
Names. A Job's name is also the value of its pods' job-name label (63 characters at most) and,
with "-<index>" added, its pods' host names; so the base name leaves room for "-workers-NNNN".
*/}}
{{- define "tether.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tether.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tether.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tether.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tether.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "tether.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tether
{{- end }}

{{/*
Checks that the schema cannot express, each failing with one sentence. The store URI is never
echoed: it holds the password.
*/}}
{{- define "tether.validate" -}}
{{- $_ := required "run.id is required: a stable id makes a re-install or a retried Job create the same run again instead of a second one (--set run.id=NAME)" .Values.run.id }}
{{- $_ = required "image.repository is required: an image with `pip install tether-ps` and your task (--set image.repository=REPO)" .Values.image.repository }}
{{- $store := .Values.store }}
{{- if and $store.uri $store.existingSecret }}
{{- fail "store: give store.uri or store.existingSecret, not both" }}
{{- end }}
{{- if not (or $store.uri $store.existingSecret) }}
{{- fail "store: give store.uri (a MongoDB replica set URI) or store.existingSecret (a Secret holding one, key store.secretKey)" }}
{{- end }}
{{- if $store.uri }}
{{- $uri := lower $store.uri }}
{{- if hasPrefix "sqlite:" $uri }}
{{- fail "store.uri: SQLite is a one-machine store and cannot be shared by pods; give a MongoDB replica set URI (mongodb:// or mongodb+srv://)" }}
{{- end }}
{{- if not (or (hasPrefix "mongodb://" $uri) (hasPrefix "mongodb+srv://" $uri)) }}
{{- fail "store.uri: expected a MongoDB URI (mongodb:// or mongodb+srv://)" }}
{{- end }}
{{- end }}
{{- $previous := 0 }}
{{- range .Values.members.failJobExitCodes }}
{{- if le (int64 .) (int64 $previous) }}
{{- fail "members.failJobExitCodes: give the exit codes in increasing order (Kubernetes requires it)" }}
{{- end }}
{{- $previous = . }}
{{- end }}
{{- end }}

{{- define "tether.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "tether.storeSecretName" -}}
{{- default (printf "%s-store" (include "tether.fullname" .)) .Values.store.existingSecret }}
{{- end }}

{{/*
What every container reads (DESIGN §12): the run, and the store from a Secret, never inline.
*/}}
{{- define "tether.env" -}}
- name: TETHER_RUN
  value: {{ .Values.run.id | quote }}
- name: TETHER_STORE
  valueFrom:
    secretKeyRef:
      name: {{ include "tether.storeSecretName" . }}
      key: {{ .Values.store.secretKey | quote }}
{{- with .Values.store.database }}
- name: TETHER_STORE_DB
  value: {{ . | quote }}
{{- end }}
{{- if .Values.tls.existingSecret }}
{{- /* TLS files from the Secret mounted by tether.memberJob (DESIGN §13). */}}
- name: TETHER_TLS_CERT
  value: /etc/tether/tls/tls.crt
- name: TETHER_TLS_KEY
  value: /etc/tether/tls/tls.key
- name: TETHER_TLS_SERVER_NAME
  value: {{ .Values.tls.serverName | quote }}
{{- if .Values.tls.mutual }}
- name: TETHER_TLS_CA
  value: /etc/tether/tls/ca.crt
{{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Short NoExecute tolerations (instead of the default 300 s) so that the pods of a lost node are
evicted, and their indexes started again elsewhere, soon; then the global and the role's own.
Takes (dict "root" $ "extra" LIST).
*/}}
{{- define "tether.tolerations" -}}
{{- $seconds := .root.Values.members.nodeLossTolerationSeconds | int64 }}
{{- range list "node.kubernetes.io/unreachable" "node.kubernetes.io/not-ready" }}
- key: {{ . }}
  operator: Exists
  effect: NoExecute
  tolerationSeconds: {{ $seconds }}
{{- end }}
{{- with .root.Values.tolerations }}
{{ toYaml . }}
{{- end }}
{{- with .extra }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The pod-level settings every pod shares. Takes (dict "root" $ "nodeSelector" MAP "tolerations"
LIST "affinity" MAP).
*/}}
{{- define "tether.podSettings" -}}
{{- $root := .root }}
restartPolicy: Never
automountServiceAccountToken: false
enableServiceLinks: false
terminationGracePeriodSeconds: {{ $root.Values.members.terminationGracePeriodSeconds | int64 }}
{{- with $root.Values.serviceAccountName }}
serviceAccountName: {{ . }}
{{- end }}
{{- with $root.Values.image.pullSecrets }}
imagePullSecrets:
{{- range . }}
{{- if kindIs "string" . }}
  - name: {{ . }}
{{- else }}
  - {{ toYaml . | nindent 4 | trim }}
{{- end }}
{{- end }}
{{- end }}
{{- with $root.Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with merge (deepCopy (default (dict) .nodeSelector)) (deepCopy $root.Values.nodeSelector) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
tolerations:
  {{- include "tether.tolerations" (dict "root" $root "extra" .tolerations) | trim | nindent 2 }}
{{- end }}

{{/*
A member Job (DESIGN §12): one Indexed Job per role, completions = parallelism = the role's count;
each pod's JOB_COMPLETION_INDEX is its member id. Takes (dict "root" $ "role" "shard"|"worker"
"count" N "section" .Values.shard|.Values.worker "args" LIST "resources" MAP).
*/}}
{{- define "tether.memberJob" -}}
{{- $root := .root }}
{{- $role := .role }}
{{- $section := .section }}
{{- $members := $root.Values.members }}
{{- $component := dict "app.kubernetes.io/component" $role }}
{{- $metrics := $root.Values.metrics }}
{{- $args := .args }}
{{- $annotations := deepCopy (default (dict) $root.Values.podAnnotations) }}
{{- if $metrics.enabled }}
{{- /* Prometheus metrics on the listen host (DESIGN §13), found by the conventional annotations. */}}
{{- $args = concat $args (list "--metrics-port" ($metrics.port | int64 | toString)) }}
{{- $annotations = merge $annotations (dict "prometheus.io/scrape" "true" "prometheus.io/port" ($metrics.port | int64 | toString) "prometheus.io/path" "/metrics") }}
{{- end }}
{{- $affinity := $section.affinity | default $root.Values.affinity }}
{{- if not $affinity }}
{{- /* Soft spreading by host: a node that dies takes as few members of one role as it can. */}}
{{- $selector := merge (include "tether.selectorLabels" $root | fromYaml) $component }}
{{- $term := dict "topologyKey" "kubernetes.io/hostname" "labelSelector" (dict "matchLabels" $selector) }}
{{- $affinity = dict "podAntiAffinity" (dict "preferredDuringSchedulingIgnoredDuringExecution" (list (dict "weight" 100 "podAffinityTerm" $term))) }}
{{- end }}
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ include "tether.fullname" $root }}-{{ $role }}s
  labels:
    {{- include "tether.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ $role }}
spec:
  completionMode: Indexed
  completions: {{ .count | int64 }}
  parallelism: {{ .count | int64 }}
  backoffLimitPerIndex: {{ $members.backoffLimitPerIndex | int64 }}
  maxFailedIndexes: 0
  podReplacementPolicy: {{ $members.podReplacementPolicy }}
  {{- if eq $members.podReplacementPolicy "Failed" }}
  podFailurePolicy:
    rules:
      # A pod lost to a disruption (a node's eviction, preemption, a drain) is replaced without
      # counting against its index's backoffLimitPerIndex.
      - action: Ignore
        onPodConditions:
          - type: DisruptionTarget
            status: "True"
      {{- with $members.failJobExitCodes }}
      # Bad input (exit 2) fails the same way on every retry.
      - action: FailJob
        onExitCodes:
          containerName: {{ $role }}
          operator: In
          values: {{ toJson . }}
      {{- end }}
  {{- end }}
  {{- if not (kindIs "invalid" $members.ttlSecondsAfterFinished) }}
  ttlSecondsAfterFinished: {{ $members.ttlSecondsAfterFinished | int64 }}
  {{- end }}
  template:
    metadata:
      labels:
        {{- include "tether.selectorLabels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ $role }}
        {{- with $root.Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $annotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      {{- include "tether.podSettings" (dict "root" $root "nodeSelector" $section.nodeSelector "tolerations" $section.tolerations "affinity" $affinity) | trim | nindent 6 }}
      {{- with $root.Values.tls.existingSecret }}
      volumes:
        - name: tls
          secret:
            secretName: {{ . | quote }}
            defaultMode: 0400
      {{- end }}
      containers:
        - name: {{ $role }}
          image: {{ include "tether.image" $root | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: {{ toJson $root.Values.tetherCommand }}
          args:
            {{- range $args }}
            - {{ . | quote }}
            {{- end }}
          env:
            # The member's own address, which it advertises in the store (--advertise).
            - name: POD_IP
              valueFrom:
                fieldRef:
                  fieldPath: status.podIP
            {{- include "tether.env" $root | nindent 12 }}
          ports:
            - name: {{ ternary "grpc" "health" (eq $role "shard") }}
              containerPort: {{ $section.port | int64 }}
              protocol: TCP
            {{- if $metrics.enabled }}
            - name: metrics
              containerPort: {{ $metrics.port | int64 }}
              protocol: TCP
            {{- end }}
          {{- if $root.Values.tls.existingSecret }}
          # The kubelet's gRPC probe cannot speak TLS: ready once the port accepts connections.
          readinessProbe:
            tcpSocket:
              port: {{ $section.port | int64 }}
            periodSeconds: 5
          volumeMounts:
            - name: tls
              mountPath: /etc/tether/tls
              readOnly: true
          {{- else }}
          # gRPC health: a shard is ready once it serves its restored state, a worker once it
          # has started.
          readinessProbe:
            grpc:
              port: {{ $section.port | int64 }}
            periodSeconds: 5
          {{- end }}
          {{- with .resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with $root.Values.securityContext }}
          securityContext:
            {{- toYaml . | nindent 12 }}
          {{- end }}
{{- end }}
