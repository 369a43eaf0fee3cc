"""Every interval in the firmware goes through ticks_diff / ticks_add: a
tick value (a ticks_*() call, or a name or attribute ever assigned one) is
never added, subtracted or ordered directly, which breaks when the counter
wraps (2^30 ms, about 12 days, on a board). Static, so it covers the async
code the VM test across the wrap cannot run (tests/firmware/mp_test_ticks_wrap.py)."""
from __future__ import annotations

import ast

from fleet.paths import BOARDS_DIR, FIRMWARE_DIR

TICKS_CALLS = {"ticks_ms", "ticks_us", "ticks_cpu", "ticks_add"}
ORDERING = (ast.Lt, ast.LtE, ast.Gt, ast.GtE)


def _is_ticks_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
    return name in TICKS_CALLS


def _label(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def misuses(source: str, filename: str) -> list[str]:
    tree = ast.parse(source, filename)
    holders: set[str] = set()  # names and attributes that hold a tick value
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and _is_ticks_call(node.value):
            for target in node.targets:
                for element in target.elts if isinstance(target, ast.Tuple) else [target]:
                    label = _label(element)
                    if label:
                        holders.add(label)

    def is_tick(node: ast.AST) -> bool:
        return _is_ticks_call(node) or _label(node) in holders

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
            if is_tick(node.left) or is_tick(node.right):
                found.append(f"{filename}:{node.lineno}: tick arithmetic without ticks_add/ticks_diff")
        elif isinstance(node, ast.Compare) and any(isinstance(op, ORDERING) for op in node.ops):
            if any(is_tick(operand) for operand in [node.left, *node.comparators]):
                found.append(f"{filename}:{node.lineno}: ticks compared directly, not through ticks_diff")
    return sorted(found, key=lambda line: int(line.split(":")[1]))


def test_no_firmware_module_does_arithmetic_on_ticks() -> None:
    sources = sorted(FIRMWARE_DIR.glob("*.py")) + sorted(BOARDS_DIR.glob("*/*.py"))
    problems = [p for path in sources for p in misuses(path.read_text(), path.name)]
    assert problems == []


def test_the_check_catches_the_usual_mistakes() -> None:
    wrong = (
        "from time import ticks_ms\n"
        "class A:\n"
        "    def start(self):\n"
        "        self.since = ticks_ms()\n"
        "    def due(self, limit):\n"
        "        return ticks_ms() - self.since >= limit\n"
        "    def later(self):\n"
        "        deadline = ticks_ms() + 500\n"
        "        return deadline\n"
        "    def past(self, deadline):\n"
        "        when = ticks_ms()\n"
        "        return when > deadline\n"
    )
    assert misuses(wrong, "wrong.py") == [
        "wrong.py:6: tick arithmetic without ticks_add/ticks_diff",
        "wrong.py:8: tick arithmetic without ticks_add/ticks_diff",
        "wrong.py:12: ticks compared directly, not through ticks_diff",
    ]
