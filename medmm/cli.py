"""The ``medmm`` command: one subcommand per stage.

    medmm prepare vqa|molecules|dna|tiny-llm ...   raw data -> conversation JSONL (+ errors.jsonl)
    medmm train --config C [--nproc N] [--resume] [key=value ...]
    medmm infer --checkpoint C --input X --question Q      (same flags as infer.py)
    medmm eval --checkpoint C --data eval.jsonl [--out DIR]     answer metrics (+ --report-metrics)
    medmm eval NAME --checkpoint C --data D | --predictions P [--out DIR]   a benchmark (medmm eval list), 95% CIs
    medmm eval compare RUN_A RUN_B                    paired bootstrap difference per metric
    medmm eval suite configs/eval/SUITE.yaml --checkpoint C    several benchmarks -> results.json + report.html
    medmm export --checkpoint C --format hf|onnx|torchscript --out DIR [--with-llm]
    medmm pacs report --checkpoint C --input STUDY --out sr.dcm        one study -> DICOM SR (no network)
    medmm pacs pull-run-push --dicomweb URL --study UID --checkpoint C  WADO-RS -> model -> STOW-RS
    medmm pacs listen --aet AET --port P --allowed-aets A,B --checkpoint C [--forward-to AET@host:port|URL]
    medmm pacs resend DIR --to AET@host:port|URL [--retry-seconds 60]   deliver the SRs the listener kept
    medmm pacs http --checkpoint C [--port 8080] [--tokens-file F] [--tls-cert F --tls-key F] [--audit-log F]
                                                                        HTTP API (tokens, loopback, limits; SECURITY.md)
    medmm demo [--out runs/demo]
    medmm prepare molecules CSV --smiles-col S [--label-col L] [--split scaffold] [--qa] --out OUT
    medmm prepare variants --vcf V --reference FA --out OUT [--flank 50] [--label-info KEY]
    medmm train --config configs/tasks/druggability_head.yaml      encoder + head recipes (trainer.stage: head)
    medmm eval head --checkpoint C --data D [--out DIR]            a head model on a labelled file
    medmm eval druggability --checkpoint C --data D [--smiles-col S --label-col L] [--calibration F]
    medmm prepare text SRC... --out DIR [--jaccard 0.8] [--languages en]   dedup + filters -> train/eval.jsonl
    medmm prepare wsi SRC --out OUT [--mpp 0.5] [--tile 224] [--labels L] [--features ENC]
    medmm prepare instructions FILE --format alpaca|sharegpt|promptcblue --out DIR   text-only conversations
    medmm prepare KIND ... --num-shards N --shard-index I --out PART_I   one part of the input (one job per part)
    medmm prepare merge PART_0 ... PART_N-1 --out OUT    parts -> one dataset (checks options, salt, coverage)
    medmm prepare preferences --from-labels DATA --out FILE          closed-set labels -> chosen/rejected pairs
    medmm prepare preferences --sample CKPT --prompts DATA --n N --reward R --min-margin M --out FILE
    medmm prepare dpo-reference --config C --out FILE [key=value ...]  reference log-probs (dpo reference: precomputed)
    medmm wsi train|eval|heatmap ...                slide classification (= train / eval head / the heat map)
    medmm plan --config C --gpus N [--nodes M] [--gpu-memory GB] [--json]   params, ZeRO memory, first stage that fits
    medmm index build [FILE ...] [--source icd10cm] --out IDX [key=value ...]   BM25 + dense (faiss) + RRF folder
    medmm index search|queries|predict ...          query an index; ICD-10-CM normalisation queries and predictions
    medmm list [KIND]                               a registry, one line each (stages, strategies, benchmarks, ...)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys

from encoders.registry import Registry

from .errors import ConfigError
from .prepare.parts import Part, merge_parts
from .training.distributed import free_port


def _prepare(argv: list[str]) -> None:
    from .prepare.genomics import prepare_dna, prepare_variants
    from .prepare.molecules import prepare_molecules
    from .prepare.vqa import prepare_vqa

    ap = argparse.ArgumentParser(prog="medmm prepare")
    sub = ap.add_subparsers(dest="kind", required=True)
    v = sub.add_parser("vqa", help="VQA-RAD-style JSON + image folder")
    v.add_argument("questions")
    v.add_argument("--images", required=True)
    v.add_argument("--allow-outside-images", action="store_true",
                   help="read an image_name that resolves outside --images (.., absolute, a link out) instead of "
                        "refusing it; records still hold paths relative to --out")
    m = sub.add_parser("molecules", help="CSV of SMILES (+ 0/1 label)")
    m.add_argument("csv")
    m.add_argument("--smiles-col", default="smiles")
    m.add_argument("--label-col")
    m.add_argument("--question", default="Is this molecule likely to be an approved drug? Answer yes or no.")
    m.add_argument("--split", choices=["random", "scaffold"], default="random",
                   help="scaffold: no Bemis-Murcko scaffold in both train and eval")
    m.add_argument("--workers", type=int, default=0, help="RDKit worker processes")
    m.add_argument("--remove-stereo", action="store_true", help="drop stereo tags when standardising")
    m.add_argument("--no-tautomer", action="store_true", help="keep the input tautomer")
    m.add_argument("--qa", action="store_true", help="also write descriptor/rule Q&A records (molecule_qa_*.jsonl)")
    va = sub.add_parser("variants", help="VCF/BCF + reference FASTA -> variant-effect Q&A on DNA windows")
    va.add_argument("--vcf", required=True)
    va.add_argument("--reference", required=True, help="reference FASTA (an index is built in a cache if missing)")
    va.add_argument("--out", required=True)
    va.add_argument("--flank", type=int, default=50, help="bases either side of the variant")
    va.add_argument("--label-info", help="INFO key holding the answer (default: SnpEff ANN/EFF effect)")
    va.add_argument("--region", help="only this region (needs a .tbi/.csi index)")
    va.add_argument("--eval-fraction", type=float, default=0.2)
    va.add_argument("--name", default="variants")
    d = sub.add_parser("dna", help="TSV of sequence<TAB>label")
    d.add_argument("tsv")
    dc = sub.add_parser("dicom", help="DICOM tree -> de-identified webdataset shards (+ reports or VQA pairs)")
    dc.add_argument("src")
    dc.add_argument("--out", required=True)
    dc.add_argument("--reports", help="CSV: study_uid or accession, then report (task report) or question,answer")
    dc.add_argument("--task", choices=["report", "vqa"], default="report")
    dc.add_argument("--window", help="lung | mediastinum | bone | brain | abdomen (default: the file's VOI)")
    dc.add_argument("--spacing", help="resample volumes to Z,Y,X mm, e.g. 2,1,1")
    dc.add_argument("--size", help="2D side (224) or D,H,W for volumes (32,128,128); or both: 224:32,128,128")
    dc.add_argument("--workers", type=int, default=1)
    dc.add_argument("--on-gap", choices=["keep", "split", "reject"], default="keep",
                    help="missing slices in a series: keep one volume and report the gaps (default), split it into "
                         "one volume per run of slices, or reject it")
    dc.add_argument("--salt", help="secret for pseudonyms and date shifts (default: $MEDMM_DEID_SALT, else a random "
                                   "one kept in OUT/.deid_salt, mode 0600, and reused by later runs into OUT)")
    dc.add_argument("--keep-phi", action="store_true", help="do NOT de-identify (writes identifiers)")
    dc.add_argument("--keep-report-phi", action="store_true",
                    help="write report/VQA text as given (by default names, IDs, dates and contact details that "
                         "it holds are removed or shifted like the headers')")
    w = sub.add_parser("wsi", help="whole-slide images -> webdataset shards of tiles or tile features")
    w.add_argument("src", help="a slide file or a folder of slides (svs, ndpi, mrxs, scn, tif, DICOM dcm ...)")
    w.add_argument("--out", required=True)
    w.add_argument("--mpp", type=float, default=0.5, help="microns per pixel of the tiles (default 0.5)")
    w.add_argument("--tile", type=int, default=224, help="tile side in pixels at --mpp")
    w.add_argument("--labels", help="CSV: slide, label and/or report (+ patient, split)")
    w.add_argument("--features", metavar="ENCODER", help="store tile features from this encoder (e.g. vit_tile)")
    w.add_argument("--encoder-checkpoint", help="local weights of the --features encoder (UNI/CONCH-style)")
    w.add_argument("--encoder-kwargs", default="{}", help='JSON, e.g. \'{"model_name": "vit_large_patch16_224"}\'')
    w.add_argument("--workers", type=int, default=0, help="decoding processes (0 = this one)")
    w.add_argument("--slide-mpp", type=float, help="scan MPP for slides whose metadata has none")
    w.add_argument("--min-tissue", type=float, default=0.5, help="least tissue fraction of a kept tile")
    w.add_argument("--mask-mpp", type=float, default=8.0, help="µm per pixel of the tissue mask")
    w.add_argument("--backend", choices=["auto", "openslide", "tifffile", "dicom"], default="auto")
    w.add_argument("--format", choices=["jpg", "png"], default="jpg", help="tile encoding in the shards")
    w.add_argument("--shard-size", type=int, default=10000, help="samples per shard at most")
    w.add_argument("--batch-size", type=int, default=64, help="tiles per encoder batch (--features)")
    w.add_argument("--device", default="auto")
    w.add_argument("--no-progress", action="store_true")
    tx = sub.add_parser("text", help="text corpora -> deduplicated, filtered train/eval JSONL (pretraining)")
    tx.add_argument("src", nargs="+", help=".jsonl (a 'text' field) or .txt (a document per line) files or folders")
    tx.add_argument("--out", required=True)
    tx.add_argument("--text-field", default="text")
    tx.add_argument("--jaccard", type=float, default=0.8, help="near-duplicate threshold (MinHash estimate)")
    tx.add_argument("--num-perm", type=int, default=128, help="MinHash permutations")
    tx.add_argument("--shingle", type=int, default=5, help="words per shingle")
    tx.add_argument("--min-chars", type=int, default=10)
    tx.add_argument("--min-words", type=int, default=2)
    tx.add_argument("--max-chars", type=int, default=100_000)
    tx.add_argument("--min-alpha", type=float, default=0.6, help="least fraction of letters among non-space chars")
    tx.add_argument("--languages", help="keep only these language tags, e.g. en or en,de (default: tag, keep all)")
    tx.add_argument("--no-exact-dedup", action="store_true")
    tx.add_argument("--no-near-dedup", action="store_true")
    tx.add_argument("--eval-fraction", type=float, default=0.01, help="held out in eval.jsonl (hash of the text)")
    tx.add_argument("--seed", type=int, default=0)
    tx.add_argument("--no-progress", action="store_true")
    ins = sub.add_parser("instructions", help="Alpaca / ShareGPT / PromptCBLUE -> text-only conversation JSONL")
    ins.add_argument("file", help="JSON array or JSON lines")
    ins.add_argument("--format", required=True, choices=["alpaca", "sharegpt", "promptcblue"])
    ins.add_argument("--out", required=True, help="writes OUT/train.jsonl and OUT/eval.jsonl")
    ins.add_argument("--eval-fraction", type=float, default=0.05)
    ins.add_argument("--seed", type=int, default=0)
    ins.add_argument("--name", help="prefix of generated record ids (default: the file stem)")
    pf = sub.add_parser("preferences", help="preference pairs (stages dpo/simpo/orpo) from closed-set labels or "
                                            "from sampled answers ranked by a reward")
    how = pf.add_mutually_exclusive_group(required=True)
    how.add_argument("--from-labels", metavar="DATA", help="conversation JSONL whose answers are closed-set (yes/no, "
                                                           "'X or Y', answer_choices): right answer chosen, wrong rejected")
    how.add_argument("--sample", metavar="CHECKPOINT", help="a medmm model folder that samples --n answers per prompt")
    pf.add_argument("--prompts", metavar="DATA", help="--sample: conversation JSONL (a final answer is the reference "
                                                      "the reward sees)")
    pf.add_argument("--n", type=int, default=4, help="--sample: answers sampled per prompt")
    pf.add_argument("--reward", default="exact_match", help="--sample: a registered reward (medmm.data.rewards)")
    pf.add_argument("--min-margin", type=float, default=0.0, help="--sample: least reward gap of a kept pair")
    pf.add_argument("--temperature", type=float, default=1.0)
    pf.add_argument("--max-new-tokens", type=int, default=32)
    pf.add_argument("--batch-size", type=int, default=8)
    pf.add_argument("--device", default="auto")
    pf.add_argument("--seed", type=int, default=0)
    pf.add_argument("--out", required=True, help="the pairs (JSONL); failures go to errors.jsonl beside it")
    dr = sub.add_parser("dpo-reference", help="the starting model's answer log-probs of every pair of a dpo recipe")
    dr.add_argument("--config", required=True)
    dr.add_argument("--out", required=True, help="then train with trainer.dpo.reference=precomputed "
                                                 "trainer.dpo.reference_file=OUT")
    dr.add_argument("--device", default="auto")
    dr.add_argument("--batch-size", type=int, help="pairs per forward pass (default trainer.micro_batch_size)")
    dr.add_argument("overrides", nargs="*", help="key=value config overrides, as for train")
    t = sub.add_parser("tiny-llm", help="train a small tokenizer and save a tiny random causal LM")
    t.add_argument("--family", default="llama")
    t.add_argument("--hidden", type=int, default=64)
    t.add_argument("--layers", type=int, default=2)
    t.add_argument("--vocab-size", type=int, default=1024)
    t.add_argument("--texts", help="train the tokenizer on this corpus (.jsonl 'text' / .txt) instead of the sample")
    mg = sub.add_parser("merge", help="join the part folders of a --num-shards run into one dataset")
    mg.add_argument("dirs", nargs="+", metavar="DIR", help="every part's --out folder")
    mg.add_argument("--out", required=True)
    for p in (v, m, d, t):
        p.add_argument("--out", required=True)
    for p in (v, m, d):
        p.add_argument("--eval-fraction", type=float, default=0.2)
        p.add_argument("--name")
    for p in (v, m, va, d, dc, w, tx, ins):  # the raw-data commands: prepared in parts on many machines
        p.add_argument("--num-shards", type=int, metavar="N", help="prepare one of N parts of the input (a hash of "
                       "each patient/slide/record): one job per part, then `medmm prepare merge`")
        p.add_argument("--shard-index", type=int, metavar="I", help="which part, 0..N-1")
    a = ap.parse_args(argv)
    a.part = Part.from_flags(a.num_shards, a.shard_index) if hasattr(a, "num_shards") else None
    if a.kind == "merge":
        print(json.dumps(merge_parts(a.dirs, a.out), indent=2, default=str))
        return
    if a.kind == "dicom":
        _prepare_dicom(a)
        return
    if a.kind == "wsi":
        _prepare_wsi(a)
        return
    if a.kind == "text":
        _prepare_text(a)
        return
    if a.kind == "preferences":
        _prepare_preferences(ap, a)
        return
    if a.kind == "dpo-reference":
        from .config import TrainConfig, load_config
        from .training.stages.dpo import precompute_reference

        cfg = load_config(TrainConfig, a.config, a.overrides)
        print(json.dumps(precompute_reference(cfg, a.out, a.device, a.batch_size), indent=2))
        return
    if a.kind == "instructions":
        from .prepare.instructions import prepare_instructions

        print(json.dumps(prepare_instructions(a.file, a.format, a.out, a.eval_fraction, a.seed, a.name, part=a.part),
                         indent=2, ensure_ascii=False))
        return
    if a.kind == "vqa":
        res = prepare_vqa(a.questions, a.images, a.out, a.eval_fraction, name=a.name or "vqa",
                            allow_outside=a.allow_outside_images, part=a.part)
    elif a.kind == "molecules":
        from .io.molecules import StandardiseOptions

        res = prepare_molecules(a.csv, a.out, a.smiles_col, a.label_col, a.question, a.eval_fraction,
                                  name=a.name or "molecules", split=a.split, workers=a.workers, qa=a.qa,
                                  options=StandardiseOptions(canonical_tautomer=not a.no_tautomer,
                                                             remove_stereo=a.remove_stereo), part=a.part)
    elif a.kind == "variants":
        res = prepare_variants(a.vcf, a.reference, a.out, flank=a.flank, label_info=a.label_info, region=a.region,
                                 eval_fraction=a.eval_fraction, name=a.name, part=a.part)
    elif a.kind == "dna":
        res = prepare_dna(a.tsv, a.out, eval_fraction=a.eval_fraction, name=a.name or "dna", part=a.part)
    else:
        from .model.tiny import build_tiny_llm, sample_texts

        texts = sample_texts()
        if a.texts:
            from .io.text import read_documents

            texts = read_documents(a.texts)
        res = {"llm": str(build_tiny_llm(a.out, texts, family=a.family, hidden=a.hidden, layers=a.layers,
                                         vocab_size=a.vocab_size))}
    print(json.dumps(res, indent=2))


def _prepare_dicom(a) -> None:
    import logging

    from .prepare.dicom import DicomPrepareOptions, prepare_dicom

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # no salt given: prepare_dicom takes $MEDMM_DEID_SALT or OUT/.deid_salt and says which on stderr
    opts = DicomPrepareOptions(window=a.window, task=a.task, workers=a.workers, keep_phi=a.keep_phi,
                               keep_report_phi=a.keep_report_phi, salt=a.salt or None, on_gap=a.on_gap)
    if a.keep_phi:
        print("warning: --keep-phi: the output holds patient identifiers", file=sys.stderr)
    if a.spacing:
        opts.spacing = tuple(float(v) for v in a.spacing.split(","))
    if a.size:
        two, _, three = a.size.partition(":")
        if "," in two:
            two, three = "", two
        if two:
            opts.size_2d = int(two)
        if three:
            opts.size_3d = tuple(int(v) for v in three.split(","))
    print(json.dumps(prepare_dicom(a.src, a.out, a.reports, opts, part=a.part), indent=2))


def _prepare_preferences(ap, a) -> None:
    from pathlib import Path

    from .prepare import preferences as P
    from .utils import read_jsonl

    if a.from_labels:
        pairs, errors, counts = P.pairs_from_labels(read_jsonl(a.from_labels), a.from_labels, a.seed)
        print(json.dumps(P.write_pairs(a.out, pairs, errors, counts, {"from_labels": a.from_labels}), indent=2))
        return
    if not a.prompts or a.n < 2:
        ap.error("--sample needs --prompts DATA and --n of at least 2")
    from .config import DecodingConfig
    from .data.rewards import get_reward
    from .inference.predictor import Predictor

    reward = get_reward(a.reward)  # an unknown name fails before the model loads
    records = read_jsonl(a.prompts)
    predictor = Predictor(a.sample, device=a.device)
    requests = [Predictor.to_conversation(r) for r in records for _ in range(a.n)]
    outs = predictor.predict(requests, DecodingConfig(strategy="sample", max_new_tokens=a.max_new_tokens, seed=a.seed,
                                                      params={"temperature": a.temperature}),
                             a.batch_size, base_dir=Path(a.prompts).parent)
    samples, failed = [], []
    for i in range(len(records)):
        mine = outs[i * a.n: (i + 1) * a.n]
        samples.append([o["answer"] for o in mine if "error" not in o])
        if not samples[-1] and mine:  # the prompt itself failed (an unreadable image): say why, once
            failed.append({"path": f"{a.prompts}:{i + 1}", "error": mine[0]["error"], "message": mine[0]["message"]})
    pairs, errors, counts = P.pairs_from_samples(records, samples, reward, a.min_margin, a.prompts)
    bad = {e["path"] for e in failed}
    errors = failed + [e for e in errors if e["path"].split(" (")[0] not in bad]
    print(json.dumps(P.write_pairs(a.out, pairs, errors, counts, {"sample": a.sample, "reward": a.reward, "n": a.n}),
                     indent=2))


def _prepare_text(a) -> None:
    from .prepare.text import TextPrepareOptions, prepare_text

    opts = TextPrepareOptions(text_field=a.text_field, min_chars=a.min_chars, min_words=a.min_words,
                              max_chars=a.max_chars, min_alpha_fraction=a.min_alpha,
                              languages=a.languages.split(",") if a.languages else None,
                              dedup_exact=not a.no_exact_dedup, dedup_near=not a.no_near_dedup, jaccard=a.jaccard,
                              num_perm=a.num_perm, shingle=a.shingle, eval_fraction=a.eval_fraction, seed=a.seed,
                              progress=not a.no_progress)
    stats = prepare_text(a.src, a.out, opts, part=a.part)
    print(json.dumps({k: stats[k] for k in ("read", "kept", "dropped", "train", "eval", "errors")} | {"out": a.out},
                     indent=2))


def _prepare_wsi(a) -> None:
    from .prepare.wsi import prepare_wsi

    m = prepare_wsi(a.src, a.out, mpp=a.mpp, tile=a.tile, labels=a.labels, features=a.features,
                    encoder_checkpoint=a.encoder_checkpoint, encoder_kwargs=json.loads(a.encoder_kwargs),
                    workers=a.workers, slide_mpp=a.slide_mpp, min_tissue=a.min_tissue, mask_mpp=a.mask_mpp,
                    backend=a.backend, image_format=a.format, shard_maxcount=a.shard_size, batch_size=a.batch_size,
                    device=a.device, progress=not a.no_progress, part=a.part)
    print(json.dumps({k: m[k] for k in ("counts", "shards", "timing")} | {"out": a.out}, indent=2))


def _wsi(argv: list[str]) -> None:
    """``medmm wsi train|eval|heatmap``: aliases of ``medmm train`` (trainer.stage: head), ``medmm eval head`` and
    the heat map of :mod:`medmm.inference.heatmap`."""
    ap = argparse.ArgumentParser(prog="medmm wsi", description="slide classification (ABMIL + head) and heat maps")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("train", help="= medmm train --config C (configs/tasks/slide_classification.yaml)", add_help=False)
    sub.add_parser("eval", help="= medmm eval head --checkpoint C --data D --out O", add_help=False)
    h = sub.add_parser("heatmap", help="thumbnail + tissue mask + attention heat map (PNG)")
    h.add_argument("--checkpoint", required=True)
    h.add_argument("--features", required=True, help="a slide's .safetensors from `medmm prepare wsi --features`")
    h.add_argument("--slide", help="the slide file, if it moved since the features were written")
    h.add_argument("--slide-mpp", type=float)
    h.add_argument("--out", required=True)
    h.add_argument("--device", default="auto")
    if argv[:1] == ["train"]:
        _train(argv[1:])
        return
    if argv[:1] == ["eval"]:
        from .eval.heads import main as eval_head

        eval_head(argv[1:])
        return
    a = ap.parse_args(argv)
    from .inference.heatmap import head_heatmap

    print(json.dumps(head_heatmap(a.checkpoint, a.features, a.out, a.slide, a.slide_mpp, a.device), indent=2))


def _train(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="medmm train", add_help=False)
    ap.add_argument("--nproc", type=int, default=1, help="ranks on this machine (runs torchrun)")
    a, rest = ap.parse_known_args(argv)
    if a.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={a.nproc}", f"--master_port={free_port()}",
               "-m", "medmm.training", *rest]
        raise SystemExit(subprocess.call(cmd))
    from .training.__main__ import main

    main(rest)


def _plan(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="medmm plan", description="parameters, DeepSpeed ZeRO-2/3 model-state memory, "
                                 "activations and the first ZeRO stage that fits (medmm/training/plan.py)")
    ap.add_argument("--config", required=True)
    ap.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpu-memory", type=float, help="GB per GPU (default: this machine's GPU, else 80)")
    ap.add_argument("--json", action="store_true", help="the same figures as JSON")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    a = ap.parse_args(argv)
    from .config import TrainConfig, load_config
    from .training.plan import format_plan, make_plan

    cfg = load_config(TrainConfig, a.config, a.overrides)
    print(format_plan(make_plan(cfg, a.gpus, a.nodes, a.gpu_memory), as_json=a.json))


def _eval(argv: list[str]) -> None:
    from .eval.__main__ import is_eval_command

    if is_eval_command(argv):  # a registered benchmark (medmm eval list), compare or suite: medmm/eval/benchmarks
        from .eval.__main__ import main as eval_main

        eval_main(argv)
        return
    if argv[:1] == ["head"]:  # a head model (trainer.stage: head) on a labelled file
        from .eval.heads import main as eval_head

        eval_head(argv[1:])
        return
    from .config import DecodingConfig
    from .eval.runner import evaluate

    ap = argparse.ArgumentParser(prog="medmm eval")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", nargs="+", required=True, help="conversation JSONL files with reference answers")
    ap.add_argument("--out", default="runs/eval")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--report-metrics", action="store_true", help="also BLEU-1..4, ROUGE-L, METEOR, CIDEr")
    a = ap.parse_args(argv)
    m = evaluate(a.checkpoint, a.data, a.out, DecodingConfig(max_new_tokens=a.max_new_tokens), a.batch_size,
                 limit=a.limit, report=a.report_metrics)
    print(json.dumps(m, indent=2))


def _export(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="medmm export")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--format", choices=["hf", "onnx", "torchscript"], default="hf")
    ap.add_argument("--out", required=True)
    ap.add_argument("--metrics", help="hf: an eval metrics.json for the model card (default: <run>/eval/metrics.json)")
    ap.add_argument("--with-llm", action="store_true", help="onnx: also export the language model (no KV cache)")
    ap.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto",
                    help="onnx: torch.export-based exporter, the TorchScript-based one, or dynamo with fallback")
    ap.add_argument("--opset", type=int, default=18)
    ap.add_argument("--atol", type=float, default=1e-4, help="onnx/torchscript: parity tolerance against PyTorch")
    a = ap.parse_args(argv)
    if a.format == "hf":
        from .export.hf import export_hf

        print(json.dumps({"exported": str(export_hf(a.checkpoint, a.out, metrics=a.metrics)), "format": a.format}))
        return
    from .export.onnx import export_graphs

    try:
        rep = export_graphs(a.checkpoint, a.out, a.format, with_llm=a.with_llm, exporter=a.exporter, opset=a.opset,
                            atol=a.atol)
    except RuntimeError as e:
        raise SystemExit(f"medmm export: {e}") from e
    summary = {n: {"file": r["file"], "exporter": r["exporter"], "max_abs_diff": r["max_abs_diff"]}
               for n, r in rep["modalities"].items()}
    if "llm" in rep:
        summary["llm"] = {k: rep["llm"].get(k) for k in ("exported", "exporter", "max_abs_diff", "error")}
    print(json.dumps({"exported": a.out, "format": a.format, "graphs": summary,
                      "validation": os.path.join(a.out, "validation.json")}, indent=2))


def _pacs(argv: list[str]) -> None:
    """``medmm pacs report|pull-run-push|listen|resend|http``: DICOM SR out of a study, over files, DICOMweb, DIMSE
    or HTTP."""
    from .errors import ConfigError
    from .inference.strategies import add_decoding_flags, apply_decoding_flags

    ap = argparse.ArgumentParser(prog="medmm pacs")
    sub = ap.add_subparsers(dest="kind", required=True)
    rep = sub.add_parser("report", help="one study from disk -> a DICOM SR file (no network)")
    rep.add_argument("--input", required=True, help="a DICOM file or a study folder")
    rep.add_argument("--out", required=True, help="the SR file to write")
    pull = sub.add_parser("pull-run-push", help="WADO-RS retrieve a study, run the model, STOW-RS the SR back")
    pull.add_argument("--dicomweb", required=True, help="DICOMweb root URL, e.g. http://pacs:8042/dicom-web")
    pull.add_argument("--study", required=True, help="StudyInstanceUID")
    pull.add_argument("--no-push", action="store_true", help="retrieve and report, but do not store the SR")
    pull.add_argument("--token-file", help="a bearer token for the DICOMweb server")
    pull.add_argument("--retry-seconds", type=float, default=60.0, help="retry failed requests this long (back-off)")
    lis = sub.add_parser("listen", help="DIMSE storage SCP: each received study -> SR (C-STORE or STOW-RS)")
    lis.add_argument("--aet", default="MEDMM")
    lis.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    lis.add_argument("--port", type=int, default=11112)
    lis.add_argument("--allowed-aets", required=True, help="comma-separated calling AE titles that may send")
    lis.add_argument("--forward-to", help="AET@host:port (C-STORE) or http(s)://.../dicom-web (STOW-RS)")
    lis.add_argument("--study-timeout", type=float, default=5.0, help="seconds after the last instance")
    lis.add_argument("--max-queue", type=int, default=16, help="studies collecting/waiting; more get 0xA700")
    lis.add_argument("--max-batch", type=int, default=8,
                     help="studies waiting in the queue reported together in one batched generate (1: one by one)")
    lis.add_argument("--out", default="runs/pacs", help="SRs, studies.jsonl and the spool")
    lis.add_argument("--keep-studies", action="store_true", help="keep received instances after processing")
    lis.add_argument("--retry-seconds", type=float, default=60.0,
                     help="retry SR delivery this long (back-off) before keeping it in OUT/undelivered")
    lis.add_argument("--amend-window", type=float, default=3600.0,
                     help="keep a study's instances this long after its SR, so a later burst is reported with them")
    lis.add_argument("--tls-cert", help="PEM certificate: speak DICOM TLS only (with --tls-key)")
    lis.add_argument("--tls-key", help="PEM private key of --tls-cert")
    lis.add_argument("--tls-ca", help="PEM CA bundle: require client certificates signed by it")
    lis.add_argument("--audit-log", help="one JSON line per association and C-STORE/C-ECHO (0600; no PHI, no UIDs)")
    rs = sub.add_parser("resend", help="deliver kept SRs (OUT/undelivered); delivered files move to DIR/delivered")
    rs.add_argument("dir", help="a folder of SR files (its *.dcm) or one SR file")
    rs.add_argument("--to", required=True, help="AET@host:port (C-STORE) or http(s)://.../dicom-web (STOW-RS)")
    rs.add_argument("--aet", default="MEDMM", help="our calling AE title (C-STORE)")
    rs.add_argument("--retry-seconds", type=float, default=60.0, help="retry each delivery this long (back-off)")
    rs.add_argument("--token-file", help="a bearer token for the DICOMweb server")
    web = sub.add_parser("http", help="HTTP API (FastAPI): token required, loopback by default")
    web.add_argument("--host", default="127.0.0.1")
    web.add_argument("--port", type=int, default=8080)
    web.add_argument("--token-file", help="file holding the API token, named 'default' (default: $MEDMM_API_TOKEN)")
    web.add_argument("--tokens-file", help="named tokens instead: one 'name token' per line, '#' comment lines; "
                                           "names key the audit log and the rate limit")
    web.add_argument("--max-request-mb", type=float, default=256.0)
    web.add_argument("--openapi", help="write the OpenAPI spec to this file and exit")
    web.add_argument("--docs", action="store_true",
                     help="serve /docs, /redoc and /openapi.json behind the token (default: off, 404)")
    web.add_argument("--batching", choices=["continuous", "window", "off"], default="continuous",
                     help="concurrent /v1/ask: continuous (HF continuous batching for text-only greedy questions, "
                          "window for the rest), window (static batches per time window) or off")
    web.add_argument("--tls-cert", help="PEM certificate (chain): serve HTTPS (default: plain HTTP)")
    web.add_argument("--tls-key", help="PEM private key of --tls-cert")
    web.add_argument("--tls-ca", help="PEM CA: require client certificates it signed (default: none asked)")
    web.add_argument("--rate-limit", metavar="N/min",
                     help="requests per token name, a sliding window (N/s and N/h too); beyond it 429 with "
                          "Retry-After (default: no limit)")
    web.add_argument("--audit-log", metavar="FILE",
                     help="append one JSON line per request (time, token_name, endpoint, status, bytes, duration_s; "
                          "never a token, query string or body); created 0600 (default: none)")
    web.add_argument("--auth-failure-limit", metavar="N/min", default="30/min",
                     help="requests with a missing or wrong token per client address before it gets 429 for the "
                          "rest of the window (throttles token guessing; 'off' for none; default: 30/min)")
    web.add_argument("--helper-model", action="append", default=[], metavar="NAME=PATH",
                     help="(repeatable) a draft/amateur model /v1/ask may name as params {draft: NAME}, loaded once "
                          "at start-up; over HTTP a helper model is never a path (default: none)")
    for p in (rep, pull, lis, web):
        p.add_argument("--checkpoint", required=True)
        p.add_argument("--question", default="Describe the findings.")
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.add_argument("--min-volume-slices", type=int, default=8)
        p.add_argument("--series-modalities", help="only series of these DICOM modalities, e.g. CT,MR")
        p.add_argument("--max-decoded-mib", type=int, default=512, metavar="MIB",
                       help="pixel budget per study: the float32 arrays its headers declare, checked before any "
                            "decoding or inflation; a larger study is refused (default: 512)")
        p.add_argument("--device", default="auto")
        add_decoding_flags(p, common=False)  # --strategy and its settings, from the strategy registry
    a = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.kind == "resend":  # no model: exit status 1 when any SR was not delivered
        from .serve.listener import Destination, resend

        try:
            res = resend(a.dir, Destination.parse(a.to, "--to"), a.aet, a.retry_seconds, a.token_file)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"medmm pacs resend: {e}") from e
        print(json.dumps(res, indent=2))
        if res["failed"]:
            raise SystemExit(1)
        return

    from .config import DecodingConfig
    from .serve.study import ReportConfig, ReportPipeline

    logging.getLogger("highdicom").setLevel(logging.WARNING)  # its INFO lines narrate every attribute copy
    try:
        cfg = ReportConfig(question=a.question, decoding=DecodingConfig(max_new_tokens=a.max_new_tokens),
                           min_volume_slices=a.min_volume_slices,
                           series_modalities=a.series_modalities.split(",") if a.series_modalities else None,
                           max_decoded_mib=a.max_decoded_mib)
        apply_decoding_flags(a, cfg.decoding)
    except ConfigError as e:
        raise SystemExit(f"medmm pacs: {e}") from e
    if a.kind == "http":
        from .serve.http import create_app, parse_helper_models, parse_rate_limit, resolve_tokens, serve, tls_options

        try:  # every flag checked before the model loads
            tokens = resolve_tokens(a.token_file, a.tokens_file)
            helpers = parse_helper_models(a.helper_model)
            for limit in (a.rate_limit, a.auth_failure_limit):
                if limit and limit != "off":
                    parse_rate_limit(limit)
            tls_options(a.tls_cert, a.tls_key, a.tls_ca)
        except (OSError, ValueError) as e:
            raise SystemExit(f"medmm pacs http: {e}") from e
        pipeline = ReportPipeline(a.checkpoint, cfg, device=a.device)
        if a.openapi:
            from pathlib import Path

            app = create_app(pipeline, tokens, batching="off")  # the spec only: no decoding loop to start
            Path(a.openapi).write_text(json.dumps(app.openapi(), indent=2))
            app.state.batcher.close()
            print(json.dumps({"openapi": a.openapi}))
            return
        serve(pipeline, tokens, a.host, a.port, int(a.max_request_mb * (1 << 20)), a.batching, tls_cert=a.tls_cert,
              tls_key=a.tls_key, tls_ca=a.tls_ca, helper_models=helpers, rate_limit=a.rate_limit,
              audit_log=a.audit_log, docs=a.docs,
              auth_failure_limit=None if a.auth_failure_limit == "off" else a.auth_failure_limit)
        return
    if a.kind == "listen":
        from .serve.listener import ListenerConfig, StudyListener, server_tls_context

        try:
            lcfg = ListenerConfig(aet=a.aet, host=a.host, port=a.port, allowed_aets=a.allowed_aets.split(","),
                                  study_timeout_s=a.study_timeout, max_queue=a.max_queue, max_batch=a.max_batch,
                                  forward_to=a.forward_to,
                                  out_dir=a.out, keep_studies=a.keep_studies, retry_s=a.retry_seconds,
                                  amend_window_s=a.amend_window, tls_cert=a.tls_cert, tls_key=a.tls_key,
                                  tls_ca=a.tls_ca, audit_log=a.audit_log)
            if lcfg.tls_cert:  # before the model loads
                server_tls_context(lcfg.tls_cert, lcfg.tls_key, lcfg.tls_ca)
        except ValueError as e:
            raise SystemExit(f"medmm pacs listen: {e}") from e
        os.umask(0o077)  # everything this process writes is its owner's alone (the listener also sets modes)
        StudyListener(ReportPipeline(a.checkpoint, cfg, device=a.device), lcfg).serve_forever()
        return
    pipeline = ReportPipeline(a.checkpoint, cfg, device=a.device)
    if a.kind == "report":
        res = pipeline.run(a.input)
        res.sr.save_as(a.out, enforce_file_format=True)
        print(json.dumps({**res.record, "report": res.text, "sr_file": a.out}, indent=2))
    else:
        from .serve.dicomweb import pull_run_push

        print(json.dumps(pull_run_push(a.dicomweb, a.study, pipeline, push=not a.no_push, token_file=a.token_file,
                                       retry_s=a.retry_seconds), indent=2))


def _demo(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="medmm demo")
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--steps", type=int, help="override trainer.max_steps")
    ap.add_argument("--nproc", type=int, default=2)
    a = ap.parse_args(argv)
    from .demo import run_demo

    run_demo(a.out, steps=a.steps, nproc=a.nproc)


COMMANDS = {"prepare": _prepare, "train": _train, "eval": _eval, "export": _export, "demo": _demo, "wsi": _wsi}
COMMANDS["pacs"] = _pacs
COMMANDS["plan"] = _plan


def _index(argv: list[str]) -> None:
    from .retrieval.__main__ import main as index_main

    index_main(argv)


COMMANDS["index"] = _index

# ``medmm list KIND``: each kind's registry as "module:NAME", imported only when listed (``medmm`` itself stays quick)
LIST_KINDS = {
    # until medmm/modalities/ holds the modality registry, the loaders are what read each kind of input
    "modalities": "medmm.data.loaders:LOADERS",
    "stages": "medmm.training.stages:STAGES",
    "strategies": "medmm.inference.strategies:STRATEGIES",
    "benchmarks": "medmm.eval.benchmarks.registry:BENCHMARKS",
    "encoders": "encoders.registry:ENCODERS",
    "projectors": "medmm.model.projectors:PROJECTORS",
    "heads": "medmm.model.heads:HEADS",
    "featurisers": "medmm.data.featurisers:FEATURISERS",
    "rewards": "medmm.data.rewards:REWARDS",
    "sources": "medmm.retrieval.sources:SOURCES",
    "dense-encoders": "medmm.retrieval.dense:DENSE_ENCODERS",
    "loaders": "medmm.data.loaders:LOADERS",
}


def list_registry(kind: str):
    """The :class:`~encoders.registry.Registry` ``medmm list KIND`` prints; a ConfigError names the kinds."""
    kinds = Registry("kind")
    for k, where in LIST_KINDS.items():
        kinds.register(k, where, where)
    module, name = kinds.get(kind).split(":")
    return getattr(importlib.import_module(module), name)


def _list(argv: list[str]) -> None:
    if not argv:  # the kinds themselves
        print("\n".join(LIST_KINDS))
        return
    if argv[0] in ("-h", "--help") or len(argv) > 1:
        print(f"usage: medmm list [KIND]   one 'name  summary' line per registered entry; KIND: {', '.join(LIST_KINDS)}")
        if len(argv) > 1:
            raise SystemExit(1)
        return
    try:
        registry = list_registry(argv[0])
    except ConfigError as e:
        print(f"medmm list: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print("\n".join(registry.lines()))


COMMANDS["list"] = _list


def main(argv: list[str] | None = None) -> None:
    """Run one ``medmm`` command. From the shell (``argv`` None) a medmm error (bad config, bad input) ends the
    command with one line naming it and exit status 1; called with ``argv`` (tests, scripts), it is raised."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if argv is None:
        from .errors import MedmmError

        try:
            return main(sys.argv[1:])
        except MedmmError as e:
            print(f"medmm {sys.argv[1] if len(sys.argv) > 1 else ''}: {type(e).__name__}: {e}", file=sys.stderr)
            raise SystemExit(1) from None
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "infer":
            from .inference.__main__ import main as infer_main

            infer_main(rest)
            return
        if cmd not in COMMANDS:
            raise SystemExit(f"medmm: unknown command '{cmd}'; commands: infer, {', '.join(COMMANDS)}")
        COMMANDS[cmd](rest)
    except ModuleNotFoundError as e:  # an optional extra is missing: say which one installs it
        from .utils import missing_extra_message

        msg = missing_extra_message(e)
        if msg is None:
            raise
        raise SystemExit(msg) from e


if __name__ == "__main__":
    main()
