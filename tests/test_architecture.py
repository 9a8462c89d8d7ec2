"""The package's layering rule (docs/architecture.md) holds for every import in llama_np/.

Each module imports only modules of an earlier row of the page's list, so the imports form no
circle; an import inside a function carries a comment saying why.
"""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "llama_np"
PAGE = PACKAGE.parent / "docs" / "architecture.md"


def documented_rows() -> dict[str, int]:
    """Module name -> row of the layering list in docs/architecture.md."""
    text = PAGE.read_text(encoding="utf-8")
    block = text.split("<!-- layers: checked by tests/test_architecture.py -->")[1].split("<!-- end layers -->")[0]
    rows = {}
    for line in block.strip().splitlines():
        number, names = line.split(".", 1)
        for name in re.findall(r"`(\w+)`", names):
            rows[name] = int(number)
    return rows


def module_of(path: Path) -> str:
    """llama_np/model.py -> "model"; anything under llama_np/exercises/ -> "exercises"."""
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imports_of(path: Path):
    """(imported llama_np module or "" for the package itself, line, inside a function?)."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    lines = source.splitlines()
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    in_function.add(id(inner))
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "llama_np":  # from llama_np import layers, trace
                targets = [f"llama_np.{alias.name}" for alias in node.names]
            else:
                targets = [node.module]
        for target in targets:
            parts = target.split(".")
            if parts[0] != "llama_np":
                continue
            line = lines[node.lineno - 1] + (lines[node.lineno] if node.lineno < len(lines) else "")
            yield (parts[1] if len(parts) > 1 else ""), node.lineno, id(node) in in_function, line


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")
                 or p.parent != PACKAGE)


def test_every_module_of_the_package_has_a_row_on_the_page():
    rows = documented_rows()
    missing = sorted({module_of(p) for p in MODULES} - set(rows))
    assert not missing, f"docs/architecture.md's layering list lacks {missing}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_only_to_earlier_rows(path):
    rows = documented_rows()
    here = module_of(path)
    top = max(rows.values())
    for target, line, _, _ in imports_of(path):
        if target == here:
            continue  # inside a subpackage (exercises.checking from exercises.heads)
        if target == "" or target not in rows:  # the package itself, or a name from its __init__
            assert rows[here] == top, f"{path.name}:{line} imports the llama_np package itself"
            continue
        assert rows[target] < rows[here], (
            f"{path.name}:{line}: {here} (row {rows[here]}) imports {target} (row {rows[target]}); "
            "docs/architecture.md allows imports of earlier rows only")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_an_import_inside_a_function_says_why(path):
    for target, line, in_function, text in imports_of(path):
        if in_function:
            assert "#" in text, f"{path.name}:{line} imports llama_np.{target} inside a function with no reason given"


def test_the_imports_form_no_circle():
    graph = {}
    for path in MODULES:
        graph.setdefault(module_of(path), set()).update(
            target for target, *_ in imports_of(path) if target and target != module_of(path))
    visiting, done = set(), set()

    def visit(module, trail):
        if module in done:
            return
        assert module not in visiting, f"import circle: {' -> '.join(trail + [module])}"
        visiting.add(module)
        for target in sorted(graph.get(module, ())):
            visit(target, trail + [module])
        visiting.discard(module)
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
