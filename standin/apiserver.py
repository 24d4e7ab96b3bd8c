"""The API server stand-in: kmock's `KubernetesEmulator`, completed into what kubectl, the
`kubernetes` client and Kopf need from a small cluster.

Plain kmock 0.8 keeps objects as merged dicts: no resourceVersion (Kopf's guarded JSON patch fails),
no namespaces list, watches that replay everything. This subclass keeps kmock's HTTP server, request
parsing and recording (and any reactions a test adds with kmock's DSL, which still win), and
serves the Kubernetes semantics itself:

- metadata the server owns: uid, resourceVersion (one counter, as etcd's revision), generation
  (bumped when anything but metadata and status changes), creationTimestamp, generateName;
- 404 NotFound, 409 AlreadyExists / Conflict (stale resourceVersion on PUT or in a patch),
  422 Invalid with causes, in the `Status` shape (errors.py);
- the status subresource: writes to the main resource keep the stored status, writes to /status
  change only status;
- PATCH as JSON patch, merge patch and strategic merge patch (patching.py);
- list and watch with label and field selectors; watches honour resourceVersion (events after it
  are replayed from a bounded log, older ones get 410 Gone as after an etcd compaction) and end at
  `timeoutSeconds`; no BOOKMARK events are sent;
- deletion with finalizers (deletionTimestamp until the last one goes), graceful pod deletion
  (the kubelet stand-in finishes it), propagationPolicy Background/Foreground/Orphan, and the
  garbage collector: objects whose every owner is gone are deleted;
- namespaces (default, kube-system, kube-public exist; deleting one deletes its contents);
- discovery and OpenAPI v3 (discovery.py), server-side Table output (tables.py);
- CustomResourceDefinitions: creating one registers its resource (Established), deleting it
  removes the resource and its objects; custom resources are admitted against the schema
  (admission.py: pruning, defaulting, OpenAPI validation, CEL incl. transition rules).

Built on kmock's public names only (`kmock.KubernetesEmulator`, `RawHandler`, `Request`,
`Server`), but it reaches two of their private methods: `Request._parse` (kmock's request parser,
reused so kmock's recording and DSL see the same requests) and `RawHandler._handle` (kmock's
reactions, tried first). Those are not API, so pyproject pins kmock exactly (`kmock==0.8`);
a new kmock needs this module's serving path re-read before the pin moves.

Not emulated: authentication and RBAC (every request is allowed; `calls()` records what was asked
so tests can compare it with an RBAC list), server-side apply, conversion webhooks and multiple
stored versions, admission webhooks other than the defaulters registered by controller stand-ins,
protobuf, pagination (`limit` is ignored; lists are complete), field managers.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import datetime
import json
import logging
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp.web
import attrs
import kmock
import yaml

from . import discovery, protobuf, tables
from .admission import admit_custom, name_causes
from .errors import (
    PATCH_TYPES,
    ApiError,
    Cause,
    already_exists,
    bad_request,
    conflict,
    invalid,
    not_found,
    stale,
    unsupported_media,
)
from .patching import PatchError, json_patch, merge_patch, strategic_merge_patch
from .resources import BUILTINS, ResourceType, clone, from_crd
from .selection import field_selector, label_selector

BODY_TYPES = ("application/json", "application/yaml", "application/vnd.kubernetes.protobuf")
STRATEGIC = "application/strategic-merge-patch+json"
LOG_LIMIT = 20000  # watch events kept for resourceVersion replays
GC_RESYNC_SECONDS = 2.0  # the garbage collector's pass when no deletion woke it
Obj = dict[str, Any]
Mutator = Callable[[Obj, Obj | None], None]


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Call:
    """One request as RBAC sees it: verb, API group, resource (with subresource), namespace."""

    verb: str
    group: str
    resource: str
    namespace: str | None
    name: str | None
    code: int
    user_agent: str
    path: str


@dataclass
class Event:
    rv: int
    key: tuple[str, str]
    type: str
    obj: Obj
    old: Obj | None


@dataclass
class Route:
    rt: ResourceType
    namespace: str | None
    name: str | None
    sub: str | None


@dataclass
class Hooks:
    """What controller stand-ins plug into the server: defaulting webhooks, per (group, plural)."""

    mutators: dict[tuple[str, str], list[Mutator]] = field(default_factory=dict)


@attrs.define(kw_only=True)
class StandInAPIServer(kmock.KubernetesEmulator):
    _types: dict[tuple[str, str, str], ResourceType] = attrs.field(factory=dict, init=False)
    _store: dict[tuple[str, str], dict[tuple[str, str], Obj]] = attrs.field(
        factory=dict, init=False
    )
    _rv: int = attrs.field(default=1, init=False)
    _log: list[Event] = attrs.field(factory=list, init=False)
    _log_rvs: list[int] = attrs.field(factory=list, init=False)
    _changed: asyncio.Condition = attrs.field(factory=asyncio.Condition, init=False)
    _gc_wake: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    _calls: list[Call] = attrs.field(factory=list, init=False)
    hooks: Hooks = attrs.field(factory=Hooks, init=False)
    kubelet: Any = attrs.field(default=None, init=False)
    address: str = attrs.field(default="127.0.0.1:0")

    def __attrs_post_init__(self) -> None:
        # kmock's own fallbacks are replaced by `_serve` (see `_handle`); reactions a test adds
        # with kmock's DSL are still matched first.
        for rt in BUILTINS:
            self._register(rt)
        for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self._put_new(
                self._type("", "v1", "namespaces"),
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": ns},
                    "spec": {"finalizers": ["kubernetes"]},
                    "status": {"phase": "Active"},
                },
            )

    # ---------------------------------------------------------------------------- public API

    def calls(self) -> list[Call]:
        """Every API request served so far, as RBAC would classify it."""
        return list(self._calls)

    def objects(self, group: str, plural: str, namespace: str | None = None) -> list[Obj]:
        """Current objects of a resource (copies), for assertions and the controller stand-ins."""
        found = self._store.get((group, plural), {})
        return [
            clone(o) for (ns, _), o in sorted(found.items()) if namespace is None or ns == namespace
        ]

    def get(self, group: str, plural: str, namespace: str | None, name: str) -> Obj | None:
        found = self._store.get((group, plural), {}).get((namespace or "", name))
        return clone(found) if found is not None else None

    def resource_type(self, group: str, plural: str) -> ResourceType:
        for rt in self._types.values():
            if rt.key == (group, plural):
                return rt
        raise KeyError((group, plural))

    async def write(
        self,
        verb: str,
        group: str,
        plural: str,
        namespace: str | None,
        body: Obj | None = None,
        name: str | None = None,
        sub: str | None = None,
    ) -> Obj:
        """The controller stand-ins' client: the same code path as HTTP, without the wire."""
        rt = self.resource_type(group, plural)
        route = Route(rt, namespace if rt.namespaced else None, name, sub)
        warnings: list[str] = []
        if verb == "create":
            return await self._create(route, clone(body or {}), {}, warnings)
        if verb == "update":
            return await self._update(route, clone(body or {}), {}, warnings)
        if verb == "merge":
            return await self._patch(route, "application/merge-patch+json", body, {}, warnings)
        if verb == "delete":
            return await self._delete(route, body or {}, {})
        raise ValueError(verb)

    async def wait_changed(self, since: int, timeout: float) -> int:
        """Wait until the resourceVersion passes `since` (or timeout); the current one."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(lambda: self._rv > since), timeout)
        return self._rv

    @property
    def resource_version(self) -> int:
        return self._rv

    # ------------------------------------------------------------------------------- serving

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # As kmock's RawHandler.__call__, except that a path kmock's parser fails on
        # (/api/v1/namespaces: no name after "namespaces") is still served: `_route` parses
        # every path itself. A bug in the stand-in is a 500 Status and a logged traceback.
        body = await raw_request.read()
        try:
            request = await kmock.Request._parse(raw_request, id=len(self._requests))
        except ValueError:
            request = kmock.Request(
                id=len(self._requests),
                raw_request=raw_request,
                url=raw_request.url,
                method=raw_request.method,
                params=dict(raw_request.query),
                headers=dict(raw_request.headers),
                body=body,
                text=body.decode(errors="replace"),
                data=json.loads(body) if body.strip().startswith((b"{", b"[")) else None,
            )
        self._requests.append(request)
        try:
            return await self._handle(request)
        except Exception as error:
            logging.getLogger(__name__).exception(
                "stand-in bug serving %s %s", raw_request.method, raw_request.path
            )
            return aiohttp.web.json_response(
                ApiError(500, "InternalError", f"stand-in bug: {error!r}").status(), status=500
            )

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if self._payloads:
            try:
                return await kmock.RawHandler._handle(self, request)
            except NotImplementedError:
                pass
        code = 200
        route: Route | None = None
        try:
            route = (
                self._route(request) if request.url.path.startswith(("/api/", "/apis/")) else None
            )
            response = await self._serve(request, route)
            code = response.status
        except ApiError as error:
            code = error.code
            response = aiohttp.web.json_response(
                error.status(), status=error.code, headers=error.headers or None
            )
        except PatchError as error:
            code = error.code
            response = aiohttp.web.json_response(
                ApiError(
                    error.code, "Invalid" if error.code == 422 else "BadRequest", error.message
                ).status(),
                status=error.code,
            )
        if route is not None:
            self._record(request, route, code)
        return response

    def _record(self, request: kmock.Request, route: Route, code: int) -> None:
        method = request.method.value if request.method else ""
        params = request.params
        if method == "GET":
            verb = (
                "watch"
                if str(params.get("watch", "")).lower() in ("true", "1")
                else "get"
                if route.name
                else "list"
            )
        else:
            verb = {
                "POST": "create",
                "PUT": "update",
                "PATCH": "patch",
                "DELETE": "delete" if route.name else "deletecollection",
            }.get(method, method)
        resource = route.rt.plural + (f"/{route.sub}" if route.sub else "")
        self._calls.append(
            Call(
                verb,
                route.rt.group,
                resource,
                route.namespace,
                route.name,
                code,
                request.headers.get("User-Agent", ""),
                request.url.path,
            )
        )

    def _route(self, request: kmock.Request) -> Route | None:
        parts = request.url.path.strip("/").split("/")
        if parts[0] == "api":
            group, rest = "", parts[1:]
        else:
            group, rest = parts[1], parts[2:]
            if not rest:
                return None
        if not rest:
            return None
        version, rest = rest[0], rest[1:]
        if not rest:
            return None
        namespace = None
        if (
            rest[0] == "namespaces"
            and len(rest) >= 3
            and not (group == "" and rest[2] in ("status", "finalize"))
        ):
            namespace, rest = rest[1], rest[2:]
        plural = rest[0]
        name = rest[1] if len(rest) > 1 else None
        sub = "/".join(rest[2:]) or None
        rt = self._types.get((group, version, plural))
        if rt is None or (namespace is not None and not rt.namespaced):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if sub is not None and sub not in rt.subresources:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return Route(rt, namespace, name, sub)

    async def _serve(
        self, request: kmock.Request, route: Route | None
    ) -> aiohttp.web.StreamResponse:
        path = request.url.path.rstrip("/") or "/"
        method = request.method.value if request.method else "GET"
        params = dict(request.params)
        if route is None:
            return self._serve_meta(path, method, params)
        warnings: list[str] = []
        accept = request.headers.get("Accept", "")
        if method == "GET" and route.sub == "log":
            return aiohttp.web.Response(
                text=self.pod_log(route.namespace, route.name or ""), content_type="text/plain"
            )
        if method == "GET" and str(params.get("watch", "")).lower() in ("true", "1"):
            return await self._watch(request, route, params, accept)
        if method == "GET" and route.name is None:
            return aiohttp.web.json_response(self._list(route, params, accept))
        if method == "GET":
            obj = self._get_or_404(route)
            if tables.wants_table(accept):
                obj = tables.to_table(route.rt, [obj], str(self._rv), params)
            return aiohttp.web.json_response(obj)
        if method == "DELETE" and route.name is None:
            return aiohttp.web.json_response(await self._delete_collection(route, params))
        if method == "DELETE":
            options = request.data if isinstance(request.data, dict) else {}
            return aiohttp.web.json_response(await self._delete(route, options, params))
        content_type = request.headers.get("Content-Type", "")
        if "protobuf" in content_type:
            try:  # kubectl create secret|configmap|namespace|serviceaccount
                body = protobuf.decode(request.body)
            except protobuf.Undecodable as why:
                raise unsupported_media(content_type, BODY_TYPES, str(why)) from None
        elif "cbor" in content_type:
            raise unsupported_media(content_type, BODY_TYPES, "the stand-in decodes no CBOR")
        else:
            body = self._decode(request)
        if method == "POST" and route.name is None:
            obj = await self._create(route, body, params, warnings)
            return self._respond(obj, 201, warnings)
        if method == "PUT" and route.name is not None:
            return self._respond(await self._update(route, body, params, warnings), 200, warnings)
        if method == "PATCH" and route.name is not None:
            kind = request.headers.get("Content-Type", "").split(";")[0].strip()
            return self._respond(
                await self._patch(route, kind, body, params, warnings), 200, warnings
            )
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")

    def _respond(self, obj: Obj, code: int, warnings: list[str]) -> aiohttp.web.StreamResponse:
        response = aiohttp.web.json_response(obj, status=code)
        for text in warnings:
            response.headers.add("Warning", f'299 - "{text}"'.replace('""', '"'))
        return response

    def _decode(self, request: kmock.Request) -> Any:
        """JSON (as kmock parsed it) or YAML; both are what the API server accepts."""
        if isinstance(request.data, (dict, list)):
            return request.data
        try:
            return yaml.safe_load(request.text) if request.text.strip() else {}
        except yaml.YAMLError as error:
            raise bad_request(f"the body of the request could not be decoded: {error}") from None

    def _serve_meta(
        self, path: str, method: str, params: dict[str, str]
    ) -> aiohttp.web.StreamResponse:
        types = list(self._types.values())
        if method != "GET":
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {path}")
        body: Any
        if path == "/":
            body = {
                "paths": sorted(
                    {
                        "/api",
                        "/api/v1",
                        "/apis",
                        "/version",
                        "/openapi/v3",
                        "/healthz",
                        "/readyz",
                        "/livez",
                    }
                    | {
                        f"/apis/{g}/{v}"
                        for g, vs in discovery.group_versions(types).items()
                        if g
                        for v in vs
                    }
                )
            }
        elif path in ("/healthz", "/readyz", "/livez"):
            return aiohttp.web.Response(text="ok")
        elif path == "/version":
            body = discovery.VERSION
        elif path == "/api":
            body = discovery.api_versions(self.address)
        elif path == "/api/v1":
            body = discovery.resource_list(types, "", "v1")
        elif path == "/apis":
            body = discovery.api_group_list(types)
        elif path.startswith("/apis/") and path.count("/") == 2:
            body = discovery.api_group(types, path.split("/")[2])
        elif path.startswith("/apis/") and path.count("/") == 3:
            _, _, group, version = path.split("/")
            body = (
                discovery.resource_list(types, group, version)
                if version in discovery.group_versions(types).get(group, [])
                else None
            )
        elif path == "/openapi/v3":
            body = discovery.openapi_root(types)
        elif path.startswith("/openapi/v3/"):
            rest = path.removeprefix("/openapi/v3/").split("/")
            group, version = ("", rest[1]) if rest[0] == "api" else (rest[1], rest[2])
            known = version in discovery.group_versions(types).get(group, [])
            body = discovery.openapi_document(types, group, version) if known else None
        elif path == "/standin/calls":  # the call log, for a client in another process
            body = [c.__dict__ for c in self._calls[int(params.get("from", 0)) :]]
        else:
            body = None
        if body is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return aiohttp.web.json_response(body)

    # --------------------------------------------------------------------------- the store

    def _type(self, group: str, version: str, plural: str) -> ResourceType:
        return self._types[(group, version, plural)]

    def _register(self, rt: ResourceType) -> None:
        self._types[(rt.group, rt.version, rt.plural)] = rt
        self._store.setdefault(rt.key, {})

    def _bucket(self, rt: ResourceType) -> dict[tuple[str, str], Obj]:
        return self._store.setdefault(rt.key, {})

    def _get_or_404(self, route: Route) -> Obj:
        obj = self._bucket(route.rt).get((route.namespace or "", route.name or ""))
        if obj is None:
            raise not_found(route.rt, route.name or "")
        return self._out(route.rt, obj)

    def _out(self, rt: ResourceType, obj: Obj) -> Obj:
        found = clone(obj)
        found["apiVersion"] = rt.api_version
        return found

    def _emit(self, rt: ResourceType, kind: str, obj: Obj, old: Obj | None) -> None:
        self._log.append(Event(self._rv, rt.key, kind, clone(obj), old))
        self._log_rvs.append(self._rv)
        if len(self._log) > LOG_LIMIT:
            del self._log[: LOG_LIMIT // 4]
            del self._log_rvs[: LOG_LIMIT // 4]
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _put_new(self, rt: ResourceType, obj: Obj) -> Obj:
        meta = obj["metadata"]
        meta["uid"] = str(uuid.uuid4())
        meta["resourceVersion"] = self._next_rv()
        meta["generation"] = 1
        meta["creationTimestamp"] = now_iso()
        key = (meta.get("namespace", ""), meta["name"])
        self._bucket(rt)[key] = obj
        with contextlib.suppress(RuntimeError):  # no loop yet: the initial namespaces
            self._emit(rt, "ADDED", obj, None)
        return obj

    # ------------------------------------------------------------------------------- create

    async def _create(
        self, route: Route, body: Any, params: dict[str, str], warnings: list[str]
    ) -> Obj:
        rt = route.rt
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object")
        self._check_kind(rt, body)
        meta = body.setdefault("metadata", {}) or {}
        body["metadata"] = meta
        if rt.namespaced:
            given = meta.get("namespace")
            if given and route.namespace and given != route.namespace:
                raise bad_request(
                    "the namespace of the provided object does not match the "
                    "namespace sent on the request"
                )
            meta["namespace"] = route.namespace or given or "default"
            namespace = self._bucket(self._type("", "v1", "namespaces")).get(
                ("", meta["namespace"])
            )
            if namespace is None:
                raise not_found(self._type("", "v1", "namespaces"), meta["namespace"])
            if namespace["metadata"].get("deletionTimestamp"):
                raise ApiError(
                    403,
                    "Forbidden",
                    f'{rt.plural} "{meta.get("name", "")}" is '
                    f"forbidden: unable to create new content in namespace "
                    f"{meta['namespace']} because it is being terminated",
                )
        else:
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(
                random.choices("bcdfghjklmnpqrstvwxz2456789", k=5)
            )
        for server_owned in (
            "uid",
            "resourceVersion",
            "generation",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
            "managedFields",
        ):
            meta.pop(server_owned, None)
        if rt.has_status:
            body.pop("status", None)
        body["apiVersion"], body["kind"] = rt.api_version, rt.kind
        key = (meta.get("namespace", ""), meta.get("name", ""))
        obj = self._admit(rt, body, None, params, warnings)  # invalid beats exists, as there
        if key in self._bucket(rt):
            raise already_exists(rt, key[1])
        if params.get("dryRun") == "All":
            return obj
        self._put_new(rt, obj)
        self._after_write(rt, obj, None)
        return self._out(rt, obj)

    def _check_kind(self, rt: ResourceType, body: Obj) -> None:
        kind = body.get("kind")
        if kind and kind != rt.kind:
            raise bad_request(
                f"the kind in the data ({kind}) does not match the expected kind ({rt.kind})"
            )
        version = body.get("apiVersion")
        if version and version != rt.api_version:
            raise bad_request(
                f"the API version in the data ({version}) does not match the "
                f"expected API version ({rt.api_version})"
            )

    def _admit(
        self,
        rt: ResourceType,
        obj: Obj,
        old: Obj | None,
        params: dict[str, str],
        warnings: list[str],
    ) -> Obj:
        """Mutating admission (built-in defaulting, registered webhooks), then validation."""
        _builtin_defaults(rt, obj, old)
        for mutate in self.hooks.mutators.get(rt.key, []):
            mutate(obj, old)
        validation = params.get("fieldValidation", "Warn")
        if rt.crd is not None:
            meta = obj["metadata"]
            obj = admit_custom(rt, obj, old, validation, warnings)
            obj["metadata"] = meta
        else:
            causes = name_causes(obj["metadata"].get("name", ""))
            if rt.key == ("apiextensions.k8s.io", "customresourcedefinitions"):
                causes += _crd_causes(obj)
            if causes:
                raise invalid(rt, obj["metadata"].get("name", ""), causes)
        return obj

    # ------------------------------------------------------------------------ update, patch

    async def _update(
        self, route: Route, body: Any, params: dict[str, str], warnings: list[str]
    ) -> Obj:
        rt = route.rt
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object")
        self._check_kind(rt, body)
        old = self._bucket(rt).get((route.namespace or "", route.name or ""))
        if old is None:
            raise not_found(rt, route.name or "")
        given = (body.get("metadata") or {}).get("resourceVersion")
        if given and given != old["metadata"]["resourceVersion"]:
            raise stale(rt, route.name or "")
        return self._commit(route, old, body, params, warnings)

    async def _patch(
        self,
        route: Route,
        content_type: str,
        patch: Any,
        params: dict[str, str],
        warnings: list[str],
    ) -> Obj:
        rt = route.rt
        old = self._bucket(rt).get((route.namespace or "", route.name or ""))
        if old is None:
            raise not_found(rt, route.name or "")
        current = self._out(rt, old)
        if content_type == "application/json-patch+json":
            patched = json_patch(current, patch)
        elif content_type == "application/merge-patch+json":
            patched = merge_patch(current, patch)
        elif content_type == "application/strategic-merge-patch+json":
            if rt.crd is not None:  # as the API server: no patch strategies in a CRD
                raise unsupported_media(content_type, PATCH_TYPES)
            patched = strategic_merge_patch(current, patch)
        else:
            accepted = PATCH_TYPES if rt.crd else (*PATCH_TYPES, STRATEGIC)
            raise unsupported_media(content_type, accepted, "server-side apply is not emulated")
        if not isinstance(patched, dict):
            raise bad_request("the patch did not result in an object")
        given = (
            (patch.get("metadata") or {}).get("resourceVersion")
            if isinstance(patch, dict)
            else None
        )
        if given and given != old["metadata"]["resourceVersion"]:
            raise stale(rt, route.name or "")
        return self._commit(route, old, patched, params, warnings)

    def _commit(
        self, route: Route, old: Obj, new: Obj, params: dict[str, str], warnings: list[str]
    ) -> Obj:
        rt = route.rt
        if route.sub == "status":  # the old object but its status: that is the new one's
            merged = clone({k: v for k, v in old.items() if k != "status"})
            if "status" in new:
                merged["status"] = new["status"]
            else:
                merged.pop("status", None)
        else:
            merged = clone(new)
            if rt.has_status:
                if "status" in old:
                    merged["status"] = clone(old["status"])
                else:
                    merged.pop("status", None)
        meta = merged.setdefault("metadata", {}) or {}
        merged["metadata"] = meta
        for kept in (
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
        ):
            if kept in old["metadata"]:
                meta[kept] = old["metadata"][kept]
            else:
                meta.pop(kept, None)
        meta["resourceVersion"] = old["metadata"]["resourceVersion"]
        merged["apiVersion"], merged["kind"] = rt.api_version, rt.kind
        if old["metadata"].get("deletionTimestamp"):
            added = set(meta.get("finalizers") or []) - set(old["metadata"].get("finalizers") or [])
            if added:
                raise invalid(
                    rt,
                    meta["name"],
                    [
                        Cause(
                            "metadata.finalizers",
                            "Forbidden: no new finalizers can be added if the object is being "
                            f"deleted, found new finalizers {sorted(added)!r}",
                            "FieldValueForbidden",
                        )
                    ],
                )
        merged = self._admit(rt, merged, old, params, warnings)  # admission only reads old
        if _desired(merged) != _desired(old):
            meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        if merged == old:
            return self._out(rt, old)
        if params.get("dryRun") == "All":
            return self._out(rt, merged)
        meta["resourceVersion"] = self._next_rv()
        if not meta.get("finalizers"):
            meta.pop("finalizers", None)
        key = (meta.get("namespace", ""), meta["name"])
        if (
            meta.get("deletionTimestamp")
            and not meta.get("finalizers")
            and not self._graceful(rt, merged)
        ):
            self._remove(rt, key, merged)
            return self._out(rt, merged)
        self._bucket(rt)[key] = merged
        self._emit(rt, "MODIFIED", merged, old)
        self._after_write(rt, merged, old)
        return self._out(rt, merged)

    def _graceful(self, rt: ResourceType, obj: Obj) -> bool:
        """A pod being deleted gracefully stays until the kubelet stand-in has stopped it."""
        return rt.key == ("", "pods") and bool(obj["metadata"].get("deletionGracePeriodSeconds"))

    # --------------------------------------------------------------------------------- delete

    async def _delete(self, route: Route, options: Obj, params: dict[str, str]) -> Obj:
        rt = route.rt
        key = (route.namespace or "", route.name or "")
        obj = self._bucket(rt).get(key)
        if obj is None:
            raise not_found(rt, route.name or "")
        pre = options.get("preconditions") or {}
        if pre.get("uid") and pre["uid"] != obj["metadata"]["uid"]:
            raise conflict(
                rt,
                key[1],
                f"Precondition failed: UID in precondition: {pre['uid']}, "
                f"UID in object meta: {obj['metadata']['uid']}",
            )
        if (
            pre.get("resourceVersion")
            and pre["resourceVersion"] != obj["metadata"]["resourceVersion"]
        ):
            raise conflict(
                rt,
                key[1],
                "Precondition failed: ResourceVersion in precondition: "
                f"{pre['resourceVersion']}, ResourceVersion in object "
                f"meta: {obj['metadata']['resourceVersion']}",
            )
        policy = options.get("propagationPolicy") or params.get("propagationPolicy")
        if options.get("orphanDependents") is True:
            policy = "Orphan"
        if (options.get("dryRun") or params.get("dryRun")) in ("All", ["All"]):
            return self._out(rt, obj)
        if policy == "Orphan":
            self._orphan(obj["metadata"]["uid"])
        grace = options.get("gracePeriodSeconds", params.get("gracePeriodSeconds"))
        updated = clone(obj)
        meta = updated["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if (
            policy == "Foreground"
            and "foregroundDeletion" not in finalizers
            and self._dependents(meta["uid"])
        ):
            finalizers.append("foregroundDeletion")
        if rt.key == ("", "pods"):
            if self.pod_is_running(updated):
                default = updated.get("spec", {}).get("terminationGracePeriodSeconds", 30)
                seconds = int(grace if grace is not None else default)
                if meta.get("deletionGracePeriodSeconds"):
                    seconds = min(seconds, int(meta["deletionGracePeriodSeconds"]))
                if seconds > 0:
                    meta["deletionGracePeriodSeconds"] = seconds
                else:
                    meta.pop("deletionGracePeriodSeconds", None)
                    self.kill_pod(updated, force=True)
            else:
                meta.pop("deletionGracePeriodSeconds", None)
        terminating_ns = rt.key == ("", "namespaces") and bool(
            (updated.get("spec") or {}).get("finalizers")
        )
        if terminating_ns:  # the namespace controller empties it first (collect_garbage)
            updated.setdefault("status", {})["phase"] = "Terminating"
        if finalizers or terminating_ns or self._graceful(rt, updated):
            if not meta.get("deletionTimestamp") or finalizers != list(
                meta.get("finalizers") or []
            ):
                meta.setdefault("deletionTimestamp", now_iso())
                meta.setdefault("deletionGracePeriodSeconds", 0)
                meta["finalizers"] = finalizers
                if not finalizers:
                    meta.pop("finalizers")
                meta["resourceVersion"] = self._next_rv()
                self._bucket(rt)[key] = updated
                self._emit(rt, "MODIFIED", updated, obj)
                self._after_write(rt, updated, obj)
                self._gc_wake.set()  # foreground deletion or a terminating namespace
            return self._out(rt, self._bucket(rt)[key])
        self._remove(rt, key, updated)
        return self._out(rt, updated)

    async def _delete_collection(self, route: Route, params: dict[str, str]) -> Obj:
        items = self._select(route, params)
        for obj in items:
            meta = obj["metadata"]
            await self._delete(
                Route(route.rt, meta.get("namespace"), meta["name"], None), {}, params
            )
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}

    def _remove(self, rt: ResourceType, key: tuple[str, str], obj: Obj) -> None:
        old = self._bucket(rt).pop(key, None)
        gone = clone(obj)
        gone["metadata"]["resourceVersion"] = self._next_rv()
        self._emit(rt, "DELETED", gone, old)
        self._gc_wake.set()
        if rt.crd is None and rt.key == ("apiextensions.k8s.io", "customresourcedefinitions"):
            self._unregister_crd(gone)
        if rt.key == ("", "pods"):
            self.kill_pod(gone, force=False)

    def _orphan(self, uid: str) -> None:
        for rt_key, bucket in self._store.items():
            rt = self.resource_type(*rt_key)
            for key, obj in list(bucket.items()):
                refs = obj["metadata"].get("ownerReferences") or []
                if any(r.get("uid") == uid for r in refs):
                    updated = clone(obj)
                    updated["metadata"]["ownerReferences"] = [
                        r for r in refs if r.get("uid") != uid
                    ]
                    if not updated["metadata"]["ownerReferences"]:
                        del updated["metadata"]["ownerReferences"]
                    updated["metadata"]["resourceVersion"] = self._next_rv()
                    bucket[key] = updated
                    self._emit(rt, "MODIFIED", updated, obj)

    def _dependents(self, uid: str) -> list[tuple[ResourceType, Obj]]:
        found = []
        for rt_key, bucket in self._store.items():
            for obj in bucket.values():
                if any(r.get("uid") == uid for r in obj["metadata"].get("ownerReferences") or []):
                    found.append((self.resource_type(*rt_key), obj))
        return found

    async def collect_garbage(self) -> None:
        """The garbage collector: delete objects whose every owner is gone; finish foreground
        deletions whose dependents are gone; empty and remove terminating namespaces."""
        uids = {o["metadata"]["uid"] for b in self._store.values() for o in b.values()}
        for rt_key, bucket in list(self._store.items()):
            rt = self.resource_type(*rt_key)
            for (ns, name), obj in list(bucket.items()):
                meta = obj["metadata"]
                refs = meta.get("ownerReferences") or []
                if (
                    refs
                    and not meta.get("deletionTimestamp")
                    and not any(r.get("uid") in uids for r in refs)
                ):
                    await self._delete(
                        Route(rt, ns or None, name, None), {"propagationPolicy": "Background"}, {}
                    )
                if meta.get("deletionTimestamp") and "foregroundDeletion" in (
                    meta.get("finalizers") or []
                ):
                    if not self._dependents(meta["uid"]):
                        updated = clone(obj)
                        updated["metadata"]["finalizers"].remove("foregroundDeletion")
                        self._commit(Route(rt, ns or None, name, None), obj, updated, {}, [])
                    else:
                        for dep_rt, dep in self._dependents(meta["uid"]):
                            if not dep["metadata"].get("deletionTimestamp"):
                                dm = dep["metadata"]
                                await self._delete(
                                    Route(dep_rt, dm.get("namespace"), dm["name"], None),
                                    {"propagationPolicy": "Background"},
                                    {},
                                )
        namespaces = self._type("", "v1", "namespaces")
        for (_, name), ns in list(self._bucket(namespaces).items()):
            if not ns["metadata"].get("deletionTimestamp"):
                continue
            contents = [
                (self.resource_type(*k), key)
                for k, b in self._store.items()
                for key in b
                if key[0] == name
            ]
            for rt, (ons, oname) in contents:
                if not self._bucket(rt)[(ons, oname)]["metadata"].get("deletionTimestamp"):
                    await self._delete(Route(rt, ons, oname, None), {}, {})
            if not contents:
                updated = clone(ns)
                updated["spec"]["finalizers"] = []
                updated["status"]["phase"] = "Terminating"
                self._remove(namespaces, ("", name), updated)

    async def run_garbage_collector(self) -> None:
        """A pass at once after a deletion (what gives the collector work), else every
        GC_RESYNC_SECONDS (a dangling owner reference written by a client): a pass walks every
        object, so passes on a timer alone cost a busy server its throughput."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._gc_wake.wait(), GC_RESYNC_SECONDS)
            self._gc_wake.clear()
            try:
                await self.collect_garbage()
            except Exception:
                logging.getLogger(__name__).exception("garbage collection failed")
            await asyncio.sleep(0.2)  # deletions in a burst share one pass

    # -------------------------------------------------------------------------- list, watch

    def _select(self, route: Route, params: dict[str, str]) -> list[Obj]:
        labels = label_selector(params.get("labelSelector"))
        fields = field_selector(params.get("fieldSelector"))
        found = []
        for (ns, name), obj in sorted(self._bucket(route.rt).items()):
            if route.namespace is not None and ns != route.namespace:
                continue
            if route.name is not None and name != route.name:
                continue
            if labels(obj) and fields(obj):
                found.append(self._out(route.rt, obj))
        return found

    def _list(self, route: Route, params: dict[str, str], accept: str) -> Obj:
        items = self._select(route, params)
        if tables.wants_table(accept):
            return tables.to_table(route.rt, items, str(self._rv), params)
        return {
            "kind": f"{route.rt.kind}List",
            "apiVersion": route.rt.api_version,
            "metadata": {"resourceVersion": str(self._rv)},
            "items": items,
        }

    async def _watch(
        self, request: kmock.Request, route: Route, params: dict[str, str], accept: str
    ) -> aiohttp.web.StreamResponse:
        assert request._raw_request is not None
        loop = asyncio.get_running_loop()
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else 1800.0
        deadline = loop.time() + timeout
        since = params.get("resourceVersion")
        table = tables.wants_table(accept)
        labels = label_selector(params.get("labelSelector"))
        fields = field_selector(params.get("fieldSelector"))
        first = True

        def match(obj: Obj | None) -> bool:
            if obj is None:
                return False
            meta = obj["metadata"]
            if route.namespace is not None and meta.get("namespace") != route.namespace:
                return False
            if route.name is not None and meta.get("name") != route.name:
                return False
            return labels(obj) and fields(obj)

        def encode(kind: str, obj: Obj) -> bytes:
            nonlocal first
            out = self._out(route.rt, obj)
            if table:
                out = tables.to_table(
                    route.rt, [out], out["metadata"]["resourceVersion"], params, headers=first
                )
            first = False
            return json.dumps({"type": kind, "object": out}).encode() + b"\n"

        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request._raw_request)
        chunks: list[bytes] = []
        if since in (None, "", "0") or str(params.get("sendInitialEvents")).lower() == "true":
            cursor = self._rv
            chunks = [encode("ADDED", o) for o in self._select(route, params)]
        else:
            cursor = int(since)
            if self._log_rvs and cursor < self._log_rvs[0] - 1 and cursor < self._rv:
                gone = ApiError(
                    410, "Expired", f"too old resource version: {cursor} ({self._log_rvs[0] - 1})"
                ).status()
                await response.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
                await response.write_eof()
                return response
        if (
            str(params.get("sendInitialEvents")).lower() == "true"
            and str(params.get("allowWatchBookmarks")).lower() == "true"
        ):
            # The one BOOKMARK sent: the end of the initial events of a streaming list
            # (client-go's WatchList, which kubectl wait/delete use), without which it waits.
            chunks.append(
                json.dumps(
                    {
                        "type": "BOOKMARK",
                        "object": {
                            "kind": route.rt.kind,
                            "apiVersion": route.rt.api_version,
                            "metadata": {
                                "resourceVersion": str(cursor),
                                "annotations": {"k8s.io/initial-events-end": "true"},
                            },
                        },
                    }
                ).encode()
                + b"\n"
            )
        try:
            for chunk in chunks:
                await response.write(chunk)
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await self.wait_changed(cursor, remaining)
                start = bisect.bisect_right(self._log_rvs, cursor)
                events = self._log[start:]
                for event in events:
                    cursor = max(cursor, event.rv)
                    if event.key != route.rt.key:
                        continue
                    now_ok, was_ok = match(event.obj), match(event.old)
                    kind = event.type
                    if kind == "MODIFIED" and now_ok and not was_ok:
                        kind = "ADDED"
                    elif kind == "MODIFIED" and was_ok and not now_ok:
                        kind, now_ok = "DELETED", True
                    if now_ok:
                        await response.write(encode(kind, event.obj))
            await response.write_eof()
        except (ConnectionResetError, ConnectionError, asyncio.CancelledError):
            pass
        return response

    # ---------------------------------------------------------------- CRDs, hooks for kinds

    def _after_write(self, rt: ResourceType, obj: Obj, old: Obj | None) -> None:
        if rt.key == ("apiextensions.k8s.io", "customresourcedefinitions"):
            self._register_crd(obj)

    def _register_crd(self, crd: Obj) -> None:
        for rt in from_crd(crd):
            self._register(rt)
        status = crd.setdefault("status", {})
        names = crd["spec"]["names"]
        accepted = {k: v for k, v in names.items()}
        accepted.setdefault("singular", names["kind"].lower())
        accepted.setdefault("listKind", names["kind"] + "List")
        if status.get("acceptedNames") != accepted:
            stamp = now_iso()
            status["acceptedNames"] = accepted
            status["conditions"] = [
                {
                    "type": "NamesAccepted",
                    "status": "True",
                    "reason": "NoConflicts",
                    "message": "no conflicts found",
                    "lastTransitionTime": stamp,
                },
                {
                    "type": "Established",
                    "status": "True",
                    "reason": "InitialNamesAccepted",
                    "message": "the initial names have been accepted",
                    "lastTransitionTime": stamp,
                },
            ]
            status["storedVersions"] = [
                v["name"] for v in crd["spec"]["versions"] if v.get("storage")
            ]
            crd["metadata"]["resourceVersion"] = self._next_rv()
            self._emit(
                self._type("apiextensions.k8s.io", "v1", "customresourcedefinitions"),
                "MODIFIED",
                crd,
                None,
            )

    def _unregister_crd(self, crd: Obj) -> None:
        spec = crd["spec"]
        for key in [k for k, rt in self._types.items() if rt.crd == crd["metadata"]["name"]]:
            del self._types[key]
        self._store.pop((spec["group"], spec["names"]["plural"]), None)

    def register_crd_sync(self, crd: Obj) -> None:
        """Install a CRD at start-up (before the server listens), as a cluster comes with it."""
        rt = self._type("apiextensions.k8s.io", "v1", "customresourcedefinitions")
        body = clone(crd)
        body.setdefault("metadata", {})
        for k in ("creationTimestamp",):
            body["metadata"].pop(k, None)
        causes = _crd_causes(body)
        if causes:
            raise ValueError(f"invalid CRD {body['metadata'].get('name')}: {causes}")
        self._put_new(rt, body)
        self._register_crd(body)

    # The kubelet stand-in (pods.PodRunner) plugs in here; without one, pods never run.
    def pod_is_running(self, pod: Obj) -> bool:
        return self.kubelet is not None and bool(self.kubelet.is_running(pod))

    def kill_pod(self, pod: Obj, *, force: bool) -> None:
        if self.kubelet is not None:
            self.kubelet.kill(pod, force=force)

    def pod_log(self, namespace: str | None, name: str) -> str:
        return str(self.kubelet.log(namespace, name)) if self.kubelet is not None else ""


def _desired(obj: Obj) -> Obj:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _crd_causes(crd: Obj) -> list[Cause]:
    spec = crd.get("spec") or {}
    causes = []
    names = spec.get("names") or {}
    for key in ("plural", "kind"):
        if not names.get(key):
            causes.append(Cause(f"spec.names.{key}", "Required value", "FieldValueRequired"))
    if not spec.get("group"):
        causes.append(Cause("spec.group", "Required value", "FieldValueRequired"))
    if names.get("plural") and spec.get("group"):
        expected = f"{names['plural']}.{spec['group']}"
        if crd.get("metadata", {}).get("name") != expected:
            causes.append(
                Cause(
                    "metadata.name",
                    f'Invalid value: "{crd.get("metadata", {}).get("name")}": '
                    'must be spec.names.plural+"."+spec.group',
                )
            )
    versions = spec.get("versions") or []
    if not versions:
        causes.append(
            Cause(
                "spec.versions",
                "Invalid value: null: must have exactly one version marked as storage version",
            )
        )
    elif sum(1 for v in versions if v.get("storage")) != 1:
        causes.append(
            Cause(
                "spec.versions",
                "Invalid value: must have exactly one version marked as storage version",
            )
        )
    if spec.get("scope") not in ("Namespaced", "Cluster"):
        causes.append(
            Cause(
                "spec.scope",
                f'Unsupported value: "{spec.get("scope")}": '
                'supported values: "Cluster", "Namespaced"',
                "FieldValueNotSupported",
            )
        )
    for index, version in enumerate(versions):
        schema = (version.get("schema") or {}).get("openAPIV3Schema")
        if schema is None:
            causes.append(
                Cause(
                    f"spec.versions[{index}].schema.openAPIV3Schema",
                    "Required value: schemas are required",
                    "FieldValueRequired",
                )
            )
    return causes


def _builtin_defaults(rt: ResourceType, obj: Obj, old: Obj | None) -> None:
    """The defaulting the API server does for the built-in kinds we use."""
    key = rt.key
    if key == ("", "secrets"):
        if not obj.get("type"):
            obj["type"] = "Opaque"
        string_data = obj.pop("stringData", None) or {}
        data = obj.setdefault("data", {}) or {}
        obj["data"] = data
        for k, v in string_data.items():
            data[k] = base64.b64encode(str(v).encode()).decode()
    elif key == ("", "pods") and old is None:
        spec = obj.setdefault("spec", {})
        spec.setdefault("restartPolicy", "Always")
        spec.setdefault("terminationGracePeriodSeconds", 30)
        spec.setdefault("dnsPolicy", "ClusterFirst")
        spec.setdefault("schedulerName", "default-scheduler")
        for container in spec.get("containers", []):
            container.setdefault("terminationMessagePath", "/dev/termination-log")
            container.setdefault("terminationMessagePolicy", "File")
            container.setdefault("imagePullPolicy", "IfNotPresent")
        obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
    elif key == ("", "services") and old is None:
        spec = obj.setdefault("spec", {})
        spec.setdefault("type", "ClusterIP")
        if spec.get("clusterIP") != "None":
            spec["clusterIP"] = "127.0.0.1"  # every Service: the host's loopback (docs/standin.md)
            spec["clusterIPs"] = ["127.0.0.1"]
        for port in spec.get("ports", []):
            port.setdefault("protocol", "TCP")
            port.setdefault("targetPort", port.get("port"))
        obj["status"] = {"loadBalancer": {}}
    elif key == ("batch", "jobs") and old is None:
        spec = obj.setdefault("spec", {})
        spec.setdefault("completions", 1)
        spec.setdefault("parallelism", 1)
        spec.setdefault("backoffLimit", 6)
        spec.setdefault("suspend", False)
        spec.setdefault("completionMode", "NonIndexed")
        template = spec.setdefault("template", {})
        labels = template.setdefault("metadata", {}).setdefault("labels", {})
        labels["batch.kubernetes.io/job-name"] = obj["metadata"]["name"]
        labels["job-name"] = obj["metadata"]["name"]
    elif key == ("", "namespaces") and old is None:
        obj.setdefault("spec", {})["finalizers"] = ["kubernetes"]  # PrepareForCreate sets it
        obj["status"] = {"phase": "Active"}
    elif key == ("", "persistentvolumeclaims") and old is None:
        obj["status"] = {"phase": "Bound"}
