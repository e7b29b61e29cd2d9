"""Training stages: every way medmm trains, each one module, all run by the one DeepSpeed loop.

``trainer.stage: NAME`` in a recipe picks the stage registered under NAME; :func:`medmm.training.loop.run_training`
runs it (ZeRO 0-3, checkpoints, ``--resume``, progress bar, TensorBoard, ``metrics.jsonl``, early
stopping). ``medmm list stages`` prints the registered stages, one line each (each stage class's docstring).

Adding a stage is one new module in this folder; it is found and imported automatically::

    # medmm/training/stages/pretrain.py
    from medmm.training.stages import Stage, StageData, register_stage

    @register_stage("pretrain")
    class PretrainStage(Stage):
        section = "pretrain"        # its settings: cfg.pretrain, a dataclass in medmm/config.py (or None)
        metrics = ("tokens",)       # what loss() reports besides the loss

        def build_model(self): ...                      # the nn.Module DeepSpeed trains
        def build_data(self) -> StageData: ...          # dataset + resumable sampler + collate
        def loss(self, engine, batch): ...              # (loss, {"tokens": n}); default: engine(**batch).loss
        def save(self, engine, model, out_dir, zero_stage, summary): ...   # the final folder

A stage may also define :meth:`Stage.evaluate` (validation metrics, read by ``trainer.eval_every``,
``trainer.patience`` and ``trainer.restore_best`` through :attr:`Stage.monitor`) and :meth:`Stage.finish`
(work after the last step, e.g. calibration and test metrics). Stages registered outside this folder
(a test, a plug-in) work the same once their module is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from encoders.registry import Registry

from ...errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from ...config import TrainConfig


@dataclass
class StageContext:
    """Where a stage runs: this process's rank, the world size and the run folder."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    output_dir: Path = Path("runs/train")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class StageData:
    """A stage's training data as the loop consumes it.

    ``sampler(start)`` returns this rank's micro-batches (lists of dataset indices) from micro-step
    ``start`` on, endlessly: a pure function of the seed and the step, so ``--resume`` replays exactly
    the batches an uninterrupted run would have seen.
    """

    dataset: Any
    """A map-style dataset (``torch.utils.data.Dataset``) indexed by what ``sampler`` yields."""
    sampler: Callable[[int], Iterable[list[int]]]
    """start micro-step -> this rank's micro-batches of indices, endless."""
    collate: Callable[[list], dict]
    """Samples -> one batch (a dict of tensors; ``load_errors`` is popped before the forward pass)."""
    batches_per_epoch: int
    """Micro-batches per rank in one pass over the data (``trainer.epochs`` counts these)."""
    num_workers: int = 0
    """DataLoader worker processes."""
    pin_memory: bool = False
    """Pin host batches (CUDA only)."""
    description: str = ""
    """One line for the start-up log (dataset names and sizes; no identifiers)."""
    stream: Callable[[int], Any] | None = None
    """Streamed data instead of ``dataset``/``sampler``: start micro-step -> an iterable dataset of collated
    micro-batches from that step on, endless (:class:`medmm.data.streaming.StreamBatches`)."""


class Stage:
    """Base class of a training stage; subclass it, set :attr:`section`, and decorate with :func:`register_stage`.

    Args:
        cfg: the whole training config (a stage reads ``cfg.trainer`` and its own section).
        ctx: rank, world size and run folder.
    """

    name: ClassVar[str] = ""
    section: ClassVar[str | None] = None
    """The ``TrainConfig`` attribute holding this stage's settings (a dataclass in ``medmm/config.py``), or None."""
    metrics: ClassVar[tuple[str, ...]] = ()
    """Names of the per-step values :meth:`loss` returns besides the loss (TensorBoard and ``metrics.jsonl``)."""
    monitor: ClassVar[str | None] = None
    """The key of :meth:`evaluate`'s result that early stopping and ``restore_best`` follow (higher is better)."""
    pad_missing_modalities: ClassVar[bool] = False
    """Whether batches carry a dummy input for every modality they lack (every rank then runs every encoder)."""

    def __init__(self, cfg: TrainConfig, ctx: StageContext | None = None):
        self.cfg = cfg
        self.ctx = ctx or StageContext(output_dir=Path(cfg.trainer.output_dir))

    @property
    def settings(self) -> Any:
        """This stage's section of the config (``cfg.<section>``), or None."""
        return getattr(self.cfg, self.section) if self.section else None

    # ------------------------------------------------------------------ what the loop calls, in order
    def build_model(self) -> nn.Module:  # pragma: no cover - interface
        """The module DeepSpeed wraps (its trainable parameters are optimised)."""
        raise NotImplementedError

    def build_data(self) -> StageData:  # pragma: no cover - interface
        """The training data."""
        raise NotImplementedError

    def streamed_data(self, load: Callable, collate: Callable, record_fn: Callable | None = None,
                      pack: Callable | None = None, label: str = "") -> StageData:
        """The :class:`StageData` of ``format: wds`` datasets (:mod:`medmm.data.streaming`): this rank's micro-batches
        streamed from the shards, from any micro-step on.

        Args:
            load: turns one record into a sample (decodes its members).
            collate: turns samples into a batch.
            record_fn: a shard sample -> its records (default: the sample's conversation records).
            pack: packs a window of samples into blocks (pretraining), or None.
            label: what the description starts with.
        """
        from ...data.streaming import SourceRecords, StreamBatches, source_splits, wds_sources

        d, t = self.cfg.data, self.cfg.trainer
        sources, batches, desc = wds_sources(d.datasets, self.ctx.world_size, t.micro_batch_size, d.epoch_size)
        to_records = SourceRecords(source_splits(d.datasets, sources), record_fn)

        def stream(start: int) -> StreamBatches:
            return StreamBatches(sources, t.micro_batch_size, to_records, load, collate, self.ctx.rank,
                                 self.ctx.world_size, t.seed, d.shuffle_buffer, start=start, pack=pack)

        return StageData(None, None, collate, batches, num_workers=d.num_workers, pin_memory=d.pin_memory,
                         description=f"{label}{desc}", stream=stream)

    def parameters(self, model: nn.Module) -> list:
        """What the optimiser updates (default: every parameter that requires a gradient)."""
        return [p for p in model.parameters() if p.requires_grad]

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """One micro-batch's loss (a scalar tensor) and its extra metrics (named in :attr:`metrics`)."""
        return engine(**batch).loss, {}

    def evaluate(self, model: nn.Module) -> dict[str, float | None] | None:
        """Validation metrics of the model (every rank calls it; None = this stage has no validation data)."""
        return None

    def finish(self, model: nn.Module, summary: dict) -> dict:
        """Work after the last step, before saving (every rank calls it); returns entries for the summary."""
        return {}

    def save(self, engine, model: nn.Module, out_dir: Path, zero_stage: int, summary: dict) -> Path | None:
        """Write the final folder (every rank calls it: ZeRO-3 gathers are collective); rank 0 returns its path."""
        raise NotImplementedError  # pragma: no cover - interface

    def load_errors(self) -> list[dict]:
        """Error records of inputs this process failed to load (rank 0 writes them all to ``errors.jsonl``)."""
        return []

    def describe(self, model: nn.Module) -> str:
        """One start-up line about the model (no identifiers)."""
        n = sum(p.numel() for p in model.parameters())
        k = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return f"params={n:,} trainable={k:,}"


def seeded_epoch_batches(n: int, batch_size: int, rank: int, world: int, seed: int, what: str = "samples"):
    """A resumable sampler over ``n`` in-memory samples: ``(sampler, batches_per_epoch)``.

    ``sampler(start)`` yields this rank's micro-batches (lists of indices) from micro-step ``start`` on, forever;
    epoch ``e``'s order is a pure function of ``(seed, e)``, so ``--resume`` replays the same batches, and each rank
    takes its own disjoint slice of every global batch. A ``ConfigError`` says when ``n`` makes no micro-batch.
    """
    import numpy as np

    per_epoch = n // (batch_size * world)
    if per_epoch == 0:
        raise ConfigError(f"{n} {what} make no micro-batch of {batch_size} on {world} ranks")

    def sampler(start: int):
        step = start
        while True:
            epoch, b = divmod(step, per_epoch)
            perm = np.random.default_rng([seed, epoch]).permutation(n)
            lo = (b * world + rank) * batch_size
            yield perm[lo:lo + batch_size].tolist()
            step += 1

    return sampler, per_epoch


STAGES = Registry("stage", config_key="trainer.stage", package=__name__)
"""name -> :class:`Stage` subclass; every module of this folder registers its stage when first looked up."""


def register_stage(name: str, summary: str | None = None):
    """Class decorator: register a :class:`Stage` subclass under ``name`` (what ``trainer.stage`` names) and set
    its ``name``; ``summary`` (for ``medmm list stages``) defaults to its docstring's first paragraph."""
    return STAGES.register_subclass(name, Stage, summary)


def list_stages() -> list[str]:
    """Registered stage names."""
    return STAGES.names()


def get_stage(name: str) -> type[Stage]:
    """The stage class registered as ``name``; a ConfigError lists the registered ones."""
    return STAGES.get(name)


__all__ = ["Stage", "StageContext", "StageData", "get_stage", "list_stages", "register_stage",
           "seeded_epoch_batches"]
