"""Genomics: VCF/BCF reading on cyvcf2's real test files (broken ones included), windows cut from the hg19 chr17
segment with REF checked, variant-effect Q&A records, k-mer decoding, and the DNA sequence classifier."""

import json

import pytest

from medmm.errors import SequenceError
from medmm.io.genomics import (
    ReferenceGenome,
    Variant,
    decode_kmers,
    looks_like_kmers,
    read_vcf,
    tokenize,
    variant_effect,
    variant_effect_records,
    variant_windows,
)
from tests.conftest import REPO

VCF = ("genomics", "vcf_cyvcf2")


@pytest.mark.parametrize("name,n,first", [
    ("test.vcf.gz", 115, ("1", 10172, "CCCTAA", ("C",))),
    ("multi-contig.bcf", 9, ("19", 111, "A", ("C",))),
    ("test.snpeff.vcf", 10, ("chr1", 30548, "T", ("G",))),
    ("test-hemi.vcf", 2, ("chr19", 11210912, "C", ("T",))),
    ("test-multiallelic-homozygous-alt.vcf.gz", 1, ("3", 81262, "G", ("A", "<*:DEL>"))),
    ("no-seq-len.vcf", 1, ("3", 81262, "G", ("A",))),
])
def test_read_real_vcf_and_bcf(shared_data, capfd, name, n, first):
    errors: list = []
    vs = list(read_vcf(shared_data.joinpath(*VCF, name), errors=errors))
    assert len(vs) == n and not errors
    assert (vs[0].chrom, vs[0].pos, vs[0].ref, vs[0].alts) == first
    assert vs[0].source.endswith(f"record 1 ({first[0]}:{first[1]})")
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # htslib's warnings (e.g. GQ declared as Float) are captured


def test_regions_through_tabix_and_csi_indexes(shared_data):
    assert [v.pos for v in read_vcf(shared_data.joinpath(*VCF, "test.vcf.gz"), region="1:10000-10400")] == \
        [10172, 10390, 10397]
    assert {v.chrom for v in read_vcf(shared_data.joinpath(*VCF, "multi-contig.bcf"), region="20")} == {"20"}


@pytest.mark.parametrize("name,reason", [
    ("empty.vcf", "empty file"),
    ("test-invalid-header.vcf", "cannot read the VCF/BCF header: Empty sample name: trailing spaces/tabs"),
    ("missing.vcf", "not found"),
])
def test_broken_vcf_files_are_typed_errors(shared_data, capfd, name, reason):
    with pytest.raises(SequenceError, match=reason) as e:
        list(read_vcf(shared_data.joinpath(*VCF, name)))
    assert e.value.source.endswith(name)
    assert capfd.readouterr().err == ""


def test_malformed_record_is_reported_and_reading_goes_on(tmp_path):
    p = tmp_path / "bad.vcf"
    p.write_text("##fileformat=VCFv4.2\n##contig=<ID=chr17,length=40000>\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"
                 "chr17\t100\t.\tA\tG\t.\t.\t.\nchr17\tXX\t.\tA\tG\t.\t.\t.\nchr17\t300\t.\tA\tG\t.\t.\t.\n")
    errors: list = []
    assert [v.pos for v in read_vcf(p, errors=errors)] == [100, 300]
    assert len(errors) == 1 and errors[0].source == f"{p}: record 2"
    assert "Could not parse the position 'XX'" in errors[0].reason
    with pytest.raises(SequenceError, match="record 2"):
        list(read_vcf(p))


# ----------------------------------------------------------------------------- windows on hg19 chr17
@pytest.fixture(scope="module")
def chr17(shared_data, tmp_path_factory):
    """The reference (indexed into a temporary cache: the shared folder is read-only) and its sequence read
    independently with Biopython."""
    from Bio import SeqIO

    path = shared_data / "genomics" / "fasta_pyfaidx" / "chr17.hg19.part.fa"
    ref = ReferenceGenome(path, index_dir=tmp_path_factory.mktemp("fai"))
    seq = str(next(SeqIO.parse(path, "fasta")).seq).upper()
    return ref, seq


def _vcf(tmp_path, seq, fmt="vcf"):
    """A VCF over the chr17 segment with known answers (the test computes REF from the Biopython sequence)."""
    import pysam

    snv_alt = "T" if seq[999] != "T" else "C"
    recs = [
        ("chr17", 1000, seq[999], snv_alt, f"ANN={snv_alt}|missense_variant|MODERATE|BRCA1|g|t|t"),
        ("chr17", 20000, seq[19999:20004], seq[19999], "EFF=FRAME_SHIFT(HIGH||||120|TP53|protein_coding|CODING|t|)"),
        ("17", 30000, seq[29999], seq[29999] + "GATTACA", "."),  # contig named without 'chr'; insertion
        ("chr17", 10, seq[9], "A" if seq[9] != "A" else "G", "."),  # near the start: left flank padded with N
        ("chr17", 15000, "A" if seq[14999] != "A" else "C", "G", "."),  # wrong REF: a mismatch to report
        ("chr1", 5000, "A", "G", "."),  # contig missing from the reference
        ("chr17", 25000, seq[24999], "<DEL>", "."),  # symbolic ALT
        ("chr17", 39990, seq[39989:] + "A", "G", "."),  # REF runs past the end of the segment
    ]
    head = ["##fileformat=VCFv4.2", "##contig=<ID=chr17,length=40000>", "##contig=<ID=17,length=40000>",
            "##contig=<ID=chr1,length=249250621>", '##INFO=<ID=ANN,Number=.,Type=String,Description="SnpEff">',
            '##INFO=<ID=EFF,Number=.,Type=String,Description="SnpEff (old)">',
            '##INFO=<ID=END,Number=1,Type=Integer,Description="End position">',
            '##ALT=<ID=DEL,Description="Deletion">', "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO"]
    text = "\n".join(head + ["\t".join([c, str(p), ".", r, a, ".", ".", i]) for c, p, r, a, i in recs]) + "\n"
    path = tmp_path / "known.vcf"
    path.write_text(text)
    if fmt == "bcf":
        src = pysam.VariantFile(str(path))
        out = pysam.VariantFile(str(tmp_path / "known.bcf"), "wb", header=src.header)
        for r in src:
            out.write(r)
        out.close()
        return tmp_path / "known.bcf"
    return path


@pytest.mark.parametrize("fmt", ["vcf", "bcf"])
def test_windows_cut_from_reference_with_ref_checked(chr17, tmp_path, fmt):
    ref, seq = chr17
    errors: list = []
    wins = variant_windows(read_vcf(_vcf(tmp_path, seq, fmt)), ref, flank=50, errors=errors)
    assert [(w.variant.chrom, w.variant.pos) for w in wins] == [("chr17", 1000), ("chr17", 20000), ("17", 30000),
                                                               ("chr17", 10)]
    snv, dele, ins, edge = wins
    assert snv.ref_seq == seq[949:1050] and snv.alt_seq == seq[949:999] + snv.alt + seq[1000:1050]
    assert snv.offset == 50 and len(snv.ref_seq) == 101 and snv.ref_seq[50] == seq[999]
    assert dele.ref_seq == seq[19949:20054] and dele.alt_seq == seq[19949:20000] + seq[20004:20054]
    assert ins.contig == "chr17" and ins.alt_seq == seq[29949:30000] + "GATTACA" + seq[30000:30050]
    assert edge.ref_seq == "N" * 41 + seq[:60] and edge.start == -41
    msgs = [e.reason for e in errors]
    assert len(errors) == 4
    assert msgs[0].startswith("REF mismatch at chr17:15000: the VCF says") and f"has '{seq[14999]}'" in msgs[0]
    assert "contig 'chr1' is not in the reference chr17.hg19.part.fa" in msgs[1]
    assert "symbolic ALT '<DEL>'" in msgs[2] and "outside chr17 (length 40000)" in msgs[3]
    assert all(isinstance(e, SequenceError) and "record" in e.source for e in errors)
    with pytest.raises(SequenceError, match="REF mismatch"):
        variant_windows(read_vcf(_vcf(tmp_path, seq, fmt)), ref)  # without an error list the first one raises


def test_real_vcfs_against_the_chr17_segment_report_every_variant(chr17, shared_data):
    """cyvcf2's files are on other contigs: every variant is reported as a typed error, none crashes."""
    ref, _ = chr17
    for name, n in (("test.vcf.gz", 115), ("multi-contig.bcf", 9), ("test.snpeff.vcf", 10)):
        errors: list = []
        assert variant_windows(read_vcf(shared_data.joinpath(*VCF, name)), ref, errors=errors) == []
        assert len(errors) == n and all("is not in the reference" in e.reason for e in errors)


def test_reference_lookup(chr17):
    ref, seq = chr17
    assert ref.contigs == {"chr17": 40000} and ref.resolve("17") == "chr17" and ref.resolve("chr17") == "chr17"
    assert ref.resolve("chr1") is None
    assert ref.fetch("chr17", 39995, 40003) == seq[39995:] + "NNN"
    with pytest.raises(SequenceError, match="not found"):
        ReferenceGenome("/nonexistent.fa")


def test_variant_effect_records_and_prepare(chr17, tmp_path, shared_data):
    from medmm.prepare.genomics import prepare_variants

    ref, seq = chr17
    wins = variant_windows(read_vcf(_vcf(tmp_path, seq)), ref, errors=[])
    assert variant_effect(wins[0].variant, wins[0].alt) == "missense_variant (MODERATE impact, gene BRCA1)"
    assert variant_effect(wins[1].variant, wins[1].alt) == "frame_shift (HIGH impact, gene TP53)"
    recs = variant_effect_records(wins)
    assert recs[0]["modalities"]["dna"] == [wins[0].ref_seq, wins[0].alt_seq]
    assert recs[0]["conversations"][0]["value"].startswith("<dna>\n<dna>\nVariant chr17:1000 ")
    assert recs[0]["conversations"][1]["value"] == "missense variant (MODERATE impact, gene BRCA1)"
    assert len(recs[2]["conversations"]) == 1  # no annotation: a prompt for inference
    snpeff = list(read_vcf(shared_data.joinpath(*VCF, "test.snpeff.vcf")))
    assert variant_effect(snpeff[6], "G") == "non_synonymous_coding (MODERATE impact, gene OR4F5)"

    m = prepare_variants(_vcf(tmp_path, seq), shared_data / "genomics/fasta_pyfaidx/chr17.hg19.part.fa",
                         tmp_path / "out", eval_fraction=0.5, index_dir=tmp_path / "fai")
    assert (m["train"] + m["eval"], m["unlabelled"], m["rejected"]) == (2, 2, 4)
    errs = [json.loads(x) for x in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert errs[0]["error"] == "SequenceError" and "REF mismatch" in errs[0]["message"]
    m = prepare_variants(shared_data.joinpath(*VCF, "empty.vcf"), shared_data / "genomics/fasta_pyfaidx/"
                         "chr17.hg19.part.fa", tmp_path / "out2", index_dir=tmp_path / "fai")
    assert m["rejected"] == 1 and m["windows"] == 0


# ----------------------------------------------------------------------------- sequences
def test_dnabert_kmers_decode_to_plain_sequence(shared_data):
    rows = (shared_data / "genomics/dna_classification_dnabert/dev.tsv").read_text().splitlines()[1:]
    text = rows[0].split("\t")[0]
    assert looks_like_kmers(text) and not looks_like_kmers("ACGTACGT") and not looks_like_kmers("ACGT TTTT")
    seq = decode_kmers(text)
    kmers = text.split()
    assert len(seq) == 101 and [seq[i:i + 6] for i in range(96)] == kmers
    with pytest.raises(SequenceError, match="does not overlap"):
        decode_kmers("ACGTAC CGTACA GGGGGG")
    assert tokenize("ACGRYN", k=2).tolist() == [2 + 1, 2 + 6, 1, 1, 1]  # AC, CG, then k-mers touching IUPAC -> N


def test_prepare_dna_decodes_kmers(shared_data, tmp_path):
    from medmm.prepare.genomics import prepare_dna

    m = prepare_dna(shared_data / "genomics/dna_classification_dnabert/dev.tsv", tmp_path, eval_fraction=0.2)
    # the split is a keyed hash of each record's id: about eval_fraction of them (0.2 of 1000: sd 13)
    assert (m["train"] + m["eval"], m["rejected"]) == (1000, 0) and 150 <= m["eval"] <= 250
    rec = json.loads((tmp_path / "dna_train.jsonl").read_text().splitlines()[0])
    assert len(rec["modalities"]["dna"]) == 101 and rec["conversations"][1]["value"] in ("yes", "no")


@pytest.mark.slow
@pytest.mark.deepspeed
def test_dna_classifier_trains_above_chance(tmp_path, shared_data):
    """The head recipe (trainer.stage: head) through train.py on DNABERT's 1,000 labelled sequences: held-out
    accuracy and AUROC above chance; `medmm eval head` on the test rows reproduces them from the checkpoint."""
    import csv

    import train
    from medmm.eval.heads import evaluate_head

    data = shared_data / "genomics/dna_classification_dnabert/dev.tsv"
    res = train.main(["--config", str(REPO / "configs/tasks/dna_classification_head.yaml"),
                      f"head.data.path={data}", f"trainer.output_dir={tmp_path}"])
    m = res["metrics"]
    assert m["rows"]["usable"] == 1000 and m["rows"]["test"] == 150
    t = m["test"]["calibrated"]
    assert t["accuracy"] > 0.7 and t["auroc"] > 0.8, t  # chance: 0.5 on a 500/500 set
    assert m["test"]["calibrated"]["auroc"] == m["test"]["raw"]["auroc"]
    test = set(json.loads((tmp_path / "split.json").read_text())["test"])  # 0-based data-row numbers
    rows = [r for r in csv.DictReader(open(data), delimiter="\t")]
    sub = tmp_path / "test.tsv"
    with open(sub, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["sequence", "label"])
        w.writerows([(r["sequence"], r["label"]) for i, r in enumerate(rows) if i in test])
    ev = evaluate_head(tmp_path / "checkpoint", sub, tmp_path / "ev", device="cpu")
    assert ev["scored"] == 150 and ev["calibrated"]["auroc"] == pytest.approx(t["auroc"], abs=1e-3)


def test_variant_dataclass_name():
    assert Variant("chr17", 5, "A", ("G", "T")).name == "chr17:5 A>G,T"
