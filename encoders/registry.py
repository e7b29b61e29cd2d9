"""The one registry primitive (:class:`Registry`) and the encoder catalogue built on it.

Every swappable part of medmm (encoders here; stages, strategies, benchmarks, projectors, heads,
featurisers, rewards, retrieval sources, dense encoders and loaders in ``medmm``) is a name -> object
table made with :class:`Registry`::

    STAGES = Registry("stage", config_key="trainer.stage", package="medmm.training.stages")

    @STAGES.register("sft")            # or STAGES.register("sft", SFTStage, "one line")
    class SFTStage(Stage):             # its docstring's first paragraph is the entry's summary
        ...

    STAGES.get("sft"); STAGES.names(); STAGES.items(); STAGES.summary("sft")

Rules, the same for every registry:

* a name is registered once: registering a taken name again (another object or the same one) raises
  :class:`RegistryError`;
* an unknown name raises :attr:`Registry.error` naming the kind, the closest names and every choice
  (``trainer.stage: unknown stage 'sfy' (did you mean 'sft'?); choose one of: align, dpo, ...``);
* each entry has a one-line summary: the one given, else the first paragraph of the object's own
  docstring (``medmm list KIND`` prints them);
* built-in members may live in other modules, imported on first lookup (``modules=`` / ``package=``), so
  importing a registry is cheap and a plug-in (a test, a user's module) registers the same way.

Why the primitive lives here: ``encoders/`` never imports ``medmm`` (it is the lower layer), yet its
unknown-name error must be the ``medmm.errors.ConfigError`` every other registry raises. So this module is
stdlib only (torch is imported where weights are read), :class:`RegistryError` is the base,
``medmm.errors.ConfigError`` subclasses it, and ``medmm.errors`` sets :attr:`Registry.error` to
``ConfigError`` when imported (``import medmm`` imports it). Code that catches ``ConfigError`` has imported
``medmm.errors``, so ``except ConfigError`` works for every registry, the encoder catalogue included; code
that uses ``encoders`` alone catches :class:`RegistryError` (a ``ValueError``), which covers both.

The encoder catalogue: ``register_encoder``, ``build_encoder(name, **overrides)``, ``list_encoders``. A
registered builder takes every architecture argument as a keyword; named presets (``*_tiny``) fix sizes for
tests and the demo. ``checkpoint=`` loads local weights (safetensors or a torch state dict, always with
``weights_only=True``).
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

__all__ = ["ENCODERS", "EncoderOutput", "EncoderSpec", "Registry", "RegistryError", "build_encoder",
           "get_encoder_spec", "list_encoders", "load_weights", "register_encoder", "summary_of"]


class RegistryError(ValueError):
    """A registry was asked for a name it does not hold, or to register a name it already holds.

    ``medmm.errors.ConfigError`` subclasses it (see the module docstring).
    """


def summary_of(obj: Any) -> str:
    """The first paragraph of a class's or function's own docstring, on one line without reST's double backquotes
    ("" when it has none).

    An instance (a dataclass record, a spec) has no docstring of its own (``obj.__doc__`` is its class's), so
    registries of instances pass their summary explicitly.
    """
    doc = obj.__doc__ if isinstance(obj, type) or (callable(obj) and hasattr(obj, "__name__")) else None
    if not isinstance(doc, str):
        return ""
    first = doc.strip().split("\n\n", 1)[0].replace("``", "")
    return " ".join(first.split())


def _shown(name: Any, limit: int = 64) -> str:
    """A name as an error message repeats it: never the whole of a huge value from a config file."""
    text = str(name)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _either(names: list[str]) -> str:
    """``'a'``, ``'a' or 'b'``, ``'a', 'b' or 'c'``."""
    quoted = [f"'{n}'" for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


@dataclass(frozen=True)
class _Entry:
    obj: Any
    summary: str


class Registry:
    """A name -> object table of one kind of swappable part (see the module docstring for the rules).

    Args:
        kind: what a member is, for messages (``"stage"``, ``"dense encoder"``).
        config_key: the config field that names a member (``"trainer.stage"``); it prefixes the unknown-name error.
        modules: modules holding built-in members, imported on the first lookup.
        package: a package whose every module holds built-in members, imported on the first lookup.
    """

    error: ClassVar[type[RegistryError]] = RegistryError
    """What an unknown name raises; ``medmm.errors`` sets it to ``ConfigError`` (a subclass) when imported."""

    def __init__(self, kind: str, config_key: str | None = None, modules: Iterable[str] = (),
                 package: str | None = None):
        self.kind, self.config_key = kind, config_key
        self._modules, self._package = tuple(modules), package
        self._entries: dict[str, _Entry] = {}
        self._loaded = not (self._modules or package)
        self._loading = False
        self._lock = threading.RLock()  # re-entrant: the modules being imported register and may look names up

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} registered)"

    # ------------------------------------------------------------------ registering
    def register(self, name: str, obj: Any = None, summary: str | None = None):
        """Register ``obj`` under ``name`` and return it; without ``obj``, a decorator that does so.

        Args:
            name: the name configs and the command line use.
            obj: the member (a class, a function, a spec record).
            summary: one line for ``medmm list``; default: the first paragraph of ``obj``'s docstring.

        Raises:
            RegistryError: ``name`` is already registered. Registering does not load the built-in members (their
                modules register while loading), so a plug-in that takes a built-in's name fails when they load.
        """
        if obj is None:
            return lambda o: self.register(name, o, summary)
        if not isinstance(name, str) or not name:
            raise RegistryError(f"a {self.kind} needs a non-empty string name, got {name!r}")
        old = self._entries.get(name)
        if old is not None:
            where = [getattr(o, "__module__", None) or type(o).__module__ for o in (old.obj, obj)]
            raise RegistryError(f"{self.kind} '{name}' is registered twice ({where[0]} and {where[1]})")
        self._entries[name] = _Entry(obj, " ".join((summary if summary is not None else summary_of(obj)).split()))
        return obj

    def register_subclass(self, name: str, base: type, summary: str | None = None):
        """A class decorator: register a subclass of ``base`` under ``name`` and set its ``name`` attribute (what
        stages, featurisers and the like read back); anything but a ``base`` subclass is a ``TypeError``."""

        def deco(cls: type) -> type:
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise TypeError(f"registering {self.kind} '{name}' takes a {base.__name__} subclass, not {cls!r}")
            self.register(name, cls, summary)
            cls.name = name
            return cls

        return deco

    def _load_builtins(self) -> None:
        if self._loaded:
            return
        # Another thread (the HTTP API's first requests) waits here until the table is whole; the loading thread
        # itself passes (its modules register and may look names up while it imports them).
        with self._lock:
            if self._loaded or self._loading:
                return
            self._loading = True
            try:
                names = list(self._modules)
                if self._package is not None:
                    pkg = importlib.import_module(self._package)
                    names += [f"{self._package}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)]
                for module in names:
                    importlib.import_module(module)
                self._loaded = True  # after a failure a later lookup tries again (imported modules are not re-run)
            finally:
                self._loading = False

    # ------------------------------------------------------------------ looking up
    def names(self) -> list[str]:
        """The registered names, sorted."""
        self._load_builtins()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, Any]]:
        """``(name, object)`` pairs, sorted by name."""
        return [(n, self._entries[n].obj) for n in self.names()]

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return isinstance(name, str) and name in self._entries

    def __len__(self) -> int:
        self._load_builtins()
        return len(self._entries)

    def get(self, name: str) -> Any:
        """The object registered as ``name``.

        Raises:
            RegistryError: (:attr:`error`, ``ConfigError`` under medmm) ``name`` is not registered; the message
                names the config key, the closest names and every choice.
        """
        if name in self:
            return self._entries[name].obj
        choices = self.names()
        close = difflib.get_close_matches(str(name), choices, n=3, cutoff=0.6)
        hint = f" (did you mean {_either(close)}?)" if close else ""
        where = f"{self.config_key}: " if self.config_key else ""
        raise self.error(f"{where}unknown {self.kind} '{_shown(name)}'{hint}; choose one of: "
                         f"{', '.join(choices) or '(none registered)'}")

    def summary(self, name: str) -> str:
        """The one-line summary of ``name`` (an unknown name raises as :meth:`get` does)."""
        self.get(name)
        return self._entries[name].summary

    def lines(self) -> list[str]:
        """``name  summary`` per entry, names padded to one column (what ``medmm list KIND`` prints)."""
        names = self.names()
        width = max((len(n) for n in names), default=0)
        return [f"{n:<{width}}  {self._entries[n].summary}".rstrip() for n in names]


# ----------------------------------------------------------------------------- the encoder catalogue
class EncoderOutput(NamedTuple):
    """Encoder result: tokens ``(B, N, D)`` and a ``(B, N)`` bool mask (True = valid) or None."""

    tokens: torch.Tensor
    mask: torch.Tensor | None


@dataclass(frozen=True)
class EncoderSpec:
    """A registered encoder: its builder, the modality it reads (``image``, ``volume``, ...) and one line."""

    name: str
    builder: Callable[..., nn.Module]
    modality: str
    description: str


ENCODERS = Registry("encoder", modules=("encoders.genomics", "encoders.molecule", "encoders.pathology",
                                        "encoders.radiology"))
"""name -> :class:`EncoderSpec`; the families' modules register into it when first looked up."""


def register_encoder(name: str, modality: str, description: str = ""):
    """Decorator: register ``builder(**kwargs) -> nn.Module`` under ``name``; ``description`` defaults to the first
    paragraph of its docstring."""

    def deco(fn):
        spec = EncoderSpec(name, fn, modality, description or summary_of(fn))
        ENCODERS.register(name, spec, spec.description)
        return fn

    return deco


def list_encoders(modality: str | None = None) -> list[str]:
    """Registered encoder names, optionally only those of one modality."""
    return [k for k, v in ENCODERS.items() if modality is None or v.modality == modality]


def get_encoder_spec(name: str) -> EncoderSpec:
    """The spec registered as ``name``; an unknown name raises :attr:`Registry.error` listing the choices."""
    return ENCODERS.get(name)


def load_weights(module: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Load a local weights file into ``module`` (safetensors, or torch with ``weights_only=True``)."""
    # imported here, not at the top, so that this module (and so medmm.errors, which imports it) stays stdlib only
    import torch

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"encoder weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    missing, unexpected = module.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(f"{path}: weights do not match the encoder (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return module


def build_encoder(name: str, checkpoint: str | None = None, **overrides) -> nn.Module:
    """Build a registered encoder; ``checkpoint`` loads local weights into it."""
    enc = get_encoder_spec(name).builder(**overrides)
    for attr in ("out_dim", "num_tokens"):
        if not hasattr(enc, attr):
            raise TypeError(f"encoder '{name}' does not define '{attr}'")
    if checkpoint:
        load_weights(enc, checkpoint)
    return enc
