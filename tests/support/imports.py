"""The modules a piece of Python source imports, read from its syntax tree (never run)."""

from __future__ import annotations

import ast


def imported_modules(tree: ast.AST) -> set[str]:
    """Absolute imports (``import x``, ``from x import y``) and ``import_module``/``__import__``
    calls with a literal name."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Call) and getattr(
            node.func, "attr", getattr(node.func, "id", "")
        ) in {"import_module", "__import__"}:
            found |= {a.value for a in node.args if isinstance(a, ast.Constant)}
    return {name for name in found if isinstance(name, str)}
