"""The package's shape: imports only go down the layers, no module grows past 500 lines, and
nothing in the repository points outside it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from helpers import REPO

SRC = REPO / "src" / "mmpo"

#: Lowest first. A module may import its own layer and the ones below, never one above.
LAYERS: list[tuple[str, ...]] = [
    ("mmpo.objectives",),
    ("mmpo.config",),
    # the world's content (paths, tasks, tokenizer, model shapes) imports nothing above config
    (
        "mmpo.data",
        "mmpo.world.tasks",
        "mmpo.world.tokenizer",
        "mmpo.world.model",
        "mmpo.world",
        "mmpo.smolworld",  # the real-model world's content: task families, tables, retention tasks
        "mmpo.pairs.verifiers",  # graders of those tasks (evaluation may use them)
    ),
    ("mmpo.modeling", "mmpo.gguf_models"),
    ("mmpo.forward",),
    ("mmpo.publish",),
    ("mmpo.training",),
    ("mmpo.evaluation", "mmpo.integrations"),
    ("mmpo.pairs", "mmpo.study", "mmpo.world.build", "mmpo.dry_run", "mmpo.smolworld.calibrate"),
    ("mmpo.cli", "mmpo.commands", "mmpo.help_sections", "mmpo.errors", "mmpo.__main__"),
]
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(name: str) -> int:
    """The layer of the longest matching prefix (``mmpo.world.build`` before ``mmpo.world``)."""
    best, best_length = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    assert best is not None, f"{name} belongs to no layer: add it to LAYERS in {Path(__file__).name}"
    return best


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {n for n in names if n == "mmpo" or n.startswith("mmpo.")}


def package_modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "assets" not in p.parts)


def test_imports_only_go_down_the_layers():
    upward = []
    for path in package_modules():
        here = module_name(path)
        if here == "mmpo":  # the package's front door re-exports from any layer
            continue
        for target in imported_modules(path):
            module = target
            # ``from mmpo.training import checkpoint`` names a module; ``... import train`` a function
            if (
                not (SRC.parent / (module.replace(".", "/") + ".py")).exists()
                and not (SRC.parent / module.replace(".", "/")).is_dir()
            ):
                module = module.rsplit(".", 1)[0]
            if module in ("mmpo",):
                continue
            if layer_of(module) > layer_of(here):
                upward.append(f"{here} -> {module}")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(upward))


def test_no_module_is_over_the_size_limit():
    long = {module_name(p): n for p in package_modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_nothing_points_outside_the_repository():
    """Users see only the repository: no code, doc or test cites files beside it."""
    pattern = re.compile(r"\.\./shared|/work/shared|SPEC\.md")
    offenders = []
    for root in ("src", "tests", "docs", "benchmarks", "examples", "configs", "README.md"):
        paths = [REPO / root] if (REPO / root).is_file() else (REPO / root).rglob("*")
        for path in paths:
            if path.is_file() and path.suffix in {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt"}:
                if path.resolve() == Path(__file__).resolve():
                    continue
                if pattern.search(path.read_text(errors="replace")):
                    offenders.append(str(path.relative_to(REPO)))
    assert not offenders, f"files that cite paths outside the repository: {offenders}"
