"""The decoding-strategy registry: one module per strategy, each registering its name, settings and step.

A :class:`Strategy` says

* ``params``: its own settings (name, type, default, one-line help, check). They live in
  ``DecodingConfig.params``; :func:`resolve` fills defaults and rejects unknown names, wrong types and
  settings of another strategy, and ``infer.py`` derives one ``--flag`` per setting from the registry;
* ``hf``: ``(params, aux) -> generate kwargs`` when Hugging Face ``generate`` runs it (batched, or one
  request at a time when ``hf_batch`` is False; ``aux`` holds the loaded helper models);
* ``start``: ``(ctx, params) -> step`` for medmm's one KV-cached loop (:mod:`medmm.inference.loop`),
  used in sessions (several questions about one input share the encoded modalities and the prompt's
  KV cache), for streaming, and for what HF lacks;
* ``exact``: whether its output equals greedy decoding token for token (tests check every such one).

Adding a strategy is one new module here (imported in :data:`_MODULES`) and its tests::

    register_strategy(Strategy("my_strategy", "one line", params=(Param("alpha", float, 0.5, "why"),),
                               start=my_start))

Pick and check a strategy with :func:`get_strategy` and :func:`resolve`; list them with :func:`list_strategies`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from encoders.registry import Registry

from ...errors import ConfigError


@dataclass(frozen=True)
class Param:
    """One setting of a strategy."""

    name: str
    type: type
    default: Any
    help: str
    check: Callable[[Any], str | None] | None = None
    """Returns an error message for a bad value, else None."""
    required: bool = False
    """No usable default (e.g. the draft model's folder)."""
    loop_only: bool = False
    """Only medmm's loop honours it: a value other than the default sends ``backend=auto`` to the loop and is an
    error with ``backend=hf``."""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Strategy:
    """A registered decoding strategy (see the module docstring)."""

    name: str
    summary: str
    params: tuple[Param, ...] = ()
    hf: Callable[[dict, Any], dict] | None = None
    hf_batch: bool = True
    start: Callable[[Any, dict], Callable] | None = None
    exact: bool = False
    needs_hidden: bool = False
    """The step reads the prompt's last hidden states (the prompt is then prefilled without prefix reuse)."""
    aux_models: tuple[str, ...] = ()
    """Params naming a local model folder the Predictor loads (draft, amateur)."""
    hf_text_only: bool = False
    """``generate`` runs it only for requests without modality inputs (HF's prompt lookup and assistant
    paths mishandle spliced ``inputs_embeds``; measured on transformers 5.24): others take the loop."""

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


_MODULES = ("hf", "speculative", "contrastive", "best_of_n", "value_beam", "mcts")
STRATEGIES = Registry("strategy", config_key="decoding.strategy", modules=[f"{__name__}.{m}" for m in _MODULES])
"""name -> :class:`Strategy`; the modules of :data:`_MODULES` register theirs when first looked up."""


def register_strategy(strategy: Strategy) -> Strategy:
    """Add a strategy; a name can be registered once."""
    if strategy.hf is None and strategy.start is None:
        raise ValueError(f"decoding strategy '{strategy.name}' needs an HF path or a loop step")
    return STRATEGIES.register(strategy.name, strategy, strategy.summary)


def list_strategies() -> list[str]:
    """Registered strategy names."""
    return STRATEGIES.names()


def get_strategy(name: str) -> Strategy:
    """The strategy registered as ``name``; a ConfigError lists the registered ones."""
    return STRATEGIES.get(name)


def all_params() -> dict[str, Param]:
    """Every setting of every strategy by name (a name shared by strategies has one type); for CLI flags."""
    out: dict[str, Param] = {}
    for _, s in STRATEGIES.items():
        for p in s.params:
            if p.name in out and out[p.name].type is not p.type:
                raise ValueError(f"strategy setting '{p.name}' is declared with two types")
            out.setdefault(p.name, p)
    return out


def _coerce(p: Param, value: Any, where: str) -> Any:
    if p.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if p.type is str and value is None and not p.required:
        return value
    if not isinstance(value, p.type) or (p.type is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: '{p.name}' must be {p.type.__name__}, got {value!r}")
    if p.check is not None and (msg := p.check(value)):
        raise ConfigError(f"{where}: '{p.name}' {msg}")
    return value


def resolve(decoding) -> dict:
    """The strategy's settings with defaults filled; a ConfigError for anything it cannot honour.

    ``decoding`` is a :class:`~medmm.config.DecodingConfig`.
    """
    s = get_strategy(decoding.strategy)
    where = f"decoding (strategy={s.name})"
    unknown = [k for k in decoding.params if s.param(k) is None]
    if unknown:
        accepts = ", ".join(p.name for p in s.params) or "no settings"
        raise ConfigError(f"{where}: {', '.join(sorted(unknown))} do not apply to this strategy (it takes {accepts})")
    out = {}
    for p in s.params:
        if p.name in decoding.params:
            out[p.name] = _coerce(p, decoding.params[p.name], where)
        elif p.required:
            raise ConfigError(f"{where}: needs '{p.name}' ({p.help})")
        else:
            out[p.name] = p.default
    return out


# Common checks used by several strategy modules.
def positive(v) -> str | None:
    return None if v > 0 else "must be > 0"


def non_negative(v) -> str | None:
    return None if v >= 0 else "must be >= 0"


def unit_interval(v) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


def at_least_one(v) -> str | None:
    return None if v >= 1 else "must be >= 1"


def one_of(*choices: str):
    """A check that a setting is one of ``choices`` ("must be a, b or c" otherwise)."""
    listed = f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else choices[0]

    def check(v) -> str | None:
        return None if v in choices else f"must be {listed}"

    return check


# ----------------------------------------------------------------------------- command-line flags
def add_decoding_flags(parser, common: bool = True) -> None:
    """``--strategy``, ``--max-new-tokens``, ``--seed`` (``common``) and one flag per registered setting (argparse)."""
    g = parser.add_argument_group("decoding (flags derived from the strategy registry)")
    listing = "; ".join(f"{name}: {s.summary}" for name, s in STRATEGIES.items())
    g.add_argument("--strategy", choices=list_strategies(), help=listing)
    if common:
        g.add_argument("--max-new-tokens", type=int, help="tokens generated at most")
        g.add_argument("--seed", type=int, help="seed for sampling and search")
    for p in all_params().values():
        users = ", ".join(name for name, s in STRATEGIES.items() if s.param(p.name) is not None)
        g.add_argument(p.flag, dest=f"param_{p.name}", type=p.type, default=None,
                       help=f"{p.help} [{users}; default {p.default}]")


def apply_decoding_flags(args, decoding) -> None:
    """Copy the flags given onto ``decoding`` (a DecodingConfig) and check them against the registry."""
    if getattr(args, "strategy", None):
        decoding.strategy = args.strategy
    for name in ("max_new_tokens", "seed"):
        if getattr(args, name, None) is not None:
            setattr(decoding, name, getattr(args, name))
    for name in all_params():
        v = getattr(args, f"param_{name}", None)
        if v is not None:
            decoding.params[name] = v
    decoding.__post_init__()
    resolve(decoding)  # a flag the strategy does not take is an error, not silently dropped
