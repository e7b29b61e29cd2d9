"""The one registry primitive, every registry built on it, ``medmm list KIND`` and the docs that name registries."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import textwrap
import threading

import pytest

from encoders import build_encoder, register_encoder
from encoders.registry import Registry, RegistryError, summary_of
from medmm import config as C
from medmm.cli import LIST_KINDS, list_registry
from medmm.cli import main as cli
from medmm.data.featurisers import Featuriser, build_featuriser, register_featuriser
from medmm.data.loaders import ModalityLoader, build_loader, register_loader
from medmm.data.rewards import get_reward, register_reward
from medmm.errors import ConfigError
from medmm.eval.benchmarks import Benchmark, get_benchmark, register_benchmark
from medmm.eval.benchmarks.registry import field_docs
from medmm.inference.strategies import Strategy, get_strategy, register_strategy
from medmm.model.heads import build_head, register_head
from medmm.model.projectors import build_projector, register_projector
from medmm.retrieval import dense
from medmm.retrieval.sources import get_source, register_source
from medmm.training.stages import Stage, get_stage, register_stage


# ----------------------------------------------------------------------------- the primitive
def _widgets() -> Registry:
    reg = Registry("widget", config_key="model.widget")
    reg.register("alpha", lambda: 1, "the first widget")
    reg.register("beta", lambda: 2, "the second widget")
    return reg


def test_an_unknown_name_is_a_config_error_naming_the_key_the_closest_name_and_the_choices():
    reg = _widgets()
    with pytest.raises(ConfigError) as e:
        reg.get("alpah")
    assert str(e.value) == ("model.widget: unknown widget 'alpah' (did you mean 'alpha'?); "
                            "choose one of: alpha, beta")
    assert isinstance(e.value, RegistryError) and isinstance(e.value, ValueError)
    with pytest.raises(ConfigError, match=r"^model\.widget: unknown widget 'zzz'; choose one of: alpha, beta$"):
        reg.get("zzz")  # nothing close: no guess
    with pytest.raises(ConfigError, match=r"unknown widget 'x{64}\.\.\. \(5000 chars\)'"):
        reg.get("x" * 5000)  # a huge value from a config file is not echoed whole
    with pytest.raises(ConfigError, match="unknown widget"):
        reg.get(["alpha"])  # an unhashable value from YAML is an unknown name, not a TypeError
    with pytest.raises(ConfigError, match=r"unknown gadget 'a'; choose one of: \(none registered\)"):
        Registry("gadget").get("a")


def test_a_duplicate_name_is_an_error_and_keeps_the_first_entry():
    reg = _widgets()
    first = reg.get("alpha")
    with pytest.raises(RegistryError, match="widget 'alpha' is registered twice"):
        reg.register("alpha", lambda: 3)
    with pytest.raises(RegistryError, match="registered twice"):
        reg.register("alpha", first)  # the same object again is a duplicate too
    assert reg.get("alpha") is first and reg.summary("alpha") == "the first widget"
    with pytest.raises(RegistryError, match="non-empty string"):
        reg.register("", lambda: 4)


def test_register_as_a_decorator_and_summaries_from_docstrings():
    reg = Registry("widget")

    @reg.register("documented")
    def documented():
        """A widget with ``markup``,
        wrapped over two lines.

        Details that stay out of the summary."""

    class Undocumented:
        pass

    reg.register("undocumented", Undocumented)
    reg.register("explicit", documented, "given   summary")
    assert reg.get("documented") is documented  # the decorator returns the object
    assert reg.summary("documented") == "A widget with markup, wrapped over two lines."
    assert reg.summary("undocumented") == "" and reg.summary("explicit") == "given summary"
    assert reg.names() == ["documented", "explicit", "undocumented"]
    assert reg.items() == [("documented", documented), ("explicit", documented), ("undocumented", Undocumented)]
    assert "explicit" in reg and "nope" not in reg and len(reg) == 3
    assert reg.lines() == ["documented    A widget with markup, wrapped over two lines.",
                           "explicit      given summary", "undocumented"]
    # an instance has no docstring of its own: its class's would be a wrong summary
    assert summary_of(Undocumented()) == "" and summary_of(ValueError("x")) == ""


def test_built_in_members_load_on_the_first_lookup(tmp_path, monkeypatch):
    pkg = tmp_path / "toy_plugins"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from encoders.registry import Registry\nTOYS = Registry('toy', package=__name__)\n")
    (pkg / "one.py").write_text('from . import TOYS\n\n@TOYS.register("one")\ndef one():\n    """The first toy."""\n')
    (pkg / "two.py").write_text('from . import TOYS\n\nTOYS.register("two", object(), "the second toy")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    toy_plugins = importlib.import_module("toy_plugins")  # made above, in tmp_path: not a dependency to declare

    assert "toy_plugins.one" not in sys.modules  # importing the registry imports no member
    assert toy_plugins.TOYS.names() == ["one", "two"] and toy_plugins.TOYS.summary("one") == "The first toy."

    broken = Registry("toy", modules=("toy_plugins.one", "toy_plugins.missing"))
    with pytest.raises(ModuleNotFoundError):
        broken.names()
    with pytest.raises(ModuleNotFoundError):  # not marked loaded after a failure: the next lookup says it again
        broken.names()


def test_a_lookup_from_another_thread_waits_for_the_built_ins(tmp_path, monkeypatch):
    """The HTTP API's first requests may look a strategy up at once: none may see a half-loaded table."""
    pkg = tmp_path / "slow_plugins"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from encoders.registry import Registry\n"
                                     "SLOW = Registry('slow', modules=('slow_plugins.impl',))\n")
    (pkg / "impl.py").write_text("import time\nfrom . import SLOW\n\nfor n in 'abc':\n"
                                 "    SLOW.register(n, object(), n)\n    time.sleep(0.1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    slow_plugins = importlib.import_module("slow_plugins")  # made above, in tmp_path

    seen: list[list[str]] = []
    threads = [threading.Thread(target=lambda: seen.append(slow_plugins.SLOW.names())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [["a", "b", "c"]] * 4


def test_the_primitive_is_stdlib_only_so_medmm_errors_stays_light():
    """``medmm.errors`` imports the primitive from ``encoders``: neither may pull torch in, and ``encoders`` never
    imports medmm (its unknown names are RegistryErrors until medmm is imported, then ConfigErrors)."""
    code = textwrap.dedent("""
        import sys
        import encoders
        from encoders.registry import Registry, RegistryError
        assert Registry.error is RegistryError and not any(m.startswith("medmm") for m in sys.modules)
        import medmm.errors
        assert Registry.error is medmm.errors.ConfigError
        assert "torch" not in sys.modules, "importing the registry primitive imported torch"
        try:
            encoders.get_encoder_spec("vit2d_tinyy")
        except medmm.errors.ConfigError as e:
            assert "did you mean 'vit2d_tiny'" in str(e), e
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ----------------------------------------------------------------------------- every registry
@pytest.mark.parametrize("kind", sorted(LIST_KINDS))
def test_every_registry_follows_the_rules(kind):
    reg = list_registry(kind)
    assert isinstance(reg, Registry)
    names = reg.names()
    assert names, f"the {kind} registry is empty"
    for name in names:
        assert reg.summary(name).strip(), f"{kind}: '{name}' has no one-line summary (a docstring or summary=)"
    with pytest.raises(ConfigError, match=f"unknown {reg.kind} 'no_such_entry'.*{re.escape(names[0])}"):
        reg.get("no_such_entry")
    first = reg.get(names[0])
    with pytest.raises(RegistryError, match="registered twice"):
        reg.register(names[0], object(), "a copy")
    assert reg.get(names[0]) is first


def _public_api():
    """Each registry's public functions, as callers use them: (unknown-name call, re-register an existing name)."""
    return {
        "encoders": (lambda n: build_encoder(n), lambda n: register_encoder(n, "image")(lambda: None)),
        "projectors": (lambda n: build_projector(n, 4, 4), lambda n: register_projector(n)(lambda **_: None)),
        "heads": (lambda n: build_head(n, 4, 1, 2), lambda n: register_head(n)(lambda **_: None)),
        "stages": (get_stage, lambda n: register_stage(n)(type("Dup", (Stage,), {}))),
        "strategies": (get_strategy, lambda n: register_strategy(Strategy(n, "a copy", hf=lambda p, a: {}))),
        "benchmarks": (get_benchmark, lambda n: register_benchmark(type("Dup", (Benchmark,), {"name": n}))),
        "rewards": (get_reward, lambda n: register_reward(n, "a copy")(lambda p, e: 0.0)),
        "featurisers": (lambda n: build_featuriser(C.HeadStageConfig(featuriser=n, data=C.HeadDataConfig(split="random"))),
                        lambda n: register_featuriser(n)(type("Dup", (Featuriser,), {}))),
        "sources": (get_source, lambda n: register_source(n)(lambda path=None: iter(()))),
        "dense-encoders": (lambda n: dense.build_encoder(n, []), lambda n: dense.register_encoder(n)(lambda *a: None)),
        "loaders": (lambda n: build_loader(n, C.PreprocessConfig()), lambda n: register_loader(n, ModalityLoader)),
    }


@pytest.mark.parametrize("kind", sorted(_public_api()))
def test_the_public_functions_keep_the_rules(kind):
    """The thin wrappers callers use (``get_stage``, ``build_loader``, ``register_projector``...): an unknown name
    is a ConfigError; re-registering a name raises (projectors, dense encoders and loaders used to overwrite)."""
    unknown, register_again = _public_api()[kind]
    reg = list_registry(kind)
    name = reg.names()[0]
    with pytest.raises(ConfigError, match=f"unknown {reg.kind} 'no_such_entry'"):
        unknown("no_such_entry")
    before = reg.get(name)
    with pytest.raises(RegistryError, match="registered twice"):
        register_again(name)
    assert reg.get(name) is before


# ----------------------------------------------------------------------------- medmm list
@pytest.mark.parametrize("kind", sorted(LIST_KINDS))
def test_medmm_list_prints_every_entry_with_its_summary(kind, capsys):
    cli(["list", kind])
    lines = capsys.readouterr().out.splitlines()
    reg = list_registry(kind)
    assert [line.split()[0] for line in lines] == reg.names()
    for line, name in zip(lines, reg.names()):
        assert line.split(None, 1)[1] == reg.summary(name)


def test_medmm_list_without_a_kind_lists_the_kinds(capsys):
    cli(["list"])
    assert capsys.readouterr().out.split() == list(LIST_KINDS)
    assert {"modalities", "stages", "strategies", "benchmarks", "encoders", "projectors", "heads", "featurisers",
            "rewards", "sources", "dense-encoders", "loaders"} <= set(LIST_KINDS)


def test_medmm_list_of_an_unknown_kind_exits_1_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as e:
        cli(["list", "stagse"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown kind 'stagse' (did you mean 'stages'?)" in err
    assert all(k in err for k in LIST_KINDS)


def test_medmm_eval_list_is_medmm_list_benchmarks(capsys):
    cli(["list", "benchmarks"])
    listed = capsys.readouterr().out
    cli(["eval", "list"])
    assert capsys.readouterr().out == listed and "vqa" in listed


# ----------------------------------------------------------------------------- docs name no hand-made lists
def _config_docs():
    fields = [(C.TrainerConfig, "stage", "stages"), (C.EncoderConfig, "name", "encoders"),
              (C.ProjectorConfig, "type", "projectors"), (C.ModalityConfig, "loader", "loaders"),
              (C.HeadStageConfig, "featuriser", "featurisers"), (C.HeadStageConfig, "loader", "loaders"),
              (C.HeadStageConfig, "type", "heads"), (C.IndexConfig, "dense_encoder", "dense-encoders"),
              (C.DecodingConfig, "strategy", "strategies")]
    return [(f"{cls.__name__}.{name}", field_docs(cls)[name], kind) for cls, name, kind in fields]


def _hand_listed(text: str, names: list[str]) -> list[str]:
    return [n for n in names if re.search(rf"(?<![\w.]){re.escape(n)}(?![\w])", text)]


@pytest.mark.parametrize(("where", "doc", "kind"), _config_docs(), ids=[w for w, _, _ in _config_docs()])
def test_config_fields_point_at_medmm_list_instead_of_a_hand_list(where, doc, kind):
    """A field naming a registry entry says where the choices are listed, and lists none by hand (a hand list goes
    stale: ``trainer.stage`` once listed 7 of 10 stages). Naming every registered entry would also pass."""
    names = list_registry(kind).names()
    assert f"medmm list {kind}" in doc, f"{where}: say 'medmm list {kind}'"
    named = _hand_listed(doc, names)
    assert len(named) < 3 or set(named) == set(names), f"{where} lists {named} by hand, not all of {names}"


@pytest.mark.parametrize("module", ["medmm.training.stages", "medmm.data.featurisers", "medmm.data.loaders",
                                    "medmm.data.rewards", "medmm.retrieval.dense", "medmm.model.heads",
                                    "medmm.inference.strategies", "medmm.eval.benchmarks", "encoders"])
def test_registry_modules_list_no_members_by_hand(module):
    mod = importlib.import_module(module)
    regs = [v for v in vars(mod).values() if isinstance(v, Registry)]
    if not regs:  # a package re-exporting its registry module's functions
        regs = [v for v in vars(importlib.import_module(f"{module}.registry")).values() if isinstance(v, Registry)]
    assert regs
    for reg in regs:
        named = _hand_listed(mod.__doc__ or "", reg.names())
        assert len(named) < 3 or set(named) == set(reg.names()), f"{module}'s docstring lists {named} by hand"
