"""The package's layout stays as designed: no import cycles, and the wheel ships every module.

Both read the package as pyproject.toml declares it (`packages` and `package-dir`), so a new
module or subpackage is covered without editing this file, and a subpackage missing from
`packages` (which setuptools would silently leave out of the wheel) fails here.
"""

from __future__ import annotations

import ast
import fnmatch
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def package_dirs() -> dict[str, Path]:
    """Each declared package and its source folder, through the longest `package-dir` prefix."""
    cfg = _setuptools()
    mapping: dict[str, str] = cfg["package-dir"]
    out = {}
    for pkg in cfg["packages"]:
        parts = pkg.split(".")
        for i in range(len(parts), 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in mapping:
                out[pkg] = ROOT / mapping[prefix] / Path(*parts[i:])
                break
        else:
            out[pkg] = ROOT / Path(*parts)
    return out


def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a package's name -> its __init__.py)."""
    out = {}
    for pkg, folder in package_dirs().items():
        for path in sorted(folder.glob("*.py")):
            out[pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"] = path
    return out


def _resolve(name: str, known: set[str]) -> str | None:
    """The module `name` loads: itself, else its longest known prefix (`a.b.obj` -> `a.b`)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """module -> the deqguard modules it imports anywhere in its body, lazily or not.

    Imports inside functions count: a deferred import still makes a cycle, only a hidden one.
    A submodule's implicit import of its parent package does not (every package would then
    "cycle" with the modules its __init__ re-exports).
    """
    mods = modules()
    known = set(mods)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.stem == "__init__" else name.rpartition(".")[0]
        targets: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets |= {_resolve(a.name, known) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in known else _resolve(base, known))
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_every_package_folder_is_declared():
    """A folder with an __init__.py under a declared package must itself be declared, or the
    wheel (and any non-editable install) would lack it."""
    dirs = package_dirs()
    declared = {p.resolve() for p in dirs.values()}
    for folder in dirs.values():
        assert (folder / "__init__.py").is_file(), f"{folder} is declared but is no package"
        for init in folder.rglob("__init__.py"):
            assert init.parent.resolve() in declared, f"{init.parent} is not in packages"


def test_graph_sees_lazy_and_relative_imports():
    """The checker is not vacuous: it resolves relative, absolute and function-level imports."""
    g = import_graph()
    assert "deqguard.clients.local" in g["deqguard.clients.score"]  # inside make_engine
    assert "deqguard.serving.onnx_engine" in g["deqguard.serving.factory"]
    assert "deqguard.training.distributed" in g["deqguard.training.loop"]  # from . import x
    assert "deqguard.training.attacks" in g["deqguard.evaluation.attacks"]
    assert "deqguard.errors" in g["deqguard.models.errors"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    """No module imports a module that imports it back, directly or through others."""
    g = import_graph()
    found = cycles(g)
    detail = ["; ".join(f"{a} imports {sorted(g[a] & set(comp))}" for a in comp)
              for comp in found]
    assert not found, "import cycles:\n" + "\n".join(detail)


# The rooms (top-level folders) and the rooms each may import, besides the package root
# (version, errors, fileio). Evaluation judges what training produced, so it builds on training
# (PGD, datasets) and models; training never imports evaluation: a training run does not load the
# evaluation code, and `deqguard window`, which trains and then evaluates, runs `deqguard eval`
# as a subprocess. The clients import serving only for the in-process engine.
ROOMS = {
    "models": {"models"},
    "training": {"training", "models"},
    "evaluation": {"evaluation", "training", "models"},
    "serving": {"serving", "models"},
    "clients": {"clients", "serving", "models"},
}


def _room(module: str) -> str:
    """`deqguard.training.data` -> `training`; the package root's own modules -> `deqguard`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS else "deqguard"


def against_direction(graph: dict[str, set[str]]) -> list[str]:
    """Every import from one room into a room it may not import."""
    return sorted(f"{m} imports {t}" for m, targets in graph.items() for t in targets
                  if _room(t) != "deqguard" and _room(m) != "deqguard"
                  and _room(t) not in ROOMS[_room(m)])


def test_rooms_are_the_declared_folders():
    """The table names every room pyproject.toml maps, and no other."""
    declared = {pkg.split(".")[1] for pkg in _setuptools()["package-dir"] if "." in pkg}
    assert declared == set(ROOMS)


def test_rooms_import_one_way():
    """Each room imports only the rooms it builds on (lazy imports count too)."""
    bad = against_direction(import_graph())
    assert not bad, "imports against the rooms' direction:\n" + "\n".join(bad)


def test_room_rule_sees_a_reverse_import():
    """The rule is not vacuous: evaluation really imports training, and a training module that
    imported evaluation, even lazily, would be caught."""
    g = import_graph()
    assert "deqguard.training.attacks" in g["deqguard.evaluation.attacks"]
    assert "deqguard.training.data" in g["deqguard.evaluation.eval_command"]  # lazily
    assert against_direction({"deqguard.training.window": {"deqguard.evaluation.cli"},
                              "deqguard.evaluation.cli": {"deqguard.training.data",
                                                          "deqguard.errors"}}) == [
        "deqguard.training.window imports deqguard.evaluation.cli"]


def test_wheel_ships_every_module_and_data_file(tmp_path):
    """`make bento`'s wheel command on a copy of the sources: the wheel's deqguard/ holds
    exactly the declared modules and package data, under their import names."""
    cfg = _setuptools()
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in sorted(set(cfg["package-dir"].values())):
        shutil.copytree(ROOT / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))

    expected = set()
    for pkg, folder in package_dirs().items():
        prefix = pkg.replace(".", "/")
        expected |= {f"{prefix}/{p.name}" for p in folder.glob("*.py")}
        for pattern in cfg.get("package-data", {}).get(pkg, []):
            expected |= {f"{prefix}/{p.relative_to(folder).as_posix()}"
                         for p in folder.glob(pattern)}

    out = tmp_path / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = out.glob("deqguard-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n for n in names if n.startswith("deqguard/")}
    assert shipped == expected, (f"missing: {sorted(expected - shipped)}, "
                                 f"extra: {sorted(shipped - expected)}")

    must = ["deqguard/__init__.py", "deqguard/cli.py", "deqguard/errors.py",
            "deqguard/fileio.py", "deqguard/models/weights/default.safetensors"]
    must += [f"deqguard/evaluation/{m}.py" for m in
             ("__init__", "attacks", "autoattack", "cli", "detection", "eval_command", "report",
              "robustness", "runner", "schema", "state")]
    assert set(must) <= shipped
    assert fnmatch.filter(shipped, "deqguard/training/presets/*.yaml")
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "deqguard = deqguard.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.parametrize("argv", [["--help"], ["eval", "--schema"]])
def test_module_entry_point_runs(argv):
    """`python -m deqguard.cli`, as torchrun and the docs call it, from the new root folder."""
    proc = subprocess.run([sys.executable, "-m", "deqguard.cli", *argv], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert ("eval" in proc.stdout) if argv == ["--help"] else '"EvalReport"' in proc.stdout
