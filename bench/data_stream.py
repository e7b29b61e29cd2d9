"""Input-pipeline benchmark: streaming webdataset shards (medmm.data.streaming) against today's readers.

1. Memory: resident-memory growth of the input pipeline between a 10k-record and a 1M-record dataset. Each run is
   a fresh process that reads every record once; growth = its peak RSS minus its RSS after imports. Streaming reads
   shards whose samples carry their conversation (``json``); the baseline is today's conversation JSONL, loaded
   whole by ``medmm.data.dataset.load_records`` (what ``ConversationDataset`` does on every rank).
   ``rss_growth_mb_10k_to_1m`` = streaming growth(1M) - growth(10k) (goal <= 100); ``rss_growth_mb_10k_to_1m_jsonl``
   the same for the JSONL.
2. Speed, one run each over ``--speed-samples`` (>= 20k) shard samples of a 32x32 float32 array (``npz``) + its
   conversation: ``samples_per_s_stream`` (the ``format: wds`` pipeline of the training stages,
   ``StreamBatches``: shuffle buffer 1000, records from each sample's ``json``, array decoded) against
   ``samples_per_s_offset`` (today: conversation JSONL in memory, each array read by tar offset with
   ``read_shard_array`` in shuffled order).

Writes ``bench/results/data_stream.json``. Run::

    python bench/data_stream.py                         # 10k and 1M records, 20k samples for speed
    python bench/data_stream.py --records 100000        # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def record(i: int) -> dict:
    """A conversation record of about 400 bytes of JSONL, like a VQA/report record."""
    return {"id": f"rec{i:08d}", "modalities": {"image": f"shard-{i // 1000:06d}.tar#s{i:08d}.npz"},
            "conversations": [{"from": "human", "value": "<image>\nIs there evidence of a pleural effusion on this "
                                                          "chest radiograph? Answer briefly and name the side."},
                              {"from": "gpt", "value": f"Case {i}: small left-sided pleural effusion with blunting "
                                                       "of the costophrenic angle; no pneumothorax; heart size normal."}]}


def write_data(folder: Path, n: int, arrays: bool, per_shard: int = 1000) -> None:
    """``n`` records as shards (conversation in each sample, + an npz when ``arrays``) and as JSONL."""
    import io

    import numpy as np
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arr = rng.standard_normal((32, 32)).astype(np.float32)
    with open(folder / "records.jsonl", "w") as jf:
        for s in range(0, n, per_shard):
            with wds.TarWriter(str(folder / f"shard-{s // per_shard:06d}.tar")) as w:
                for i in range(s, min(n, s + per_shard)):
                    rec = record(i)
                    sample = {"__key__": f"s{i:08d}", "json": json.dumps(rec).encode()}
                    if arrays:
                        buf = io.BytesIO()
                        np.savez(buf, arr=arr)
                        sample["npz"] = buf.getvalue()
                    w.write(sample)
                    jf.write(json.dumps(rec) + "\n")


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(kind: str, folder: str) -> dict:
    """Run in a fresh process: read every record once; peak RSS growth over the post-import baseline."""
    import resource
    import threading

    from medmm.data.dataset import load_records
    from medmm.data.streaming import SourceRecords, StreamBatches, expand_shards

    base = _rss()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    n = 0
    if kind == "jsonl":
        recs = load_records(Path(folder) / "records.jsonl")
        n = sum(1 for r in recs if r["conversations"])
    else:  # the training input pipeline of format wds, without the model: records streamed in micro-batches of 8
        urls = expand_shards(str(Path(folder) / "shard-*.tar"))
        total = sum(1 for _ in open(Path(folder) / "records.jsonl"))
        it = iter(StreamBatches([(urls, 1.0)], 8, SourceRecords({}), lambda r: r, list, shuffle_buffer=1000))
        while n < total:
            n += sum(bool(r["conversations"]) for r in next(it))
    dt = time.perf_counter() - t0
    stop.set()
    th.join()
    peak[0] = max(peak[0], _rss())
    return {"records": n, "seconds": dt, "growth_mb": (peak[0] - base) / 2**20,
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def speed(folder: Path) -> dict:
    from medmm.data.dataset import load_records
    from medmm.data.streaming import SourceRecords, StreamBatches, decoded, expand_shards
    from medmm.io.shards import read_shard_array

    urls = expand_shards(str(folder / "shard-*.tar"))
    n = sum(1 for _ in open(folder / "records.jsonl"))
    t0 = time.perf_counter()
    got = 0
    # the format-wds pipeline of the training stages: shuffle buffer 1000, records from each sample's json member,
    # its npz decoded when the record is loaded, micro-batches of 8
    it = iter(StreamBatches([(urls, 1.0)], 8, SourceRecords({}), decoded, list, shuffle_buffer=1000))
    while got < n:
        for r in next(it):
            got += r["modalities"]["image"].shape == (32, 32) and bool(r["conversations"])
    stream_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    recs = load_records(folder / "records.jsonl")
    random.Random(0).shuffle(recs)
    got = 0
    for r in recs:
        got += read_shard_array(r["modalities"]["image"], folder).shape == (32, 32)
    offset_s = time.perf_counter() - t0
    assert got == n
    return {"speed_samples": n, "samples_per_s_stream": got / stream_s, "samples_per_s_offset": n / offset_s,
            "stream_over_offset": (got / stream_s) / (n / offset_s)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--speed-samples", type=int, default=20_000)
    ap.add_argument("--tmp", help="scratch folder (default: a temporary one; needs ~1.5 GB for 1M records)")
    ap.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "data_stream.json"))
    a = ap.parse_args(argv)
    if a.measure:
        print("RESULT " + json.dumps(measure(*a.measure)), flush=True)
        return
    with tempfile.TemporaryDirectory(dir=a.tmp) as d:
        d = Path(d)
        res: dict = {"command": " ".join(["python bench/data_stream.py", *(argv or sys.argv[1:])])}
        write_data(d / "speed", a.speed_samples, arrays=True)
        res.update(speed(d / "speed"))
        print({k: v for k, v in res.items() if k.startswith(("samples", "stream_over"))}, flush=True)
        Path(a.out + ".partial").write_text(json.dumps(res, indent=2))
        for n in (a.small, a.records):
            write_data(d / f"n{n}", n, arrays=False)
            for kind in ("stream", "jsonl"):
                r = subprocess.run([sys.executable, __file__, "--measure", kind, str(d / f"n{n}")], capture_output=True,
                                   text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
                if r.returncode:
                    raise SystemExit(r.stderr[-3000:])
                m = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))[7:])
                assert m["records"] >= n, m
                res[f"{kind}_{n}"] = m
                print(kind, n, m, flush=True)
                Path(a.out + ".partial").write_text(json.dumps(res, indent=2))
        res["rss_growth_mb_10k_to_1m"] = res[f"stream_{a.records}"]["growth_mb"] - res[f"stream_{a.small}"]["growth_mb"]
        res["rss_growth_mb_10k_to_1m_jsonl"] = (res[f"jsonl_{a.records}"]["growth_mb"]
                                                - res[f"jsonl_{a.small}"]["growth_mb"])
        res["records_small"], res["records_large"] = a.small, a.records
        res["rss_growth_ratio_jsonl_over_stream"] = (res["rss_growth_mb_10k_to_1m_jsonl"]
                                                     / max(res["rss_growth_mb_10k_to_1m"], 1.0))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    Path(a.out + ".partial").unlink(missing_ok=True)
    print(f"RSS growth {a.small:,} -> {a.records:,} records: streaming {res['rss_growth_mb_10k_to_1m']:.0f} MB, "
          f"JSONL {res['rss_growth_mb_10k_to_1m_jsonl']:.0f} MB; {res['speed_samples']:,} samples: "
          f"stream {res['samples_per_s_stream']:.0f}/s, offset reader {res['samples_per_s_offset']:.0f}/s "
          f"(stream/offset {res['stream_over_offset']:.2f}x; JSONL/stream RSS growth "
          f"{res['rss_growth_ratio_jsonl_over_stream']:.0f}x)")


if __name__ == "__main__":
    main()
