"""MoleculeNet classification (BBBP, BACE, ClinTox, Tox21, HIV): train + test a GIN head over seeds, beside the
published tables.

    medmm eval moleculenet --datasets bbbp,bace,clintox,tox21,hiv --seeds 5 --split scaffold_deterministic \\
        [--data-dir ../shared/data/molecules/moleculenet] [--pretrained CKPT] [--out bench/results/moleculenet.json]

The model (:class:`Protocol`, recorded beside the numbers): a 3 x 64 GIN with a virtual node (GIN-VN, as OGB's;
``--virtual-node false`` for the plain GIN) whose masked mean + max readout the MLP head reads together with the
molecule's 2048-bit Morgan fingerprint and RDKit 2D descriptors (``head.mol_features=morgan+rdkit2d``, chemprop's
``features_generator`` idea); ``--mol-features none`` is the GIN alone, as in the published GIN rows. Each model's
table is also kept under ``by_mol_features``.

Unlike the other benchmarks this one trains: every (dataset, seed) is one ``trainer.stage: head`` run
(``python -m medmm.training --config configs/tasks/druggability_head.yaml`` + the overrides of
:func:`run_overrides`) in its own process, ``--jobs`` at a time, one torch thread each. The split is the
deterministic scaffold split of Hu et al. 2020 (the seed changes the initialisation and the batches, never
the split); labels are masked where missing; the score is the test ROC-AUC averaged over the tasks with both
classes, of the epoch with the best validation ROC-AUC. Molecules are featurised as the reference does, from
the SMILES as written (every fragment, charges kept, no tautomer pass; ``--standardise`` for medmm's
standardisation, which on ClinTox erases the salts and charged forms the labels follow). ``--pretrained``
starts every run's GNN from a ``trainer.stage: mol_pretrain`` encoder (its width, depth and virtual node are
adopted).
The featurised records are cached under ``<work>/.molecule-cache``: with ``--jobs`` > 1 each file is featurised
once, in that many processes, before its runs start; the runs read the cache. A finished run is reused only if
it was trained with the same overrides by the same :data:`REVISION` of this code (``run_overrides.json`` beside it),
so a changed protocol, or a code change that alters what the same overrides train, retrains.
The results file holds, per variant::

    {"no_pretrain": {"bbbp": {"mean": 68.1, "std": 1.2, "seeds": [..], "n_seeds": 5}, ...},
     "pretrained":  {...},                     # runs given --pretrained (the encoder's starting weights)
     "published":   {"gin_no_pretrain": {...}, "gin_pretrained": {...}, "ogbg_molhiv": {...}},
     "protocol":    {"no_pretrain": {...layers, width, epochs, model selection...}, "pretrained": {...}}}

ROC-AUC is on the 0-100 scale of the published tables. A plot of the means with their std beside the
published figures goes next to the JSON (``.png``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import get_args, get_type_hints

import numpy as np

from ...config import HeadStageConfig
from ...data.featurisers.molecules import CACHE_ENV, MOLECULENET
from ...utils import resource_path
from .registry import Benchmark, register_benchmark

# the checkout, which the default --data-dir (../shared/data/...) and the runs' head.data.path are relative to; the
# recipe itself ships with the package (HEAD_RECIPE)
REPO = Path(__file__).resolve().parents[3]
HEAD_RECIPE = "configs/tasks/druggability_head.yaml"
"""The recipe every run trains (:func:`run_overrides` on top); read from the checkout or the installed package."""

DATASETS: dict[str, dict] = MOLECULENET
"""File, SMILES column and label columns of each dataset in the shared MoleculeNet folder (chemprop's copies)."""

PUBLISHED = {
    "gin_no_pretrain": {"bbbp": [65.8, 4.5], "tox21": [74.0, 0.8], "clintox": [58.0, 4.4], "hiv": [75.3, 1.9],
                        "bace": [70.1, 5.4], "source": "Hu et al. 2020 (ICLR), Table 1, GIN without pre-training"},
    "gin_pretrained": {"bbbp": [68.7, 1.3], "clintox": [72.6, 1.5], "bace": [84.5, 0.7],
                       "source": "Hu et al. 2020 (ICLR), Table 1, GIN with ContextPred + supervised pre-training"},
    "ogbg_molhiv": {"gin": [75.58, 1.40], "gin_virtual_node": [77.07, 1.49],
                    "source": "OGB leaderboard, ogbg-molhiv (scaffold split)"},
}
"""Published test ROC-AUC (mean, std over seeds) on the same deterministic scaffold split."""


@dataclass
class Protocol:
    """How every run is trained (recorded beside the numbers)."""

    hidden: int = 64
    """GIN width."""
    layers: int = 3
    """GIN message-passing layers."""
    head_hidden: int | None = None
    """The head MLP's width (``head.hidden``); None = the GIN's."""
    gnn_dropout: float = 0.0
    """Dropout inside each GIN layer (``head.encoder.kwargs.dropout``; Hu et al. 2020 use 0.5 in a 5 x 300 GIN)."""
    virtual_node: bool = True
    """GIN-VN (``head.encoder.kwargs.virtual_node``): a virtual node joined to every atom, as OGB's GIN-VN. On HIV
    without pre-training, 5 seeds: test 75.5 ± 0.6 against 75.0 ± 0.8 without it, validation 79.4 against 79.9
    (level within seed noise)."""
    epochs: int = 10
    """Passes over the training part (the epoch with the best validation ROC-AUC is kept)."""
    batch_size: int = 64
    lr: float = 1.0e-3
    lr_schedule: str = "cosine"
    """``trainer.lr_schedule``: constant | cosine (to 0 over the run)."""
    dropout: float = 0.3
    """Head dropout (``head.dropout``, before its output layer)."""
    feature_dropout: float = 0.0
    """Dropout on the fingerprint and descriptors the head reads (``head.feature_dropout``)."""
    mol_features: str = "morgan+rdkit2d"
    """``head.mol_features``: none = the GIN alone; morgan / rdkit2d / morgan+rdkit2d = the head also reads the
    2048-bit Morgan fingerprint (radius 2) and/or RDKit's 2D descriptors beside the GIN's readout."""
    canonical_tautomer: bool = False
    """The RDKit canonical-tautomer pass (off: the published protocols featurise the SMILES as written)."""
    as_written: bool = True
    """Featurise every fragment with its charges as written (the reference: ``MolFromSmiles`` only); off = medmm's
    standardisation (largest fragment, neutralised), which erases e.g. the salts and charged forms of ClinTox."""


def run_overrides(dataset: str, seed: int, data_dir: Path, out: Path, split: str, proto: Protocol,
                  pretrained: str | None = None) -> list[str]:
    """The ``key=value`` overrides of one (dataset, seed) run on ``configs/tasks/druggability_head.yaml``."""
    d = DATASETS[dataset]
    ov = [f"head.data.path={data_dir / d['file']}", f"head.data.input_col={d['smiles']}",
          f"head.data.label_cols=[{','.join(d['labels'])}]", f"head.data.split={split}",
          "head.data.fractions=[0.8,0.1,0.1]", "head.data.seed=0", "head.data.workers=0",
          f"head.encoder.kwargs={{hidden: {proto.hidden}, layers: {proto.layers}, dropout: {proto.gnn_dropout}"
          + (", virtual_node: true}" if proto.virtual_node else "}"),
          f"head.hidden={proto.head_hidden or proto.hidden}", f"head.dropout={proto.dropout}",
          f"head.feature_dropout={proto.feature_dropout}", f"head.mol_features={proto.mol_features}",
          f"head.preprocess.mol_canonical_tautomer={str(proto.canonical_tautomer).lower()}",
          f"head.preprocess.mol_largest_fragment={str(not proto.as_written).lower()}",
          f"head.preprocess.mol_neutralise={str(not proto.as_written).lower()}",
          "head.preprocess.mol_max_heavy_atoms=1000",
          f"trainer.output_dir={out}", f"trainer.seed={seed}", f"trainer.epochs={proto.epochs}",
          f"trainer.micro_batch_size={proto.batch_size}", f"trainer.lr={proto.lr}",
          f"trainer.lr_schedule={proto.lr_schedule}",
          f"trainer.patience={proto.epochs}", "trainer.restore_best=true", "trainer.save_every=1000000000"]
    if pretrained:
        ov.append(f"head.encoder.checkpoint={pretrained}")
    return ov


def featurise_once(overrides: list[str], workers: int, cache: str) -> None:
    """Featurise a run's file into the molecule cache folder ``cache`` with ``workers`` processes, as its training
    run will read it (same rows, options and features; the cache key leaves out the worker count): the runs of a
    dataset then start from the cache instead of each featurising it on one core."""
    from ...config import TrainConfig, load_config
    from ...data.featurisers import build_featuriser, featurise_rows
    from ...training.stages.head import multitask_label_parser, read_multitask_rows

    h = load_config(TrainConfig, resource_path(HEAD_RECIPE), overrides).head
    h = dataclasses.replace(h, data=dataclasses.replace(h.data, workers=workers))
    saved = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = cache  # where the featuriser's cache lives (the runs get it through their env)
    try:
        featurise_rows(build_featuriser(h), read_multitask_rows(h.data, h.data.path),
                       multitask_label_parser(h.data.label_cols))
    finally:
        if saved is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = saved


def test_auroc(run_dir: Path) -> float | None:
    """A finished run's test ROC-AUC (0-100), mean over tasks with both classes; None if the run has none."""
    path = run_dir / "checkpoint" / "metrics.json"
    if not path.exists():
        return None
    auc = json.loads(path.read_text())["test"]["raw"].get("auroc")
    return None if auc is None else 100.0 * float(auc)


RUN_FILE = "run_overrides.json"
"""Beside each run: ``{"revision", "overrides"}`` it was trained with; a finished run counts only for the same."""
REVISION = 3
"""Raised when medmm's code changes what a run with the same overrides trains, so that older finished runs are
retrained instead of mixed into the table (2: the descriptor columns standardised by a scaler fitted on the training
molecules instead of a BatchNorm over size-bucketed batches; 3: the standardised columns clipped to ±5)."""


def run_record(overrides: list[str]) -> dict:
    """What :data:`RUN_FILE` holds for a run trained with ``overrides`` by this code."""
    return {"revision": REVISION, "overrides": list(overrides)}


def finished_auroc(run_dir: Path, overrides: list[str]) -> float | None:
    """:func:`test_auroc` of a run trained with exactly ``overrides`` by this :data:`REVISION` (None: unfinished,
    another protocol, or older code)."""
    try:
        same = json.loads((run_dir / RUN_FILE).read_text()) == run_record(overrides)
    except (OSError, ValueError):
        same = False
    return test_auroc(run_dir) if same else None


def summarise(scores: list[float]) -> dict:
    """``{"mean", "std", "seeds", "n_seeds"}`` (population std, as the published tables)."""
    a = np.asarray(scores, dtype=np.float64)
    return {"mean": round(float(a.mean()), 2), "std": round(float(a.std()), 2),
            "seeds": [round(float(s), 2) for s in scores], "n_seeds": len(scores)}


def run_moleculenet(datasets: list[str], seeds: int, data_dir: Path, work: Path, split: str = "scaffold_deterministic",
                    proto: Protocol | None = None, pretrained: str | None = None, jobs: int = 1,
                    seed_counts: dict[str, int] | None = None, train: bool = True,
                    epochs_of: dict[str, int] | None = None) -> dict[str, dict]:
    """Train + test every (dataset, seed) in subprocesses; ``{dataset: summary}`` over the runs that finished
    (``train=False``: only collect the runs already finished under ``work``; ``epochs_of``: per-dataset epochs)."""
    proto = proto or Protocol()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # more threads than cores: far slower
    env.setdefault(CACHE_ENV, str(work.parent / ".molecule-cache"))  # the seeds of a dataset featurise it once
    tasks = [(ds, s) for ds in datasets for s in range((seed_counts or {}).get(ds, seeds))]
    running: set[subprocess.Popen] = set()
    stopping = threading.Event()

    def overrides_of(task) -> list[str]:
        ds, seed = task
        return run_overrides(ds, seed, data_dir, work / ds / f"seed{seed}", split,
                             dataclasses.replace(proto, epochs=(epochs_of or {}).get(ds, proto.epochs)), pretrained)

    def one(task) -> tuple[str, int, float | None, float]:
        ds, seed = task
        out = work / ds / f"seed{seed}"
        t0 = time.perf_counter()
        if stopping.is_set():
            return ds, seed, None, 0.0
        overrides = overrides_of(task)
        if train and finished_auroc(out, overrides) is None:  # finished runs of this protocol are kept (resumable)
            shutil.rmtree(out, ignore_errors=True)  # a torn run, or one of another protocol
            out.mkdir(parents=True, exist_ok=True)
            (out / RUN_FILE).write_text(json.dumps(run_record(overrides), indent=1) + "\n")
            cmd = [sys.executable, "-m", "medmm.training", "--config",
                   str(resource_path(HEAD_RECIPE)), *overrides]
            with open(out / "train.log", "w") as log:
                proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
                running.add(proc)
                try:
                    proc.wait()
                finally:
                    running.discard(proc)
        auc = finished_auroc(out, overrides)
        print(f"moleculenet {ds} seed {seed}: test ROC-AUC {auc} ({time.perf_counter() - t0:.0f}s)", flush=True)
        return ds, seed, auc, time.perf_counter() - t0

    # stopped (Ctrl-C, or SIGTERM from a scheduler or `kill`), the benchmark stops the trainings it started
    # instead of leaving them running; a later run resumes from the runs that finished
    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() else None
    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        for ds in datasets if train and jobs > 1 else []:  # each file featurised once, on every core
            todo = [t for t in tasks if t[0] == ds and finished_auroc(work / ds / f"seed{t[1]}", overrides_of(t)) is None]
            if todo:
                print(f"moleculenet {ds}: featurising with {jobs} processes", flush=True)
                featurise_once(overrides_of(todo[0]), jobs, env[CACHE_ENV])
        done = list(pool.map(one, tasks))
    except BaseException:
        stopping.set()
        for proc in list(running):
            proc.terminate()
        for proc in list(running):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    out: dict[str, dict] = {}
    for ds in datasets:
        scores = [auc for d, _, auc, _ in sorted(done) if d == ds and auc is not None]
        if scores:
            out[ds] = summarise(scores)
    return out


def protocol_record(proto: Protocol, split: str, pretrained: str | None, epochs_of: dict | None = None) -> dict:
    feats = {"none": "", "morgan": " + 2048-bit Morgan fingerprint (radius 2)",
             "rdkit2d": " + RDKit 2D descriptors (log-squashed, standardised on the training molecules, clipped to ±5)",
             "morgan+rdkit2d": " + 2048-bit Morgan fingerprint (radius 2) + RDKit 2D descriptors (log-squashed, "
                               "standardised on the training molecules, clipped to ±5)"}[proto.mol_features]
    gin = "GIN-VN" if proto.virtual_node else "GIN"
    return {"encoder": f"mol_gin (GINE over bond codes{', a virtual node' if proto.virtual_node else ''}, masked mean + "
                       "max readout, MLP head)",
            "model": f"{gin} readout{feats} -> MLP head", "mol_features": proto.mol_features,
            "layers": proto.layers, "width": proto.hidden, "epochs": proto.epochs,
            **({"epochs_per_dataset": epochs_of} if epochs_of else {}), "batch_size": proto.batch_size,
            "lr": proto.lr, "lr_schedule": proto.lr_schedule, "dropout_head": proto.dropout,
            "dropout_gnn": proto.gnn_dropout, "virtual_node": proto.virtual_node,
            "head_width": proto.head_hidden or proto.hidden,
            **({"dropout_features": proto.feature_dropout} if proto.mol_features != "none" else {}),
            "split": f"{split} 0.8/0.1/0.1 (Hu et al. 2020 procedure)", "canonical_tautomer": proto.canonical_tautomer,
            "featurised": "SMILES as written (every fragment, charges kept)" if proto.as_written else
                          "standardised (largest fragment, neutralised)",
            "model_selection": "epoch with the best validation ROC-AUC (restore_best)",
            "metric": "test ROC-AUC x100, mean over tasks with both classes; missing labels masked",
            "seeds": "trainer.seed = 0..N-1 (initialisation and batch order; the split is fixed)",
            "init": _shown(pretrained) if pretrained else "random", **({"pretraining": pretraining_record(pretrained)} if pretrained else {})}


def _true_false(v: str) -> bool:
    if v.lower() not in ("true", "false"):
        raise ValueError(v)  # argparse names the flag and the value
    return v.lower() == "true"


def _shown(path: str) -> str:
    """A path relative to the repository when it lies inside it (results files name no home folders)."""
    p = Path(path)
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def pretraining_record(encoder_path: str) -> dict:
    """What the pre-trained encoder saw (from the ``mol_pretrain.json`` beside it): objectives, corpus, steps."""
    meta = Path(encoder_path).parent / "mol_pretrain.json"
    if not meta.is_file():
        return {"source": _shown(encoder_path)}
    m = json.loads(meta.read_text())
    s = m.get("mol_pretrain", {})
    corpus = m.get("corpus", {})
    return {"stage": "mol_pretrain", "objectives": s.get("objectives"), "mask_rate": s.get("mask_rate"),
            "contrastive": {k: s.get(k) for k in ("drop_node_rate", "drop_edge_rate", "temperature")},
            "corpus_datasets": list(corpus.get("datasets", {})), "corpus_molecules": corpus.get("kept"),
            "test_molecules_removed": corpus.get("test_molecules"), "steps": m.get("training", {}).get("steps")}


def write_results(path: Path, variant: str, results: dict[str, dict], protocol: dict) -> dict:
    """Merge one variant's table into the results JSON (the other variant is kept) and draw the plot."""
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.setdefault("no_pretrain", {})
    doc.setdefault("pretrained", {})
    doc[variant] = {**doc.get(variant, {}), **results}
    doc["published"] = PUBLISHED
    doc.setdefault("protocol", {})[variant] = protocol
    # every model's table kept apart too (the headline variants hold the latest run's model)
    by = doc.setdefault("by_mol_features", {}).setdefault(protocol.get("mol_features", "none"), {})
    by[variant] = {**by.get(variant, {}), **results}
    by.setdefault("protocol", {})[variant] = protocol
    doc["layout"] = ("{variant: {dataset: {mean, std, seeds, n_seeds}}}, variant in no_pretrain | pretrained; "
                     "ROC-AUC 0-100 on the deterministic scaffold split; by_mol_features: {head.mol_features: "
                     "{variant: ..., protocol: ...}}, each model's own table")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    plot_results(doc, path.with_suffix(".png"))
    return doc


def plot_results(doc: dict, path: Path) -> Path | None:
    """Bars of our mean ± std per dataset and variant, with the published GIN figures as markers."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional
        return None
    names = list(DATASETS)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(9, 4))
    tables = doc.get("by_mol_features") or {"": {v: doc.get(v, {}) for v in ("no_pretrain", "pretrained")}}
    bars = [(f, v) for f in tables for v in ("no_pretrain", "pretrained") if tables[f].get(v)]
    width = 0.8 / max(1, len(bars))
    for k, (feats, variant) in enumerate(bars):
        res = tables[feats][variant]
        means = [res.get(n, {}).get("mean", np.nan) for n in names]
        stds = [res.get(n, {}).get("std", 0.0) for n in names]
        gin = "GIN-VN" if tables[feats].get("protocol", {}).get(variant, {}).get("virtual_node") else "GIN"
        label = f"medmm {gin}{'' if feats in ('', 'none') else ' + ' + feats} {variant}"
        ax.bar(x - 0.4 + width * (k + 0.5), means, width, yerr=stds, label=label, color=f"C{k}", alpha=0.8)
    for key, marker in (("gin_no_pretrain", "v"), ("gin_pretrained", "^")):
        pub = PUBLISHED[key]
        ax.scatter(x, [pub.get(n, [np.nan])[0] for n in names], marker=marker, color="k", zorder=3,
                   label=f"published {key}")
    ax.set_xticks(x, names)
    ax.set_ylim(40, 110)
    ax.set_ylabel("test ROC-AUC (scaffold_deterministic)")
    ax.legend(fontsize=7, loc="upper center", ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@register_benchmark
class MoleculeNet(Benchmark):
    """The MoleculeNet classification benchmark: this benchmark trains (see the module docstring), so it is run
    by :func:`main` (``medmm eval moleculenet ...``) rather than on a checkpoint's predictions."""

    name = "moleculenet"
    summary = "MoleculeNet BBBP/BACE/ClinTox/Tox21/HIV: train + test a GIN over seeds vs published tables"
    headline = "auroc"
    scale = 100.0
    trains = True

    def protocol(self, opts) -> str:
        return "deterministic scaffold split (Hu et al. 2020), test ROC-AUC of the best-validation epoch"

    @staticmethod
    def main(argv: list[str]) -> dict:
        return main(argv)


def main(argv: list[str] | None = None) -> dict:
    """``medmm eval moleculenet``: train + test each dataset over seeds, write the table (JSON + plot)."""
    ap = argparse.ArgumentParser(prog="medmm eval moleculenet", description=MoleculeNet.summary)
    ap.add_argument("--datasets", default="bbbp,bace,clintox,tox21,hiv", help="comma-separated: " + ",".join(DATASETS))
    ap.add_argument("--seeds", type=int, default=5, help="seeds per dataset")
    ap.add_argument("--seeds-per-dataset", type=json.loads, default=None,
                    help='JSON {"hiv": 3} overriding --seeds for some datasets')
    ap.add_argument("--epochs-per-dataset", type=json.loads, default=None,
                    help='JSON {"tox21": 4} overriding --epochs for some datasets')
    ap.add_argument("--split", default="scaffold_deterministic", choices=["scaffold_deterministic", "scaffold",
                                                                          "random"])
    ap.add_argument("--data-dir", default="../shared/data/molecules/moleculenet")
    ap.add_argument("--pretrained", help="an encoder checkpoint (encoder.safetensors or a folder) to start from")
    ap.add_argument("--out", default="bench/results/moleculenet.json", help="results JSON (a .png plot beside it)")
    ap.add_argument("--work", default="runs/moleculenet", help="one run folder per dataset and seed")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (one torch thread each)")
    ap.add_argument("--collect-only", action="store_true", help="train nothing: tabulate the finished runs")
    for f in ("hidden", "layers", "epochs", "batch_size"):
        ap.add_argument("--" + f.replace("_", "-"), type=int, default=None,
                        help=f"default {getattr(Protocol, f)}" + (" (or the pre-trained encoder's)" if f in
                                                                 ("hidden", "layers") else ""))
    ap.add_argument("--mol-features", choices=get_args(get_type_hints(HeadStageConfig)["mol_features"]),
                    default=Protocol.mol_features,
                    help="molecule-level features the head reads beside the GIN (head.mol_features)")
    ap.add_argument("--dropout", type=float, default=Protocol.dropout, help="head dropout (head.dropout)")
    ap.add_argument("--feature-dropout", type=float, default=Protocol.feature_dropout,
                    help="dropout on the fingerprint and descriptors the head reads (head.feature_dropout)")
    ap.add_argument("--head-hidden", type=int, default=None, help="the head MLP's width (default: the GIN's)")
    ap.add_argument("--gnn-dropout", type=float, default=Protocol.gnn_dropout,
                    help="dropout inside the GIN layers (head.encoder.kwargs.dropout)")
    ap.add_argument("--virtual-node", type=_true_false, default=None,
                    metavar="{true,false}", help="GIN-VN: a virtual node joined to every atom "
                    "(head.encoder.kwargs.virtual_node; default: the protocol's, or the pre-trained encoder's)")
    ap.add_argument("--lr-schedule", choices=["constant", "cosine"], default=Protocol.lr_schedule,
                    help="trainer.lr_schedule")
    ap.add_argument("--standardise", action="store_true",
                    help="medmm's standardisation (largest fragment, neutralised) instead of the SMILES as written")
    a = ap.parse_args(argv)
    names = [n.strip() for n in a.datasets.split(",") if n.strip()]
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        ap.error(f"unknown datasets {unknown}; known: {', '.join(DATASETS)}")
    data_dir = Path(a.data_dir)
    if not data_dir.is_absolute() and not data_dir.exists():
        data_dir = REPO / data_dir  # the default is relative to the repository root
    data_dir = data_dir.resolve()
    sizes = {f: getattr(a, f) for f in ("hidden", "layers", "epochs", "batch_size", "virtual_node")
             if getattr(a, f) is not None}
    pretrained = None
    if a.pretrained:
        path = Path(a.pretrained).resolve()
        path = path / "encoder.safetensors" if path.is_dir() else path
        if not path.is_file():
            ap.error(f"--pretrained {a.pretrained}: no encoder weights there (a mol_pretrain checkpoint folder or its "
                     "encoder.safetensors)")
        meta = path.parent / "mol_pretrain.json"
        if meta.is_file():  # the pre-trained GNN's width, depth and virtual node fix the fine-tuned one's
            # an encoder saved before the virtual node existed has none
            kw = {"virtual_node": False, **json.loads(meta.read_text())["encoder"]["kwargs"]}
            for f in ("hidden", "layers", "virtual_node"):
                if f in kw and sizes.setdefault(f, kw[f]) != kw[f]:
                    ap.error(f"--{f.replace('_', '-')} {sizes[f]} differs from the pre-trained encoder's {kw[f]} "
                             f"({meta})")
        pretrained = str(path)
    proto = Protocol(**sizes, as_written=not a.standardise, mol_features=a.mol_features, dropout=a.dropout,
                     lr_schedule=a.lr_schedule, gnn_dropout=a.gnn_dropout, head_hidden=a.head_hidden,
                     feature_dropout=a.feature_dropout)
    variant = "pretrained" if a.pretrained else "no_pretrain"
    work = Path(a.work).resolve() / variant
    results = run_moleculenet(names, a.seeds, data_dir, work, a.split, proto, pretrained, a.jobs,
                              a.seeds_per_dataset, train=not a.collect_only, epochs_of=a.epochs_per_dataset)
    doc = write_results(Path(a.out), variant, results, protocol_record(proto, a.split, pretrained,
                                                                      a.epochs_per_dataset))
    for n in names:
        r = doc[variant].get(n)
        pubs = [(k, PUBLISHED[f"gin_{k}"].get(n)) for k in ("no_pretrain", "pretrained")]
        print(f"{n:8s} {variant}: " + (f"{r['mean']:.1f} ± {r['std']:.1f} ({r['n_seeds']} seeds)" if r else "no run")
              + "".join(f"   published GIN {k} {p[0]} ± {p[1]}" for k, p in pubs if p))
    return doc
