"""``trainer.stage: mol_pretrain``: pre-training of a molecular GNN on SMILES, self-supervised (and, optionally,
supervised on the files' labels).

Section ``mol_pretrain`` (:class:`medmm.config.MolPretrainConfig`). Corpus: the union of the SMILES of the
MoleculeNet files in ``mol_pretrain.data_dir`` (``datasets``), standardised as ``mol_pretrain.preprocess`` says,
de-duplicated by canonical SMILES, with every molecule of the ``scaffold_deterministic`` test part of each
benchmark in ``exclude_test_of`` removed (matched by canonical SMILES, so a BBBP test molecule is also removed
from the Tox21 and HIV rows): pre-training never sees a molecule the benchmarks test on. Objectives (both by
default, ``mol_pretrain.objectives``):

* ``attr_mask`` (Hu et al. 2020, "Strategies for pre-training graph neural networks"): the element one-hot of
  15% of each molecule's atoms is zeroed and a linear layer on the GNN's atom states predicts it;
* ``contrastive`` (GraphCL, You et al. 2020): the masked view and a second view with 20% of the atoms and 20%
  of the bonds dropped are pooled (masked mean), projected by a 2-layer MLP and pulled together by NT-Xent
  against the other molecules of the batch (temperature 0.1);
* ``supervised`` (off by default; Hu et al.'s graph-level supervised pre-training, on these files' labels in place
  of ChEMBL's): a linear layer on the pooled states of the molecule itself predicts every label column of
  ``datasets`` (Tox21's 12 assays, HIV, ClinTox's 2, BBBP, BACE: :func:`supervised_tasks`), BCE over the labels
  present. The validation molecules of each benchmark in ``exclude_test_of`` stay in the corpus without labels
  (fine-tuning's model selection never meets a molecule whose label was pre-trained on), as their test molecules
  are not in it at all. Measured (600 steps, the three objectives; ``medmm eval moleculenet --seeds 5
  --pretrained``): BBBP 69.6 ± 0.9, ClinTox 86.7 ± 2.4, Tox21 76.9 ± 0.2, BACE 83.2 ± 0.5, against 69.8, 86.2,
  77.0 and 83.5 from the default two: level within the seeds' spread.

Every view is drawn from ``(trainer.seed, epoch, item)``, so ``--resume`` replays the same views. Saved
(``<output_dir>/checkpoint``)::

    encoder.safetensors   the GNN alone: ``head.encoder.checkpoint`` / ``medmm eval moleculenet --pretrained``
    model.safetensors     GNN + masking head + projection     mol_pretrain.json   settings, corpus counts
    corpus.json           per-file rows, rejected, test molecules removed, duplicates, kept

    python train.py --config configs/tasks/mol_pretrain.yaml
    python train.py --config configs/tasks/druggability_head.yaml head.encoder.checkpoint=runs/mol_pretrain/checkpoint/encoder.safetensors
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ...errors import ConfigError, InvalidInputError
from . import Stage, StageData, register_stage

CONFIG_NAME = "mol_pretrain.json"
ENCODER_NAME = "encoder.safetensors"
WEIGHTS_NAME = "model.safetensors"


# ----------------------------------------------------------------------------- the corpus
def benchmark_split_smiles(data_dir: Path, names: list[str], parts: tuple[str, ...] = ("test",)
                           ) -> dict[str, dict[str, list[str]]]:
    """``{part: {dataset: SMILES as written}}`` of each benchmark's ``scaffold_deterministic`` (0.8/0.1/0.1) rows of
    ``parts`` ("test", "val"), over the whole file (the rows ``head.data.split: scaffold_deterministic`` uses); one
    split per file, whatever the parts."""
    from ...data.featurisers import read_table
    from ...data.featurisers.molecules import MOLECULENET
    from ...data.splits import scaffold_deterministic_rows

    out: dict[str, dict[str, list[str]]] = {part: {} for part in parts}
    for name in names:
        spec = MOLECULENET[name]
        smiles = [row.get(spec["smiles"]) or "" for _, row in read_table(data_dir / spec["file"], spec["smiles"])]
        rows = scaffold_deterministic_rows(smiles)
        for part in parts:
            out[part][name] = [smiles[k] for k in rows[part]]
    return out


def _label(value) -> float:
    """A label cell -> 0.0 / 1.0, NaN when empty or not a number."""
    try:
        return float(value) if value not in (None, "") else float("nan")
    except ValueError:
        return float("nan")


def supervised_tasks(datasets: list[str]) -> list[str]:
    """``dataset/column`` of every label column of ``datasets`` (the ``supervised`` objective's tasks, in order)."""
    from ...data.featurisers.molecules import MOLECULENET

    return [f"{name}/{col}" for name in datasets for col in MOLECULENET[name]["labels"]]


def build_corpus(settings) -> tuple[list, list[str], dict, np.ndarray | None]:
    """``(graphs, canonical SMILES, report, labels)`` of the pre-training corpus (see the module docstring).

    ``labels``: ``(molecules, tasks)`` float32 over :func:`supervised_tasks` when the ``supervised`` objective is
    on (NaN = no label: the molecule is not in that file, its cell is empty, or it is a validation or test molecule
    of a benchmark in ``exclude_test_of``), else None.
    """
    from ...data.featurisers import read_table
    from ...data.featurisers.molecules import MOLECULENET, cached_process_molecules, standardise_options

    unknown = sorted((set(settings.datasets) | set(settings.exclude_test_of)) - set(MOLECULENET))
    if unknown:
        raise ConfigError(f"mol_pretrain.datasets / exclude_test_of: unknown {unknown}; known: {sorted(MOLECULENET)}")
    data_dir = Path(settings.data_dir)
    opts = standardise_options(settings.preprocess)
    supervised = "supervised" in settings.objectives
    split = benchmark_split_smiles(data_dir, settings.exclude_test_of, ("test", "val") if supervised else ("test",))
    tests = split["test"]
    test_smiles = [s for name in settings.exclude_test_of for s in tests[name]]
    test_recs = cached_process_molecules(test_smiles, [f"test {i}" for i in range(len(test_smiles))], opts,
                                         features=(), workers=settings.workers)
    banned = {r.smiles for r in test_recs if r.ok}
    banned_raw = set(test_smiles)  # rows RDKit can parse but the standardisation rejects are removed by their text
    tasks = supervised_tasks(settings.datasets) if supervised else []
    unlabelled, unlabelled_raw = set(banned), set(banned_raw)  # molecules whose labels are never used
    if supervised:  # validation molecules stay in the corpus, without labels: model selection never saw them
        val_smiles = [s for name in settings.exclude_test_of for s in split["val"][name]]
        val_recs = cached_process_molecules(val_smiles, [f"val {i}" for i in range(len(val_smiles))], opts,
                                            features=(), workers=settings.workers)
        unlabelled |= {r.smiles for r in val_recs if r.ok}
        unlabelled_raw |= set(val_smiles)
    labels: dict[str, np.ndarray] = {}  # canonical SMILES -> its task vector
    column = 0
    graphs, canonical, seen = [], [], set()
    report: dict = {"datasets": {}, "test_molecules": len(banned), "test_rows": {k: len(v) for k, v in tests.items()}}
    for name in settings.datasets:
        spec = MOLECULENET[name]
        path = data_dir / spec["file"]
        table = read_table(path, spec["smiles"], limit=settings.limit)
        values = [row.get(spec["smiles"]) or "" for _, row in table]
        recs = cached_process_molecules(values, [src for src, _ in table], opts, features=("graph",),
                                        workers=settings.workers)
        counts = {"rows": len(values), "rejected": 0, "test_removed": 0, "duplicates": 0, "kept": 0}
        if supervised:
            counts["labelled"] = 0
        for (_, row), value, r in zip(table, values, recs):
            if not r.ok:
                counts["rejected"] += 1
                continue
            if r.smiles in banned or value in banned_raw:
                counts["test_removed"] += 1
                continue
            if r.smiles in seen:
                counts["duplicates"] += 1
            else:
                seen.add(r.smiles)
                graphs.append(r.graph)
                canonical.append(r.smiles)
                counts["kept"] += 1
            if supervised and r.smiles not in unlabelled and value not in unlabelled_raw:
                y = labels.setdefault(r.smiles, np.full(len(tasks), np.nan, dtype=np.float32))
                cells = [_label(row.get(col)) for col in spec["labels"]]
                for k, v in enumerate(cells):  # the first row of a repeated molecule that labels a task wins
                    if np.isnan(y[column + k]):
                        y[column + k] = v
                counts["labelled"] += any(not np.isnan(v) for v in cells)
        column += len(spec["labels"])
        report["datasets"][name] = counts
    report["kept"] = len(graphs)
    if len(graphs) < 2:
        raise InvalidInputError(data_dir, f"the pre-training corpus holds {len(graphs)} molecules; need at least 2")
    if not supervised:
        return graphs, canonical, report, None
    missing = np.full(len(tasks), np.nan, dtype=np.float32)
    y = np.stack([labels.get(c, missing) for c in canonical])
    report["supervised"] = {"tasks": tasks, "labelled_molecules": int((~np.isnan(y)).any(1).sum()),
                            "labels": int((~np.isnan(y)).sum()),
                            "validation_molecules_unlabelled": len(unlabelled - banned)}  # of the benchmarks
    return graphs, canonical, report, y


# ----------------------------------------------------------------------------- views
def element_targets(x: torch.Tensor) -> torch.Tensor:
    """The element class of each atom ``(N,)`` from its one-hot block (the first ``ELEMENT_CLASSES`` features)."""
    return x[:, :ELEMENT_CLASSES].argmax(-1)


def _element_classes() -> int:
    from ...io.molecules import ATOM_SYMBOLS

    return len(ATOM_SYMBOLS) + 1  # + "other"


ELEMENT_CLASSES = _element_classes()


def masked_view(x: torch.Tensor, rate: float, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    """Hide the element of ``max(1, round(rate * N))`` atoms (zeroed one-hot block): ``(x', atoms, targets)``."""
    n = x.shape[0]
    k = max(1, int(round(rate * n)))
    atoms = torch.from_numpy(np.sort(rng.choice(n, size=k, replace=False))).long()
    targets = element_targets(x[atoms])
    x = x.clone()
    x[atoms, :ELEMENT_CLASSES] = 0
    return x, atoms, targets


def dropped_view(x: torch.Tensor, adj: torch.Tensor, node_rate: float, edge_rate: float,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random subgraph: ``node_rate`` of the atoms dropped (at least one kept), then ``edge_rate`` of the remaining
    bonds removed (both directions)."""
    n = x.shape[0]
    keep = max(1, n - int(round(node_rate * n)))
    idx = torch.from_numpy(np.sort(rng.choice(n, size=keep, replace=False))).long()
    x, adj = x[idx], adj[idx][:, idx].clone()
    if edge_rate > 0:
        i, j = torch.triu_indices(keep, keep, 1)
        bonded = adj[i, j] > 0
        drop = torch.from_numpy(rng.random(int(bonded.sum())) < edge_rate)
        di, dj = i[bonded][drop], j[bonded][drop]
        adj[di, dj] = 0
        adj[dj, di] = 0
    return x, adj


class PretrainDataset(Dataset):
    """Corpus graphs -> two views each; keys are ``epoch * n + i`` so a view is a pure function of (seed, epoch, i)."""

    def __init__(self, graphs: list, settings, seed: int, labels: np.ndarray | None = None):
        self.graphs, self.s, self.seed, self.labels = graphs, settings, seed, labels

    def __len__(self) -> int:
        return len(self.graphs)

    def __getitem__(self, key: int) -> dict:
        epoch, i = divmod(int(key), len(self.graphs))
        rng = np.random.default_rng([self.seed, epoch, i])
        g = self.graphs[i]
        x, adj = torch.from_numpy(g.node_features), torch.from_numpy(g.adjacency())
        xa, atoms, targets = masked_view(x, self.s.mask_rate, rng)
        xb, adjb = dropped_view(x, adj, self.s.drop_node_rate, self.s.drop_edge_rate, rng)
        out = {"xa": xa, "adja": adj, "atoms": atoms, "targets": targets, "xb": xb, "adjb": adjb}
        if self.labels is not None:  # the supervised objective reads the molecule itself
            out |= {"x": x, "y": torch.from_numpy(self.labels[i])}
        return out


def collate_views(samples: list[dict]) -> dict:
    """Pack both views (``x`` (B, N, F + N), ``mask`` (B, N) each) and the masked atoms' flat positions in view a."""
    from encoders.molecule import pack_graphs

    xa, ma = pack_graphs([s["xa"] for s in samples], [s["adja"] for s in samples])
    xb, mb = pack_graphs([s["xb"] for s in samples], [s["adjb"] for s in samples])
    n = xa.shape[1]
    atoms = torch.cat([s["atoms"] + b * n for b, s in enumerate(samples)])  # positions in the (B * N) atoms
    out = {"x": xa, "mask": ma, "x_b": xb, "mask_b": mb, "atoms": atoms,
           "targets": torch.cat([s["targets"] for s in samples])}
    if "y" in samples[0]:
        out["x_c"], out["mask_c"] = pack_graphs([s["x"] for s in samples], [s["adja"] for s in samples])
        out["y"] = torch.stack([s["y"] for s in samples])
    return out


# ----------------------------------------------------------------------------- model
def nt_xent(za: torch.Tensor, zb: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (SimCLR / GraphCL): each of the 2B embeddings must pick its partner view among the other 2B - 1."""
    z = F.normalize(torch.cat([za, zb]).float(), dim=-1)  # (2B, D)
    sim = z @ z.T / temperature  # (2B, 2B)
    b = za.shape[0]
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    partner = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    return F.cross_entropy(sim, partner)


def masked_bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over the labels present (``y`` NaN = missing), as Hu et al.'s supervised pre-training;
    0 (with a gradient path) when a batch has no label."""
    present = ~torch.isnan(y)
    if not present.any():
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits.float()[present], y[present].float())


class MolPretrainModel(nn.Module):
    """A node-readout GNN + an element classifier on atom states + a projection MLP on pooled graph states (+ a
    linear task head on them, with the ``supervised`` objective)."""

    def __init__(self, encoder: nn.Module, settings, encoder_name: str, encoder_kwargs: dict, tasks: int = 0):
        super().__init__()
        if getattr(encoder, "readout", "nodes") != "nodes":
            raise ConfigError("mol_pretrain.encoder: attribute masking needs the atom states (readout: nodes)")
        d = encoder.out_dim
        self.encoder, self.settings = encoder, settings
        self.encoder_name, self.encoder_kwargs = encoder_name, dict(encoder_kwargs)
        self.atom_head = nn.Linear(d, ELEMENT_CLASSES)
        self.proj = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        if "supervised" in settings.objectives:
            if tasks < 1:
                raise ConfigError("mol_pretrain.objectives: supervised needs at least one label column")
            self.task_head = nn.Linear(d, tasks)
        self.extra: dict = {}

    def _states(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, m = self.encoder(x, mask)
        return h, (m if m is not None else mask)

    def _pool(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(h.dtype)  # (B, N, 1)
        return (h * m).sum(1) / m.sum(1).clamp(min=1)  # (B, D)

    def forward(self, x, mask, x_b, mask_b, atoms, targets, x_c=None, mask_c=None, y=None) -> dict:
        s = self.settings
        ha, ma = self.encoder(x, mask)  # (B, N, D), (B, N)
        out: dict = {}
        loss = ha.new_zeros(())
        if "attr_mask" in s.objectives:
            logits = self.atom_head(ha.reshape(-1, ha.shape[-1])[atoms])  # (M, classes)
            out["attr_loss"] = F.cross_entropy(logits.float(), targets)
            out["attr_acc"] = (logits.argmax(-1) == targets).float().mean().detach()
            loss = loss + out["attr_loss"]
        if "contrastive" in s.objectives:
            hb, mb = self.encoder(x_b, mask_b)
            za, zb = self.proj(self._pool(ha, ma if ma is not None else mask)), \
                self.proj(self._pool(hb, mb if mb is not None else mask_b))
            out["nce_loss"] = nt_xent(za, zb, s.temperature)
            loss = loss + s.contrastive_weight * out["nce_loss"]
        if "supervised" in s.objectives:
            out["task_loss"] = masked_bce(self.task_head(self._pool(*self._states(x_c, mask_c))), y)
            loss = loss + s.supervised_weight * out["task_loss"]
        out["loss"] = loss
        return out

    def save_pretrained(self, path: str | Path, extra: dict | None = None) -> Path:
        """Write ``encoder.safetensors`` (the GNN alone), ``model.safetensors`` and ``mol_pretrain.json`` atomically."""
        from ...config import to_dict
        from ...model.heads import save_encoder_folder

        settings = dataclasses.replace(self.settings, encoder=dataclasses.replace(self.settings.encoder, checkpoint=None))
        meta = {"encoder": {"name": self.encoder_name, "kwargs": self.encoder_kwargs},
                "mol_pretrain": to_dict(settings), **self.extra, **(extra or {})}
        return save_encoder_folder(path, self, self.encoder, CONFIG_NAME, meta)


# ----------------------------------------------------------------------------- the stage
@register_stage("mol_pretrain")
class MolPretrainStage(Stage):
    """MoleculeNet SMILES (benchmark test molecules removed) -> attribute masking + GraphCL NT-Xent (+ their labels'
    masked BCE, with ``supervised``)."""

    section = "mol_pretrain"
    metrics = ("attr_loss", "attr_acc", "nce_loss", "task_loss")

    def build_model(self):
        from encoders import build_encoder

        s = self.settings
        if s.encoder.trainable != "full":
            raise ConfigError("mol_pretrain.encoder.trainable: pre-training trains the encoder 'full'")
        self.graphs, self.canonical, self.corpus, self.labels = build_corpus(s)
        kwargs = dict(s.encoder.kwargs)
        enc = build_encoder(s.encoder.name, checkpoint=s.encoder.checkpoint, **kwargs)
        tasks = 0 if self.labels is None else self.labels.shape[1]
        self.model = MolPretrainModel(enc, s, s.encoder.name, kwargs, tasks)
        self.model.extra = {"corpus": self.corpus}
        return self.model

    def build_data(self) -> StageData:
        from .head import BucketBatchSampler

        t = self.cfg.trainer
        ds = PretrainDataset(self.graphs, self.settings, t.seed, self.labels)
        sizes = [g.num_nodes for g in self.graphs]

        def sampler(start: int) -> BucketBatchSampler:
            return BucketBatchSampler(sizes, t.micro_batch_size, t.seed, self.ctx.rank, self.ctx.world_size, start)

        c = self.corpus
        return StageData(ds, sampler, collate_views, sampler(0).batches_per_epoch,
                         description=f"molecules={c['kept']} test_molecules_removed={c['test_molecules']} "
                                     f"datasets={','.join(c['datasets'])} objectives={','.join(self.settings.objectives)}")

    def loss(self, engine, batch):
        dtype = next(engine.module.parameters()).dtype
        extra = {}
        if "y" in batch:
            extra = {"x_c": batch["x_c"].to(dtype), "mask_c": batch["mask_c"], "y": batch["y"]}
        out = engine(batch["x"].to(dtype), batch["mask"], batch["x_b"].to(dtype), batch["mask_b"], batch["atoms"],
                     batch["targets"], **extra)
        logs = {k: float(out[k].detach()) for k in self.metrics if k in out}
        return out["loss"], logs

    def save(self, engine, model, out_dir: Path, zero_stage: int, summary: dict) -> Path | None:
        from ...utils import atomic_write_text
        from ..checkpoint import save_final_model

        training = {"stage": self.name, "steps": summary["step"], "final_loss": summary["loss"],
                    "world_size": summary["world_size"], "zero_stage": zero_stage}
        path = save_final_model(engine, model, out_dir, zero_stage, extra={"training": training})
        if path is not None:
            atomic_write_text(path / "corpus.json", json.dumps(self.corpus, indent=2))
        return path

    def describe(self, model) -> str:
        return f"{super().describe(model)} encoder={self.settings.encoder.name}"
