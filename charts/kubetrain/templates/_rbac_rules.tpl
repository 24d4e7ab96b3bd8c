{{/* Generated from operator/kubetrain_operator/permissions.py by observability/generate.py (make chart): do not edit. */}}
{{- define "kubetrain.clusterRules" }}
# framework: Kopf discovers the TrainingRun CRD and notices when it is added or removed
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
# framework: with --namespace, Kopf's namespace observer lists and watches namespaces
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- define "kubetrain.namespacedRules" }}
# framework: Kopf watches (indexes) runs and patches its finalizer on them
- apiGroups: ["kubetrain.dev"]
  resources: ["trainingruns"]
  verbs: ["list", "watch", "patch"]
# application: k8s.Cluster.patch_status: conditions, progress, attempts, outputs
- apiGroups: ["kubetrain.dev"]
  resources: ["trainingruns/status"]
  verbs: ["patch"]
# framework: Kopf posts the events k8s.post_event queues (one per condition transition, attempt)
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# application: handlers.run_jobs index (which pokes the run): the preprocess and merge Jobs' status
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["list", "watch"]
# application: k8s.Cluster.create (stage Jobs), set_suspend (spec.suspend), delete (a preprocess stall)
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["create", "patch", "delete"]
# application: handlers.run_pytorchjobs index (which pokes the run): sanity and training jobs' status
- apiGroups: ["kubeflow.org"]
  resources: ["pytorchjobs"]
  verbs: ["list", "watch"]
# application: k8s.Cluster.create (attempts), set_suspend (runPolicy.suspend), delete (stall, failure)
- apiGroups: ["kubeflow.org"]
  resources: ["pytorchjobs"]
  verbs: ["create", "patch", "delete"]
# application: handlers.run_pods index: exit codes, termination messages, pods still running
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# application: k8s.Cluster.create / update_data: the run's stage configs (kept current for attempts)
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["create", "patch"]
# application: k8s.Cluster.create: the run's metrics Service (progress polling, PodMonitor)
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create"]
# application: k8s.Cluster.create: the trainer ServiceAccount where a run starts and it is missing (no Role binds it; stage pods never mount its token)
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["create"]
{{- end }}
