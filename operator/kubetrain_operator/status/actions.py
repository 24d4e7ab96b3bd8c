"""What `derive_status` asks its caller to do: plain values, carried out after the status patch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from kubetrain_operator.status.vocabulary import AttemptReason


@dataclass(frozen=True)
class EnsureObject:
    """Create `body` unless it exists; `update`: bring an existing one's data up to date;
    `owned`: owned by the run (False: shared by the namespace's runs, the trainer account)."""

    body: dict[str, Any]
    update: bool = False
    attempt_reason: AttemptReason | None = None
    owned: bool = True


@dataclass(frozen=True)
class DeleteObject:
    """Delete a child (its pods go with it through owner references)."""

    api_version: str
    kind: str
    name: str
    why: str


@dataclass(frozen=True)
class SetSuspend:
    """Suspend or resume a Job (`spec.suspend`) or PyTorchJob (`spec.runPolicy.suspend`)."""

    api_version: str
    kind: str
    name: str
    suspend: bool


@dataclass(frozen=True)
class RecordEvent:
    """A Kubernetes event on the run."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class RequeueAfter:
    """Reconcile again after this many seconds (backoff), even if nothing happens."""

    seconds: float


Action = EnsureObject | DeleteObject | SetSuspend | RecordEvent | RequeueAfter
