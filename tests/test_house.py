"""The house rules the code keeps, checked on its syntax trees: arrows point down only, no class
grows past 250 lines, no function of the core past 60."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "meshgw"
CORE = ("wire", "topology.py", "routing.py", "dataplane", "control")
MAX_CLASS_LINES = 250
MAX_CORE_FUNCTION_LINES = 60

# What each layer may import from meshgw (anything else in meshgw is above it).
ALLOWED = {
    "wire": {"meshgw.wire"},
    "addresses": {"meshgw.wire", "meshgw.addresses"},
    "durations": set(),
    "topology": {"meshgw.addresses"},
    "routing": {"meshgw.addresses", "meshgw.topology", "meshgw.wire"},
    "dataplane": {
        "meshgw.addresses",
        "meshgw.dataplane",
        "meshgw.logs",
        "meshgw.metrics",
        "meshgw.routing",
        "meshgw.topology",
        "meshgw.wire",
    },
    "control": {
        "meshgw.addresses",
        "meshgw.control",
        "meshgw.durations",
        "meshgw.topology",
        "meshgw.wire",
        "meshgw.__version__",  # for the client's User-Agent
    },
}


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def layer_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def meshgw_imports(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "meshgw":
            found |= {f"meshgw.{a.name}" for a in node.names}  # from meshgw import logs
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("meshgw."):
            found.add(node.module or "")
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("meshgw")}
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_point_down_only(layer: str) -> None:
    allowed = ALLOWED[layer]
    for path in modules():
        if layer_of(path) != layer:
            continue
        for module in meshgw_imports(ast.parse(path.read_text())):
            assert any(module == a or module.startswith(a + ".") for a in allowed), (
                f"{path.relative_to(PACKAGE.parent)} imports {module}, above its layer"
            )


def test_no_class_over_250_lines_and_no_core_function_over_60() -> None:
    too_long = []
    for path in modules():
        core = str(path.relative_to(PACKAGE)).startswith(CORE)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                limit = MAX_CLASS_LINES
            elif core and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                limit = MAX_CORE_FUNCTION_LINES
            else:
                continue
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            if lines > limit:
                too_long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}")
    assert too_long == []
