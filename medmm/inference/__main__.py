"""``infer.py``: answer a question about a DICOM file/series, PNG/JPEG, SMILES or FASTA; or run a manifest.

    python infer.py --checkpoint runs/demo/checkpoint --input CT_small.dcm --question "What modality is this?"
    python infer.py --checkpoint C --smiles "CCO" --question "Is this molecule drug-like?" --strategy beam
    python infer.py --checkpoint C --manifest requests.jsonl --out answers.jsonl [--options yes,no]
    python infer.py --checkpoint C --input x.dcm --question Q --strategy speculative --draft DRAFT_DIR
    python infer.py --checkpoint C --input x.dcm --question Q --strategy prompt_lookup --num-draft-tokens 4
    python infer.py --checkpoint C --volume SERIES/ --question Q --dump-inputs DIR   # DIR/volume.npy: the encoder input

Decoding flags come from the strategy registry (medmm/inference/strategies/): ``--strategy NAME`` and
one flag per setting; a flag the chosen strategy does not take is an error. Every strategy and
``--options`` work the same for ``--question``, manifest rows in either form (``question`` or LLaVA
``conversations``) and the HTTP API.
    python infer.py --checkpoint C --molecules in.csv --question "Is this molecule likely to be approved?" --out out.csv

Prints JSON (one object, or one line per manifest row when no --out is given).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..config import DecodingConfig, InferConfig, load_config
from ..errors import ConfigError, InvalidInputError
from ..io.files import not_regular_reason
from .predictor import closed_set_check
from .strategies import add_decoding_flags, apply_decoding_flags


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
    elif os.path.lexists(p):  # a FIFO, device, socket, dangling link or link loop is refused, never opened
        raise InvalidInputError(p, not_regular_reason(p) or "cannot tell which modality this file is; use "
                                                            "--image/--volume/--fasta")
    else:
        want = "mol"
    if want not in available:
        raise InvalidInputError(value, f"looks like a '{want}' input, but the model has only {available}")
    return want


def _stream(predictor, req: dict, d: DecodingConfig) -> dict:
    """Print tokens to stderr as they come (any strategy with a loop step); returns the usual record."""
    from ..inference.strategies import get_strategy

    if get_strategy(d.strategy).start is None:
        raise SystemExit(f"infer.py: --stream needs a strategy with a loop step; {d.strategy} runs only through "
                         "batched generate")
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
    except (InvalidInputError, ConfigError) as e:
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


def _dump_inputs(predictor, request: dict, base_dir: Path | None, out: Path) -> None:
    """``out/<key>.npy`` per modality of ``request``: what its encoder is handed (see ``--dump-inputs``)."""
    import numpy as np

    try:
        arrays = predictor.encoder_inputs(request, base_dir)
    except (InvalidInputError, ConfigError) as e:
        raise SystemExit(f"infer.py: --dump-inputs: {e}") from e
    out.mkdir(parents=True, exist_ok=True)
    for key, arr in arrays.items():
        np.save(out / f"{key}.npy", arr)


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
    add_decoding_flags(ap)
    ap.add_argument("--dump-inputs", metavar="DIR", help="write the arrays handed to each encoder for the one "
                    "request as DIR/<key>.npy (<key>: the checkpoint's model.modalities key; float32 (M, ...) as "
                    "collated, after the loader's mean/std normalisation), to check parity with the training "
                    "loader")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--device")
    rag = ap.add_argument_group("retrieval augmentation")
    rag.add_argument("--rag", metavar="IDX", help="a `medmm index build` folder: the top passages enter the prompt "
                     "numbered, and the output lists them as citations [{n, id, source, text, cited}]")
    rag.add_argument("--rag-top-k", type=int, metavar="K", help="passages per question (default 3)")
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
    try:
        apply_decoding_flags(args, d)
        if args.options:
            closed_set_check(d)
    except ConfigError as e:
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
    options = [o.strip() for o in args.options.split(",") if o.strip()] if args.options else None
    if args.stream and (args.manifest or args.options or (args.question and len(args.question) > 1)):
        raise SystemExit("infer.py: --stream prints one generated answer: it takes one --question, without "
                         "--manifest or --options")
    if args.manifest:
        if args.question:
            raise SystemExit("infer.py: --question and --manifest exclude each other (put questions in the rows)")
        requests = read_jsonl(args.manifest)
        base_dir = Path(args.manifest).parent
        if options:  # --options applies to every row; a row with other options of its own is an error row
            requests = [dict(r, options=options) if not r.get("options") or r["options"] == options else
                        dict(r, options=None, _conflict=True) for r in requests]
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
        if options:
            req["options"] = options
        requests = [req]
    if args.dump_inputs:
        if len(requests) != 1:
            raise SystemExit(f"infer.py: --dump-inputs writes the inputs of one request; got {len(requests)}")
        _dump_inputs(predictor, requests[0], base_dir, Path(args.dump_inputs))
    citations = None
    if args.rag:
        cfg.rag = args.rag
    if args.rag_top_k:
        cfg.rag_top_k = args.rag_top_k
    if cfg.rag:
        from ..retrieval.index import load_index, rag_requests

        originals = [(r.get("question"), r.get("questions")) for r in requests]
        requests, citations = rag_requests(requests, load_index(cfg.rag), cfg.rag_top_k)
    if args.stream:
        outputs = [_stream(predictor, requests[0], d)]
    else:
        conflicts = {i for i, r in enumerate(requests) if r.pop("_conflict", False)}
        outputs = predictor.predict([r for i, r in enumerate(requests) if i not in conflicts], d,
                                    batch_size=cfg.batch_size, base_dir=base_dir)
        for i in sorted(conflicts):
            outputs.insert(i, {"id": requests[i].get("id"), "error": "ConfigError",
                               "message": "the row's own 'options' differ from --options"})
    if citations is not None:
        from ..retrieval.index import attach_citations

        for (q, qs), out, cites in zip(originals, outputs, citations):
            attach_citations(out, cites)
            if q is not None:
                out["question"] = q  # the user's question, not the prompt with the passages
            for a, orig in zip(out.get("answers") or [], qs or []):
                a["question"] = orig
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
