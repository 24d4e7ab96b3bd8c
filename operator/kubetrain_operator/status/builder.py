"""The new status, accumulated from the old one: conditions, the kstatus summary, events."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubetrain_operator.status.actions import Action, RecordEvent
from kubetrain_operator.status.redaction import bounded
from kubetrain_operator.status.timing import format_time
from kubetrain_operator.status.vocabulary import (
    CONDITION_TYPES,
    DATA_READY,
    R_PENDING,
    R_PROGRESSING,
    READY,
    RECONCILING,
    SANITY_PASSED,
    STALLED,
    SUCCEEDED,
    WARNING_REASONS,
)


class StatusBuilder:
    """Accumulates the new status from the old one; conditions keep lastTransitionTime unless
    their status changes, and every change becomes an event."""

    def __init__(self, old: Mapping[str, Any], generation: int, now: float) -> None:
        self.old = old
        self.generation, self.now = generation, now
        self.fields: dict[str, Any] = {
            k: v for k, v in old.items() if k not in ("conditions", "observedGeneration")
        }
        self.old_conditions = {c.get("type"): c for c in old.get("conditions") or []}
        self.conditions: dict[str, dict[str, Any]] = {}
        self.actions: list[Action] = []

    def condition(self, type_: str, status: str, reason: str, message: str = "") -> None:
        previous = self.old_conditions.get(type_)
        if previous is not None and previous.get("status") == status:
            since = previous.get("lastTransitionTime") or format_time(self.now)
        else:
            since = format_time(self.now)
        entry = {
            "type": type_,
            "status": status,
            "reason": reason,
            "message": bounded(message),
            "lastTransitionTime": since,
            "observedGeneration": self.generation,
        }
        self.conditions[type_] = entry
        # A transition: a status that changed, or an abnormal condition raised on the first visit
        # (a run invalid from the start still gets its Warning event).
        changed = previous is None and type_ == STALLED and status == "True"
        changed = changed or (previous is not None and previous.get("status") != status)
        if changed:
            warn = (type_ == STALLED and status == "True") or reason in WARNING_REASONS
            detail = f": {message}" if message else ""
            self.actions.append(
                RecordEvent(
                    "Warning" if warn else "Normal",
                    reason,
                    bounded(f"{type_} is {status}{detail}"),
                )
            )

    def keep(self, type_: str, default_reason: str = R_PENDING) -> None:
        """Carry a stage condition over unchanged (Unknown on the first visit)."""
        previous = self.old_conditions.get(type_)
        if previous is None:
            self.condition(type_, "Unknown", default_reason)
        else:
            self.condition(
                type_, previous["status"], previous.get("reason", ""), previous.get("message", "")
            )

    def summary(self, phase: str, ready: tuple[str, str, str], state: str) -> None:
        """The kstatus trio. state: progressing | done | failed | paused."""
        ready_status, reason, message = ready
        self.fields["phase"] = phase
        self.condition(READY, ready_status, reason, message)
        self.condition(RECONCILING, "True" if state == "progressing" else "False", reason, message)
        self.condition(
            STALLED,
            "True" if state == "failed" else "False",
            reason if state == "failed" else R_PROGRESSING,
            message if state == "failed" else "",
        )
        if state == "failed":
            self.condition(SUCCEEDED, "False", reason, message)
        elif state == "done":
            self.condition(SUCCEEDED, "True", reason, message)
        else:
            self.condition(SUCCEEDED, "Unknown", reason, message)
        for type_ in (DATA_READY, SANITY_PASSED):
            if type_ not in self.conditions:
                self.keep(type_)

    def build(self) -> dict[str, Any]:
        status = dict(self.fields)
        status["observedGeneration"] = self.generation
        status["conditions"] = [self.conditions[t] for t in CONDITION_TYPES if t in self.conditions]
        return status
