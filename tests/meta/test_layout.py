"""House rules a reviewer would otherwise check by hand: module size, `__all__`, boundaries."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAX_LINES = 700
# source folder -> its import name
PACKAGES = {"loraflight": "loraflight", "engine": "loraflight.engine", "federation": "loraflight.federation"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, name in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([name, *parts])] = path
    return out


MODULES = _modules()


def test_no_source_module_over_700_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by concept): {long}"


def _declares_all(tree: ast.Module) -> bool:
    for node in tree.body:
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, ast.AnnAssign)
            else []
        )
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            return True
    return False


def test_every_module_declares_all():
    missing = [m for m, p in MODULES.items() if not _declares_all(ast.parse(p.read_text()))]
    assert not missing, f"modules without __all__: {missing}"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    is_pkg = MODULES[module].name == "__init__.py" if module in MODULES else False
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _private_imports(path: Path, module: str | None) -> list[str]:
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        target = _resolve(module, node) if module else (node.module or "")
        if not target.startswith("loraflight"):
            continue
        for alias in node.names:
            if alias.name.startswith("_") and not alias.name.startswith("__"):
                bad.append(f"{path.relative_to(REPO)}:{node.lineno} imports {alias.name} from {target}")
    return bad


def test_nothing_imports_another_modules_private_names():
    bad = []
    for m, p in MODULES.items():
        bad += _private_imports(p, m)
    for folder in ("tests", "bench"):
        for p in sorted((REPO / folder).rglob("*.py")):
            bad += _private_imports(p, None)
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_bench_does_not_import_tests():
    bad = []
    for p in sorted((REPO / "bench").rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            mods = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            bad += [f"{p.relative_to(REPO)}:{node.lineno} {m}" for m in mods if m.split(".")[0] == "tests"]
    assert not bad, f"bench imports from tests: {bad}"


@pytest.mark.parametrize(
    "name", ["loraflight", "loraflight.federation", "loraflight.engine", "loraflight.engine.card"]
)
def test_import_loads_neither_torch_nor_grpc(name):
    code = f"import json, sys, {name}; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'grpc'))))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [], f"import {name} loaded {r.stdout.strip()}"


def test_one_hop_names_resolve():
    code = (
        "import loraflight as lf, json;"
        "print(json.dumps({n: type(getattr(lf, n)).__name__ for n in lf.__all__}))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    names = json.loads(r.stdout)
    for n in (
        "LoRACard",
        "Engine",
        "Node",
        "NodeConfig",
        "Client",
        "Store",
        "to_peft",
        "from_peft",
        "generate_key",
    ):
        assert n in names, n
    assert issubclass(__import__("loraflight").CardNotFound, __import__("loraflight").LoraflightError)
