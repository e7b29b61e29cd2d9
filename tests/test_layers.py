"""The dependency order of medmm's layers, read from the source: no two subpackages import each other.

Every ``import`` / ``from ... import`` in every module is collected from the AST, function-level
(lazy) imports included, and resolved to the ``medmm`` unit it reaches: a subpackage (``medmm.data``)
or a top-level module (``medmm.config``). A pair of units that import each other is a cycle in the
layer order; the shared piece belongs in the lower layer. The floors (:data:`FLOORS`) are the folders a study follows
from disk to the PACS: readers (``io``) -> preparing (``prepare``) beside the runtime datasets (``data``) -> the model
-> inference -> training -> evaluation -> serving and export -> the command line.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "medmm"
ENCODERS = Path(__file__).resolve().parents[1] / "encoders"


def unit_of(module: str) -> str | None:
    """``medmm.data.loaders`` -> ``data``; ``medmm.config`` -> ``config``; ``medmm`` -> ``medmm``; else None."""
    parts = module.split(".")
    if parts[0] != "medmm":
        return None
    return parts[1] if len(parts) > 1 else "medmm"


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path, root: Path) -> list[tuple[str, int]]:
    """Absolute names of every module ``path`` imports (relative imports resolved), with line numbers."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:  # from .. import x, y: each may be a module
                    out += [(f"{target}.{a.name}", node.lineno) for a in node.names]
                else:
                    out.append((target, node.lineno))
            elif node.module:
                out.append((node.module, node.lineno))
    return out


def unit_edges(root: Path = PKG) -> dict[tuple[str, str], list[str]]:
    """(importing unit, imported unit) -> ["file:line", ...] over every module of the package."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(root.rglob("*.py")):
        src = unit_of(module_name(path, root))
        for mod, line in imported_modules(path, root):
            dst = unit_of(mod)
            if dst and src and dst != src and dst != "medmm":
                edges[(src, dst)].append(f"{path.relative_to(root.parent)}:{line}")
    return edges


def mutual_pairs(edges: dict[tuple[str, str], list[str]]) -> list[str]:
    pairs = []
    for (a, b), where in sorted(edges.items()):
        if a < b and (b, a) in edges:
            pairs.append(f"{a} <-> {b}: {a} imports {b} at {where[:3]}; {b} imports {a} at {edges[(b, a)][:3]}")
    return pairs


def test_no_two_subpackages_import_each_other():
    edges = unit_edges()
    assert edges, "no imports found: is the package path right?"
    assert not mutual_pairs(edges), "\n".join(mutual_pairs(edges))


def test_the_walker_sees_function_level_and_relative_imports(tmp_path):
    """The check itself can fail: a lazy import inside a function that closes a cycle is found."""
    pkg = tmp_path / "medmm"
    (pkg / "model").mkdir(parents=True)
    (pkg / "eval").mkdir()
    for d in (pkg, pkg / "model", pkg / "eval"):
        (d / "__init__.py").write_text("")
    (pkg / "model" / "net.py").write_text("def f():\n    from ..eval.plots import draw\n    return draw\n")
    (pkg / "eval" / "plots.py").write_text("from medmm.model import net\n\ndef draw():\n    return net\n")
    pairs = mutual_pairs(unit_edges(pkg))
    assert len(pairs) == 1 and pairs[0].startswith("eval <-> model") and "medmm/model/net.py:2" in pairs[0]


def test_encoders_import_nothing_from_medmm():
    bad = [f"{p.name}:{line} imports {m}" for p in sorted(ENCODERS.rglob("*.py"))
           for m, line in imported_modules(p, ENCODERS) if m.split(".")[0] == "medmm"]
    assert not bad, bad


@pytest.mark.parametrize("low,high", [("config", "training"), ("data", "model"), ("model", "training"),
                                      ("training", "eval"), ("inference", "eval"), ("model", "eval"),
                                      ("scoring", "eval"), ("data", "training")])
def test_lower_layers_do_not_reach_up(low, high):
    """The pairs this refactor untangled stay one-way: the lower layer never imports the higher one."""
    where = unit_edges().get((low, high), [])
    assert not where, f"{low} imports {high} at {where}"


# The floor of each unit: a unit imports only units on lower floors, or the same-floor pairs in SAME_FLOOR.
FLOORS = {
    "errors": 0, "utils": 1, "config": 2, "scoring": 2,
    "io": 3, "retrieval": 3,
    "modalities": 4,
    "prepare": 5, "data": 5,
    "model": 6,
    "inference": 7,
    "training": 8,
    "eval": 9,
    "serve": 10, "export": 10,
    "demo": 11, "cli": 12,
}
SAME_FLOOR = {("prepare", "data")}  # preparing reuses runtime pieces (conversations, rewards); never the reverse


def test_every_unit_has_a_floor():
    units = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    units |= {p.stem for p in PKG.glob("*.py") if p.stem not in ("__init__", "__main__")}
    assert not units - set(FLOORS), f"give these a floor in FLOORS: {sorted(units - set(FLOORS))}"


def test_imports_go_down_the_floors():
    bad = [f"{a} (floor {FLOORS[a]}) imports {b} (floor {FLOORS[b]}) at {where[:3]}"
           for (a, b), where in sorted(unit_edges().items())
           if a in FLOORS and b in FLOORS and FLOORS[b] >= FLOORS[a] and (a, b) not in SAME_FLOOR]
    assert not bad, "\n".join(bad)


def test_the_floor_check_can_fail():
    """A runtime dataset that imports a preparing command is the wall the floors guard: the check sees it."""
    edges = {("data", "prepare"): ["medmm/data/x.py:1"], ("prepare", "data"): ["medmm/prepare/y.py:1"]}
    bad = [(a, b) for (a, b) in edges if FLOORS[b] >= FLOORS[a] and (a, b) not in SAME_FLOOR]
    assert bad == [("data", "prepare")]


def test_dicom_is_opened_only_in_io():
    """One DICOM model: serving, preparing and everything else read DICOM through medmm/io's defensive reader."""
    bad = [f"{p.relative_to(PKG.parent)}:{n}" for p in sorted(PKG.rglob("*.py")) if p.parent.name != "io"
           for n, line in enumerate(p.read_text().splitlines(), 1) if "dcmread(" in line]
    assert not bad, f"pydicom.dcmread outside medmm/io: {bad}"
