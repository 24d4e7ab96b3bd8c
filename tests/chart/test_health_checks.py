"""The GitOps health checks on runs whose status the operator's own code derived.

Real: the Argo CD Lua script runs in a real Lua 5.1 runtime (lupa; Argo CD's gopher-lua is 5.1),
with `obj` set the way Argo CD sets it; the Flux healthCheckExprs are evaluated with cel-python on
the object's top-level fields, as kustomize-controller does. The sample runs come from the
operator's status tests: their World drives the real `derive_status` through a lifecycle
(tests/operator/test_status.py). Not real: Argo CD and Flux themselves (neither can run here); the
order Flux applies the three expressions in (inProgress, failed, current, else in progress) is the
documented one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import celpy
import pytest
import yaml
from lupa import lua51

from chart_support import CHART, ROOT
from operator_support import result, run_doc
from status_world import World, through_data, train_result

LUA = ROOT / "observability" / "argocd-health.lua"
FLUX = ROOT / "observability" / "flux-health-check-exprs.yaml"


# ------------------------------------------------------------------------------- the samples


def created() -> dict[str, Any]:
    return World(run_doc()).run  # no status yet


def preprocessing() -> dict[str, Any]:
    world = World(run_doc())
    world.step()
    return world.run


def training() -> dict[str, Any]:
    world = World(run_doc())
    through_data(world)
    world.set_state(world.child("train")["metadata"]["name"], "running")
    world.step()
    return world.run


def succeeded() -> dict[str, Any]:
    world = World(run_doc())
    through_data(world)
    world.finish("train", message=train_result())
    merged = result("merge", perplexity=3.2, outputs={"merged": "s3://out/sft/merged"})
    world.finish("merge", message=merged)
    return world.run


def failed_preprocessing() -> dict[str, Any]:
    world = World(run_doc())
    world.step()
    name = world.child("preprocess")["metadata"]["name"]
    world.set_state(name, "running")
    world.step()
    error = "12 of 100 rows rejected (12.00%), above maxRejectedFraction 1.00%"
    world.set_state(name, "failed", exit_code=2, message=result("preprocess", False, error=error))
    world.step()
    return world.run


def restarts_exhausted() -> dict[str, Any]:
    world = World(run_doc(maxRestarts=0))
    through_data(world)
    name = world.child("train")["metadata"]["name"]
    world.set_state(name, "running")
    world.step()
    world.set_state(name, "failed", exit_code=1, message=result("train", False, error="OOM"))
    world.step(dt=100)
    return world.run


def suspended() -> dict[str, Any]:
    world = World(run_doc())
    through_data(world)
    name = world.child("train")["metadata"]["name"]
    world.set_state(name, "running")
    world.step()
    world.run["spec"]["suspend"] = True
    world.run["metadata"]["generation"] = 2
    world.step()
    world.set_state(name, "suspended")
    world.step(dt=3600)
    return world.run


def suspend_not_yet_seen() -> dict[str, Any]:
    run = training()
    run["spec"]["suspend"] = True
    run["metadata"]["generation"] = 2  # the operator has not reconciled the edit yet
    return run


SAMPLES: dict[str, tuple[Callable[[], dict[str, Any]], str]] = {
    "created": (created, "Progressing"),
    "preprocessing": (preprocessing, "Progressing"),
    "training": (training, "Progressing"),
    "succeeded": (succeeded, "Healthy"),
    "failed preprocessing": (failed_preprocessing, "Degraded"),
    "restarts exhausted": (restarts_exhausted, "Degraded"),
    "suspended": (suspended, "Suspended"),
    "suspend not yet observed": (suspend_not_yet_seen, "Progressing"),
}
#: Argo CD's health → Flux's: a suspended run is where its owner wants it, so Flux is Current.
FLUX_STATUS = {
    "Healthy": "Current",
    "Suspended": "Current",
    "Degraded": "Failed",
    "Progressing": "InProgress",
}


# ---------------------------------------------------------------------------------- Argo CD


def argocd_health(run: dict[str, Any]) -> dict[str, Any]:
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    assert lua.lua_version == (5, 1)
    lua.globals().obj = lua.table_from(copy.deepcopy(run), recursive=True)
    health = lua.execute(LUA.read_text())
    return dict(health.items())


@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_argocd_lua_health(sample: str) -> None:
    build, expected = SAMPLES[sample]
    health = argocd_health(build())
    assert health["status"] == expected, health
    assert health["message"]


def test_argocd_messages_carry_the_operators_words() -> None:
    run = failed_preprocessing()
    (stalled,) = [c for c in run["status"]["conditions"] if c["type"] == "Succeeded"]
    assert argocd_health(run)["message"] == stalled["message"]
    assert "generation 2" in argocd_health(suspend_not_yet_seen())["message"]


def test_samples_cover_all_four_argocd_states() -> None:
    assert {expected for _, expected in SAMPLES.values()} == {
        "Healthy",
        "Progressing",
        "Degraded",
        "Suspended",
    }


# -------------------------------------------------------------------------------------- Flux


def flux_checks() -> dict[str, Any]:
    (check,) = yaml.safe_load(FLUX.read_text())
    assert (check["apiVersion"], check["kind"]) == ("kubetrain.dev/v1alpha1", "TrainingRun")
    return check


def flux_status(run: dict[str, Any]) -> str:
    env = celpy.Environment()
    activation = {key: celpy.json_to_cel(value) for key, value in run.items()}
    check = flux_checks()
    for key, status in (("inProgress", "InProgress"), ("failed", "Failed"), ("current", "Current")):
        program = env.program(env.compile(check[key]))
        value = program.evaluate(activation)
        if isinstance(value, celpy.CELEvalError):
            raise AssertionError(f"{key}: {value}")
        if value:
            return status
    return "InProgress"


@pytest.mark.parametrize("sample", sorted(set(SAMPLES) - {"created"}))
def test_flux_health_check_exprs(sample: str) -> None:
    build, expected = SAMPLES[sample]
    assert flux_status(build()) == FLUX_STATUS[expected]


def test_both_checks_ship_in_the_chart() -> None:
    for source in (LUA, FLUX):
        assert (CHART / "files" / source.name).read_text() == source.read_text()
