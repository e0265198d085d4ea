"""The package's layers import one way (docs/architecture.md): parse every module's imports and check them.

TYPE_CHECKING imports count too: a type that names an outer layer is a dependency on it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Longest matching prefix wins: sidecar.drain.targets is "targets", the rest of sidecar.drain is "drain".
LAYER_OF = {
    # shared leaves: settings, entry format, logging, secrets, TLS, server plumbing, counters
    "sidecar": "shared",  # the package's own __init__ (its version) only, not everything under it
    "sidecar.config": "shared",
    "sidecar.counters": "shared",
    "sidecar.envelope": "shared",
    "sidecar.http": "shared",
    "sidecar.logs": "shared",
    "sidecar.memcache_keys": "shared",
    "sidecar.applied": "shared",
    "sidecar.offload": "shared",
    "sidecar.progress": "shared",
    "sidecar.secrets": "shared",
    "sidecar.tcp": "shared",
    "sidecar.tls": "shared",
    "sidecar.units": "shared",
    "sidecar.log": "journal",
    "sidecar.drain": "drain",
    "sidecar.drain.targets": "targets",
    "sidecar.ingress": "ingress",
    "sidecar.overlay": "ingress",
    "sidecar.reads": "ingress",
    "sidecar.reused_token": "ingress",
    "sidecar.protocols": "fronts",
    "sidecar.control": "control",
    "sidecar.replay": "replay",
    "sidecar.admin": "admin",
    "sidecar.inject": "inject",
    "sidecar.app": "app",
    "sidecar.cli": "app",
    "sidecar.memory_budget": "shared",
}

# What each layer may import besides itself.
MAY_IMPORT = {
    "shared": set(),
    "journal": {"shared"},
    "targets": {"shared"},
    "drain": {"shared", "journal", "targets"},
    "ingress": {"shared", "journal", "targets"},  # reads of the primary target use its client
    "fronts": {"shared", "ingress"},
    "control": {"shared", "journal"},
    "replay": {"shared", "journal", "drain", "targets"},
    "admin": {"shared", "journal", "drain", "targets", "ingress", "control", "replay"},
    "inject": {"shared"},
    "app": {"shared", "journal", "drain", "targets", "ingress", "fronts", "control", "replay", "admin", "inject"},
}

# The NATS client protocol codec belongs to the journal: no other layer builds NATS frames.
JOURNAL_PRIVATE = ("sidecar.log.wire",)

# Known violations, each being removed by a change in flight. Keep this list short; never add to it
# to make a new import pass.
ALLOWED: set[tuple[str, str]] = set()


def layer_of(module: str) -> str | None:
    prefixes = [p for p in LAYER_OF if module == p or (p != "sidecar" and module.startswith(p + "."))]
    return LAYER_OF[max(prefixes, key=len)] if prefixes else None


def module_name(path: Path) -> tuple[str, str]:
    """(module, the package its relative imports start from)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        name = ".".join(parts[:-1])
        return name, name
    name = ".".join(parts)
    return name, name.rsplit(".", 1)[0]


def is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def imports_of(source: str, package: str) -> set[str]:
    """The sidecar modules `source` imports (`from pkg import submodule` counts as the submodule)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base)
    return {name for name in found if name == "sidecar" or name.startswith("sidecar.")}


def violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, imported in sorted(graph.items()):
        source = layer_of(module)
        if source is None:
            problems.append(f"{module}: in no layer (add it to LAYER_OF here and to docs/architecture.md)")
            continue
        for target in sorted(imported):
            if (module, target) in ALLOWED:
                continue
            dest = layer_of(target)
            if dest is None:
                continue  # reported as a module of its own
            if dest != source and dest not in MAY_IMPORT[source]:
                problems.append(f"{module} ({source}) imports {target} ({dest})")
            elif target.startswith(JOURNAL_PRIVATE) and source != "journal":
                problems.append(f"{module} ({source}) imports {target}, the journal's own NATS codec")
    return problems


def sidecar_graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted((ROOT / "sidecar").rglob("*.py")):
        module, package = module_name(path)
        graph[module] = imports_of(path.read_text(), package)
    return graph


def test_layers_import_one_way() -> None:
    problems = violations(sidecar_graph())
    assert not problems, "\n".join(problems)


def test_allowed_violations_still_exist() -> None:
    """An allow-list entry whose import is gone is removed, so the list only ever shrinks."""
    graph = sidecar_graph()
    stale = sorted(f"{m} -> {t}" for m, t in ALLOWED if t not in graph.get(m, set()))
    assert not stale, "remove from ALLOWED: " + ", ".join(stale)


def test_the_check_sees_a_wrong_way_import() -> None:
    graph = {
        "sidecar.log.journal": {"sidecar.protocols.kv.app"},  # the journal knowing a front
        "sidecar.drain.partition": {"sidecar.ingress"},  # the drain reaching into ingress
        "sidecar.protocols.kv.models": {"sidecar.log.wire"},  # a front building NATS frames
        "sidecar.admin.metrics": {"sidecar.app"},  # admin holding the whole Sidecar
        "sidecar.newthing": set(),
    }
    assert violations(graph) == [
        "sidecar.admin.metrics (admin) imports sidecar.app (app)",
        "sidecar.drain.partition (drain) imports sidecar.ingress (ingress)",
        "sidecar.log.journal (journal) imports sidecar.protocols.kv.app (fronts)",
        "sidecar.newthing: in no layer (add it to LAYER_OF here and to docs/architecture.md)",
        "sidecar.protocols.kv.models (fronts) imports sidecar.log.wire (journal)",
    ]
    assert imports_of("from .. import config\nfrom . import wire\n", "sidecar.log") == {
        "sidecar.config", "sidecar.log.wire"}
