"""Sequence packing: planners, neat-packed losses equal to per-document losses, SFT packed == unpacked."""

import json

import pytest
import torch

from medmm.data.conversation import IGNORE_INDEX
from medmm.data.packing import (
    PackedConversationDataset,
    block_causal_mask,
    concat_samples,
    packed_llm_inputs,
    plan_bins,
    plan_stream,
    segment_ids,
)
from tests.conftest import SAMPLE, model_dict

# ------------------------------------------------------------------ planners


def test_plan_stream_cuts_every_block_and_keeps_order():
    lengths = [5, 3, 9, 1, 4]
    blocks = plan_stream(lengths, 8)
    assert [sum(p.length for p in b) for b in blocks] == [8, 8, 6]
    flat = [(p.doc, p.start, p.end) for b in blocks for p in b]
    assert flat == [(0, 0, 5), (1, 0, 3), (2, 0, 8), (2, 8, 9), (3, 0, 1), (4, 0, 4)]
    assert plan_stream(lengths, 8, drop_last=True) == blocks[:2]


def test_plan_stream_never_splits_atomic_documents():
    lengths = [6, 5, 12, 3]
    atomic = [False, True, True, False]
    blocks = plan_stream(lengths, 8, atomic)
    for b in blocks:
        assert sum(p.length for p in b) <= 8
    pieces = {p.doc: [] for b in blocks for p in b}
    for b in blocks:
        for p in b:
            pieces[p.doc].append(p)
    assert len(pieces[1]) == 1 and pieces[1][0].length == 5  # moved whole to the next block
    assert len(pieces[2]) == 1 and pieces[2][0].length == 8  # longer than a block: cut, never split
    assert blocks[0] == [plan_stream([6], 8)[0][0]]  # the 2 left in block 0 stay padding


def test_plan_bins_places_every_sample_once_within_the_block():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 200, (500,), generator=g).tolist() + [256, 300]
    bins = plan_bins(lengths, 256)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths)))
    for b in bins:
        assert len(b) == 1 or sum(lengths[i] for i in b) <= 256
    lower_bound = -(-sum(min(n, 256) for n in lengths) // 256)
    assert len(bins) <= 1.05 * lower_bound + 1  # best-fit decreasing is near the optimum on this mix
    assert bins == plan_bins(lengths, 256)


def test_concat_samples_restarts_positions_and_ignores_document_starts():
    a = {"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([-100, 2, 3]), "items": {"image": ["a"]}}
    b = {"input_ids": torch.tensor([4, 5]), "labels": torch.tensor([4, 5]), "items": {"image": ["b"], "mol": ["m"]}}
    s = concat_samples([a, b])
    assert s["position_ids"].tolist() == [0, 1, 2, 0, 1]
    assert s["labels"].tolist() == [-100, 2, 3, -100, 5]
    assert s["items"] == {"image": ["a", "b"], "mol": ["m"]}
    assert segment_ids(s["position_ids"][None]).tolist() == [[1, 1, 1, 2, 2]]
    c = concat_samples([a, b], neat=False)
    assert "position_ids" not in c and c["labels"].tolist() == [-100, 2, 3, 4, 5]


def test_block_causal_mask_is_block_diagonal_and_causal():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    m = block_causal_mask(pos)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                             [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(m, expected)
    add = block_causal_mask(pos, torch.float32)[0, 0]
    assert torch.equal(add == 0, expected) and add.min() == torch.finfo(torch.float32).min


def test_packed_llm_inputs_flattens_for_flash_attention():
    emb = torch.randn(2, 4, 8)
    pos = torch.tensor([[0, 1, 0, 1], [0, 1, 2, 0]])
    labels = torch.arange(8).reshape(2, 4)
    e, p, lab, mask = packed_llm_inputs(emb, pos, labels, "flash_attention_2")
    assert e.shape == (1, 8, 8) and p.tolist() == [[0, 1, 0, 1, 0, 1, 2, 0]] and mask is None
    assert lab.tolist() == [[-100, 1, -100, 3, -100, 5, 6, -100]]
    _, _, _, mask = packed_llm_inputs(emb, pos, labels, "sdpa")
    assert mask.dtype == torch.bool and mask.shape == (2, 1, 4, 4)
    _, _, _, mask = packed_llm_inputs(emb, pos, labels, "eager")
    assert mask.dtype == emb.dtype


# ------------------------------------------------------------------ losses on the tiny LLM


def _model(tiny_llm, impl, modalities=()):
    from medmm.config import ModelConfig, config_from_dict
    from medmm.model.multimodal import MedMMForCausalLM

    d = model_dict(tiny_llm, llm_trainable="full", attn_implementation=impl)
    d["modalities"] = {k: v for k, v in d["modalities"].items() if k in modalities}
    torch.manual_seed(0)
    return MedMMForCausalLM.from_config(config_from_dict(ModelConfig, d)).eval()


DOCS = ["The lungs are clear. No pleural effusion.", "CT", "Is there an abnormality of the head? yes",
        "MR brain: no acute abnormality. The ventricles are normal in size and the midline is not shifted.",
        "Hepatic steatosis."]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_neat_block_loss_is_the_token_weighted_mean_of_document_losses(tiny_llm, impl):
    model = _model(tiny_llm, impl)
    tok = model.tokenizer
    docs = [torch.tensor(tok(t)["input_ids"] + [tok.eos_token_id]) for t in DOCS]
    with torch.no_grad():
        own = [(float(model(input_ids=d[None], labels=d[None]).loss), d.numel() - 1) for d in docs]
        expected = sum(loss * n for loss, n in own) / sum(n for _, n in own)
        # two rows: the first holds docs 0-2, the second docs 3-4 and padding (one more document, no loss)
        proc = model.processor(64)
        rows = [concat_samples([{"input_ids": d, "labels": d} for d in docs[:3]]),
                concat_samples([{"input_ids": d, "labels": d} for d in docs[3:]])]
        batch = proc.collate(rows)
        assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
        packed = float(model(**batch).loss)
        # the same blocks with attention across documents (concat packing) give another loss
        crossed = float(model(input_ids=batch["input_ids"], labels=batch["labels"]).loss)
    assert abs(packed - expected) < 1e-5, (packed, expected)
    assert abs(crossed - expected) > 1e-3


def test_neat_packing_gradients_match_the_documents_own(tiny_llm):
    """Not only the loss: the gradient of a packed block is the token-weighted sum of the documents' gradients."""
    model = _model(tiny_llm, "sdpa")
    tok = model.tokenizer
    docs = [torch.tensor(tok(t)["input_ids"] + [tok.eos_token_id]) for t in DOCS[:3]]
    n = sum(d.numel() - 1 for d in docs)
    model.zero_grad()
    for d in docs:
        (model(input_ids=d[None], labels=d[None]).loss * (d.numel() - 1) / n).backward()
    ref = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    s = concat_samples([{"input_ids": d, "labels": d} for d in docs])
    model(input_ids=s["input_ids"][None], labels=s["labels"][None], position_ids=s["position_ids"][None]).loss.backward()
    for k, p in model.named_parameters():
        if k in ref:
            torch.testing.assert_close(p.grad, ref[k], atol=1e-6, rtol=1e-4)


def _vqa_records(n):
    qa_dir = SAMPLE / "vqa_rad"
    qa = json.loads((qa_dir / "testset.json").read_text())
    recs = []
    for i, q in enumerate(qa[:n]):
        if i % 3 == 2:  # a text-only conversation among the image ones, with a longer answer
            recs.append({"id": f"t{i}", "conversations": [
                {"from": "human", "value": "Describe the findings."},
                {"from": "gpt", "value": f"{q['question']} {q['answer']}. No acute abnormality is seen."}]})
        else:
            recs.append({"id": f"q{i}", "modalities": {"image": str(qa_dir / "images" / q["image_name"])},
                         "conversations": [{"from": "human", "value": f"<image>\n{q['question']}"},
                                           {"from": "gpt", "value": str(q["answer"])}]})
    return recs


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_sft_packed_loss_equals_unpacked(tiny_llm, tmp_path, impl):
    from medmm.data.dataset import ConversationDataset

    model = _model(tiny_llm, impl, modalities=("image",))
    recs = _vqa_records(12)
    path = tmp_path / "vqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    proc = model.processor(256)
    base = ConversationDataset(path, proc)
    packed = PackedConversationDataset(base, 256)
    assert len(packed) < len(base) and sorted(i for b in packed.blocks for i in b) == list(range(len(base)))
    with torch.no_grad():
        unpacked_batch = proc.collate([base[i] for i in range(len(base))])
        unpacked = float(model(**unpacked_batch).loss)
        packed_batch = proc.collate([packed[i] for i in range(len(packed))])
        assert packed_batch["input_ids"].shape[1] <= 256
        assert int((packed_batch["labels"] != IGNORE_INDEX).sum()) == int((unpacked_batch["labels"] != IGNORE_INDEX).sum())
        loss = float(model(**packed_batch).loss)
    assert abs(loss - unpacked) < 1e-5, (loss, unpacked)
    assert 0 < packed.fill() <= 1


def test_packed_dataset_leaves_out_a_record_that_fails_to_load(tiny_llm, tmp_path):
    from medmm.data.dataset import ConversationDataset

    model = _model(tiny_llm, "sdpa", modalities=("image",))
    recs = _vqa_records(4)
    recs[0]["modalities"]["image"] = str(tmp_path / "missing.png")
    recs.append({"id": "bad", "conversations": [{"from": "gpt", "value": "answer first"}]})
    path = tmp_path / "vqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    packed = PackedConversationDataset(ConversationDataset(path, model.processor(256)), 256)
    assert 4 in packed.failed  # the bad conversation never reaches a block
    sample = packed[next(k for k, b in enumerate(packed.blocks) if 0 in b)]
    assert any(e["path"].endswith("missing.png") for e in sample["load_errors"])
    assert 0 in packed.failed


@pytest.mark.gpu
def test_flash_attention_varlen_matches_sdpa(tiny_llm):
    pytest.importorskip("flash_attn")
    from medmm.config import ModelConfig, config_from_dict
    from medmm.model.multimodal import MedMMForCausalLM

    losses = {}
    for impl in ("sdpa", "flash_attention_2"):
        d = model_dict(tiny_llm, llm_trainable="full", attn_implementation=impl)
        d["modalities"] = {}
        torch.manual_seed(0)
        model = MedMMForCausalLM.from_config(config_from_dict(ModelConfig, d)).cuda().to(torch.bfloat16).eval()
        tok = model.tokenizer
        docs = [torch.tensor(tok(t)["input_ids"] + [tok.eos_token_id]) for t in DOCS]
        batch = model.processor(64).collate([concat_samples([{"input_ids": x, "labels": x} for x in docs[:3]]),
                                             concat_samples([{"input_ids": x, "labels": x} for x in docs[3:]])])
        with torch.no_grad():
            losses[impl] = float(model(**{k: v.cuda() for k, v in batch.items() if torch.is_tensor(v)}).loss)
    assert abs(losses["sdpa"] - losses["flash_attention_2"]) < 2e-2, losses


# ------------------------------------------------------------------ pretraining documents


def _docs_and_proc(tiny_llm, tmp_path, modalities=("image",)):
    from medmm.data.packing import caption_document, text_documents

    model = _model(tiny_llm, "sdpa", modalities=modalities)
    proc = model.processor(48)
    texts = DOCS * 3
    docs = text_documents(texts, [f"t:{i}" for i in range(len(texts))], model.tokenizer)
    cap = caption_document(_vqa_records(1)[0], "v:1", proc, tmp_path) if modalities else None
    return model, proc, docs, cap


def test_text_documents_end_with_eos(tiny_llm, tmp_path):
    model, _, docs, cap = _docs_and_proc(tiny_llm, tmp_path)
    tok = model.tokenizer
    assert all(d.ids[-1] == tok.eos_token_id for d in docs)
    assert tok.decode(docs[0].ids[:-1]).strip() == DOCS[0]
    mt = model.modality_tokens["image"]
    assert cap.ids[: cap.slots] == [mt.token_id] * mt.slots and cap.ids[-1] == tok.eos_token_id


@pytest.mark.parametrize("packing", ["concat", "neat", "none"])
def test_document_blocks_cover_every_token_once(tiny_llm, tmp_path, packing):
    from medmm.data.packing import DocumentBlockDataset

    _, proc, docs, cap = _docs_and_proc(tiny_llm, tmp_path)
    all_docs = docs[:4] + [cap] + docs[4:]
    ds = DocumentBlockDataset(all_docs, 48, packing, proc)
    got = [ds[i] for i in range(len(ds))]
    flat = torch.cat([g["input_ids"] for g in got]).tolist()
    assert flat == [t for d in all_docs for t in d.ids][: len(flat)]
    # every text token once; a captioning document is never split (cut at a block if longer)
    assert len(flat) == sum(min(len(d.ids), 48) if d.record else len(d.ids) for d in all_docs)
    assert all(g["input_ids"].numel() <= 48 for g in got)
    if packing != "none":  # blocks are full but the last, and the one closed early for the captioning document
        assert sum(g["input_ids"].numel() == 48 for g in got) >= len(got) - 2
    cap_block = next(g for g in got if g["items"])
    assert len(cap_block["items"]["image"]) == 1
    mt = proc.encoder.modality_tokens["image"]
    slots = cap_block["input_ids"] == mt.token_id
    assert int(slots.sum()) == mt.slots and bool((cap_block["labels"][slots] == IGNORE_INDEX).all())
    if packing == "neat":
        assert all("position_ids" in g for g in got)
        starts = [int((g["position_ids"] == 0).sum()) for g in got]
        assert sum(starts) >= len(all_docs)  # every document (and every continued piece) restarts
        batch = proc.collate(got[:2], pad_missing_modalities=True)
        assert "attention_mask" not in batch
    else:
        assert all("position_ids" not in g for g in got)


def test_concat_labels_every_token_neat_ignores_document_starts(tiny_llm, tmp_path):
    from medmm.data.packing import DocumentBlockDataset

    _, proc, docs, _ = _docs_and_proc(tiny_llm, tmp_path, modalities=())
    concat = DocumentBlockDataset(docs[:3], 256, "concat", proc)[0]
    neat = DocumentBlockDataset(docs[:3], 256, "neat", proc)[0]
    assert torch.equal(concat["labels"], concat["input_ids"])
    assert int((neat["labels"] == IGNORE_INDEX).sum()) == 3
    assert neat["position_ids"].tolist()[: len(docs[0].ids) + 1] == list(range(len(docs[0].ids))) + [0]


def test_caption_document_errors_name_the_record(tiny_llm, tmp_path):
    from medmm.data.packing import caption_document
    from medmm.errors import ConversationError

    _, proc, _, _ = _docs_and_proc(tiny_llm, tmp_path)
    with pytest.raises(ConversationError, match="f.jsonl:3"):
        caption_document({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]},
                         "f.jsonl:3", proc)
    with pytest.raises(ConversationError, match="final answer"):
        caption_document({"modalities": {"image": "a.png"}, "conversations": [{"from": "human", "value": "hi"}]},
                         "f.jsonl:4", proc)
