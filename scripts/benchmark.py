"""Training-step speed and memory of the pretraining model, on synthetic batches (no data loading).

    python scripts/benchmark.py --config configs/Pretrain.yaml --batch 4 --device cpu --amp fp32
    python scripts/benchmark.py --config configs/Pretrain.yaml --batch 64 --matrix   # fp32/bf16 x cpu/cuda

One full optimizer step = forward (ITC, ITM, MLM, momentum update, queue) + backward + AdamW.
Each setting of `--matrix` runs in its own process so the peak memory of one does not hide another's.
Weights are random (speed does not depend on them); captions are 8-25 random word pieces.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils  # noqa: E402
from models.albef import ALBEF, build_bert_config  # noqa: E402
from Pretrain import PretrainConfig  # noqa: E402


def synthetic_batch(cfg, batch: int, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    L = 25
    lengths = torch.randint(8, L + 1, (batch,), generator=g)
    ids = torch.randint(1000, 29000, (batch, L), generator=g)
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    ids = ids * mask
    ids[:, 0] = 101
    image = torch.randn(batch, 3, cfg.image_res, cfg.image_res, generator=g)
    return {"image": image.to(device), "input_ids": ids.to(device), "attention_mask": mask.to(device)}


def run_one(args) -> dict:
    cfg, _ = utils.load_config(args.config, list(args.opts), PretrainConfig)
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    queue = max(args.batch, cfg.queue_size // args.batch * args.batch)
    cfg.queue_size = queue
    model = ALBEF(cfg, build_bert_config(cfg)).to(device).train()
    optimizer = utils.build_optimizer(model, cfg.optimizer)
    batch = synthetic_batch(cfg, args.batch, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        with utils.autocast_context(args.amp, device):
            out = model(**batch, alpha=cfg.alpha)
        sum(v for k, v in out.items() if k.startswith("loss")).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    elapsed = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"config": os.path.basename(args.config), "device": device.type, "amp": args.amp, "batch": args.batch,
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "step_s": elapsed / args.steps, "samples_per_s": args.batch * args.steps / elapsed,
            "peak_mem_gib": peak / 2**30,
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/Pretrain.yaml")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--matrix", action="store_true", help="fp32 and bf16 on CPU and, if present, CUDA")
    p.add_argument("--json", action="store_true", help="print one JSON line (used by --matrix)")
    p.add_argument("--opts", nargs="*", default=["text_encoder=null", "vit_init=null"])
    args = p.parse_args(argv)
    if not args.matrix:
        result = run_one(args)
        print(json.dumps(result) if args.json else result)
        return
    devices = ["cpu"] + ["cuda"] * torch.cuda.is_available()
    rows = []
    for device in devices:
        for amp in ("fp32", "bf16"):
            cmd = [sys.executable, os.path.abspath(__file__), "--config", args.config, "--batch", str(args.batch),
                   "--device", device, "--amp", amp, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--threads", str(args.threads), "--json", "--opts", *args.opts]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                print(res.stderr[-2000:], file=sys.stderr)
                continue
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(f"{'config':<22}{'device':<8}{'amp':<6}{'batch':>6}{'step s':>9}{'samples/s':>11}{'peak GiB':>10}")
    for r in rows:
        print(f"{r['config']:<22}{r['device']:<8}{r['amp']:<6}{r['batch']:>6}{r['step_s']:>9.3f}"
              f"{r['samples_per_s']:>11.2f}{r['peak_mem_gib']:>10.2f}")


if __name__ == "__main__":
    main()
