"""The package's floors, checked on the source: no import cycles, nothing imports upward, small files.

Parses every module of ``director_jax`` with ``ast`` (imports at any depth, so a cycle cannot hide
in a function body) and checks the rules the README's package map states.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "director_jax"
MAX_LINES = 450

# Floors, bottom to top: a module may import its own package and any lower floor, nothing else.
FLOORS = {
    "errors": 0, "io_utils": 0, "xla_flags": 0,
    "video_io": 1, "diffusion": 1, "parallel": 1,
    "kernels": 2, "cli": 2,
    "models": 3,
    "convert": 4, "data": 4,
    "build": 5, "configs_common": 5,
    "pipeline": 6,
    "eval": 7, "train": 7, "curation": 7, "pytorch": 7,
    # the commands
    "demo": 8, "encode": 8, "movies": 8, "curate": 8, "shards": 8, "embed_text": 8, "evaluate": 8, "generate": 8,
}
COMMAND_FLOOR = 8  # every package's __main__ is a command
# The demo drives the trainer's Python API the way a user's script would (train/__main__ is inside train/).
ALLOWED_UPWARD = {("demo", "train")}
# Function-level imports of this package are allowed only for the optional PyTorch side (needs torch).
# imported inside functions on purpose: optional heavy dependencies (PyTorch; apache-beam, only for a --runner
# curation run)
LAZY_OK = ("director_jax.pytorch", "director_jax.curation.beam_pipeline")


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The director_jax modules an import statement names (a submodule where it names one, else the package)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            here = module.split(".")
            package = here if MODULES[module].name == "__init__.py" else here[:-1]
            base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    out = []
    for name in names:
        while name not in MODULES and "." in name:
            name = name.rsplit(".", 1)[0]
        if name.startswith("director_jax") and name in MODULES and name != module:
            out.append(name)
    return out


def _imports() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """(every edge module -> imported module, function-level imports as (module, imported, line))."""
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    lazy = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        top |= {id(n) for stmt in tree.body if isinstance(stmt, ast.If) for n in stmt.body}  # if __name__ == ...
        top |= {id(n) for stmt in tree.body if isinstance(stmt, ast.Try) for n in stmt.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in _resolve(module, node):
                    edges[module].add(target)
                    if id(node) not in top:
                        lazy.append((module, target, node.lineno))
    return edges, lazy


def _floor_name(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def _floor(module: str) -> int:
    return COMMAND_FLOOR if module.endswith(".__main__") else FLOORS[_floor_name(module)]


def test_every_module_has_a_floor():
    unknown = sorted({_floor_name(m) for m in MODULES if m != "director_jax"} - set(FLOORS))
    assert not unknown, f"modules outside the floor table (add them to FLOORS and the README's map): {unknown}"


def test_no_import_cycles():
    edges, _ = _imports()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in MODULES:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_function_level_imports_of_the_package():
    _, lazy = _imports()
    hidden = [f"{m} (line {line}) imports {t}" for m, t, line in lazy if not t.startswith(LAZY_OK)]
    assert not hidden, "imports inside functions hide the dependency graph:\n" + "\n".join(hidden)


def test_nothing_imports_upward():
    edges, _ = _imports()
    bad = []
    for module, targets in edges.items():
        src = _floor_name(module)
        for target in targets:
            dst = _floor_name(target)
            if src in ("", dst) or dst == "" or (src, dst) in ALLOWED_UPWARD:
                continue
            if _floor(target) >= _floor(module):
                bad.append(f"{module} (floor {_floor(module)}) imports {target} (floor {_floor(target)})")
    assert not bad, "\n".join(bad)


def test_only_train_imports_train_and_models_import_no_sampling():
    edges, _ = _imports()
    into_train = sorted(m for m, ts in edges.items() for t in ts
                        if t.startswith("director_jax.train") and not m.startswith(("director_jax.train",
                                                                                     "director_jax.demo")))
    assert not into_train, into_train
    sampling = sorted(f"{m} -> {t}" for m, ts in edges.items() if m.startswith("director_jax.models") for t in ts
                      if t.startswith(("director_jax.diffusion", "director_jax.pipeline")))
    assert not sampling, sampling


def test_files_are_small():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split them along their seams): {long}"


def test_no_source_file_is_git_ignored():
    """A broad ignore pattern (``build/``) once kept ``director_jax/build/`` out of every clone."""
    root = PACKAGE.parent
    if shutil.which("git") is None or not (root / ".git").exists():
        return  # an installed copy, not a checkout: nothing to check
    sources = [str(p.relative_to(root)) for top in ("director_jax", "tests", "benchmarks", "scripts")
               for p in (root / top).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    out = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=root, input="\n".join(sources),
                         capture_output=True, text=True)
    ignored = out.stdout.split()
    assert not ignored, f"source files .gitignore would keep out of a clone: {ignored}"
