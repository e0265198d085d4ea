"""Per-pod annotations: parsed and validated before anything is injected.

A pod says what it wants with `walcar.io/*` annotations; a typo must not silently
give it a sidecar that listens on the wrong protocol, so every value is checked and
every problem is reported at once (the pod is denied with all of them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from sidecar.config import NAMESPACE_RE
from sidecar.inject.settings import LOG_LEVELS, PROTOCOLS, InjectorSettings

PREFIX = "walcar.io/"
INJECT = "walcar.io/inject"
NATIVE_SIDECAR = "walcar.io/native-sidecar"
NAMESPACE = "walcar.io/namespace"
PROTOCOLS_KEY = "walcar.io/protocols"
CPU = "walcar.io/cpu"
MEMORY = "walcar.io/memory"
LOG_LEVEL = "walcar.io/log-level"
# written by the injector, never by users
STATUS = "walcar.io/status"
CONFIG = "walcar.io/config"
INJECTED_LABEL = "walcar.io/injected"

USER_KEYS = (INJECT, NATIVE_SIDECAR, NAMESPACE, PROTOCOLS_KEY, CPU, MEMORY, LOG_LEVEL)
KNOWN_KEYS = frozenset((*USER_KEYS, STATUS, CONFIG))

_QUANTITY_RE = re.compile(r"^(?P<number>\d+(?:\.\d+)?|\.\d+)(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|[eE][+-]?\d+)?$")


class AnnotationError(Exception):
    """Every invalid walcar.io annotation on a pod, one message each."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("; ".join(errors))


@dataclass(frozen=True)
class PodOptions:
    namespace: str | None
    protocols: tuple[str, ...]
    cpu: str | None
    memory: str | None
    log_level: str
    native: bool
    warnings: tuple[str, ...] = field(default=())
    # the default limit raised to what the sidecar's budgets can hold (render.sized_memory)
    memory_limit: str | None = None


def _boolean(value: str, key: str, errors: list[str]) -> bool | None:
    if value in ("true", "false"):
        return value == "true"
    errors.append(f'{key}: expected "true" or "false", got {value!r}')
    return None


def wants_injection(annotations: dict[str, str], labels: dict[str, str]) -> bool:
    """`walcar.io/inject: "true"` as an annotation (the documented way) or a label (selectable)."""
    errors: list[str] = []
    values = [v for v in (annotations.get(INJECT), labels.get(INJECT)) if v is not None]
    wanted = [_boolean(v, INJECT, errors) for v in values]
    if errors:
        raise AnnotationError(errors)
    return any(wanted)


def _quantity(value: str, key: str, errors: list[str], memory: bool) -> str | None:
    match = _QUANTITY_RE.match(value.strip())
    if match is None:
        example = "256Mi" if memory else "250m"
        errors.append(f"{key}: {value!r} is not a Kubernetes quantity (e.g. {example!r})")
        return None
    try:
        positive = Decimal(match.group("number")) > 0
    except InvalidOperation:  # the regex admits only decimals; keep the guard for safety
        positive = False
    if not positive:
        errors.append(f"{key}: must be greater than zero, got {value!r}")
        return None
    if memory and match.group("suffix") == "m":
        errors.append(f"{key}: {value!r} means milli-bytes; did you mean {match.group('number') + 'Mi'!r}?")
        return None
    return value.strip()


_SUFFIX_BYTES = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50, "Ei": 1 << 60,
                 "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18, "": 1}


def quantity_bytes(value: str) -> int | None:
    """A memory quantity ("256Mi", "1G", "268435456") in bytes; None when it is not one."""
    match = _QUANTITY_RE.match(value.strip())
    if match is None:
        return None
    suffix = match.group("suffix") or ""
    number = Decimal(match.group("number"))
    if suffix[:1] in ("e", "E"):
        return int(number * Decimal(10) ** int(suffix[1:]))
    return int(number * _SUFFIX_BYTES[suffix]) if suffix in _SUFFIX_BYTES else None


def _protocols(value: str, errors: list[str]) -> tuple[str, ...]:
    names = [part.strip() for part in value.split(",") if part.strip()]
    if not names:
        errors.append(f"{PROTOCOLS_KEY}: name at least one of {', '.join(PROTOCOLS)}")
        return ()
    unknown = [name for name in names if name not in PROTOCOLS]
    if unknown:
        errors.append(f"{PROTOCOLS_KEY}: unknown protocol(s) {', '.join(map(repr, unknown))} "
                      f"(known: {', '.join(PROTOCOLS)})")
        return ()
    return tuple(dict.fromkeys(names))  # keep order, drop repeats


def parse_options(annotations: dict[str, str], settings: InjectorSettings) -> PodOptions:
    """Annotations + the injector's defaults -> what this pod gets, or AnnotationError."""
    errors: list[str] = []
    warnings = [
        f"walcar: unknown annotation {key} ignored"
        for key in sorted(annotations)
        if key.startswith(PREFIX) and key not in KNOWN_KEYS
    ]

    namespace = annotations.get(NAMESPACE)
    if namespace is not None and not NAMESPACE_RE.match(namespace):
        errors.append(f"{NAMESPACE}: {namespace!r} is not a walcar namespace name "
                      "(lowercase letters, digits, '-' and '_', at most 63)")

    protocols: tuple[str, ...] = tuple(settings.protocols)
    if PROTOCOLS_KEY in annotations:
        protocols = _protocols(annotations[PROTOCOLS_KEY], errors)
    if namespace is None:
        needing = [p for p in protocols if p in ("memcached", "cql")]
        if needing:
            errors.append(f"{PROTOCOLS_KEY}: {' and '.join(needing)} write(s) to one namespace: "
                          f"set {NAMESPACE} too")

    cpu = _quantity(annotations[CPU], CPU, errors, memory=False) if CPU in annotations else None
    memory = _quantity(annotations[MEMORY], MEMORY, errors, memory=True) if MEMORY in annotations else None

    log_level = annotations.get(LOG_LEVEL, settings.log_level)
    if log_level not in LOG_LEVELS:
        errors.append(f"{LOG_LEVEL}: expected one of {', '.join(LOG_LEVELS)}, got {log_level!r}")

    native: bool | None = settings.native_sidecar
    if NATIVE_SIDECAR in annotations:
        native = _boolean(annotations[NATIVE_SIDECAR], NATIVE_SIDECAR, errors)

    if errors:
        raise AnnotationError(errors)
    return PodOptions(namespace=namespace, protocols=protocols, cpu=cpu, memory=memory, log_level=log_level,
                      native=bool(native), warnings=tuple(warnings))
