"""The import graph of the repository's Python packages: layers, upward imports, circles, depth.

  python tools/import_graph.py [ROOT] [--json FILE]

Every `import` / `from ... import` statement is read from the source (function-local imports included), so a
circle hidden behind a deferred import still counts. A module's layer is the folder it lives in; the layering it
checks is the one `docs/design.md` describes:

  base         magnet_jax/{cli, fileio, sharding}.py        imports no other module of the repository
  models       magnet_jax/models/                           base
  data         magnet_jax/data/                             base
  checkpoints  magnet_jax/checkpoints/                      base, models
  generation   magnet_jax/generation/                       base, models
  evaluation   magnet_jax/evaluation/                       base, models, data, checkpoints
  training     magnet_jax/training/                         base, models, data, checkpoints
  jobs         the entry points magnet_jax/{api, generate, train, convert, compile_check, evaluate}.py: anything
               above, nothing from configs/ or data_pipelines/
  apps         configs/, data_pipelines/, references/: anything

An import that leaves these bounds is "upward". Modules of the older flat layout (before the layered packages) are
placed by their file name, so the same report measures both.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGES = ("magnet_jax", "configs", "data_pipelines", "references")
BASE = ("cli", "fileio", "sharding")
ENTRY_POINTS = ("api", "generate", "train", "convert", "compile_check", "evaluate")
# Where each module of the flat layout belongs (file name -> layer), for measuring the old tree.
FLAT_LAYOUT = {
    "attention": "models", "lm": "models", "t5": "models", "encodec": "models", "conditioner": "models",
    "sampling": "generation", "decoding": "generation", "musicgen": "generation", "hybrid": "generation",
    "train_lib": "training", "masking": "training", "optim": "training", "checkpointing": "training",
    "metrics": "training", "flops": "training", "records": "data", "input_pipeline": "data",
    "weights": "checkpoints", "lm_weights": "checkpoints", "encodec_weights": "checkpoints",
    "pretrained": "checkpoints",
}  # fmt: skip
ALLOWED = {
    "base": {"base"},
    "models": {"base", "models"},
    "data": {"base", "data"},
    "checkpoints": {"base", "models", "checkpoints"},
    "generation": {"base", "models", "generation"},
    "evaluation": {"base", "models", "data", "checkpoints", "evaluation"},
    "training": {"base", "models", "data", "checkpoints", "training"},
    "jobs": {"base", "models", "data", "checkpoints", "generation", "evaluation", "training", "jobs"},
    "apps": {"base", "models", "data", "checkpoints", "generation", "evaluation", "training", "jobs", "apps"},
}
# Entry points a user runs for inference alone: they must not load the trainer.
INFERENCE_ENTRY_POINTS = ("magnet_jax.convert", "magnet_jax.api", "magnet_jax.generate")


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of `PACKAGES` under `root`."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "magnet_jax":
        return "apps"
    if len(parts) == 1:
        return "base"  # the package itself (empty __init__)
    if len(parts) == 2:
        name = parts[1]
        if name in BASE:
            return "base"
        if name in FLAT_LAYOUT:
            return FLAT_LAYOUT[name]
        if name in ENTRY_POINTS:
            return "jobs"
        return name  # a subpackage's __init__
    return parts[1]


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Repository modules `module` imports (package `__init__`s reached only through a submodule are dropped)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module and (name.count(".") or name not in ("magnet_jax",)):
                found.add(name)
    # `from magnet_jax.models import lm` names both the package and the module: keep the module only
    return {m for m in found if not any(o.startswith(m + ".") for o in found) or modules[m].name != "__init__.py"}


def allowed(module: str, imported: str) -> bool:
    """Whether `module` may import `imported`: the layer table, and entry points use no other entry point but the
    library API."""
    if layer(module) == layer(imported) == "jobs":
        return imported == "magnet_jax.api"
    return layer(imported) in ALLOWED[layer(module)]


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; components of more than one module (or a self-import) are circles."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
            out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def depth(graph: dict[str, set[str]], components: list[list[str]]) -> int:
    """Edges on the longest import chain, circles collapsed into one node."""
    owner = {m: i for i, c in enumerate(components) for m in c}
    memo: dict[int, int] = {}

    def longest(c: int) -> int:
        if c not in memo:
            below = {owner[w] for m in components[c] for w in graph[m]} - {c}
            memo[c] = max((1 + longest(b) for b in below), default=0)
        return memo[c]

    return max((longest(i) for i in range(len(components))), default=0)


def loaded_modules(root: Path, module: str) -> list[str]:
    """The repository modules that `import module` loads, in a fresh interpreter."""
    code = f"import sys, {module}; print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in {PACKAGES})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    if out.returncode:
        raise RuntimeError(f"import {module} failed: {out.stderr.strip().splitlines()[-1]}")
    return out.stdout.split()


def report(root: Path, *, loads: bool = True) -> dict:
    modules = module_files(root)
    graph = {m: imports_of(m, p, modules) for m, p in modules.items()}
    upward = sorted(f"{m} ({layer(m)}) -> {w} ({layer(w)})" for m, ws in graph.items() for w in ws if not allowed(m, w))
    circles = [c for c in strongly_connected(graph) if len(c) > 1]
    sizes = sorted(
        ((len(p.read_text().splitlines()), str(p.relative_to(root))) for p in modules.values()), reverse=True
    )
    return {
        "modules": len(modules),
        "imports": sum(len(v) for v in graph.values()),
        "depth": depth(graph, strongly_connected(graph)),
        "upward_imports": upward,
        "circles": circles,
        "largest_files": [f"{path} ({lines} lines)" for lines, path in sizes[:5]],
        "loads": {m: loaded_modules(root, m) for m in INFERENCE_ENTRY_POINTS if m in modules} if loads else {},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args(argv)
    result = report(Path(args.root))
    print(f"{result['modules']} modules, {result['imports']} imports, import depth {result['depth']}")
    print(f"upward imports: {len(result['upward_imports'])}")
    for line in result["upward_imports"]:
        print(f"  {line}")
    print(f"circles: {len(result['circles'])}")
    for circle in result["circles"]:
        print(f"  {' <-> '.join(circle)}")
    print("largest files: " + ", ".join(result["largest_files"]))
    training_loaded = {}
    for module, loaded in result["loads"].items():
        training = [m for m in loaded if layer(m) == "training"]
        training_loaded[module] = training
        print(f"import {module} loads {len(loaded)} modules, {len(training)} of them training: {' '.join(training)}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 1 if result["upward_imports"] or result["circles"] or any(training_loaded.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
