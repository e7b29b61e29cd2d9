"""Rebuild the small committed sample under data/sample/ from ../shared/data (run once; the output is committed).

    python data/make_sample.py --shared ../shared/data

Picks: 40 VQA-RAD images (CC0) with all their question/answer pairs, 200 ClinTox rows (MIT),
120 DNABERT promoter sequences decoded from 6-mers to plain bases (Apache-2.0), and one NCBI FASTA
record (public domain; from pyfaidx's BSD-3 test data). Licences: data/README.md.
"""

import argparse
import csv
import json
import random
import shutil
from pathlib import Path

ap = argparse.ArgumentParser()
ap.add_argument("--shared", default="../shared/data")
ap.add_argument("--out", default=str(Path(__file__).parent / "sample"))
args = ap.parse_args()
shared, out = Path(args.shared), Path(args.out)
rng = random.Random(0)

# VQA-RAD: the 24 smallest images (keeps the sample ~1 MB) with every QA pair on them.
qa = json.load(open(shared / "vqa/vqa_rad/testset.json"))
imgs = sorted({q["image_name"] for q in qa}, key=lambda n: (shared / "vqa/vqa_rad/images" / n).stat().st_size)[:40]
(out / "vqa_rad/images").mkdir(parents=True, exist_ok=True)
for n in imgs:
    shutil.copy(shared / "vqa/vqa_rad/images" / n, out / "vqa_rad/images" / n)
sub = [q for q in qa if q["image_name"] in set(imgs)]
json.dump(sub, open(out / "vqa_rad/testset.json", "w"), indent=1)

# ClinTox: 60 not-approved + 140 approved rows.
rows = list(csv.DictReader(open(shared / "molecules/moleculenet/clintox.csv")))
neg = [r for r in rows if r["FDA_APPROVED"] == "0"]
pos = [r for r in rows if r["FDA_APPROVED"] == "1"]
pick = rng.sample(neg, 60) + rng.sample(pos, 140)
rng.shuffle(pick)
(out / "molecules").mkdir(parents=True, exist_ok=True)
with open(out / "molecules/clintox_sample.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["smiles", "FDA_APPROVED", "CT_TOX"])
    w.writeheader()
    w.writerows(pick)

# DNABERT promoter sequences: 6-mers -> plain sequence.
lines = open(shared / "genomics/dna_classification_dnabert/dev.tsv").read().splitlines()[1:]
rng.shuffle(lines)
(out / "dna").mkdir(parents=True, exist_ok=True)
with open(out / "dna/promoters_sample.tsv", "w") as f:
    f.write("sequence\tlabel\n")
    for line in lines[:120]:
        kmers, label = line.split("\t")
        km = kmers.split()
        f.write(km[0] + "".join(k[-1] for k in km[1:]) + "\t" + label + "\n")

# One FASTA record.
text = open(shared / "genomics/fasta_pyfaidx/genes.fasta").read().split(">")[1]
(out / "dna/FGFR2_AHCYL1_sample.fasta").write_text(">" + text)
print("sample written to", out)
