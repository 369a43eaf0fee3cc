"""The host package's layers: a module imports only from its own layer or the
ones below, peers never import each other, and there are no import circles.

The layers (docs/ARCHITECTURE.md, "The host package"), lowest first."""
from __future__ import annotations

import ast
from pathlib import Path

import fleet

PACKAGE = Path(fleet.__file__).parent

LAYERS: list[tuple[str, set[str]]] = [
    ("definitions", {"__init__", "errors", "redact", "paths", "protocol", "schema", "wire"}),
    ("nats", {"natsconn", "jetstream", "server", "context"}),
    ("fleet state", {"commands", "config", "inventory", "nickname", "query"}),
    # Three peers: none imports another.
    ("gateway", {"gateway", "forwarding", "configpush", "writeapi"}),
    ("clients", {"cmdcli", "configcli", "tail"}),
    ("boards", {"compile", "flash", "provision", "romfs", "mipindex", "virtualboard"}),
    ("simulator", {"simulator", "simsession", "observe", "faults", "flashlog"}),
    ("cli", {"cli", "flashcli", "__main__"}),
]
PEERS = {"gateway", "clients", "boards"}
RANK = {"definitions": 0, "nats": 1, "fleet state": 2, "gateway": 3, "clients": 3, "boards": 3, "simulator": 4, "cli": 5}


def layer_of(module: str) -> str:
    return next(name for name, members in LAYERS if module in members)


def imports_of(path: Path) -> set[str]:
    """The package's modules that `path` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)  # from . import x
            elif node.module and node.module.split(".")[0] == "fleet":
                parts = node.module.split(".")
                found.update([parts[1]] if len(parts) > 1 else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("fleet."))
    return found & {path.stem for path in PACKAGE.glob("*.py")}


def import_graph() -> dict[str, set[str]]:
    return {path.stem: imports_of(path) - {path.stem} for path in PACKAGE.glob("*.py")}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, imported in graph.items():
        mine = layer_of(module)
        for other in imported:
            theirs = layer_of(other)
            if RANK[theirs] > RANK[mine] or (theirs != mine and theirs in PEERS and mine in PEERS):
                wrong.append(f"{module} ({mine}) imports {other} ({theirs})")
    return sorted(wrong)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            found.append(path[path.index(module):] + [module])
            return
        if module in done:
            return
        for other in sorted(graph.get(module, ())):
            visit(other, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    return found


def test_every_module_of_the_package_has_a_layer() -> None:
    placed = set().union(*(members for _, members in LAYERS))
    assert {path.stem for path in PACKAGE.glob("*.py")} - placed == set()


def test_no_module_imports_a_layer_above_its_own_or_a_peer_layer() -> None:
    assert upward_imports(import_graph()) == []


def test_the_package_has_no_import_circles() -> None:
    assert circles(import_graph()) == []


def test_the_checks_see_an_upward_import_and_a_circle() -> None:
    graph = import_graph()
    graph["gateway"] = graph["gateway"] | {"configcli"}
    graph["romfs"] = graph["romfs"] | {"flash"}
    assert upward_imports(graph) == ["gateway (gateway) imports configcli (clients)"]
    assert ["flash", "romfs", "flash"] in circles(graph)


def test_the_benchmarks_are_not_in_the_shipped_package() -> None:
    assert not {"bench", "memorybench", "background"} & {path.stem for path in PACKAGE.glob("*.py")}
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        assert not [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                    and any(name.startswith("bench") for name in
                            ([node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]))
                    and getattr(node, "level", 0) == 0], path.name
