"""Imports go one way through the layers in .importlinter, and function-level imports are kept for heavy
optional dependencies (each loaded only where it is used)."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# imported inside functions on purpose: optional or heavy, and not needed by most commands
LAZY_OK = {"fla", "triton", "tilelang", "matplotlib", "wandb", "submitit", "torch", "ctypes", "fcntl"}


def test_layers_contract_holds():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                        "lint_imports_command()"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]


def function_level_imports() -> list[str]:
    found = []
    for path in sorted((ROOT / "attnbench").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    mods = ["." * node.level + (node.module or "")]
                else:
                    continue
                for m in mods:
                    if m.split(".")[0] not in LAZY_OK:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {m}")
    return found


def test_function_level_imports_are_only_optional_dependencies():
    assert function_level_imports() == []
