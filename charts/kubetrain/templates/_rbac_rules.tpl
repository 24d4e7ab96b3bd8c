{{/* Generated from operator/kubetrain_operator/permissions.py by observability/generate.py (make chart): do not edit. */}}
{{- define "kubetrain.clusterRules" }}
# framework: Kopf discovers the TrainingRun CRD and notices when it is added or removed
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- end }}
{{- define "kubetrain.namespacedRules" }}
# framework: Kopf watches runs and patches its finalizer and progress annotations on them
- apiGroups: ["kubetrain.dev"]
  resources: ["trainingruns"]
  verbs: ["get", "list", "watch", "patch"]
# application: status: conditions, progress, attempts, outputs
- apiGroups: ["kubetrain.dev"]
  resources: ["trainingruns/status"]
  verbs: ["get", "patch"]
# framework: Kopf posts an event per handler outcome and per condition transition
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# framework: the same events through the events.k8s.io API
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create"]
{{- end }}
