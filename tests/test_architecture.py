"""The package's architecture (docs/architecture.md) holds for every import in llama_np/.

- Layers: each module imports only modules of an earlier row of the page's list (a folder named
  alone stands for all its modules, which may import each other), so the imports form no circle.
- Folders: each folder imports only what the page's folder list allows it.
- Sizes: no module over 700 lines, at most 12 modules directly in llama_np/, and the storage
  dtype names ("F16", "BF16", "F32", "F64", and llama.cpp's "Q8_0", "Q4_K" …) spelled as strings
  only in weights/codecs.py.
An import inside a function carries a comment saying why.
"""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "llama_np"
PAGE = PACKAGE.parent / "docs" / "architecture.md"
FOLDERS = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")
                 or p.parent != PACKAGE)
MAX_MODULE_LINES = 700
MAX_TOP_LEVEL_MODULES = 12
STORAGE_DTYPE_NAMES = {"F16", "BF16", "F32", "F64", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"}
CODEC_MODULES = {"weights.codecs"}


def page_block(marker: str) -> str:
    text = PAGE.read_text(encoding="utf-8")
    return text.split(f"<!-- {marker}: checked by tests/test_architecture.py -->")[1].split(f"<!-- end {marker} -->")[0]


def documented_rows() -> dict[str, int]:
    """Module or folder name ("formats.files", "cli") -> row of the layering list."""
    rows = {}
    for line in page_block("layers").strip().splitlines():
        number, names = line.split(".", 1)
        for name in re.findall(r"`([\w.]+)`", names):
            rows[name] = int(number)
    return rows


def documented_folder_rules() -> dict[str, tuple[set, bool]]:
    """Folder (or module) -> (what it may import, whether that is everything *but* those)."""
    rules = {}
    for line in page_block("folders").strip().splitlines():
        subject, allowed = re.match(r"- `(\w+)`: (.*)", line).groups()
        allowed = allowed.split(" — ")[0]
        names = set(re.findall(r"`([\w.]+)`", allowed))
        rules[subject] = (names, allowed.startswith("anything but"))
    return rules


def module_of(path: Path) -> str:
    """llama_np/model.py -> "model"; llama_np/formats/files.py -> "formats.files";
    llama_np/formats/__init__.py -> "formats"."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(dotted: str) -> bool:
    return (PACKAGE / (dotted.replace(".", "/") + ".py")).is_file() or (PACKAGE / dotted.replace(".", "/")).is_dir()


def imports_of(path: Path):
    """(imported llama_np module, "" for the package itself; line; inside a function?; line text)."""
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
            # from llama_np import layers / from llama_np.weights import codecs: a module each;
            # from llama_np import LlamaConfig: the package itself
            targets = [f"{node.module}.{alias.name}" if is_module(f"{node.module[9:]}.{alias.name}".lstrip("."))
                       else node.module for alias in node.names]
        for target in targets:
            if target.split(".")[0] != "llama_np":
                continue
            line = lines[node.lineno - 1] + (lines[node.lineno] if node.lineno < len(lines) else "")
            yield target[len("llama_np."):] if "." in target else "", node.lineno, id(node) in in_function, line


def folder_of(module: str) -> str:
    return module.split(".")[0]


def row_of(module: str, rows: dict[str, int]) -> int | None:
    return rows.get(module, rows.get(folder_of(module)))


def test_every_module_of_the_package_has_a_row_on_the_page():
    rows = documented_rows()
    missing = sorted(m for m in map(module_of, MODULES) if row_of(m, rows) is None and m not in FOLDERS)
    assert not missing, f"docs/architecture.md's layering list lacks {missing}"
    unknown = sorted(name for name in rows if not is_module(name))
    assert not unknown, f"docs/architecture.md's layering list names modules that do not exist: {unknown}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_only_to_earlier_rows(path):
    rows = documented_rows()
    here = module_of(path)
    top = max(rows.values())
    for target, line, _, _ in imports_of(path):
        if target == here or target in FOLDERS and folder_of(here) == target:
            continue  # a folder's __init__, or a module of the folder importing its own package
        if target == "":  # the package itself
            assert row_of(here, rows) == top, f"{path.name}:{line} imports the llama_np package itself"
            continue
        if folder_of(target) == folder_of(here) and rows.get(folder_of(here)) is not None:
            continue  # inside a folder that has one row (exercises.heads importing exercises.checking)
        assert row_of(here, rows) is not None and row_of(target, rows) is not None, (path, target)
        assert row_of(target, rows) < row_of(here, rows), (
            f"{path.relative_to(PACKAGE)}:{line}: {here} (row {row_of(here, rows)}) imports {target} "
            f"(row {row_of(target, rows)}); docs/architecture.md allows imports of earlier rows only")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_folder_imports_only_what_the_page_allows(path):
    rules = documented_folder_rules()
    here = module_of(path)
    subject = here if here in rules else folder_of(here)
    for target, line, _, _ in imports_of(path):
        if target == "" or folder_of(target) == folder_of(here):
            continue
        assert folder_of(target) != "cli", f"{path.relative_to(PACKAGE)}:{line} imports the command line"
        if subject not in rules:
            continue
        allowed, all_but = rules[subject]
        permitted = (target not in allowed and folder_of(target) not in allowed) if all_but else (
            target in allowed or folder_of(target) in allowed)
        assert permitted, (f"{path.relative_to(PACKAGE)}:{line}: {subject} imports {target}; "
                           f"docs/architecture.md's folder list does not allow it")


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


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_700_lines(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines; split it by what its parts are for"


def test_at_most_12_modules_sit_directly_in_the_package():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, f"llama_np/ holds {len(top)} modules: {top}"


def test_storage_dtype_names_are_spelled_only_by_the_codecs():
    spelled = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in STORAGE_DTYPE_NAMES:
                spelled.setdefault(module_of(path), []).append(node.lineno)
    others = {module: lines for module, lines in spelled.items() if module not in CODEC_MODULES}
    assert not others, f"storage dtype names spelled outside weights/codecs.py (ask CODECS instead): {others}"
