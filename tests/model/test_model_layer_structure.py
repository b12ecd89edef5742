"""The model layer's structure stays as docs/architecture.md describes it: no import cycle,
no module reaching into another module's private names, no method importing another method,
no module over 800 lines and no function over 120 (the product: python/llmrec and
llmrec_kernels).

Checked on the source (every ``import``, including those inside functions), so a lazy
import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_FUNCTION_LINES = 120
MAX_MODULE_LINES = 800
#: moved out of the product by another change (issue 26); over the limits until then
SIZE_EXEMPT: set = set()


def _modules() -> dict:
    files = sorted((ROOT / "python" / "llmrec").rglob("*.py"))
    files += [p for p in [ROOT / "llmrec_kernels" / "lora.py"] if p.exists()]
    out = {}
    for path in files:
        base = ROOT / "python" if "python" in path.relative_to(ROOT).parts[:1] else ROOT
        name = ".".join(path.relative_to(base).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, known: dict):
    """``(imported module, imported name or None)`` pairs of a module's source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{target}.{alias.name}"
                yield (full, None) if full in known else (target, alias.name)


def test_no_import_cycle():
    mods = _modules()
    graph = {
        m: {t for t, _ in _imports(m, p, mods) if t in mods and t != m} for m, p in mods.items()
    }
    state: dict = {}

    def visit(m, stack):
        state[m] = "open"
        for dep in sorted(graph[m]):
            if state.get(dep) == "open":
                cycle = [*stack[stack.index(dep) :], dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*stack, dep])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_no_module_uses_another_modules_private_names():
    mods = _modules()
    bad = []
    for m, path in mods.items():
        for target, name in _imports(m, path, mods):
            private = name and name.startswith("_") and not name.startswith("__")
            if private and target in mods and target != m:
                bad.append(f"{m} imports {target}.{name}")
        tree = ast.parse(path.read_text())
        aliases = {}  # local name -> one of our modules
        for n in ast.walk(tree):
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                for a in n.names:
                    full = f"{n.module}.{a.name}" if isinstance(n, ast.ImportFrom) else a.name
                    if full in mods:
                        aliases[a.asname or a.name] = full
        for n in ast.walk(tree):
            if (
                isinstance(n, ast.Attribute)
                and isinstance(n.value, ast.Name)
                and n.value.id in aliases
                and n.attr.startswith("_")
                and not n.attr.startswith("__")
            ):
                bad.append(f"{m} uses {n.value.id}.{n.attr}")
    assert not bad, bad


def _product_files():
    files = sorted((ROOT / "python" / "llmrec").rglob("*.py"))
    files += sorted((ROOT / "llmrec_kernels").rglob("*.py"))
    return [p for p in files if str(p.relative_to(ROOT)) not in SIZE_EXEMPT]


def test_no_method_imports_another_method():
    """``llmrec.methods.<a>...`` never imports ``llmrec.methods.<b>...``: what two methods
    share lives below them (``llmrec.methods.common``, ``llmrec.data``, ``llmrec.llm``)."""
    mods = _modules()
    shared = {"llmrec.methods", "llmrec.methods.common"}

    def method_of(name):
        parts = name.split(".")
        return parts[2] if len(parts) > 2 and parts[:2] == ["llmrec", "methods"] else None

    bad = []
    for m, path in mods.items():
        own = method_of(m)
        if own is None or m in shared:
            continue
        for target, _ in _imports(m, path, mods):
            other = method_of(target)
            if target not in shared and other not in (None, own, "common"):
                bad.append(f"{m} imports {target}")
    assert not bad, bad
    # and nothing outside the methods reaches into a method (the registry finds them)
    outside = [
        f"{m} imports {t}"
        for m, p in mods.items()
        if method_of(m) is None and m not in shared
        for t, _ in _imports(m, p, mods)
        if method_of(t) not in (None, "common") and m not in ("llmrec", "llmrec.cora")
    ]
    assert not outside, outside


def test_no_module_over_800_lines():
    big = [
        f"{p.relative_to(ROOT)}: {n} lines"
        for p in _product_files()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    assert not big, big


def test_no_function_over_120_lines():
    long = []
    for path in _product_files():
        m = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{m}.{node.name}: {n} lines")
    assert not long, long
