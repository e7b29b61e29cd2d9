"""Row 9: files that medmm reads back from its own folders must never run code.

* The molecule featurisation cache (``$MEDMM_MOLECULE_CACHE``) was a pickle: a crafted file under the cache key ran
  code on the next featurisation. It is now ``.npz`` + JSON read with ``allow_pickle=False``; old ``.pkl`` files are
  ignored and an unreadable file is a miss.
* ``--resume`` handed the checkpoint folder to DeepSpeed's checkpoint engine, which unpickles every ``.pt`` with
  ``weights_only=False``: a crafted ``.pt`` ran code. The folder is now scanned (nothing unpickled) and loaded
  weights-only; anything else is refused with a typed :class:`CheckpointError` naming the file.

Each crafted pickle's ``__reduce__`` writes a marker file: the marker must never appear.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path

import pytest

SMILES = ["CCO", "c1ccccc1O", "C1CC", "CC(=O)Oc1ccccc1C(=O)O"]
SOURCES = [f"t.csv:{i}" for i in range(2, 6)]


class _Payload:
    """Unpickling this calls ``Path(marker).write_text(...)``: code run by the loader."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def crafted_pickle(marker: Path) -> bytes:
    return pickle.dumps({"records": _Payload(marker)})


def crafted_pt(path: Path, marker: Path) -> None:
    """A real torch zip checkpoint whose ``data.pkl`` holds the payload (what ``torch.save`` of it would write)."""
    import torch

    torch.save({"module": {"w": torch.zeros(2)}, "payload": _Payload(marker)}, str(path))


# ----------------------------------------------------------------------------- the molecule cache
def _same(a, b):
    import numpy as np

    assert [(r.index, r.source, r.input, r.smiles, r.error, r.warnings, r.scaffold) for r in a] == \
        [(r.index, r.source, r.input, r.smiles, r.error, r.warnings, r.scaffold) for r in b]
    for x, y in zip(a, b):
        assert (x.graph is None) == (y.graph is None)
        if x.graph is not None:
            for k in ("node_features", "edge_index", "edge_code"):
                u, v = getattr(x.graph, k), getattr(y.graph, k)
                assert u.dtype == v.dtype and np.array_equal(u, v)


def test_crafted_pickle_in_the_molecule_cache_never_runs(tmp_path, monkeypatch, caplog):
    from medmm.data.featurisers.molecules import CACHE_ENV, cached_process_molecules
    from medmm.io.molecules import StandardiseOptions, process_molecules

    cache, marker = tmp_path / "cache", tmp_path / "PWNED"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    opts, feats = StandardiseOptions(), ("graph", "scaffold")
    fresh = process_molecules(SMILES, SOURCES, opts, features=feats)
    cached_process_molecules(SMILES, SOURCES, opts, features=feats, workers=0)
    (written,) = cache.glob("molecules-*")  # the key's file, whatever its format
    stem = written.name.split(".")[0]
    # the attacker plants the payload under every name the key could be read from: the pickle name of older medmm,
    # and over the current file (so it is also a corrupt cache file)
    for name in (f"{stem}.pkl", written.name):
        (cache / name).write_bytes(crafted_pickle(marker))
    with caplog.at_level(logging.WARNING):
        again = cached_process_molecules(SMILES, SOURCES, opts, features=feats, workers=0)
    assert not marker.exists(), "the cache file ran code"
    _same(again, fresh)  # recomputed: featurisation still works
    assert any(".pkl" in r.getMessage() and "ignored" in r.getMessage() for r in caplog.records)
    # a zip holding a pickled object array (an .npz that needs allow_pickle) is a miss too, and is not run
    import numpy as np

    with zipfile.ZipFile(written, "w") as z:
        with z.open("meta.npy", "w") as f:
            np.lib.format.write_array(f, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    _same(cached_process_molecules(SMILES, SOURCES, opts, features=feats, workers=0), fresh)
    assert not marker.exists()
    # and what was recomputed is a warm cache again: equal records, nothing recomputed
    monkeypatch.setattr("medmm.io.molecules.process_molecules", lambda *a, **k: pytest.fail("recomputed"))
    _same(cached_process_molecules(SMILES, SOURCES, opts, features=feats, workers=2), fresh)


# ----------------------------------------------------------------------------- DeepSpeed checkpoints on --resume
class _FakeEngine:
    """What :func:`medmm.training.checkpoint.load_checkpoint` uses of a DeepSpeed engine, loading as DeepSpeed does:
    every ``.pt`` of the tag folder through ``self.checkpoint_engine.load`` (DeepSpeed's own TorchCheckpointEngine,
    whose ``load`` unpickles with ``weights_only`` off)."""

    def __init__(self):
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        self.checkpoint_engine = TorchCheckpointEngine()

    def load_universal_checkpoint(self):
        return False

    def load_checkpoint(self, load_dir, tag):
        states = [self.checkpoint_engine.load(str(p), map_location="cpu")
                  for p in sorted((Path(load_dir) / tag).glob("*.pt"))]
        return str(Path(load_dir) / tag), states[0].get("client_state", {})


def _checkpoint_folder(root: Path) -> Path:
    import torch

    tag = root / "step-00000004"
    tag.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(3)}, "client_state": {"step": 4}}, str(tag / "mp_rank_00_model_states.pt"))
    (root / "latest").write_text(tag.name)
    return tag


def _resume_error(run) -> BaseException | None:
    """What ``run()`` raised (None if it returned): looked at after checking that no code ran."""
    try:
        run()
    except Exception as e:  # noqa: BLE001 - the test asserts the type once it has checked the marker
        return e
    return None


def test_crafted_pt_is_refused_before_any_load_unit(tmp_path, monkeypatch):
    """No DeepSpeed run: the resume loader over a folder with one crafted ``.pt`` (DeepSpeed's real checkpoint engine
    class, a stand-in engine that reads every file through it)."""
    import torch

    import medmm.training.checkpoint as ckpt

    marker = tmp_path / "PWNED"
    root = tmp_path / "checkpoints"
    tag = _checkpoint_folder(root)
    assert ckpt.load_checkpoint(_FakeEngine(), root) == {"step": 4}  # a clean folder loads
    crafted_pt(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    refused = _resume_error(lambda: ckpt.load_checkpoint(_FakeEngine(), root))
    assert not marker.exists(), "the checkpoint ran code"
    assert type(refused).__name__ == "CheckpointError", repr(refused)
    assert loads == [], "a file was unpickled before the refusal"
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in str(refused) and "--trust-checkpoint" in str(refused)
    # a raw pickle (not a torch zip) under a .pt name, and a tag that leaves the folder, are refused the same way
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(crafted_pickle(marker))
    with pytest.raises(ckpt.CheckpointError, match="not a torch zip"):
        ckpt.load_checkpoint(_FakeEngine(), root)
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    (root / "latest").write_text("../" + tag.name)
    (tmp_path / tag.name).mkdir()
    with pytest.raises(ckpt.CheckpointError, match="step-NNNNNNNN"):
        ckpt.load_checkpoint(_FakeEngine(), root)
    assert not marker.exists() and loads == []


@pytest.mark.deepspeed
@pytest.mark.slow
def test_crafted_pt_through_the_real_resume(tmp_path):
    """A real ZeRO-2 run (the toy stage, in this process) writes its checkpoint; ``--resume`` from it works
    (DeepSpeed's model and optimizer states load weights-only), and with a crafted ``.pt`` in its place is refused
    with a typed error naming the file, code unrun."""
    import train
    from tests.conftest import REPO
    from tests.test_training import toy_config

    zero2 = str(REPO / "configs/deepspeed/zero2.json")
    train.main(["--config", str(toy_config(tmp_path, epochs=1, deepspeed=zero2))])
    resumed = train.main(["--config", str(toy_config(tmp_path, epochs=2, deepspeed=zero2)), "--resume"])
    assert resumed["step"] == 16  # continued from step 8: DeepSpeed's real model and optimizer states load

    marker = tmp_path / "PWNED"
    victim = tmp_path / "run" / "checkpoints" / "step-00000016" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    crafted_pt(victim, marker)
    refused = _resume_error(lambda: train.main(["--config", str(toy_config(tmp_path, epochs=3, deepspeed=zero2)),
                                                "--resume"]))
    assert not marker.exists(), "the checkpoint ran code"
    assert type(refused).__name__ == "CheckpointError", repr(refused)
    assert victim.name in str(refused) and "--trust-checkpoint" in str(refused)
