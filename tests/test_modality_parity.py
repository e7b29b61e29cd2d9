"""What prepare did is what serving does: one transform per modality, its options carried from prepare to the
checkpoint.

Each parity case prepares a raw source into shards, builds a tiny checkpoint whose preprocessing comes from that
manifest (as training copies it), runs ``infer.py --dump-inputs`` on the raw source, and compares the dumped
encoder input with what the training loader hands the encoder for the source's shard sample: within float16
storage precision for DICOM volumes and images (2e-3 on [0, 1] values; the loaders' mean/std of 0.5 doubles it
here, so 4e-3 after normalisation), exactly for whole-slide tiles stored as PNG.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from infer import main as infer_main
from medmm.config import DatasetConfig, DicomPrepareOptions, ModelConfig, config_from_dict
from medmm.data.loaders import build_loader
from medmm.data.prepared import prepared_preprocess
from medmm.data.streaming import decoded, expand_shards, sample_records, shard_samples
from medmm.errors import ConfigError
from medmm.modalities import VolumeOptions, adopt_prepared
from medmm.model.multimodal import CONFIG_NAME, MedMMForCausalLM
from medmm.prepare.dicom import prepare_dicom
from tests.conftest import model_dict

# float16 storage on [0, 1] (2e-3), divided by the loaders' std of 0.5
ATOL = 2e-3 / 0.5


# ----------------------------------------------------------------------------- sources


def _ct_series(folder: Path, pydicom_files: Path) -> Path:
    """Six CT_small slices 3 mm apart (a real series' header, positions changed), shuffled file names."""
    folder.mkdir(parents=True)
    base = pydicom.dcmread(pydicom_files / "CT_small.dcm")
    series = pydicom.uid.generate_uid()
    rng = np.random.default_rng(0)
    for k in range(6):
        ds = base.copy()
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, 3.0 * k]
        ds.InstanceNumber = k + 1
        # slices that differ, so that resampling along the slice axis matters
        px = ds.pixel_array.astype(np.int32) + int(rng.integers(-200, 200))
        ds.PixelData = np.clip(px, -2000, 4000).astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(folder / f"s{(k * 7) % 6}.dcm")
    return folder


def _radiograph(path: Path, pydicom_files: Path) -> Path:
    """A single-frame DX image with its own window (CT_small's pixels under a digital X-ray header)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(pydicom_files / "CT_small.dcm")
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.Modality = "DX"
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.WindowCenter, ds.WindowWidth = 300, 900  # narrower than the values: the file's window decides
    ds.save_as(path)
    return path


def _samples(out: Path) -> list[dict]:
    return [s for url in expand_shards(str(out / "shard-*.tar")) for s in shard_samples(url)]


def _checkpoint(tiny_llm: Path, prepared: list[Path], path: Path, **modalities_pre) -> Path:
    """A tiny checkpoint whose preprocessing is copied from the prepared data (what training does)."""
    md = model_dict(tiny_llm)
    md["modalities"] = {k: v for k, v in md["modalities"].items() if k in ("image", "volume")}
    for k, pre in modalities_pre.items():
        md["modalities"][k].setdefault("preprocess", {}).update(pre)
    cfg = config_from_dict(ModelConfig, md)
    adopt_prepared(cfg, prepared_preprocess([DatasetConfig(format="wds", shards=str(d / "shard-*.tar"))
                                             for d in prepared]))
    return MedMMForCausalLM.from_config(cfg).save_pretrained(path)


def _saved_modalities(ckpt: Path) -> dict:
    return json.loads((ckpt / CONFIG_NAME).read_text())["model"]["modalities"]


def _training_input(ckpt: Path, sample: dict, key: str) -> np.ndarray:
    """What the training loader hands encoder ``key`` for a shard sample: the streamed record decoded, loaded by
    the checkpoint's loader (built from the saved preprocess), collated."""
    cfg = config_from_dict(ModelConfig, json.loads((ckpt / CONFIG_NAME).read_text())["model"])
    loader = build_loader(cfg.modalities[key].loader, cfg.modalities[key].preprocess)
    rec = decoded(sample_records(sample, split=None)[0])
    return loader.collate([loader.load(rec["modalities"][key])])["x"].numpy()


def _served_input(ckpt: Path, flag: str, value: Path, key: str, dump: Path) -> np.ndarray:
    infer_main(["--checkpoint", str(ckpt), flag, str(value), "--question", "What is it?", "--max-new-tokens", "1",
                "--dump-inputs", str(dump)])
    return np.load(dump / f"{key}.npy")


def _report_for_every_study(tmp_path: Path, src: Path) -> Path:
    """A reports CSV keyed by accession (empty in these files), so every sample carries a conversation."""
    csv = tmp_path / "reports.csv"
    csv.write_text("study_uid,report\n" + "".join(
        f"{uid},Findings.\n" for uid in {pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID
                                         for p in src.rglob("*.dcm")}))
    return csv


# ----------------------------------------------------------------------------- volumes


def test_volume_with_spacing_and_window_is_served_as_prepared(tmp_path, tiny_llm, pydicom_files):
    src = tmp_path / "src"
    series = _ct_series(src / "series", pydicom_files)
    out = tmp_path / "prepared"
    opts = DicomPrepareOptions(window="abdomen", spacing=(2.0, 1.0, 1.0), size_3d=(8, 32, 32), size_2d=32,
                               salt="s", eval_fraction=0)
    manifest = prepare_dicom(src, out, _report_for_every_study(tmp_path, src), opts)
    assert manifest["preprocess"]["volume"]["spacing"] == [2.0, 1.0, 1.0]
    (sample,) = [s for s in _samples(out) if json.loads(s["json"])["kind"] == "volume"]
    assert json.loads(sample["json"])["preprocess"]["volume"] == manifest["preprocess"]["volume"]

    ckpt = _checkpoint(tiny_llm, [out], tmp_path / "ckpt")
    saved = _saved_modalities(ckpt)["volume"]["preprocess"]
    assert saved["spacing"] == [2.0, 1.0, 1.0] and saved["window"] == "abdomen"
    assert saved["prepared_volume_size"] == [8, 32, 32] and saved["volume_size"] == [16, 64, 64]

    trained = _training_input(ckpt, sample, "volume")
    served = _served_input(ckpt, "--volume", series, "volume", tmp_path / "dump")
    assert served.shape == trained.shape == (1, 1, 16, 64, 64)
    np.testing.assert_allclose(served, trained, atol=ATOL, rtol=0)
    # the check can fail: the same series served without the recorded spacing is another array
    pre = config_from_dict(ModelConfig, json.loads((ckpt / CONFIG_NAME).read_text())["model"]).modalities["volume"]
    pre.preprocess.spacing = None
    unspaced = build_loader("volume", pre.preprocess).load(str(series))["x"].numpy()
    assert np.abs(unspaced - trained[0]).max() > 10 * ATOL


def test_volume_options_record_round_trips_and_reaches_the_loader():
    o = VolumeOptions(window="lung", spacing=(2, 1, 1), size=(8, 32, 32))
    assert VolumeOptions.from_record(json.loads(json.dumps(o.to_record()))) == o
    with pytest.raises(ConfigError, match="unknown preset"):
        VolumeOptions(window="nope")
    with pytest.raises(ConfigError, match="window_fallback"):
        VolumeOptions(window_fallback="vendor")


# ----------------------------------------------------------------------------- 2D radiographs


def test_dicom_radiograph_is_served_as_prepared(tmp_path, tiny_llm, pydicom_files):
    src = tmp_path / "src"
    dx = _radiograph(src / "dx.dcm", pydicom_files)
    out = tmp_path / "prepared"
    # no preset: the file's own window (its VOI transform) on both sides; prepared at 32 px, encoder at 64 px
    manifest = prepare_dicom(src, out, _report_for_every_study(tmp_path, src),
                             DicomPrepareOptions(size_2d=32, salt="s", eval_fraction=0))
    assert manifest["preprocess"]["image"] == {"window": None, "window_fallback": "file", "size": 32,
                                               "range": [0.0, 1.0], "dtype": "float16"}
    (sample,) = _samples(out)
    assert json.loads(sample["json"])["kind"] == "image"

    ckpt = _checkpoint(tiny_llm, [out], tmp_path / "ckpt")
    saved = _saved_modalities(ckpt)["image"]["preprocess"]
    assert saved["prepared_image_size"] == 32 and saved["image_size"] == 64 and saved["window_fallback"] == "file"

    trained = _training_input(ckpt, sample, "image")
    served = _served_input(ckpt, "--image", dx, "image", tmp_path / "dump")
    assert served.shape == trained.shape == (1, 3, 64, 64)
    np.testing.assert_allclose(served, trained, atol=ATOL, rtol=0)
    # the file's window matters: min-max of the same file is another image
    pre = config_from_dict(ModelConfig, json.loads((ckpt / CONFIG_NAME).read_text())["model"]).modalities["image"]
    pre.preprocess.window_fallback = "minmax"
    minmax = build_loader("image", pre.preprocess).load(str(dx))["x"].numpy()
    assert np.abs(minmax - trained[0]).max() > 10 * ATOL


# ----------------------------------------------------------------------------- the copy into the checkpoint


def test_training_copies_the_recorded_options_and_refuses_a_config_that_disagrees(tiny_llm):
    recorded = [("prepared/manifest.json", {"volume": VolumeOptions(window="lung", spacing=(2, 1, 1),
                                                                    size=(8, 32, 32)).to_record()})]
    cfg = config_from_dict(ModelConfig, model_dict(tiny_llm))
    copied = adopt_prepared(cfg, recorded)
    pre = cfg.modalities["volume"].preprocess
    assert pre.spacing == [2.0, 1.0, 1.0] and pre.window == "lung" and pre.prepared_volume_size == [8, 32, 32]
    assert copied == {"volume": {"window": "lung", "spacing": [2.0, 1.0, 1.0], "prepared_volume_size": [8, 32, 32]}}
    assert cfg.modalities["image"].preprocess.window is None  # a kind the data lacks leaves other modalities alone
    assert adopt_prepared(cfg, recorded) == {}  # the same values again: nothing to copy, no error

    md = model_dict(tiny_llm)
    md["modalities"]["volume"]["preprocess"] = {"spacing": [1.0, 1.0, 1.0]}
    with pytest.raises(ConfigError, match=r"spacing is \[1.0, 1.0, 1.0\], but prepared/manifest.json was prepared "
                                          r"with \[2.0, 1.0, 1.0\]"):
        adopt_prepared(config_from_dict(ModelConfig, md), recorded)
    other = [("b/manifest.json", {"volume": VolumeOptions(spacing=(3, 1, 1), size=(8, 32, 32)).to_record()})]
    with pytest.raises(ConfigError, match="the data disagree: prepared/manifest.json .* b/manifest.json"):
        adopt_prepared(config_from_dict(ModelConfig, model_dict(tiny_llm)), recorded + other)


# ----------------------------------------------------------------------------- whole-slide tiles


def test_whole_slide_tile_from_png_shards_is_served_exactly_as_prepared(tmp_path, tiny_llm, shared_data):
    from medmm.prepare.wsi import prepare_wsi

    slides = tmp_path / "slides"
    slides.mkdir()
    slide = slides / "CMU-1-Small-Region.svs"
    slide.symlink_to(shared_data / "pathology/wsi/CMU-1-Small-Region.svs")
    (tmp_path / "labels.csv").write_text("slide,label\nCMU-1-Small-Region.svs,tumor\n")
    out = tmp_path / "prepared"
    m = prepare_wsi(slides, out, mpp=4.0, tile=32, labels=tmp_path / "labels.csv", slide_mpp=0.5, min_tissue=0.3,
                    image_format="png", eval_fraction=0, progress=False)
    assert m["preprocess"]["slide_tile"]["mpp"] == 4.0 and m["preprocess"]["slide_tile"]["scan_mpp"] == 0.5
    tiles = _samples(out)
    assert len(tiles) >= 4 and all("png" in s for s in tiles)

    # an image modality trained on the tiles, and the slide modality that serves whole slides (tiles on the fly)
    md = model_dict(tiny_llm)
    md["modalities"] = {"image": {"loader": "image", "encoder": {"name": "vit2d_tiny", "kwargs": {"img_size": 32}},
                                  "preprocess": {"image_size": 32}},
                        "slide": {"loader": "slide_tiles", "encoder": {"name": "vit_tile_tiny"},
                                  "projector": {"type": "resampler", "num_queries": 4},
                                  "preprocess": {"image_size": 32}}}
    cfg = config_from_dict(ModelConfig, md)
    adopt_prepared(cfg, prepared_preprocess([DatasetConfig(format="wds", shards=str(out / "shard-*.tar"))]))
    ckpt = MedMMForCausalLM.from_config(cfg).save_pretrained(tmp_path / "ckpt")
    saved = _saved_modalities(ckpt)["slide"]["preprocess"]
    assert (saved["slide_mpp"], saved["slide_tile"], saved["slide_scan_mpp"], saved["slide_min_tissue"]) == \
        (4.0, 32, 0.5, 0.3)

    served = _served_input(ckpt, "--slide", slide, "slide", tmp_path / "dump")  # (1, N, 3, 32, 32)
    assert served.shape[1] == len(tiles)
    for sample in tiles:
        meta = json.loads(sample["json"])
        trained = _training_input(ckpt, sample, "image")  # (1, 3, 32, 32)
        np.testing.assert_array_equal(served[0, meta["index"]], trained[0])


@pytest.mark.slow
@pytest.mark.deepspeed
def test_train_py_on_shards_prepared_with_spacing_writes_it_into_the_checkpoint(tmp_path, tiny_llm, pydicom_files):
    """One real (1 rank, 2 steps) training run over `prepare dicom --spacing 2,1,1` shards: the checkpoint it
    writes says spacing (2, 1, 1), and serving reads it back from there."""
    from tests.test_streaming import _stream_config
    from tests.test_training import torchrun

    src = tmp_path / "src"
    _ct_series(src / "series", pydicom_files)
    out = tmp_path / "prepared"
    prepare_dicom(src, out, _report_for_every_study(tmp_path, src),
                  DicomPrepareOptions(window="abdomen", spacing=(2.0, 1.0, 1.0), size_3d=(8, 32, 32), salt="s",
                                      eval_fraction=0))
    ds = [{"format": "wds", "shards": str(out / "shard-*.tar"), "split": None}]
    cfg = _stream_config(tmp_path, tiny_llm, ds, modalities=("volume",), max_steps=2, save_every=2,
                         micro_batch_size=1)
    r = torchrun(cfg, nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    saved = _saved_modalities(tmp_path / "run" / "checkpoint")["volume"]["preprocess"]
    assert saved["spacing"] == [2.0, 1.0, 1.0] and saved["window"] == "abdomen"
    assert saved["prepared_volume_size"] == [8, 32, 32]
