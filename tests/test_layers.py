"""The host package's layers: a module imports only from its own layer or the
ones below, peers never import each other, and there are no import circles.

A layer is a subpackage of `fleet`; the modules at the top of the package are
the definitions every layer shares (docs/ARCHITECTURE.md, "The host package")."""
from __future__ import annotations

import ast
from pathlib import Path

import fleet

PACKAGE = Path(fleet.__file__).parent

# Lowest first. gateway, client and boards are peers: none imports another.
RANK = {"definitions": 0, "broker": 1, "state": 2, "gateway": 3, "client": 3, "boards": 3, "sim": 4, "cli": 5}
PEERS = {"gateway", "client", "boards"}


def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name under fleet ("broker.connection", "errors")."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)] = path
    return found


def layer_of(module: str) -> str:
    if module == "__main__":
        return "cli"
    return module.split(".")[0] if "." in module or module in RANK else "definitions"


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `module` imports, at the top or inside a function."""
    here = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    if module in ("__init__", "__main__") or "." not in module and path.name != "__init__.py":
        here = []
    found: set[str] = set()

    def add(base: list[str], names: list[str]) -> None:
        for name in names:  # from fleet.x import y: y is a module of x, or a name in x
            dotted = ".".join(base + [name])
            found.add(dotted if dotted in known else ".".join(base) or "__init__")

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "fleet":
                base = node.module.split(".")[1:]
            else:
                continue
            add(base, [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            found.update(alias.name[len("fleet."):] for alias in node.names if alias.name.startswith("fleet."))
    return (found & known) - {module}


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {module: imports_of(module, path, set(known)) for module, path in known.items()}


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


def test_every_subpackage_is_a_known_layer() -> None:
    subpackages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    assert subpackages - set(RANK) == set()
    assert {layer_of(module) for module in modules()} <= set(RANK)


def test_no_module_imports_a_layer_above_its_own_or_a_peer_layer() -> None:
    assert upward_imports(import_graph()) == []


def test_the_package_has_no_import_circles() -> None:
    assert circles(import_graph()) == []


def test_the_checks_see_an_upward_import_a_peer_import_and_a_circle() -> None:
    graph = import_graph()
    assert "broker.connection" in graph["gateway.service"]  # the graph sees real imports
    graph["gateway.service"] = graph["gateway.service"] | {"client.config"}
    graph["state.config"] = graph["state.config"] | {"sim.simulator"}
    graph["boards.romfs"] = graph["boards.romfs"] | {"boards.flash"}
    graph["boards.flash"] = graph["boards.flash"] | {"boards.romfs"}
    assert upward_imports(graph) == ["gateway.service (gateway) imports client.config (client)",
                                     "state.config (state) imports sim.simulator (sim)"]
    assert ["boards.flash", "boards.romfs", "boards.flash"] in circles(graph)


def test_the_benchmarks_are_not_in_the_shipped_package() -> None:
    assert not {"bench", "memorybench", "background"} & {path.stem for path in PACKAGE.rglob("*.py")}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        assert not [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                    and any(name.startswith("bench") for name in
                            ([node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]))
                    and getattr(node, "level", 0) == 0], path.name
