"""Peak extra memory of the final ZeRO-3 save: every parameter gathered at once (the former ``save_final_model``)
against module-by-module gathers streamed into safetensors shards (``medmm.training.checkpoint.save_final_model``).

A Llama-shaped model of about 300M parameters (random weights, built under ``deepspeed.zero.Init`` so no rank ever
holds it whole) is partitioned over 2 ranks (torchrun, gloo on CPU or NCCL on GPU; ZeRO-3, no optimizer: the save
only reads parameters). Each mode runs in fresh processes; a thread samples each rank's ``VmRSS`` and ``RssAnon``
(anonymous memory: what the save allocates, without file pages such as the memory-mapped shards) every 5 ms, and
the extra memory is the peak during the save minus the value just before it. Writes ``bench/results/zero3_save.json``.

Run::

    python bench/zero3_save.py                 # both modes, 2 ranks, ~323M parameters
    python bench/zero3_save.py --layers 2      # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon"):
            out[k] = int(v.split()[0]) * 1024
    return out


class _Peak(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.base = _status()
        self.peak = dict(self.base)
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            for k, v in _status().items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(0.005)

    def extra_mb(self) -> dict[str, float]:
        return {k: (self.peak[k] - self.base[k]) / 2**20 for k in self.base}


def worker(a) -> None:
    """One rank: build the partitioned model, save it in mode ``a.mode``, print a JSON line."""
    from medmm.training.distributed import init_distributed

    rank, world, _ = init_distributed()
    import deepspeed
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from medmm.training import checkpoint

    class Wrapped(torch.nn.Module):  # what save_final_model needs of a model: save_pretrained(out, extra=...)
        def __init__(self, llm):
            super().__init__()
            self.llm = llm

        def save_pretrained(self, out, extra=None):
            self.llm.save_pretrained(out, state_dict=self.llm.state_dict(), safe_serialization=True)
            Path(out, "extra.json").write_text(json.dumps(extra or {}))

    c = LlamaConfig(vocab_size=32000, hidden_size=a.hidden, intermediate_size=a.intermediate,
                    num_hidden_layers=a.layers, num_attention_heads=16, num_key_value_heads=16)
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = Wrapped(LlamaForCausalLM(c))
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    n = sum(p.ds_numel for p in model.parameters())
    torch.distributed.barrier()
    mon = _Peak()
    mon.start()
    t0 = time.perf_counter()
    if a.mode == "at_once":
        checkpoint.save_final_model_gathered_at_once(model, a.out)
    else:
        checkpoint.save_final_model(engine, model, a.out, zero_stage=3, max_shard_bytes=a.shard_mb << 20)
    dt = time.perf_counter() - t0
    mon.stop.set()
    mon.join()
    extra = mon.extra_mb()
    rows = [None] * world
    torch.distributed.all_gather_object(rows, {"rank": rank, **extra})
    if rank == 0:
        print("RESULT " + json.dumps({"mode": a.mode, "params": n, "seconds": dt, "ranks": rows}), flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--shard-mb", type=int, default=256, help="streamed save: max pending MB per shard")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["at_once", "streamed"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "zero3_save.json"))
    a = ap.parse_args(argv)
    if a.worker:
        worker(a)
        return
    from medmm.training.distributed import free_port

    # A fixed mmap threshold: glibc otherwise raises it after each large free, so freed gather buffers stay in the
    # heap and RSS would report allocator fragmentation rather than what the save holds (same for both modes).
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               MALLOC_MMAP_THRESHOLD_="131072")
    res = {}
    for mode in ("at_once", "streamed"):
        with tempfile.TemporaryDirectory() as d:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={a.nproc}",
                   f"--master_port={free_port()}", __file__, "--worker", "--mode", mode, "--out", f"{d}/model",
                   "--layers", str(a.layers), "--hidden", str(a.hidden), "--intermediate", str(a.intermediate),
                   "--shard-mb", str(a.shard_mb)]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
            if r.returncode:
                raise SystemExit(f"{mode}: rank failed\n{r.stderr[-3000:]}")
            line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
            res[mode] = json.loads(line[len("RESULT "):])
            print(mode, json.dumps(res[mode]), flush=True)
    out = {"params": res["at_once"]["params"], "ranks": a.nproc, "command": " ".join(["python", "bench/zero3_save.py",
                                                                                     *(argv or sys.argv[1:])]),
           "peak_extra_mb": {m: {k: max(r[k] for r in res[m]["ranks"]) for k in ("VmRSS", "RssAnon")} for m in res},
           "seconds": {m: res[m]["seconds"] for m in res}, "per_rank": {m: res[m]["ranks"] for m in res}}
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    Path(a.results).write_text(json.dumps(out, indent=2))
    print(f"params {out['params']:,}: peak extra RSS per rank (max over ranks) "
          f"{out['peak_extra_mb']['at_once']['VmRSS']:.0f} MB at once -> "
          f"{out['peak_extra_mb']['streamed']['VmRSS']:.0f} MB streamed (anon "
          f"{out['peak_extra_mb']['at_once']['RssAnon']:.0f} -> {out['peak_extra_mb']['streamed']['RssAnon']:.0f} MB)")


if __name__ == "__main__":
    main()
