"""The package layering of docs/architecture.md: packages import downward only, never in a cycle.

    router -> rpc <- node -> engine -> models -> kernels -> common;  node -> transfer -> common

Every import of a `pdserve.<package>` module counts, also one inside a function or under
TYPE_CHECKING: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# What each top-level package may import (besides itself). Anything else is a layering violation.
ALLOWED: dict[str, set[str]] = {
    "common": set(),
    "kernels": {"common"},
    "models": {"kernels", "common"},
    "engine": {"models", "kernels", "common"},
    "transfer": {"common"},
    "rpc": {"common"},
    "node": {"engine", "models", "transfer", "rpc", "common"},
    "prefill_node": {"node", "engine", "models", "transfer", "rpc", "common"},
    "decode_node": {"node", "engine", "models", "transfer", "rpc", "common"},
    "router": {"rpc", "models", "common"},
    "deploy": {"router", "node", "prefill_node", "decode_node", "engine", "models", "transfer", "rpc",
               "common"},
}


def package_edges(root: Path) -> dict[str, dict[str, set[str]]]:
    """package -> imported package -> the files that import it."""
    packages = {p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    edges: dict[str, dict[str, set[str]]] = {}
    for package in sorted(packages - {"tests"}):
        for path in (root / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    modules = [node.module]
                elif isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                else:
                    continue
                for module in modules:
                    parts = module.split(".")
                    if parts[0] == "pdserve" and len(parts) > 1 and parts[1] != package:
                        edges.setdefault(package, {}).setdefault(parts[1], set()).add(
                            str(path.relative_to(root)))
    return edges


def violations(edges: dict[str, dict[str, set[str]]], allowed: dict[str, set[str]]) -> list[str]:
    found = []
    for package, targets in sorted(edges.items()):
        for target, files in sorted(targets.items()):
            if target not in allowed.get(package, set()):
                found.append(f"{package} -> {target} ({', '.join(sorted(files))})")
    for package, targets in sorted(edges.items()):
        for target in sorted(targets):
            if package < target and package in edges.get(target, {}):
                found.append(f"cycle: {package} <-> {target}")
    return found


def test_packages_import_downward_only_and_never_in_a_cycle() -> None:
    edges = package_edges(ROOT)
    assert set(edges) <= set(ALLOWED), f"a package the layering does not know: {set(edges) - set(ALLOWED)}"
    assert violations(edges, ALLOWED) == []


def test_the_allowed_graph_itself_has_no_cycle() -> None:
    order: list[str] = []

    def visit(package: str, path: tuple[str, ...]) -> None:
        assert package not in path, f"cycle in ALLOWED: {' -> '.join((*path, package))}"
        for below in ALLOWED[package]:
            visit(below, (*path, package))
        if package not in order:
            order.append(package)

    for package in ALLOWED:
        visit(package, ())
    assert order[0] == "common"


def test_a_planted_cycle_and_an_upward_import_are_reported(tmp_path: Path) -> None:
    for package, source in {
        "common": "",
        "engine": "from pdserve.common import tokens\n",
        # node -> engine is allowed, engine -> node is not: together a cycle
        "node": "import pdserve.engine.protocol\n",
    }.items():
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text(source)
    (tmp_path / "engine" / "late.py").write_text("def f():\n    from pdserve.node.server import x\n")
    found = violations(package_edges(tmp_path), ALLOWED)
    assert found == ["engine -> node (engine/late.py)", "cycle: engine <-> node"]


def test_bench_and_the_product_import_tests_only_through_the_support_package() -> None:
    """bench/ may use tests/support (the stub node, the cluster helpers); product code no test code."""
    offenders = []
    product = [p for p in ROOT.rglob("*.py") if p.parts[len(ROOT.parts)] in ALLOWED]
    for path in [*ROOT.glob("bench/*.py"), *product]:
        in_product = path.parts[len(ROOT.parts)] in ALLOWED
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            if not module or not module.startswith("pdserve.tests"):
                continue
            if in_product or not module.startswith("pdserve.tests.support"):
                offenders.append(f"{path.relative_to(ROOT)}: {module}")
    assert offenders == []
