"""Cluster-wide defaults for what a run's spec leaves unset — typed, validated at construction.

The operator reads them once from its environment (settings.py; the chart sets them) and
`kubetrain render` takes the same values as flags, so both give the same objects. Precedence, for
every field: the run's own spec value, else this default, else the built-in behaviour named on the
field. Only plan.py applies them (one place); render reads the resolved plan.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from kubetrain_operator import __version__
from kubetrain_operator.api import Endpoint, ImageReference, ObjectName, Quantity, Uri

DEFAULT_TRAINER_IMAGE = f"ghcr.io/kubetrain/trainer:{__version__}"
DEFAULT_METRICS_PORT = 9400


class ClusterDefaults(BaseModel):
    """What the cluster's operator fills in for every run; the spec's own value always wins."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    trainer_image: ImageReference = DEFAULT_TRAINER_IMAGE
    """Image of every stage pod of a run without spec.image."""
    trainer_service_account: ObjectName | None = None
    """ServiceAccount of every stage pod (no API access: no Role binds it and its token is never
    mounted). The operator creates it in a run's namespace when it is missing. None: the
    namespace's `default` account, still without a token."""
    image_pull_secrets: tuple[ObjectName, ...] = ()
    """Secrets (in the run's namespace) every stage pod pulls its image with."""
    metrics_port: int = Field(default=DEFAULT_METRICS_PORT, ge=1, le=65535)
    """Port the stage pods serve /metrics on (the metrics Service, the PodMonitor)."""
    cache_root: Uri | None = None
    """Dataset cache (s3:// or pvc://) of runs without spec.storage.cacheRoot, shared across runs
    so that equal data is tokenized once. None: <output.uri>/cache per run."""
    s3_allow_insecure_endpoint: bool = False
    """Allow a plain http:// s3_endpoint (a store on a trusted network); applies to s3_endpoint
    only, never to a run's own endpoint."""
    s3_endpoint: Endpoint = ""
    """S3 endpoint of runs whose spec.storage.s3.endpoint is empty. Empty: AWS."""
    s3_secret_name: ObjectName | None = None
    """Secret (in the run's namespace) with the S3 keys, for runs without
    spec.storage.s3.secretName that read or write s3:// URIs."""
    gpu_memory: Quantity | None = None
    """Memory of the cluster's GPUs (e.g. 80Gi) for the fit check of runs that say neither
    resources.gpuMemory nor a GPU Feature Discovery label in their nodeSelector. None: those runs
    are not checked."""

    @field_validator("cache_root")
    @classmethod
    def _reachable_from_pods(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("s3://", "pvc://")):
            raise ValueError(
                "a pod cannot reach a local path — use s3://BUCKET/prefix or pvc://CLAIM/path"
            )
        return value

    @field_validator("s3_endpoint")
    @classmethod
    def _encrypted_unless_allowed(cls, value: str, info: ValidationInfo) -> str:
        if value.startswith("http://") and not info.data.get("s3_allow_insecure_endpoint"):
            raise ValueError(
                "is plain http: credentials and data would cross the network unencrypted — use "
                "https://, or allow an insecure endpoint for a store on a trusted network"
            )
        return value


#: No cluster: the built-in behaviour (local runs, tests, `kubetrain render` without flags).
NO_DEFAULTS = ClusterDefaults()
