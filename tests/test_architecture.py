"""The layout's rules, checked over the source with `ast` (DESIGN.md §2; also run by `make lint`):

- bottom modules (records, config, provenance, loopback checks, request limits, lazy exports) import no platform
  folder;
- `safactory/__init__.py` is the public face: it may name anything, and nothing inside imports it;
- the platform folders form a directed acyclic graph and never import `factory`, `jobs` or `cli`;
- `factory` and `jobs` sit beside each other (neither imports the other), `cli` on top;
- no import circle between any two files;
- no file in `safactory/` over 600 lines, no function in `factory/` or `jobs/` over 80.

Every import counts, also one inside a function or under `TYPE_CHECKING`.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "safactory"
BOTTOM = {"types", "config", "provenance", "loopback", "request_limits", "_exports"}
FACE = "__init__"  # the area of `safactory/__init__.py`
PLATFORMS = {"policy", "sim", "data", "evolve", "evals", "view"}
ABOVE = {"factory", "jobs", "cli"}
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80


def module_files() -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package modules it imports (a name imported from a package resolves to
    its submodule when there is one)."""

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = defaultdict(set)
    for module, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                target = resolve(name) if name.startswith("safactory") else None
                if target is not None and target != module and not module.startswith(target + "."):
                    edges[module].add(target)
    return edges


def area(module: str) -> str:
    """The folder (or top-level module) a module belongs to: `safactory.sim.envs.ops` -> `sim`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    nodes = set(edges) | {n for targets in edges.values() for n in targets}
    for node in sorted(nodes):
        if node not in index:
            visit(node)
    return found


FILES = module_files()
EDGES = import_graph(FILES)


def area_edges() -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for source, targets in EDGES.items():
        for target in targets:
            if area(source) != area(target):
                out[area(source)].add(area(target))
    return out


def offending(rule: str, allowed: Callable[[str, str], bool]) -> list[str]:
    return [
        f"{source} -> {target} ({rule})"
        for source, targets in sorted(EDGES.items())
        for target in sorted(targets)
        if area(source) != area(target) and not allowed(area(source), area(target))
    ]


def test_the_checker_sees_the_package() -> None:
    assert {"safactory.types", "safactory.cli", "safactory.factory.loop", "safactory.sim.runner"} <= set(FILES)
    assert "safactory.types" in EDGES["safactory.sim.agent"]


def test_the_checker_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_nothing_imports_the_public_face() -> None:
    assert offending("the public face sits on top", lambda s, t: t != FACE) == []


def test_bottom_modules_import_no_folder() -> None:
    assert offending("a bottom module imports only bottom modules", lambda s, t: s not in BOTTOM or t in BOTTOM) == []


def test_platforms_never_import_factory_jobs_or_cli() -> None:
    assert (
        offending("platforms sit below factory, jobs and cli", lambda s, t: s not in PLATFORMS or t not in ABOVE) == []
    )


def test_factory_and_jobs_sit_beside_each_other_below_cli() -> None:
    def allowed(source: str, target: str) -> bool:
        return target != "cli" and {source, target} != {"factory", "jobs"}

    assert offending("factory and jobs are side by side", allowed) == []


def test_no_circle_between_folders() -> None:
    assert cycles(area_edges()) == []


def test_no_circle_between_files() -> None:
    assert cycles(EDGES) == []


def test_no_file_over_the_limit() -> None:
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in FILES.values()
        if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    }
    assert long == {}


@pytest.mark.parametrize("folder", ["factory", "jobs"])
def test_no_long_function_in_the_loop_or_jobs(folder: str) -> None:
    long = []
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({length} lines)")
    assert long == []


@pytest.mark.parametrize(
    "package", ["safactory", "safactory.sim", "safactory.policy", "safactory.data", "safactory.evolve"]
)
def test_every_public_name_resolves(package: str) -> None:
    module = importlib.import_module(package)
    assert module.__all__ == sorted(module.__all__) and module.__all__
    for info in pkgutil.iter_modules(module.__path__):  # a submodule must not hide a public name
        importlib.import_module(f"{package}.{info.name}")
    for name in module.__all__:
        assert not inspect.ismodule(getattr(module, name)), name
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018


def test_the_public_face_serves_what_an_env_author_needs() -> None:
    import safactory

    assert {"Environment", "ToolEnvironment", "ToolError", "EnvSpec", "Task", "Message", "StepResult"} <= set(
        safactory.__all__
    )
    assert {"Policy", "Completion", "SamplingParams", "RunConfig", "load_config", "Factory"} <= set(safactory.__all__)


def test_the_environments_guide_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/environments.md: its one-file env, imported only from `safactory`, registered in code
    and rolled out with its scripted expert exactly as the guide's snippet does."""
    import re

    guide = (PACKAGE.parent / "docs" / "environments.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", guide, flags=re.S)
    env_file = next(b for b in blocks if b.startswith('"""`guess`'))
    imported = {n.module for n in ast.walk(ast.parse(env_file)) if isinstance(n, ast.ImportFrom)}
    assert imported == {"__future__", "dataclasses", "safactory"}  # only the public face of safactory
    (tmp_path / "guess_env.py").write_text(env_file)
    snippet = next(b for b in blocks if "guess_env.register(registry)" in b)
    snippet = "\n".join(line.removeprefix("   ") for line in snippet.splitlines())
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    exec(compile(snippet, "environments.md", "exec"), scope)  # noqa: S102
    summary = scope["summary"]
    assert summary.episodes == summary.stored == 16  # type: ignore[attr-defined]
    assert summary.success_rate == 1.0  # type: ignore[attr-defined]
    assert (tmp_path / "runs" / "guess" / "store.db").exists()
