"""Pathology encoders, slide loaders, slide classification, metrics, recipes, and the LLM with a ``slide`` modality.

Tile encoders are tiny timm ViTs built here (no weights are downloaded); their UNI-style and CONCH-style
checkpoint files are written by the tests. Features come from the real CMU-1 and TCGA slides.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from encoders import build_encoder
from medmm.errors import SlideError

REPO = Path(__file__).resolve().parents[1]


def bag(n=9, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n, d, generator=g)


# ------------------------------------------------------------------ ABMIL


def test_abmil_is_gated_attention_mil_and_ignores_padding():
    enc = build_encoder("abmil_tiny").eval()
    x = bag()
    z, _ = enc(x)
    # Ilse et al. 2018, eq. 9: a_k = softmax_k(w^T (tanh(V h_k) * sigm(U h_k))), z = sum_k a_k h_k.
    h = enc.fc(x[0])
    a = torch.softmax(enc.attn_w(torch.tanh(enc.attn_v[0](h)) * torch.sigmoid(enc.attn_u[0](h)))[:, 0], 0)
    torch.testing.assert_close(z[0, 0], a @ h)
    torch.testing.assert_close(enc.attention(x)[0], a)
    # Padding changes nothing; attention on padded tiles is 0 and sums to 1 over the real ones.
    padded = torch.cat([x, torch.randn(1, 5, 32) * 100], 1)
    mask = torch.arange(14)[None] < 9
    torch.testing.assert_close(enc(padded, mask)[0], z)
    att = enc.attention(padded, mask).detach()
    assert float(att[0, 9:].abs().sum()) == 0.0 and float(att[0, :9].sum()) == pytest.approx(1.0)
    # A bag is a set: permuting tiles permutes the attention and leaves the slide embedding.
    perm = torch.randperm(9)
    torch.testing.assert_close(enc(x[:, perm])[0], z)
    with pytest.raises(ValueError, match="no tiles"):
        enc(padded, torch.zeros(1, 14, dtype=torch.bool))


def test_resampler_bounds_llm_tokens_whatever_the_bag_size():
    from medmm.model.projectors import build_projector

    enc = build_encoder("slide_tokens_tiny")
    proj = build_projector("resampler", enc.out_dim, 64, num_queries=8, heads=4)
    for n in (3, 3000):
        tokens, mask = enc(torch.randn(2, n, 32), torch.ones(2, n, dtype=torch.bool))
        assert proj(tokens, mask).shape == (2, 8, 64)


# ------------------------------------------------------------------ tile encoder


def test_vit_tile_loads_uni_and_conch_style_checkpoints(tmp_path):
    import timm
    from safetensors.torch import save_file

    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, embed_dim=32,
                            depth=2, num_heads=2, global_pool="").eval()
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(sd, str(tmp_path / "uni.safetensors"))  # UNI: plain timm keys
    conch = {f"visual.trunk.{k}": v for k, v in sd.items()}
    conch.update({"text.token_embedding.weight": torch.zeros(10, 4), "visual.attn_pool.q": torch.zeros(2)})
    torch.save(conch, tmp_path / "conch.bin")  # CONCH: a tower inside a CoCa state dict
    x = torch.randn(3, 3, 32, 32)
    want = ref.forward_features(x)[:, 0]
    for f in ("uni.safetensors", "conch.bin"):
        enc = build_encoder("vit_tile_tiny", checkpoint=str(tmp_path / f)).eval()
        torch.testing.assert_close(enc.embed_tiles(x), want)
    torch.save({"blocks.0.norm1.weight": torch.ones(32)}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="do not match"):
        build_encoder("vit_tile_tiny", checkpoint=str(tmp_path / "partial.pt"))
    # A checkpoint trained at 32 px loads into a 64 px encoder (timm resamples the position embeddings).
    enc64 = build_encoder("vit_tile_tiny", img_size=64, checkpoint=str(tmp_path / "uni.safetensors"))
    assert enc64.embed_tiles(torch.randn(1, 3, 64, 64)).shape == (1, 32)


def test_vit_tile_bag_skips_padded_tiles_and_preprocess():
    enc = build_encoder("vit_tile_tiny", pool="token+avg").eval()
    tiles = torch.randn(2, 4, 3, 32, 32)
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    with torch.no_grad():
        out, m = enc(tiles, mask)
    assert out.shape == (2, 4, 64) and torch.equal(m, mask)
    torch.testing.assert_close(out[1, :2], enc.embed_tiles(tiles[1, :2]))
    assert float(out[1, 2:].abs().sum()) == 0.0
    u8 = torch.randint(0, 256, (2, 48, 48, 3), dtype=torch.uint8)
    x = enc.preprocess(u8)
    assert x.shape == (2, 3, 32, 32) and abs(float(x.mean())) < 1.0


# ------------------------------------------------------------------ loaders


def test_slide_feature_loader(tmp_path):
    from medmm.config import PreprocessConfig
    from medmm.data.loaders import build_loader
    from medmm.io.slide_features import save_slide_features

    pre = PreprocessConfig(slide_feature_dim=8, slide_max_tiles=5)
    f1 = save_slide_features(tmp_path / "a.safetensors", np.random.rand(12, 8), np.arange(24).reshape(12, 2),
                             {"source": "/x.svs", "tile0": 448.0})
    np.save(tmp_path / "b.npy", np.random.rand(3, 8).astype(np.float32))
    np.save(tmp_path / "c.npy", np.random.rand(3, 6).astype(np.float32))
    ld = build_loader("slide_features", pre)
    a = ld.load("a.safetensors", tmp_path)
    assert a["x"].shape == (5, 8) and a["coords"][0].tolist() == [0, 1] and a["coords"][-1].tolist() == [22, 23]
    assert a["meta"]["tile0"] == 448.0 and a["meta"]["path"] == str(f1)
    b = ld.load(str(tmp_path / "b.npy"))
    batch = ld.collate([a, b])
    assert batch["x"].shape == (2, 5, 8) and batch["mask"].sum(1).tolist() == [5, 3]
    with pytest.raises(SlideError, match="slide_feature_dim=8"):
        ld.load(str(tmp_path / "c.npy"))
    with pytest.raises(SlideError, match="not found"):
        ld.load(str(tmp_path / "missing.safetensors"))
    assert ld.collate([ld.dummy()])["x"].shape == (1, 1, 8)


def test_slide_tile_loader_on_real_slide(shared_data):
    from medmm.config import PreprocessConfig
    from medmm.data.loaders import build_loader

    pre = PreprocessConfig(image_size=32, slide_mpp=1.0, slide_tile=112, slide_max_tiles=6)
    item = build_loader("slide_tiles", pre).load(str(shared_data / "pathology/wsi/CMU-1-Small-Region.svs"))
    assert item["x"].shape == (6, 3, 32, 32) and item["coords"].shape == (6, 2) and item["meta"]["tile0"] > 200
    with pytest.raises(SlideError, match="--slide-mpp"):
        build_loader("slide_tiles", pre).load(str(shared_data / "pathology/wsi/tcga-cr-7395-01a-01-ts1.svs"))


# ------------------------------------------------------------------ prepare --features


@pytest.fixture(scope="module")
def feature_run(tmp_path_factory, shared_data):
    """``prepare wsi --features vit_tile_tiny`` on the two real SVS slides + the broken one, with labels and reports."""
    from medmm.prepare.wsi import prepare_wsi

    d = tmp_path_factory.mktemp("feat")
    torch.manual_seed(0)
    enc = build_encoder("vit_tile_tiny")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in enc.trunk.state_dict().items()}, str(d / "tile_encoder.safetensors"))
    src = d / "slides"
    src.mkdir()
    for f in ("wsi/CMU-1-Small-Region.svs", "wsi/tcga-cr-7395-01a-01-ts1.svs", "broken/broken.svs"):
        (src / Path(f).name).symlink_to(shared_data / "pathology" / f)
    (d / "labels.csv").write_text('slide,label,report\nCMU-1-Small-Region.svs,tumor,"Invasive carcinoma, grade 2."\n'
                                  "tcga-cr-7395-01a-01-ts1.svs,normal,Benign mucosa.\n")
    m = prepare_wsi(src, d / "out", mpp=1.0, tile=64, labels=d / "labels.csv", features="vit_tile_tiny",
                    encoder_checkpoint=str(d / "tile_encoder.safetensors"), slide_mpp=0.5, progress=False,
                    eval_fraction=0.5)
    return d, m


def test_prepare_features_writes_bags_conversations_and_shards(feature_run):
    import tarfile

    from medmm.io import wsi
    from medmm.io.slide_features import load_slide_features

    d, m = feature_run
    out = d / "out"
    assert m["counts"]["slides_ok"] == 2 and m["counts"]["slides_failed"] == 1
    assert json.loads((out / "errors.jsonl").read_text())["path"].endswith("broken.svs")
    tcga = m["slides"]["tcga-cr-7395-01a-01-ts1"]
    assert tcga["mpp_source"].startswith("user") and tcga["slide_mpp"] == 0.5
    feats, coords, meta = load_slide_features(out / m["slides"]["CMU-1-Small-Region"]["features"])
    assert feats.shape == (m["slides"]["CMU-1-Small-Region"]["tiles"], 32) and coords.shape == (feats.shape[0], 2)
    assert meta["encoder"] == "vit_tile_tiny" and Path(meta["source"]).name == "CMU-1-Small-Region.svs"
    # The stored features are the encoder's output on the tiles read at those coordinates.
    enc = build_encoder("vit_tile_tiny", checkpoint=str(d / "tile_encoder.safetensors")).eval()
    with wsi.open_slide(meta["source"]) as s:
        ch = wsi.select_level(s, 1.0, 64)
        tiles = np.stack([wsi.read_tile(s, ch, int(x), int(y)) for x, y in coords[:4]])
    with torch.no_grad():
        want = enc.embed_tiles(enc.preprocess(torch.from_numpy(tiles))).numpy()
    np.testing.assert_allclose(feats[:4], want, rtol=1e-4, atol=1e-5)
    # One webdataset sample per slide.
    with tarfile.open(out / m["shards"][0]) as t:
        names = sorted(t.getnames())
    assert names == sorted(f"{s}.{e}" for s in ("CMU-1-Small-Region", "tcga-cr-7395-01a-01-ts1")
                           for e in ("coords.npy", "features.npy", "json"))
    # Conversations: a label record and a report record per slide; split by patient (eval_fraction 0.5).
    train = [json.loads(x) for x in (out / "slides_train.jsonl").read_text().splitlines()]
    evals = [json.loads(x) for x in (out / "slides_eval.jsonl").read_text().splitlines()]
    assert len(train) == len(evals) == 2
    assert {r["patient"] for r in train}.isdisjoint({r["patient"] for r in evals})
    by_id = {r["id"]: r for r in train + evals}
    lab, rep = by_id["wsi-CMU-1-Small-Region-label"], by_id["wsi-CMU-1-Small-Region-report"]
    assert lab["conversations"][1]["value"] == "tumor" and lab["answer_type"] == "CLOSED"
    assert rep["conversations"][1]["value"] == "Invasive carcinoma, grade 2." and rep["answer_type"] == "OPEN"
    assert all(r["conversations"][0]["value"].startswith("<slide>\n") for r in by_id.values())
    assert by_id["wsi-tcga-cr-7395-01a-01-ts1-label"]["patient"] == "TCGA-CR-7395"
    assert (out / lab["modalities"]["slide"]).exists()


# ------------------------------------------------------------------ LLM with a slide modality


@pytest.mark.slow
def test_llm_with_slide_modality_trains_answers_and_draws_attention(tiny_llm, feature_run, tmp_path):
    from medmm.config import ModelConfig, config_from_dict
    from medmm.inference.__main__ import main as infer_main
    from medmm.model.multimodal import MedMMForCausalLM

    d, m = feature_run
    out = d / "out"
    rec = json.loads((out / "slides_train.jsonl").read_text().splitlines()[0])
    feat = str(out / rec["modalities"]["slide"])
    for enc, proj, k in (("slide_tokens_tiny", {"type": "resampler", "num_queries": 4}, 4),
                         ("abmil_tiny", {"type": "mlp2x_gelu"}, 2)):
        cfg = config_from_dict(ModelConfig, {
            "llm": str(tiny_llm), "llm_trainable": "lora", "lora": {"r": 4, "alpha": 8},
            "modalities": {"slide": {"loader": "slide_features",
                                     "encoder": {"name": enc, "kwargs": {"branches": 2} if enc == "abmil_tiny" else {},
                                                 "trainable": "full"},
                                     "projector": proj, "preprocess": {"slide_feature_dim": 32},
                                     "max_tokens": 8}}})
        model = MedMMForCausalLM.from_config(cfg)
        assert model.modality_tokens["slide"].slots == k  # thousands of tiles or not: k LLM tokens
        proc = model.processor(256)
        batch = proc.collate([proc.process(rec, base_dir=out)])
        assert batch["modality_inputs"]["slide"]["x"].shape[2] == 32
        loss = model(**batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        assert model.encoders["slide"].norm.weight.grad is not None if enc == "slide_tokens_tiny" else \
            model.encoders["slide"].attn_w.weight.grad is not None
        ckpt = tmp_path / enc
        model.save_pretrained(ckpt)
        png = tmp_path / f"{enc}.png"
        res = infer_main(["--checkpoint", str(ckpt), "--slide", feat, "--question", "<slide>\nWhat is the diagnosis?",
                          "--max-new-tokens", "4", "--heatmap", str(png), "--device", "cpu"])
        assert isinstance(res[0]["answer"], str) and "error" not in res[0], res[0]
        assert res[0]["heatmap"]["heatmap"] == str(png) and png.stat().st_size > 10_000
        sid = Path(feat).stem
        assert res[0]["heatmap"]["tiles"] == m["slides"][sid]["tiles"]


# ------------------------------------------------------------------ slide classification


def synthetic_bags(d: Path, n_slides=24, dim=16, seed=0, source: str | None = None) -> tuple[Path, list]:
    """Bags where 'tumor' slides hold a few tiles shifted along one direction (the rest is shared noise)."""
    from medmm.io.slide_features import save_slide_features

    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    recs, signal = [], []
    for i in range(n_slides):
        n = int(rng.integers(100, 200))
        f = rng.normal(size=(n, dim)).astype(np.float32)
        lab = "tumor" if i % 2 else "normal"
        pos = rng.choice(n, 4, replace=False) if lab == "tumor" else np.array([], int)
        f[pos] += 6 * direction
        coords = np.stack(np.meshgrid(np.arange(10) * 224, np.arange(n // 10 + 1) * 224), -1).reshape(-1, 2)[:n]
        save_slide_features(d / f"s{i}.safetensors", f, coords, {"source": source or "", "tile0": 224.0})
        recs.append({"id": f"s{i}", "modalities": {"slide": f"s{i}.safetensors"}, "label": lab})
        signal.append(set(pos.tolist()))
    return d, recs, signal


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is ~30x faster than two contended ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.deepspeed
def test_slide_classifier_learns_reports_metrics_and_attends_to_signal(tmp_path, shared_data, one_thread):
    """configs/tasks/slide_classification.yaml (trainer.stage: head) through train.py, then `medmm eval head`,
    the attention of the saved model and the heat map, all from the checkpoint folder."""
    import train
    from medmm.eval.heads import evaluate_head
    from medmm.inference.heatmap import head_heatmap
    from medmm.utils import write_jsonl

    cmu = str(shared_data / "pathology/wsi/CMU-1-Small-Region.svs")
    d, recs, signal = synthetic_bags(tmp_path, source=cmu)
    write_jsonl(d / "train.jsonl", recs[:16])
    write_jsonl(d / "eval.jsonl", recs[16:])
    res = train.main(["--config", str(REPO / "configs/tasks/slide_classification.yaml"),
                      f"head.data.path={d / 'train.jsonl'}", f"head.data.eval_path={d / 'eval.jsonl'}",
                      "trainer.epochs=30", "trainer.lr=2e-3", "head.preprocess.slide_feature_dim=16",
                      "head.encoder.kwargs={in_dim: 16, hidden: 32, attn_dim: 16, dropout: 0.0}", "head.bootstrap=50",
                      f"trainer.output_dir={tmp_path / 'run'}"])
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    loss = [r["loss"] for r in rows if "loss" in r]
    assert len(loss) == 30 * 16 and np.mean(loss[-16:]) < np.mean(loss[:16])  # one bag per step, 16 bags
    assert len([r for r in rows if "val_auroc" in r]) == 31  # before training and after every epoch
    t = res["metrics"]["test"]["raw"]
    assert res["metrics"]["classes"] == ["normal", "tumor"] and t["count"] == 8
    assert t["auroc"] >= 0.9 and t["balanced_accuracy"] >= 0.75, t
    m = evaluate_head(res["checkpoint"], d / "eval.jsonl", tmp_path / "ev", bootstrap=50, device="cpu")
    assert m["auroc"] == pytest.approx(t["auroc"]) and m["auroc_ci"][0] <= m["auroc"] <= m["auroc_ci"][1]
    assert len((tmp_path / "ev" / "predictions.csv").read_text().splitlines()) == 1 + 8
    # Attention concentrates on the tiles that carry the signal.
    from medmm.io.slide_features import load_slide_features
    from medmm.model.heads import HeadModel

    model = HeadModel.from_pretrained(res["checkpoint"])
    hits = []
    for i in range(17, 24, 2):  # eval tumour slides
        f, _, _ = load_slide_features(d / f"s{i}.safetensors")
        att = model.attention(torch.from_numpy(f)[None])[0].numpy()
        hits.append(len(set(np.argsort(-att)[:4].tolist()) & signal[i]) / 4)
    assert np.mean(hits) >= 0.6
    info = head_heatmap(res["checkpoint"], d / "s17.safetensors", tmp_path / "s17.png", device="cpu")
    assert (tmp_path / "s17.png").stat().st_size > 10_000 and info["prediction"] in ("tumor", "normal")


def test_classification_metrics_match_sklearn_and_say_when_undefined():
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    from medmm.scoring import classification_metrics

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    p = rng.dirichlet(np.ones(3), 60)
    p[np.arange(60), y] += 0.5
    p /= p.sum(1, keepdims=True)
    m = classification_metrics(y, p, ["a", "b", "c"], bootstrap=200)
    assert m["accuracy"] == pytest.approx((p.argmax(1) == y).mean())
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p.argmax(1)))
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"))
    assert m["auroc_ci"][0] <= m["auroc"] <= m["auroc_ci"][1] and sum(map(sum, m["confusion_matrix"])) == 60
    assert m["per_class"]["a"]["support"] == int((y == 0).sum())
    one = classification_metrics([1, 1, 1], np.array([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9]]))
    assert one["auroc"] is None and one["accuracy"] == pytest.approx(2 / 3) and any("AUROC" in n for n in one["notes"])
    binary = classification_metrics([0, 1, 1, 0], np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.4, 0.6]]))
    assert binary["auroc"] == pytest.approx(0.75) and binary["balanced_accuracy"] == pytest.approx(0.5)


def test_task_recipes_load_and_build():
    from medmm.config import TrainConfig, load_config
    from medmm.model.heads import build_head_model

    cfg = load_config(TrainConfig, REPO / "configs/tasks/slide_classification.yaml", ["head.classes=[a, b]"])
    assert cfg.trainer.stage == "head" and cfg.head.featuriser == "slides"
    model = build_head_model(cfg.head)
    assert model.encoder.in_dim == 1024 and model(torch.randn(1, 50, 1024)).shape == (1, 2)
