"""Serving benchmark: studies per minute through ``medmm pacs listen`` with N concurrent DICOM senders, on loopback.

The same studies go two ways in one run:

* ``direct``: :class:`~medmm.serve.study.ReportPipeline` called on each study folder in a loop (load -> select
  series -> infer -> write SR) in one worker thread, no network: the ceiling for one model on this machine;
* ``listener``: the DIMSE storage SCP (:class:`~medmm.serve.listener.StudyListener`) fed by N pynetdicom
  C-STORE senders in threads, one association per study; each study is collected until ``--study-timeout``
  after its last instance, reported, and its SR sent back by C-STORE to a sink SCP on loopback. A sender
  that gets 0xA700 (the listener's bounded queue is full) retries the study after 0.2 s. Each sender count runs
  twice on the same studies: ``max_batch`` 1 (one study per ``generate``: ``listener``) and
  ``--listener-max-batch`` (the worker reports the studies waiting in its queue in one batched ``generate``:
  ``listener_batched``); ``batched_speedup_vs_unbatched`` is their throughput ratio at the highest sender count.

Each study is a copy of pydicom's CT_small or MR_small (real pixels and headers) with new Study/Series/SOP
UIDs and ``--instances`` instances. Senders are ``storescu`` processes (dcmtk) by default, so they do not share
the listener's Python process. The model is random (Llama ``--layers`` x ``--hidden``, ``vit2d_tiny``), greedy,
``--new-tokens`` tokens per report: at the default 2x64 the figures measure the plumbing; ``--hidden 512
--layers 8`` makes inference dominate, as it does with a real model.
Throughput = studies reported OK / (last SR sent - first instance sent); latency = first instance
received -> SR sent. Bounded: ``--studies`` per run and ``--max-seconds`` per configuration.

``--only http`` measures the HTTP API instead (``http_ask`` in the same file): N concurrent ``/v1/ask`` clients
against one uvicorn server with ``create_app(batching=...)`` off, window (static batches) and continuous (HF's
continuous batching), the same text questions side by side, answers of varied lengths (``--eos-varied``).

Writes ``bench/results/serve.json``; the last printed line is the headline.

    python bench/serve.py                                   # --senders 1,4 --studies 24
    python bench/serve.py --senders 1,2,8 --studies 40 --instances 3 --new-tokens 32
    OMP_NUM_THREADS=1 python bench/serve.py --only http --hidden 512 --layers 8 --new-tokens 64 --http-clients 1,8
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_checkpoint(tmp: Path, hidden: int = 64, layers: int = 2) -> Path:
    from medmm.config import ModelConfig, config_from_dict
    from medmm.model.multimodal import MedMMForCausalLM
    from medmm.model.tiny import build_tiny_llm, sample_texts

    llm = build_tiny_llm(tmp / "llm", sample_texts(), hidden=hidden, layers=layers, heads=max(1, hidden // 64),
                         kv_heads=max(1, hidden // 128))
    cfg = config_from_dict(ModelConfig, {
        "llm": str(llm), "llm_trainable": "frozen",
        "modalities": {"image": {"loader": "image", "encoder": {"name": "vit2d_tiny"},
                                 "projector": {"type": "mlp2x_gelu"}, "preprocess": {"image_size": 64}}}})
    torch.manual_seed(0)
    return MedMMForCausalLM.from_config(cfg).save_pretrained(tmp / "model")


def make_studies(out: Path, n: int, instances: int) -> list[list[Path]]:
    """``n`` studies alternating CT_small / MR_small, each with fresh UIDs and ``instances`` instances."""
    import pydicom
    from pydicom.uid import generate_uid

    from medmm.io.dicom import pydicom_test_files

    srcs = [pydicom_test_files() / "CT_small.dcm", pydicom_test_files() / "MR_small.dcm"]
    studies = []
    for s in range(n):
        ds = pydicom.dcmread(srcs[s % 2])
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        folder = out / f"study{s:04d}"
        folder.mkdir(parents=True)
        paths = []
        for i in range(instances):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = i + 1
            paths.append(folder / f"{i}.dcm")
            ds.save_as(paths[-1], enforce_file_format=True)
        studies.append(paths)
    return studies


class Sink:
    """A C-STORE SCP on loopback that accepts the SRs (what the PACS would do) and counts them."""

    def __init__(self, port: int):
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import ComprehensiveSRStorage

        self.count = 0
        self.last = 0.0
        ae = AE(ae_title="SINK")
        ae.add_supported_context(ComprehensiveSRStorage)
        self.server = ae.start_server(("127.0.0.1", port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event):
        self.count += 1
        self.last = time.perf_counter()
        return 0x0000

    def close(self):
        self.server.shutdown()


def send_storescu(port: int, paths: list[Path], deadline: float) -> tuple[int, int]:
    """One ``storescu`` process (one association) per study, as a modality or PACS forward would; a failed
    store (0xA700 when the listener's queue is full) is retried after 0.2 s. Returns (exit code, retries)."""
    import subprocess

    retries = 0
    while True:
        rc = subprocess.run(["storescu", "-aet", "BENCH", "-aec", "MEDMM", "127.0.0.1", str(port), *map(str, paths)],
                            capture_output=True).returncode
        if rc == 0 or time.perf_counter() > deadline:
            return rc, retries
        retries += 1
        time.sleep(0.2)


def send_study(port: int, paths: list[Path], datasets: dict) -> tuple[int, int]:
    """One association per study; retries on 0xA700 (queue full). Returns (status, refusals)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, MRImageStorage

    from medmm.serve.listener import no_delay

    refusals = 0
    while True:
        ae = AE(ae_title="BENCH")
        ae.add_requested_context(CTImageStorage)
        ae.add_requested_context(MRImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDMM")
        if not assoc.is_established:
            return -1, refusals
        no_delay(assoc)  # as DCMTK's storescu does by default
        statuses = [int(assoc.send_c_store(datasets[p]).Status) for p in paths]
        assoc.release()
        if all(s == 0 for s in statuses):
            return 0, refusals
        if any(s == 0xA700 for s in statuses):
            refusals += 1
            time.sleep(0.2)
            continue
        return statuses[0], refusals


def run_listener(pipeline, studies, senders: int, args, tmp: Path, max_batch: int = 1) -> dict:
    """``studies`` through one listener with ``max_batch`` (1: one study per generate, as before batching)."""
    import pydicom

    from medmm.serve.listener import ListenerConfig, StudyListener
    from medmm.training.distributed import free_port

    port, sink_port = free_port(), free_port()
    sink = Sink(sink_port)
    out = tmp / f"listener_{senders}_batch{max_batch}"
    listener = StudyListener(pipeline, ListenerConfig(
        port=port, allowed_aets=["BENCH"], study_timeout_s=args.study_timeout, max_queue=args.max_queue,
        max_batch=max_batch, forward_to=f"SINK@127.0.0.1:{sink_port}", out_dir=str(out))).start()
    datasets = ({p: pydicom.dcmread(p) for paths in studies for p in paths}  # read once, outside the timing
                if args.sender == "pynetdicom" else {})
    todo = iter(studies)
    lock = threading.Lock()
    refusals = []
    deadline = time.perf_counter() + args.max_seconds

    def sender():
        while time.perf_counter() < deadline:
            with lock:
                paths = next(todo, None)
            if paths is None:
                return
            if args.sender == "storescu":
                _, r = send_storescu(port, paths, deadline)
            else:
                _, r = send_study(port, paths, datasets)
            refusals.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=sender) for _ in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    idle = listener.wait_idle(max(1.0, deadline - time.perf_counter()))
    listener.stop()
    sink.close()
    records = [json.loads(x) for x in (out / "studies.jsonl").read_text().splitlines()]
    ok = [r for r in records if r["outcome"] == "ok"]
    elapsed = (sink.last or time.perf_counter()) - t0
    lat = [r["total_s"] for r in ok]
    infer = [next(s["s"] for s in r["steps"] if s["op"] == "infer") for r in ok]
    sizes = [r["batch_size"] for r in records if "batch_size" in r]  # per study: studies reported with it
    return {"senders": senders, "max_batch": max_batch, "studies_sent": len(refusals), "studies_ok": len(ok),
            "worker_batches": {str(k): v for k, v in sorted(listener.batch_sizes.items())},
            "mean_batch_per_study": round(statistics.mean(sizes), 2) if sizes else None,
            "outcomes": {k: sum(r["outcome"] == k for r in records) for k in {r["outcome"] for r in records}},
            "srs_received_by_sink": sink.count, "queue_full_retries": sum(refusals), "finished": idle,
            "elapsed_s": round(elapsed, 3), "studies_per_min": round(len(ok) / elapsed * 60, 1),
            "latency_s": {"p50": round(statistics.median(lat), 3), "p95": round(sorted(lat)[int(0.95 * (len(lat) - 1))], 3),
                          "max": round(max(lat), 3)} if lat else None,
            "infer_s_median": round(statistics.median(infer), 4) if infer else None}


def run_direct(pipeline, studies, args) -> dict:
    """The pipeline in a loop, in a worker thread like the listener's (main-thread inference measured up to 20x
    slower on this shared 2-core machine, so both paths run off the main thread)."""
    per: list[float] = []
    box = {}

    def loop():
        deadline = time.perf_counter() + args.max_seconds
        t0 = time.perf_counter()
        for paths in studies:
            if time.perf_counter() > deadline:
                break
            t = time.perf_counter()
            pipeline.run(paths[0].parent)
            per.append(time.perf_counter() - t)
        box["elapsed"] = time.perf_counter() - t0

    t = threading.Thread(target=loop)
    t.start()
    t.join()
    n, elapsed = len(per), box["elapsed"]
    return {"studies_ok": n, "elapsed_s": round(elapsed, 3), "studies_per_min": round(n / elapsed * 60, 1),
            "per_study_s_median": round(statistics.median(per), 4)}


# ----------------------------------------------------------------------------- HTTP API, concurrent /v1/ask clients
HTTP_TOKEN = "bench-token-0123456789abcdef"


def http_questions(n: int) -> list[str]:
    """``n`` distinct text questions from the bundled VQA-RAD sample (text-only /v1/ask requests)."""
    qa = json.loads((ROOT / "data" / "sample" / "vqa_rad" / "testset.json").read_text())
    qs = list(dict.fromkeys(q["question"] for q in qa))
    return [qs[i % len(qs)] for i in range(n)]


def vary_answer_lengths(pipeline, questions: list[str], new_tokens: int) -> list[int]:
    """Give the random LLM answers of varied lengths, as a trained one has (short findings and long descriptions):
    the end-of-turn row of its output layer copies (slightly scaled up) the row of a token t, so EOS wins exactly
    where t would have been the greedy pick and an answer ends at t's first place. t is the token, among those greedy
    decoding picks (never as an answer's first two), whose first places spread the answer lengths most. Without it
    every answer runs to ``--new-tokens`` and a static batch wastes nothing. Returns each question's answer length."""
    import collections

    p = pipeline.predictor
    gens = []
    for i in range(0, len(questions), 16):  # batched greedy generate, left padding, as Predictor does
        samples = [p.processor.process_prompt(p.to_conversation({"question": q})) for q in questions[i: i + 16]]
        batch = p.processor.collate(samples, padding_side="left")
        ids = batch["input_ids"].to(p.device)
        out = p.model.llm.generate(input_ids=ids, attention_mask=batch["attention_mask"].to(p.device),
                                   max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                   pad_token_id=p.tokenizer.pad_token_id)
        gens += out[:, ids.shape[1]:].tolist()
    counts = collections.Counter(t for g in gens for t in g)

    def lengths(t: int) -> list[int]:
        return [g.index(t) if t in g else len(g) for g in gens]

    # no one-word answers to every question: t never among an answer's first two tokens
    ok = [t for t, _ in counts.most_common(200) if min(lengths(t)) >= 2] or [counts.most_common(1)[0][0]]
    best = max(ok, key=lambda t: statistics.pstdev(lengths(t)))
    head = p.model.llm.get_output_embeddings().weight
    with torch.no_grad():
        head[p.tokenizer.eos_token_id] = head[best] * 1.05
    return lengths(best)


def spread_by_length(questions: list[str], lengths: list[int], n: int) -> list[str]:
    """``n`` questions whose answer lengths step evenly from the shortest to the longest (for each step, the question
    of the nearest length, each used as few times as possible), in a shuffled order (a fixed seed): a mix of short
    and long answers arriving together."""
    import collections
    import random

    lo, hi = min(lengths), max(lengths)
    used: collections.Counter = collections.Counter()
    picked = []
    for k in range(n):
        target = lo + k * (hi - lo) / max(1, n - 1)
        i = min(range(len(questions)), key=lambda j: (used[j], abs(lengths[j] - target), j))
        used[i] += 1
        picked.append(questions[i])
    random.Random(0).shuffle(picked)
    return picked


def run_http(pipeline, questions: list[str], clients: int, max_batch: int, args, batching: str = "window") -> dict:
    """One uvicorn server on loopback (``create_app(..., max_batch, batching=...)``), ``clients`` threads each POSTing
    its share of ``questions`` to ``/v1/ask`` one after another; returns throughput, latency, batch sizes, the paths
    that served the requests and the answers."""
    import socket
    import urllib.request

    import uvicorn

    from medmm.serve.http import create_app

    app = create_app(pipeline, HTTP_TOKEN, max_batch=max_batch, batch_window_s=args.batch_window, batching=batching)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    def ask(q: str) -> tuple[dict, float]:
        body = json.dumps({"question": q, "max_new_tokens": args.new_tokens}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/ask", data=body, method="POST", headers={
            "Authorization": f"Bearer {HTTP_TOKEN}", "Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as r:
            out = json.load(r)
        return out, time.perf_counter() - t0

    try:
        for q in questions[:2]:  # warm-up: imports, first calls
            ask(q)
        batcher = app.state.batcher
        before = len(batcher.batches)
        served_before = dict(batcher.served)
        together_before = len(batcher.continuous.running_together) if batcher.continuous else 0
        answers: dict[int, str] = {}
        new_tokens: dict[int, int] = {}
        latency: list[float] = []

        def client(c: int) -> None:
            for i in range(c, len(questions), clients):
                out, dt = ask(questions[i])
                answers[i], new_tokens[i] = out["answer"], out["new_tokens"]
                latency.append(dt)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        sizes = batcher.batches[before:]
        served = {k: v - served_before.get(k, 0) for k, v in batcher.served.items() if v - served_before.get(k, 0)}
        together = batcher.continuous.running_together[together_before:] if batcher.continuous else []
        mode = batcher.mode
    finally:
        server.should_exit = True  # the app's shutdown stops the continuous loop
        thread.join(timeout=30)
    latency.sort()
    return {"clients": clients, "batching": mode, "max_batch": max_batch, "requests": len(questions),
            "ok": len(answers), "elapsed_s": round(elapsed, 3), "requests_per_s": round(len(answers) / elapsed, 3),
            "latency_s": {"p50": round(statistics.median(latency), 3),
                          "p95": round(latency[min(len(latency) - 1, int(0.95 * len(latency)))], 3)},
            "served_by": served, "generate_calls": len(sizes),
            "mean_batch": round(statistics.mean(sizes), 2) if sizes else 0,
            "mean_running_together": round(statistics.mean(together), 2) if together else None,
            "new_tokens_total": sum(new_tokens.values()),
            "answers": [answers[i] for i in sorted(answers)],
            "answer_tokens": [new_tokens[i] for i in sorted(new_tokens)]}


def http_section(args) -> dict:
    """Concurrent ``/v1/ask`` clients against the API with batching off, static windows and continuous batching, the
    same questions in one run, side by side."""
    from medmm.config import DecodingConfig
    from medmm.serve.study import ReportConfig, ReportPipeline

    questions = http_questions(args.http_requests)
    modes = args.http_batching.split(",")
    runs = []
    with tempfile.TemporaryDirectory(prefix="medmm-bench-http-") as d:
        ckpt = build_checkpoint(Path(d), args.hidden, args.layers)
        pipeline = ReportPipeline(ckpt, ReportConfig(decoding=DecodingConfig(max_new_tokens=args.new_tokens)),
                                  device=args.device)
        if args.eos_varied:  # the whole VQA-RAD sample as the pool, then a spread of lengths
            pool = list(dict.fromkeys(http_questions(10_000)))
            questions = spread_by_length(pool, vary_answer_lengths(pipeline, pool, args.new_tokens), len(questions))
        for clients in [int(x) for x in args.http_clients.split(",")]:
            for mode in modes:
                r = run_http(pipeline, questions, clients, args.max_batch, args, batching=mode)
                runs.append(r)
                print(f"  http: {clients} client(s), batching {mode}: {r['requests_per_s']:.2f} req/s, p50 "
                      f"{r['latency_s']['p50']} s, served by {r['served_by']}, mean window batch {r['mean_batch']}, "
                      f"mean running together {r['mean_running_together']}", file=sys.stderr, flush=True)
    ref = runs[0]["answers"]
    lengths = runs[0]["answer_tokens"]
    for r in runs:
        r["same_answers_as_first_run"] = r.pop("answers") == ref
        r.pop("answer_tokens")
    by = {(r["clients"], r["batching"]): r for r in runs}
    client_counts = sorted({r["clients"] for r in runs})

    def ratio(a: str, b: str) -> dict:
        return {str(c): round(by[(c, a)]["requests_per_s"] / by[(c, b)]["requests_per_s"], 3)
                for c in client_counts if (c, a) in by and (c, b) in by}

    most = max(client_counts)
    eos = ("allowed; questions picked from the VQA-RAD sample so that answer lengths step evenly from short to the "
           "limit") if args.eos_varied else "allowed"
    out = {"what": f"{len(questions)} text-only POST /v1/ask (greedy, up to {args.new_tokens} new tokens, EOS {eos}) "
                   "from N client threads on "
                   "loopback (urllib, one request at a time per client) to one uvicorn server, per batching mode: off "
                   "(one request at a time), window (AskBatcher: requests within batch_window_s share one HF generate "
                   "call; static batches, no admission into a running batch), continuous (HF's continuous batching "
                   "manager: a request joins the running batch when it arrives and leaves when it ends)",
           "model": f"random Llama {args.layers}x{args.hidden} + vit2d_tiny (unused: text-only requests)"
                    + (", EOS row tied to a frequent token so answers end at varied lengths" if args.eos_varied else ""),
           "answer_tokens": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths),
                             "mean": round(statistics.mean(lengths), 2)},
           "max_batch": args.max_batch, "batch_window_s": args.batch_window, "runs": runs,
           "batched_vs_unbatched_throughput": ratio("window", "off"),
           "continuous_vs_off_throughput": ratio("continuous", "off"),
           "continuous_vs_window_throughput": ratio("continuous", "window"),
           "same_answers_all_modes": all(r["same_answers_as_first_run"] for r in runs)}
    for key, (a, b) in {"continuous_speedup_vs_off": ("continuous", "off"),
                        "window_speedup_vs_off": ("window", "off"),
                        "continuous_speedup_vs_window": ("continuous", "window")}.items():
        if (most, a) in by and (most, b) in by:
            out[key] = round(by[(most, a)]["requests_per_s"] / by[(most, b)]["requests_per_s"], 3)
    out["speedups_at_clients"] = most
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--senders", default="1,4", help="comma-separated numbers of concurrent senders")
    ap.add_argument("--studies", type=int, default=24, help="studies per configuration")
    ap.add_argument("--instances", type=int, default=1, help="instances per study")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--study-timeout", type=float, default=0.5, help="seconds after a study's last instance")
    ap.add_argument("--max-queue", type=int, default=16, help="the listener's bound (CLI default 16)")
    ap.add_argument("--listener-max-batch", type=int, default=8,
                    help="listener: max_batch of the batched runs (beside max_batch 1 on the same studies)")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="time bound per configuration")
    ap.add_argument("--sender", choices=["storescu", "pynetdicom"], default="storescu",
                    help="storescu: one dcmtk process per study (senders outside the listener's process); "
                         "pynetdicom: SCU threads inside the benchmark process")
    ap.add_argument("--hidden", type=int, default=64, help="LLM width (64: plumbing-bound; 512: inference-bound)")
    ap.add_argument("--layers", type=int, default=2, help="LLM layers")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.json"))
    ap.add_argument("--only", choices=["http"], help="run one section and merge its figures into --out")
    ap.add_argument("--http-clients", default="1,8", help="http: comma-separated numbers of concurrent clients")
    ap.add_argument("--http-requests", type=int, default=32, help="http: /v1/ask requests per configuration")
    ap.add_argument("--max-batch", type=int, default=8, help="http: the batched server's max_batch")
    ap.add_argument("--batch-window", type=float, default=0.01, help="http: AskBatcher window in seconds")
    ap.add_argument("--http-batching", default="off,window,continuous",
                    help="http: comma-separated batching modes to compare (create_app(batching=...))")
    ap.add_argument("--eos-varied", action=argparse.BooleanOptionalAction, default=True,
                    help="http: make the random LLM end its answers at varied lengths (as a trained one does)")
    args = ap.parse_args(argv)
    if args.only == "http":
        sec = http_section(args)
        out = Path(args.out)
        result = json.loads(out.read_text()) if out.exists() else {"benchmark": "serve"}
        result["http_ask"] = {**sec, "device": args.device, "cpu_threads": torch.get_num_threads(),
                              "args": {k: v for k, v in vars(args).items() if k != "out"}}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        for r in sec["runs"]:
            print(f"http /v1/ask, {r['clients']} client(s), batching {r['batching']}: {r['requests_per_s']:.2f} req/s, "
                  f"latency p50 {r['latency_s']['p50']} s p95 {r['latency_s']['p95']} s, served by {r['served_by']}, "
                  f"{r['generate_calls']} window generate calls (mean batch {r['mean_batch']}), mean running together "
                  f"{r['mean_running_together']}, same answers {r['same_answers_as_first_run']}")
        print(f"serve http: throughput vs off by clients: window {sec['batched_vs_unbatched_throughput']}, continuous "
              f"{sec['continuous_vs_off_throughput']}; continuous vs window {sec['continuous_vs_window_throughput']} "
              f"(answer tokens {sec['answer_tokens']}; {args.device}, Llama {args.layers}x{args.hidden})")
        return result
    import logging

    logging.getLogger("medmm.pacs").setLevel(logging.WARNING)
    from medmm.config import DecodingConfig
    from medmm.serve.study import ReportConfig, ReportPipeline

    senders = [int(x) for x in args.senders.split(",")]
    if args.sender == "storescu" and not shutil.which("storescu"):
        raise SystemExit("storescu not found: apt-get install dcmtk, or run with --sender pynetdicom")
    with tempfile.TemporaryDirectory(prefix="medmm-bench-serve-") as d:
        tmp = Path(d)
        ckpt = build_checkpoint(tmp, args.hidden, args.layers)
        pipeline = ReportPipeline(ckpt, ReportConfig(decoding=DecodingConfig(max_new_tokens=args.new_tokens)),
                                  device=args.device)
        warm = make_studies(tmp / "warm", 2, args.instances)
        warm_up = threading.Thread(target=lambda: [pipeline.run(s[0].parent) for s in warm])  # imports, first calls
        warm_up.start()
        warm_up.join()
        direct = run_direct(pipeline, make_studies(tmp / "direct", args.studies, args.instances), args)
        runs, batched = [], []
        for n, k in zip(senders, itertools.count()):  # the same studies unbatched, then batched
            studies = make_studies(tmp / f"s{k}", args.studies, args.instances)
            runs.append(run_listener(pipeline, studies, n, args, tmp, max_batch=1))
            batched.append(run_listener(pipeline, studies, n, args, tmp, max_batch=args.listener_max_batch))
    speedup = {str(u["senders"]): round(b["studies_per_min"] / u["studies_per_min"], 3)
               for u, b in zip(runs, batched) if u["studies_per_min"]}
    result = {
        "benchmark": "serve",
        "what": "studies/min through the DIMSE listener (receive, collect until time-out, infer, write SR, C-STORE "
                "the SR to a sink) vs the same pipeline called directly on the same kind of studies",
        "device": args.device, "cpu_threads": torch.get_num_threads(), "machine": platform.machine(),
        "python": platform.python_version(), "torch": torch.__version__, "args": vars(args),
        "model": f"random Llama {args.layers}x{args.hidden} + vit2d_tiny (64 px), greedy, {args.new_tokens} tokens",
        "direct": direct, "listener": runs,
        "ratio_listener_vs_direct": {str(r["senders"]): round(r["studies_per_min"] / direct["studies_per_min"], 3)
                                     for r in runs},
        "listener_batched": batched,
        "batched_speedup_by_senders": speedup,
        "batched_speedup_vs_unbatched": speedup.get(str(max(senders))),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # other sections' figures in the file (e.g. ``http_ask`` from --only http) stay
    result = {**(json.loads(out.read_text()) if out.exists() else {}), **result}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"direct pipeline: {direct['studies_per_min']:.1f} studies/min ({direct['per_study_s_median']:.3f} s/study)")
    for r in runs:
        lat = r["latency_s"] or {}
        print(f"listener, {r['senders']} sender(s): {r['studies_per_min']:.1f} studies/min, {r['studies_ok']}/"
              f"{r['studies_sent']} ok, SRs at sink {r['srs_received_by_sink']}, queue-full retries "
              f"{r['queue_full_retries']}, latency p50 {lat.get('p50')} s p95 {lat.get('p95')} s")
    for u, b in zip(runs, batched):
        lat = b["latency_s"] or {}
        print(f"listener, {b['senders']} sender(s), max_batch {b['max_batch']}: {b['studies_per_min']:.1f} studies/min "
              f"({speedup.get(str(b['senders']))}x max_batch 1's {u['studies_per_min']:.1f}), {b['studies_ok']}/"
              f"{b['studies_sent']} ok, worker batches {b['worker_batches']}, latency p50 {lat.get('p50')} s p95 "
              f"{lat.get('p95')} s")
    print(f"  wrote {out}")
    best = max(runs, key=lambda r: r["studies_per_min"])
    print(f"serve: {best['studies_per_min']:.0f} studies/min through the DIMSE listener with {best['senders']} "
          f"concurrent sender(s) ({best['studies_per_min'] / direct['studies_per_min']:.2f}x the direct pipeline's "
          f"{direct['studies_per_min']:.0f}/min; {args.device}, Llama {args.layers}x{args.hidden}); batched "
          f"(max_batch {args.listener_max_batch}) vs max_batch 1 at {max(senders)} sender(s): "
          f"{result['batched_speedup_vs_unbatched']}x")
    return result


if __name__ == "__main__":
    main()
