"""The admission decision, sans I/O: AdmissionReview bytes in, (HTTP status, AdmissionReview) out.

Nothing here touches a socket or a file, so every case the API server can send is a
unit test. The answer is always an AdmissionReview that says why:

- not asking for walcar, not a pod CREATE, or already injected: allowed, no patch;
- a review that cannot be read (no request, no pod object, a spec of the wrong
  shape): allowed with a warning, since the API server validates the pod itself;
- invalid `walcar.io/*` annotations, a namespace the control plane does not know, a
  port clash with the app, a hostNetwork pod, a legacy-mode sidecar in a pod that must
  complete, annotations that would pass Kubernetes' 256 KiB cap: denied, every reason
  listed, so `kubectl` shows it;
- an app container already named `walcar`: allowed unchanged, with a warning;
- a bug in here: answered per `failure_policy` (the webhook's), never an HTTP 500.

Only a body that is not JSON at all gets HTTP 400: the API server never sends one,
so whoever did is told plainly, and there is no request uid to answer to.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from sidecar.inject import annotations as ann
from sidecar.inject import container, render
from sidecar.inject.settings import InjectorSettings
from sidecar.logs import get_logger

log = get_logger("inject")

API_VERSION = "admission.k8s.io/v1"
SUPPORTED_VERSIONS = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")
DEFAULT_GRACE_SECONDS = 30  # what the API server assumes when a pod sets none
MAX_CONFIG_BYTES = 128 * 1024  # all of a pod's annotations together may not exceed 256 KiB
# The API server's cap on one object's annotations (keys + values, apimachinery's
# TotalAnnotationSizeLimitB): past it the pod fails with a generic "Too long" naming no one.
MAX_ANNOTATIONS_BYTES = 256 * 1024
MAX_WARNING_CHARS = 120  # kubectl shows longer warnings truncated


@dataclass
class Decision:
    """What to answer, plus why (`outcome`) for the logs."""

    allowed: bool
    outcome: str
    patch: list[dict[str, Any]] | None = None
    warnings: list[str] = field(default_factory=list)
    message: str = ""
    code: int = 200
    pod: dict[str, str] = field(default_factory=dict)


class Malformed(Exception):
    """The review is not shaped like what the API server sends."""


def _escape(key: str) -> str:
    """A JSON-pointer path segment (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")


def _string_map(value: object, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise Malformed(f"{where} must map strings to strings")
    return value


def _list_of_dicts(value: object, where: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise Malformed(f"{where} must be a list of objects")
    return value


def _add_entries(ops: list[dict[str, Any]], present: dict[str, str] | None, path: str,
                 entries: dict[str, str]) -> None:
    if present is None:
        ops.append({"op": "add", "path": path, "value": entries})
        return
    for key, value in entries.items():
        ops.append({"op": "add", "path": f"{path}/{_escape(key)}", "value": value})


def _append(ops: list[dict[str, Any]], present: list[Any] | None, path: str, items: list[Any],
            first: bool = False) -> None:
    if present is None:
        ops.append({"op": "add", "path": path, "value": items})
        return
    for offset, item in enumerate(items):
        ops.append({"op": "add", "path": f"{path}/{offset}" if first else f"{path}/-", "value": item})


def _has_walcar_container(spec: dict[str, Any]) -> bool:
    names = [c.get("name") for key in ("containers", "initContainers") for c in spec.get(key) or []
             if isinstance(c, dict)]
    return container.CONTAINER_NAME in names


def _annotations_bytes(annotations: dict[str, str]) -> int:
    """What the API server counts against its cap: every key and value, in bytes."""
    return sum(len(key.encode()) + len(value.encode()) for key, value in annotations.items())


def _refusals(spec: dict[str, Any], native: bool) -> list[str]:
    """Pods walcar must not go into, whatever the annotations say."""
    reasons = []
    if spec.get("hostNetwork") is True:
        # on the node's network, walcar's loopback admin/KV ports are the node's: two such pods on
        # one node clash, and every process on the node reaches them
        reasons.append("hostNetwork pods are not injected: walcar's ports would be the node's and clash between "
                       f"pods on one node; drop hostNetwork or {ann.INJECT}")
    if not native and spec.get("restartPolicy") in ("Never", "OnFailure"):
        # a regular container that never exits: the Job (or any run-to-completion pod) never completes
        reasons.append(f"restartPolicy {spec['restartPolicy']} (a Job's pod) needs the native sidecar: as a regular "
                       f"container walcar never exits and the pod never completes; set {ann.NATIVE_SIDECAR}: "
                       '"true" (Kubernetes >= 1.29)')
    return reasons


def _clashes(spec: dict[str, Any], walcar: dict[str, Any], volumes: list[dict[str, Any]]) -> list[str]:
    """Ports or volume names the app already uses: walcar (or the app) would fail to start."""
    ours = {p["containerPort"]: p["name"] for p in walcar["ports"]}
    clashes = []
    for key in ("containers", "initContainers"):
        for app in _list_of_dicts(spec.get(key), f"spec.{key}"):
            for port in _list_of_dicts(app.get("ports"), f"spec.{key}[].ports"):
                number = port.get("containerPort")
                if isinstance(number, int) and number in ours:
                    clashes.append(f"container {app.get('name')!r} declares port {number}, which walcar uses "
                                   f"({ours[number]}): drop that protocol from {ann.PROTOCOLS_KEY} or move the app")
    volumes_now = _list_of_dicts(spec.get("volumes"), "spec.volumes")
    taken = {name for v in volumes_now if isinstance(name := v.get("name"), str)}
    for name in sorted(taken & {v["name"] for v in volumes}):
        clashes.append(f"the pod already has a volume named {name!r}, which walcar needs")
    return clashes


class Injector:
    """Decides one AdmissionReview at a time from the settings and the control plane loaded at start."""

    def __init__(self, settings: InjectorSettings, control_plane: dict[str, Any]) -> None:
        self.settings = settings
        self.control_plane = control_plane

    # --- the HTTP-facing entry point -------------------------------------------------

    def handle(self, body: bytes) -> tuple[int, dict[str, Any], Decision]:
        """Raw request body -> (HTTP status, AdmissionReview to send, decision for the logs)."""
        try:
            review = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            decision = Decision(False, "not-json", message=f"request body is not JSON: {exc}", code=400)
            return 400, self._answer(API_VERSION, "", decision), decision
        uid, version = "", API_VERSION
        if isinstance(review, dict):
            request = review.get("request")
            if isinstance(request, dict) and isinstance(request.get("uid"), str):
                uid = request["uid"]
            if review.get("apiVersion") in SUPPORTED_VERSIONS:
                version = review["apiVersion"]
        try:
            decision = self.decide(review)
        except Exception as exc:  # a bug must still produce an answer
            log.error("decision_failed", exc_info=True, uid=uid)
            decision = self._internal_error(exc)
        decision.pod = pod_identity(review)
        return 200, self._answer(version, uid, decision), decision

    def _internal_error(self, exc: Exception) -> Decision:
        text = f"walcar injector error: {type(exc).__name__}: {exc}"
        if self.settings.failure_policy == "Ignore":
            return Decision(True, "error-ignored", warnings=[text[:MAX_WARNING_CHARS]])
        return Decision(False, "error", message=text, code=500)

    @staticmethod
    def _answer(version: str, uid: str, decision: Decision) -> dict[str, Any]:
        response: dict[str, Any] = {"uid": uid, "allowed": decision.allowed}
        if decision.patch:
            response["patchType"] = "JSONPatch"
            response["patch"] = base64.b64encode(json.dumps(decision.patch).encode()).decode()
        if decision.warnings:
            response["warnings"] = [w[:MAX_WARNING_CHARS] for w in decision.warnings]
        if not decision.allowed:
            response["status"] = {"code": decision.code, "message": decision.message}
        return {"apiVersion": version, "kind": "AdmissionReview", "response": response}

    # --- the decision -------------------------------------------------------------------

    def decide(self, review: object) -> Decision:
        try:
            return self._decide(review)
        except Malformed as exc:
            return Decision(True, "malformed", warnings=[f"walcar: not injected, malformed review: {exc}"])

    def _decide(self, review: object) -> Decision:
        pod = _pod_under_review(review)
        if isinstance(pod, Decision):
            return pod
        metadata = pod.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise Malformed("`metadata` must be an object")
        metadata = metadata or {}
        annotations = _string_map(metadata.get("annotations"), "metadata.annotations")
        labels = _string_map(metadata.get("labels"), "metadata.labels")

        try:
            if not ann.wants_injection(annotations, labels):
                return Decision(True, "not-requested")
        except ann.AnnotationError as exc:
            return self._deny(exc.errors)

        spec = pod.get("spec")
        if not isinstance(spec, dict):
            raise Malformed("`spec` must be an object")
        containers = _list_of_dicts(spec.get("containers"), "spec.containers")
        _list_of_dicts(spec.get("initContainers"), "spec.initContainers")  # walcar goes in front of them
        if not containers:
            raise Malformed("the pod has no containers")
        if annotations.get(ann.STATUS) == "injected":
            return Decision(True, "already-injected")  # a reinvocation, or a pod re-created from its own manifest
        if _has_walcar_container(spec):
            # the app's own container has walcar's name: injecting would make two, and the API
            # server would refuse the pod; say why it runs without walcar instead of skipping silently
            return Decision(True, "name-taken", warnings=[
                f"walcar: not injected: the pod already has a container named {container.CONTAINER_NAME!r}"])

        try:
            options = ann.parse_options(annotations, self.settings)
            document, parsed = render.pod_config(self.control_plane, self.settings, options)
            options = render.sized_memory(parsed, self.settings, options)
        except (ann.AnnotationError, render.RenderError) as exc:
            return self._deny(exc.errors)
        config_text = render.dump(document)
        refusals = _refusals(spec, options.native) or _size_refusals(annotations, config_text)
        if refusals:
            return self._deny(refusals)

        walcar = container.sidecar_container(self.settings, options)
        volumes = container.volumes(self.settings)
        clashes = _clashes(spec, walcar, volumes)
        if clashes:
            return self._deny(clashes)

        ops: list[dict[str, Any]] = []
        if not isinstance(pod.get("metadata"), dict):  # absent or null
            ops.append({"op": "add", "path": "/metadata", "value": {}})
        _add_entries(ops, metadata.get("annotations"), "/metadata/annotations",
                     {ann.STATUS: "injected", ann.CONFIG: config_text})
        _add_entries(ops, metadata.get("labels"), "/metadata/labels", {ann.INJECTED_LABEL: "true"})
        _append(ops, spec.get("volumes"), "/spec/volumes", volumes)
        _add_app_env(ops, containers, container.app_env(self.settings, options))
        if options.native:
            _append(ops, spec.get("initContainers"), "/spec/initContainers", [walcar], first=True)
        else:
            _append(ops, containers, "/spec/containers", [walcar], first=True)

        grace = spec.get("terminationGracePeriodSeconds")
        current = grace if isinstance(grace, int) and not isinstance(grace, bool) else DEFAULT_GRACE_SECONDS
        required = render.required_grace_seconds(parsed)
        if current < required:
            ops.append({"op": "add", "path": "/spec/terminationGracePeriodSeconds", "value": required})
        return Decision(True, "injected", patch=ops, warnings=list(options.warnings))

    @staticmethod
    def _deny(errors: list[str]) -> Decision:
        return Decision(False, "denied", message="walcar: " + "; ".join(errors), code=400)


def _pod_under_review(review: object) -> dict[str, Any] | Decision:
    """The pod of a CREATE review, or the decision for a review that is not about creating a pod."""
    if not isinstance(review, dict):
        raise Malformed("expected an AdmissionReview object")
    request = review.get("request")
    if not isinstance(request, dict):
        raise Malformed("no `request`")
    if not isinstance(request.get("uid"), str):
        raise Malformed("`request.uid` is missing")
    kind = request.get("kind")
    kind_name = kind.get("kind") if isinstance(kind, dict) else None
    if kind_name != "Pod":
        return Decision(True, "not-a-pod", warnings=[f"walcar injects into pods only, not {kind_name!r}"])
    if request.get("operation", "CREATE") != "CREATE":
        return Decision(True, "not-create")
    pod = request.get("object")
    if not isinstance(pod, dict):
        raise Malformed("`request.object` is not a pod")
    return pod


def _size_refusals(annotations: dict[str, str], config_text: str) -> list[str]:
    """Why the config annotation would not fit (walcar's own budget, then Kubernetes' limit)."""
    if len(config_text.encode()) > MAX_CONFIG_BYTES:
        return [f"the walcar config for this pod is {len(config_text)} bytes, over the "
                f"{MAX_CONFIG_BYTES}-byte annotation budget: set {ann.NAMESPACE} to narrow it"]
    total = _annotations_bytes({**annotations, ann.STATUS: "injected", ann.CONFIG: config_text})
    if total > MAX_ANNOTATIONS_BYTES:
        return [f"with walcar's config ({len(config_text.encode())} bytes) the pod's annotations "
                f"would be {total} bytes, over Kubernetes' {MAX_ANNOTATIONS_BYTES}-byte limit: "
                "move the pod's large annotations elsewhere (a ConfigMap) or narrow "
                f"the config with {ann.NAMESPACE}"]
    return []


def _add_app_env(ops: list[dict[str, Any]], containers: list[dict[str, Any]], env: list[dict[str, str]]) -> None:
    """walcar's variables for each app container, except those the pod sets itself (its own win)."""
    for index, app in enumerate(containers):  # before walcar is inserted: indexes are the app's own
        have = [e.get("name") for e in _list_of_dicts(app.get("env"), "env")]
        missing = [e for e in env if e["name"] not in have]
        if missing:
            _append(ops, app.get("env"), f"/spec/containers/{index}/env", missing)


def pod_identity(review: object) -> dict[str, str]:
    """Namespace and name (or generateName) of the pod under review, for logs; empty when unreadable."""
    if not isinstance(review, dict) or not isinstance(review.get("request"), dict):
        return {}
    request = review["request"]
    pod = request.get("object")
    pod = pod if isinstance(pod, dict) else {}
    metadata = pod.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    generated = metadata.get("generateName")
    name = metadata.get("name") or request.get("name") or (f"{generated}*" if generated else "")
    identity = {"namespace": request.get("namespace") or metadata.get("namespace"), "pod": name}
    return {key: str(value) for key, value in identity.items() if value}
