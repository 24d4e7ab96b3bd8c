"""A run's children, their pods and the trainer's metrics → its status and next actions — pure.

The package by job: `vocabulary` (condition types, reasons, phases), `actions` (what the caller
carries out), `timing` (timestamps, durations, backoff), `redaction` (pod messages made safe),
`observation` (children and pods → ChildState; a scrape → Progress), `builder` (conditions and
the kstatus summary), `lifecycle` (the walk over the stages, by role) and `derive`
(`derive_status`, the entry point). This module is its public API: what reconcile, progress,
settings and the tests use.
"""

from kubetrain_operator.status.actions import (
    Action as Action,
)
from kubetrain_operator.status.actions import (
    DeleteObject as DeleteObject,
)
from kubetrain_operator.status.actions import (
    EnsureObject as EnsureObject,
)
from kubetrain_operator.status.actions import (
    RecordEvent as RecordEvent,
)
from kubetrain_operator.status.actions import (
    RequeueAfter as RequeueAfter,
)
from kubetrain_operator.status.actions import (
    SetSuspend as SetSuspend,
)
from kubetrain_operator.status.derive import (
    derive_status as derive_status,
)
from kubetrain_operator.status.lifecycle import (
    SCRAPED_ROLES as SCRAPED_ROLES,
)
from kubetrain_operator.status.observation import (
    POD_REPORT_GRACE as POD_REPORT_GRACE,
)
from kubetrain_operator.status.observation import (
    ChildState as ChildState,
)
from kubetrain_operator.status.observation import (
    Progress as Progress,
)
from kubetrain_operator.status.observation import (
    observe_child as observe_child,
)
from kubetrain_operator.status.observation import (
    pod_terminated as pod_terminated,
)
from kubetrain_operator.status.redaction import (
    redact as redact,
)
from kubetrain_operator.status.timing import (
    Timing as Timing,
)
from kubetrain_operator.status.vocabulary import *  # noqa: F403 (the condition, reason and phase words)
