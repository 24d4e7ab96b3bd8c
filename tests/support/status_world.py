"""A run's world for the pure status tests: its children and pods in a dictionary, changed as the
controllers would change them, with `derive_status`'s actions applied as the API server would
(create-if-absent, delete). Shared by tests/operator/test_status.py and the GitOps health checks.

Every derived status is validated against the generated CRD's status schema, as the API server
validates a status patch (standin.crd_emulation: OAS 3.0 with openapi-schema-validator, defaulting
first, strict field validation): a field the operator writes that the CRD does not declare, or
declares with another type, fails every status test that reaches it.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from kubetrain_operator.api import SanitySpec
from kubetrain_operator.crd import status_schema
from kubetrain_operator.status import (
    DeleteObject,
    EnsureObject,
    Progress,
    RecordEvent,
    SetSuspend,
    Timing,
    derive_status,
)
from operator_support import PREPROCESS_RESULT, result, stored
from standin import crd_emulation
from standin.controllers import job_status, pod_for

T0 = 1_800_000_000.0
TIMING = Timing(backoff_base=10.0, backoff_max=40.0)
#: The CRD's status schema, built once: the emulation caches its validator per schema object.
STATUS_SCHEMA = status_schema()


def status_schema_errors(status: dict[str, Any]) -> list[str]:
    """`path: problem` for each thing the API server would refuse in this status (unknown fields
    included: strict field validation)."""
    errors = crd_emulation.schema_errors(status, schema=STATUS_SCHEMA)
    return [f"status.{e.path}: {e.message}" if e.path else e.message for e in errors]


def sanity_spec(rungs: int) -> dict[str, Any]:
    """A ladder of `rungs` rungs in whichever shape the API takes (rungs list or one gate)."""
    if "rungs" in SanitySpec.model_fields:
        return {"rungs": [{"steps": 10, "gpus": 0, "minLossDrop": 0.05} for _ in range(rungs)]}
    assert rungs == 1
    return {"steps": 10, "gpus": 0, "minLossDrop": 0.05}


class World:
    """A run, its children and pods; `step` derives, stores the status and applies actions."""

    def __init__(self, doc: dict[str, Any], upstream: dict[str, Any] | None = None) -> None:
        self.run = stored(doc)
        self.children: dict[str, dict[str, Any]] = {}
        self.shared: dict[str, dict[str, Any]] = {}
        self.pods: dict[str, dict[str, Any]] = {}
        self.upstream = upstream
        self.events: list[RecordEvent] = []
        self.actions: list[Any] = []
        self.now = T0

    def step(self, progress: Progress | None = None, dt: float = 1.0) -> list[Any]:
        self.now += dt
        status, actions = derive_status(
            self.run,
            list(self.children.values()),
            list(self.pods.values()),
            progress,
            self.now,
            upstream=self.upstream,
            timing=TIMING,
        )
        json.dumps(status)  # a status is plain JSON
        assert status_schema_errors(status) == [], status
        self.run["status"] = status
        for action in actions:
            if isinstance(action, EnsureObject):
                body, name = action.body, action.body["metadata"]["name"]
                target = self.children if body["kind"] in ("Job", "PyTorchJob") else self.shared
                if name not in target or action.update:
                    target[name] = copy.deepcopy(body)
            elif isinstance(action, DeleteObject):
                self.children.pop(action.name, None)
            elif isinstance(action, SetSuspend):
                child = self.children[action.name]
                if action.kind == "Job":
                    child["spec"]["suspend"] = action.suspend
                else:
                    child["spec"]["runPolicy"]["suspend"] = action.suspend
            elif isinstance(action, RecordEvent):
                self.events.append(action)
        self.actions = actions
        return actions

    # ---------------------------------------------------------------------- the controllers
    def child(self, stage: str) -> dict[str, Any]:
        """The stage's child (for train: the newest attempt)."""
        found = [
            c
            for c in self.children.values()
            if c["metadata"]["labels"]["kubetrain.dev/stage"].startswith(stage)
        ]
        if stage == "train":
            found.sort(key=lambda c: int(c["metadata"]["name"].rsplit("-", 1)[1]))
            return found[-1]
        assert len(found) == 1, (stage, list(self.children))
        return found[0]

    def set_state(self, name: str, state: str, **pod: Any) -> None:
        """The controller reports `state`; pods follow (running, or terminated with a code)."""
        child = self.children[name]
        child["status"] = job_status(child["kind"], state, self.now)
        if state == "running":
            self.pods[name] = pod_for(child, at=self.now)
        elif state in ("succeeded", "failed"):
            code = pod.pop("exit_code", 0 if state == "succeeded" else 1)
            self.pods[name] = pod_for(child, exit_code=code, at=self.now, **pod)
        elif state == "suspended":
            self.pods.pop(name, None)

    def finish(self, stage: str, **pod: Any) -> str:
        name = self.child(stage)["metadata"]["name"]
        self.set_state(name, "running")
        self.step()
        self.set_state(name, "succeeded", **pod)
        self.step()
        return name

    def condition(self, type_: str) -> dict[str, Any]:
        return next(c for c in self.run["status"]["conditions"] if c["type"] == type_)

    @property
    def status(self) -> dict[str, Any]:
        return dict(self.run["status"])


def through_data(world: World, hit: bool = False) -> None:
    world.step()
    world.finish(
        "preprocess", message=result("preprocess", **{**PREPROCESS_RESULT, "cacheHit": hit})
    )


def train_result(step: int = 100) -> str:
    return result(
        "train",
        step=step,
        totalSteps=100,
        loss=1.5,
        checkpoint={"step": step, "uri": "s3://out/sft/checkpoints/step-00000100"},
        outputs={"final": "s3://out/sft/final"},
    )
