"""``infer.py``: answer a question about a DICOM file/series, PNG/JPEG, SMILES or FASTA; or run a manifest.

    python infer.py --checkpoint runs/demo/checkpoint --input CT_small.dcm --question "What modality is this?"
    python infer.py --checkpoint C --smiles "CCO" --question "Is this molecule drug-like?" --strategy beam
    python infer.py --checkpoint C --manifest requests.jsonl --out answers.jsonl
    python infer.py --checkpoint C --molecules in.csv --question "Is this molecule likely to be approved?" --out out.csv

Prints JSON (one object, or one line per manifest row when no --out is given).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import DecodingConfig, InferConfig, load_config
from ..errors import InvalidInputError


def detect_modality(value: str, available: list[str]) -> str:
    """Pick the modality for ``--input``: folder -> volume, DICOM/PNG/JPEG -> image (multi-frame -> volume
    when the model has no image modality), FASTA -> dna, anything else -> a SMILES for ``mol``."""
    from ..io.dicom import is_dicom_file, read_dicom
    from ..io.genomics import FASTA_SUFFIXES
    from ..io.images import RASTER_SUFFIXES

    p = Path(value)
    want: str
    if p.is_dir():
        want = "volume"
    elif p.is_file() and p.suffix.lower() in RASTER_SUFFIXES:
        want = "image"
    elif p.is_file() and (p.suffix.lower() in FASTA_SUFFIXES or "".join(p.suffixes[-2:]).lower() in FASTA_SUFFIXES):
        want = "dna"
    elif p.is_file() and is_dicom_file(p):
        frames = read_dicom(p, stop_before_pixels=True).meta["frames"]
        want = "volume" if frames > 1 and ("volume" in available and "image" not in available) else "image"
    elif p.exists():
        raise InvalidInputError(p, "cannot tell which modality this file is; use --image/--volume/--fasta")
    else:
        want = "mol"
    if want not in available:
        raise InvalidInputError(value, f"looks like a '{want}' input, but the model has only {available}")
    return want


def _stream(predictor, req: dict, d: DecodingConfig) -> dict:
    """Print tokens to stderr as they come (greedy or sampling); returns the usual record."""
    if d.strategy not in ("greedy", "sample"):
        raise SystemExit("infer.py: --stream supports the greedy and sample strategies")
    tok = predictor.tokenizer
    shown: list[int] = []
    prev = ""

    def on_token(t: int) -> None:
        nonlocal prev
        shown.append(t)
        text = tok.decode(shown, skip_special_tokens=True)
        sys.stderr.write(text[len(prev):])
        sys.stderr.flush()
        prev = text

    try:
        sess = predictor.session(req["modalities"])
        out = {"id": req["id"], **predictor.ask(sess, req["question"], d, on_token=on_token)}
    except InvalidInputError as e:
        out = {"id": req["id"], "error": type(e).__name__, "message": str(e)}
    sys.stderr.write("\n")
    return out


SLIDE_LOADERS = ("slide_features", "slide_tiles")


def _slide_modality(model) -> str:
    """The model's modality fed by a slide loader (its name is the placeholder, usually ``slide``)."""
    names = [n for n, m in model.config.modalities.items() if m.loader in SLIDE_LOADERS]
    if not names:
        raise SystemExit(f"infer.py: --slide needs a model with a slide modality (loader {' or '.join(SLIDE_LOADERS)});"
                         f" this one has {list(model.config.modalities)}")
    return names[0]


def _slide_heatmap(predictor, value: str, out_png: str) -> dict:
    """Attention of the slide modality's aggregator (ABMIL) or resampler over the tiles, drawn on the thumbnail."""
    import torch

    from ..model.attention import bag_attention
    from .heatmap import heatmap_from_item

    model = predictor.model
    name = _slide_modality(model)
    try:
        item = predictor.processor.loaders[name].load(value)
        dev = next(model.parameters()).device
        x = item["x"][None].to(dev)
        x = x.to(next(model.encoders[name].parameters()).dtype) if x.is_floating_point() else x
        with torch.no_grad():
            att = bag_attention(model.encoders[name], model.projectors[name], x, item["mask"][None].to(dev))[0]
        return heatmap_from_item(item, att.float().cpu().numpy(), out_png)
    except InvalidInputError as e:
        return {"error": type(e).__name__, "message": str(e)}


def _molecules(args, cfg: InferConfig) -> dict:
    """``--molecules in.csv``: score every row (an LLM checkpoint's closed-set yes/no, or a head checkpoint)."""
    from .molecules import predict_molecules_csv

    if not args.out:
        raise SystemExit("infer.py: --molecules needs --out (the output CSV)")
    options = [o.strip() for o in (args.options or "yes,no").split(",") if o.strip()]
    try:
        res = predict_molecules_csv(cfg.checkpoint, args.molecules, args.out, args.smiles_col,
                                    args.question[0] if args.question else None, options, args.workers, cfg.device)
    except InvalidInputError as e:
        raise SystemExit(f"infer.py: {e}") from e
    print(json.dumps(res))
    return res


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="infer.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", help="optional InferConfig YAML")
    ap.add_argument("--checkpoint", help="medmm model folder")
    src = ap.add_argument_group("one request")
    src.add_argument("--input", help="path or value; the modality is detected")
    src.add_argument("--image", help="PNG/JPEG/DICOM file")
    src.add_argument("--volume", help="DICOM series folder or multi-frame file")
    src.add_argument("--smiles", help="SMILES string")
    src.add_argument("--fasta", help="FASTA file (first record)")
    src.add_argument("--dna", help="DNA sequence")
    src.add_argument("--modality", action="append", default=[], metavar="NAME=VALUE", help="any modality")
    src.add_argument("--slide", help="whole slide: its tile-feature file (.safetensors from `medmm prepare wsi "
                     "--features`) or, with the slide_tiles loader, the slide itself")
    src.add_argument("--heatmap", metavar="PNG", help="with --slide: write the thumbnail, tissue mask and the "
                     "aggregator's attention over the tiles as a PNG")
    src.add_argument("--question", action="append", help="the question; repeat it to ask several about one input "
                     "(the input is encoded once and the shared prompt's KV cache is reused)")
    src.add_argument("--options", help="closed-set answering: comma-separated allowed answers, e.g. yes,no")
    src.add_argument("--stream", action="store_true", help="print tokens as they are generated (one question)")
    batch = ap.add_argument_group("batch")
    batch.add_argument("--manifest", help="JSONL of requests ({modalities, question} or conversations)")
    batch.add_argument("--out", help="write outputs here (JSONL) instead of stdout")
    batch.add_argument("--molecules", help="CSV of SMILES: one output row per input row (canonical SMILES, score, "
                       "answer, rule report, error); --out names the output CSV")
    batch.add_argument("--smiles-col", default="smiles", help="--molecules: the SMILES column")
    batch.add_argument("--workers", type=int, default=0, help="--molecules: RDKit worker processes")
    dec = ap.add_argument_group("decoding")
    dec.add_argument("--strategy", choices=["greedy", "beam", "sample", "speculative", "prompt_lookup", "contrastive",
                                            "contrastive_search"])
    dec.add_argument("--draft", help="speculative: local draft model folder (same tokenizer)")
    dec.add_argument("--num-draft-tokens", type=int)
    dec.add_argument("--amateur", help="contrastive: local amateur model folder (same tokenizer)")
    dec.add_argument("--cd-alpha", type=float)
    dec.add_argument("--cd-beta", type=float)
    dec.add_argument("--penalty-alpha", type=float)
    dec.add_argument("--search-top-k", type=int)
    dec.add_argument("--max-new-tokens", type=int)
    dec.add_argument("--num-beams", type=int)
    dec.add_argument("--length-penalty", type=float)
    dec.add_argument("--temperature", type=float)
    dec.add_argument("--top-k", type=int)
    dec.add_argument("--top-p", type=float)
    dec.add_argument("--repetition-penalty", type=float)
    dec.add_argument("--no-repeat-ngram-size", type=int)
    dec.add_argument("--seed", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--device")
    ap.add_argument("overrides", nargs="*", help="dotted InferConfig overrides, e.g. decoding.max_new_tokens=32")
    return ap


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    cfg = load_config(InferConfig, args.config, args.overrides)
    if args.checkpoint:
        cfg.checkpoint = args.checkpoint
    if not cfg.checkpoint:
        raise SystemExit("infer.py: --checkpoint is required")
    d = cfg.decoding
    for flag, field in [("strategy", "strategy"), ("max_new_tokens", "max_new_tokens"), ("num_beams", "num_beams"),
                        ("length_penalty", "length_penalty"), ("temperature", "temperature"), ("top_k", "top_k"),
                        ("top_p", "top_p"), ("repetition_penalty", "repetition_penalty"),
                        ("no_repeat_ngram_size", "no_repeat_ngram_size"), ("seed", "seed"), ("draft", "draft"),
                        ("num_draft_tokens", "num_draft_tokens"), ("amateur", "amateur"), ("cd_alpha", "cd_alpha"),
                        ("cd_beta", "cd_beta"), ("penalty_alpha", "penalty_alpha"), ("search_top_k", "search_top_k")]:
        v = getattr(args, flag)
        if v is not None:
            setattr(d, field, v)
    try:
        d.__post_init__()  # re-check after the flags
    except Exception as e:
        raise SystemExit(f"infer.py: {e}") from e
    if args.batch_size:
        cfg.batch_size = args.batch_size
    if args.device:
        cfg.device = args.device
    if args.molecules:
        return [_molecules(args, cfg)]

    from ..inference.predictor import Predictor
    from ..utils import read_jsonl, write_jsonl

    predictor = Predictor(cfg.checkpoint, device=cfg.device)
    available = list(predictor.model.modality_tokens)
    base_dir = None
    if args.manifest:
        requests = read_jsonl(args.manifest)
        base_dir = Path(args.manifest).parent
    else:
        if not args.question and not args.manifest:
            raise SystemExit("infer.py: --question is required (or --manifest)")
        mods: dict[str, str] = {}
        try:
            if args.input:
                mods[detect_modality(args.input, available)] = args.input
        except InvalidInputError as e:
            print(json.dumps({"error": type(e).__name__, "message": str(e)}))
            return [{"error": type(e).__name__, "message": str(e)}]
        for name, v in [("image", args.image), ("volume", args.volume), ("mol", args.smiles), ("dna", args.fasta),
                        ("dna", args.dna)]:
            if v:
                mods[name] = v
        for kv in args.modality:
            name, _, v = kv.partition("=")
            mods[name] = v
        if args.slide:
            mods[_slide_modality(predictor.model)] = args.slide
        req = {"id": "request", "modalities": mods}
        if len(args.question) > 1:
            req["questions"] = args.question
        else:
            req["question"] = args.question[0]
        if args.options:
            req["options"] = [o.strip() for o in args.options.split(",") if o.strip()]
        requests = [req]
    if args.stream and not args.manifest and "question" in requests[0] and not args.options:
        outputs = [_stream(predictor, requests[0], d)]
    else:
        outputs = predictor.predict(requests, d, batch_size=cfg.batch_size, base_dir=base_dir)
    for req, out in zip(requests, outputs):
        out.setdefault("question", req.get("question"))
    if args.heatmap:
        if args.manifest or not args.slide:
            raise SystemExit("infer.py: --heatmap needs one request with --slide")
        outputs[0]["heatmap"] = _slide_heatmap(predictor, args.slide, args.heatmap)
    if args.out:
        write_jsonl(args.out, outputs)
        print(json.dumps({"written": args.out, "requests": len(outputs),
                          "errors": sum(1 for o in outputs if "error" in o)}))
    elif len(outputs) == 1 and not args.manifest:
        print(json.dumps(outputs[0], indent=2, ensure_ascii=False))
    else:
        for o in outputs:
            print(json.dumps(o, ensure_ascii=False))
    return outputs


if __name__ == "__main__":
    main(sys.argv[1:])
