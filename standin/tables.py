"""Server-side Table output (`Accept: application/json;as=Table;g=meta.k8s.io;v=v1`).

Custom resources: the CRD's additionalPrinterColumns, evaluated with JSONPath (jsonpath-ng), as
apiextensions-apiserver's tableconvertor does (`date` columns become ages, absent values are
`nil` cells that kubectl prints as `<none>`, `priority > 0` columns only with `-o wide`). Built-in
kinds: the columns of the API server's own printers for what we use (pods, jobs, services, ...).
"""

from __future__ import annotations

import datetime
import functools
from typing import Any

from jsonpath_ng.ext import parse

from .resources import Column, ResourceType

NAME = {
    "name": "Name",
    "type": "string",
    "format": "name",
    "priority": 0,
    "description": "Name must be unique within a namespace.",
}


def wants_table(accept: str) -> bool:
    return "as=Table" in accept


def include_object(params: dict[str, str]) -> str:
    return params.get("includeObject", "Metadata")


def to_table(
    rt: ResourceType,
    objs: list[dict[str, Any]],
    rv: str,
    params: dict[str, str],
    headers: bool = True,
) -> dict[str, Any]:
    table: dict[str, Any] = {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv},
        "columnDefinitions": [],
        "rows": [row(rt, obj, params) for obj in objs],
    }
    if headers:
        table["columnDefinitions"] = [NAME] + [
            {
                "name": c.name,
                "type": c.type if c.type != "date" else "string",
                "format": c.format,
                "description": c.description,
                "priority": c.priority,
            }
            for c in rt.columns
        ]
    return table


def row(rt: ResourceType, obj: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
    cells: list[Any] = [obj["metadata"]["name"]]
    cells += [cell(c, obj) for c in rt.columns]
    found: dict[str, Any] = {"cells": cells}
    mode = include_object(params)
    if mode == "Object":
        found["object"] = obj
    elif mode == "Metadata":
        found["object"] = {
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": obj["metadata"],
        }
    return found


def cell(column: Column, obj: dict[str, Any]) -> Any:
    if column.json_path.startswith(".standin."):
        return COMPUTED[column.json_path.removeprefix(".standin.")](obj)
    matches = [m.value for m in _compiled(column.json_path).find(obj)]
    if not matches:
        return None
    found = matches[0]
    if column.type == "date" and isinstance(found, str):
        return age(found)
    if isinstance(found, (dict, list)):
        return str(found)
    return found


@functools.cache
def _compiled(path: str) -> Any:
    return parse("$" + path)


def age(timestamp: str, now: datetime.datetime | None = None) -> str:
    """k8s.io/apimachinery duration.HumanDuration of the time since `timestamp`."""
    then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    now = now or datetime.datetime.now(datetime.UTC)
    seconds = int((now - then).total_seconds())
    if seconds < -1:
        return "<invalid>"
    seconds = max(seconds, 0)
    if seconds < 120:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    days = hours // 24
    if hours < 24 * 8:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    if days < 365 * 2:
        return f"{days}d"
    return f"{days // 365}y"


# ------------------------------------------------------------------ the built-in printers' cells


def _pod_status(pod: dict[str, Any]) -> str:
    if pod["metadata"].get("deletionTimestamp"):
        return "Terminating"
    status = pod.get("status", {})
    reason = status.get("reason") or status.get("phase", "Pending")
    for cs in status.get("containerStatuses", []):
        state = cs.get("state", {})
        if "waiting" in state and state["waiting"].get("reason"):
            reason = state["waiting"]["reason"]
        elif "terminated" in state:
            term = state["terminated"]
            reason = term.get("reason") or f"ExitCode:{term.get('exitCode')}"
    return reason


def _pod_ready(pod: dict[str, Any]) -> str:
    statuses = pod.get("status", {}).get("containerStatuses", [])
    ready = sum(1 for cs in statuses if cs.get("ready"))
    return f"{ready}/{len(pod.get('spec', {}).get('containers', []))}"


def _restarts(pod: dict[str, Any]) -> int:
    return sum(
        cs.get("restartCount", 0) for cs in pod.get("status", {}).get("containerStatuses", [])
    )


def _job_status(job: dict[str, Any]) -> str:
    for cond in job.get("status", {}).get("conditions", []):
        if cond.get("status") == "True" and cond.get("type") in ("Complete", "Failed", "Suspended"):
            return cond["type"]
    return "Running"


def _completions(job: dict[str, Any]) -> str:
    spec = job.get("spec", {})
    return f"{job.get('status', {}).get('succeeded', 0)}/{spec.get('completions', 1)}"


def _duration(job: dict[str, Any]) -> str:
    status = job.get("status", {})
    start = status.get("startTime")
    if not start:
        return ""
    end = status.get("completionTime")
    now = datetime.datetime.fromisoformat(end.replace("Z", "+00:00")) if end else None
    return age(start, now)


def _ports(svc: dict[str, Any]) -> str:
    ports = svc.get("spec", {}).get("ports", [])
    return ",".join(f"{p.get('port')}/{p.get('protocol', 'TCP')}" for p in ports) or "<none>"


def _data_count(obj: dict[str, Any]) -> int:
    return len(obj.get("data") or {}) + len(obj.get("binaryData") or {})


def _involved(event: dict[str, Any]) -> str:
    ref = event.get("involvedObject", {})
    return f"{str(ref.get('kind', '')).lower()}/{ref.get('name', '')}"


COMPUTED = {
    "podStatus": _pod_status,
    "ready": _pod_ready,
    "restarts": _restarts,
    "jobStatus": _job_status,
    "completions": _completions,
    "duration": _duration,
    "ports": _ports,
    "dataCount": _data_count,
    "involved": _involved,
}
