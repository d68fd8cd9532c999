"""The house's measurable rules: file and function sizes, no import circles, the library below the command line, the
pipelines' one call shape, the README's size. Each is a number a reader can check; these tests keep them true."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "tarflow_hf"
CODE_FOLDERS = ("src", "spaces_demo", "benchmarks", "scripts")
MAX_FILE_LINES, MAX_FUNCTION_LINES, MAX_CALL_PARAMETERS = 700, 80, 18


def python_files() -> list[Path]:
    return sorted(path for folder in CODE_FOLDERS for path in (ROOT / folder).rglob("*.py"))


def body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """A function's lines after its docstring."""
    body = node.body
    first = (
        body[1]
        if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
        else body[0]
    )
    return node.end_lineno - first.lineno + 1


def test_no_file_is_over_700_lines_and_no_function_body_over_80():
    too_long = []
    for path in python_files():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_FILE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and body_lines(node) > MAX_FUNCTION_LINES:
                too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {body_lines(node)} lines")
    assert not too_long, too_long


def runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of `tree` but those under `if TYPE_CHECKING:` (imports for type checkers only)."""
    skipped = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for statement in node.body
        for inner in ast.walk(statement)
    }
    return [node for node in ast.walk(tree) if id(node) not in skipped]


def imported_modules(path: Path) -> set[str]:
    """The package's modules `path` imports when it runs (at any depth of the file, relative or by name)."""
    package_parts = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    found = set()
    for node in runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package_parts[: len(package_parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
                names = [f"{target}.{alias.name}" for alias in node.names] + [target]
            else:
                names = [node.module or ""] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in MODULES}
    return found


MODULES = {
    ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): path
    for path in PACKAGE.rglob("*.py")
}


def test_the_package_has_no_import_circles():
    graph = {name: imported_modules(path) - {name} for name, path in MODULES.items()}
    graph["tarflow_hf"] = set()  # the package's __init__ only imports lazily, by name, on first use
    circles = []

    def visit(module: str, trail: list[str]) -> None:
        for imported in graph.get(module, ()):
            if imported in trail:
                circles.append(" -> ".join([*trail[trail.index(imported) :], imported]))
            elif len(trail) < len(graph):
                visit(imported, [*trail, imported])

    for module in graph:
        visit(module, [module])
    assert not circles, sorted(set(circles))[:5]


def test_the_library_never_imports_the_command_line():
    command_line = ("tarflow_hf.commands", "tarflow_hf.__main__")  # `python -m tarflow_hf` is the command line
    library = {name: path for name, path in MODULES.items() if not name.startswith(command_line)}
    offenders = {name: sorted(imported_modules(path)) for name, path in library.items()}
    offenders = {name: [m for m in found if m.startswith("tarflow_hf.commands")] for name, found in offenders.items()}
    assert not {name: found for name, found in offenders.items() if found}


@pytest.mark.parametrize("pipeline", ["TarFlowPipeline", "StarFlowPipeline"])
def test_both_pipelines_take_one_call_shape(pipeline):
    import tarflow_hf

    parameters = inspect.signature(getattr(tarflow_hf, pipeline).__call__).parameters
    assert len(parameters) - 1 <= MAX_CALL_PARAMETERS, list(parameters)
    assert not [name for name in parameters if name.startswith("jacobi")]
    tarflow = inspect.signature(tarflow_hf.TarFlowPipeline.__call__).parameters
    shared = ("guidance_scale", "guidance_rule", "attention_temperature", "sampler", "denoise", "generator", "latents",
              "output_type", "return_dict", "callback_on_step_end", "callback_on_step_end_tensor_inputs")  # fmt: skip
    for name in shared:
        assert parameters[name].default == tarflow[name].default, name


def test_the_readme_stays_a_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode()) <= 30_000
    assert "## Architecture" in readme
    for diary in ("previous stop", "runs 11", "Notes for the next", "of the day"):
        assert diary not in readme
