"""Training throughput on the CPU: `cnclip train` vs cn_clip's own modules driven by a Python loop
that does what cn_clip's `training/train.py` does per step, same tiny model config, batch, data,
workers and steps, fp32 (or both under bf16 autocast), one run each.

    .venv/bin/python scripts/bench/train.py [--batch-size 32] [--steps 200] [--warmup-steps 5]
        [--samples 0] [--num-workers 2] [--precision fp32|bf16] [--cnclip target/release/cnclip]
        [--work /tmp/cnclip-bench-train]

Data: `cnclip synth` (96×96 JPEGs, short Chinese captions) + `cnclip build-lmdb`, read by both
sides from the same cn_clip LMDB split. Per sample both do the same work: LMDB read, base64
decode, JPEG decode, Resize(64, bicubic) + normalise, tokenize to --context-length 24.

The reference loop (a subprocess of this script): `cn_clip.clip.model.CLIP(**model_info)`,
`cn_clip.training.data.LMDBDataset("train", use_augment False)` padded as `get_dataset` pads it,
with the DistributedSampler of `get_dataset` (one replica, shuffled with the seed) and a torch
DataLoader of --num-workers worker processes; AdamW with main.py's two parameter groups,
`cosine_lr`; per step `scheduler(step)`, `zero_grad`, cn_clip's `get_loss` (aggregate off),
`backward`, `step`, the logit_scale clamp. No DDP wrapper and no process group: one replica,
world size 1 (cn_clip would wrap even one process in DDP). Our side: `cnclip train --precision
fp32`, random initial weights, no validation, no checkpoints inside the timed steps. With
`--precision bf16` the reference's `get_loss` runs under `torch.autocast("cpu", torch.bfloat16)`
(cn_clip's `--precision amp` with a CPU autocast) and ours with `--precision bf16`.

Timing, the same on both sides: the wall time from the end of one step to the end of the next
(data wait included, as cn_clip's "Batch Time" counts it), summed over the steps after the first
--warmup-steps; steps/s = timed steps / that sum. Start-up (imports, model build, first
batches, worker start) falls in the skipped steps. For cnclip, each step's interval is
batch / `samples_per_s` of its per-step metrics row (`--log-interval 1`: the rate is measured
from one step's log to the next). By default --samples is batch × steps, so the run is one
epoch and no epoch boundary (pipeline restart, epoch_latest.pt save) falls among the timed steps.
torch's thread count is left at its default on both sides.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
HARNESS_DIR = os.path.join(HERE, "..", "..", "tests", "reference")
TINY = {
    "embed_dim": 64, "image_resolution": 64, "vision_layers": 2, "vision_width": 128, "vision_patch_size": 16,
    "vocab_size": 21128, "text_attention_probs_dropout_prob": 0.1, "text_hidden_act": "gelu",
    "text_hidden_dropout_prob": 0.1, "text_hidden_size": 128, "text_initializer_range": 0.02,
    "text_intermediate_size": 256, "text_max_position_embeddings": 64, "text_num_attention_heads": 2,
    "text_num_hidden_layers": 2, "text_type_vocab_size": 2,
}
LR, BETA1, BETA2, EPS, WD, WARMUP_LR, CONTEXT, SEED = 1e-3, 0.9, 0.98, 1e-6, 0.2, 4, 24, 123


def corpus(work, cnclip, n):
    data = os.path.join(work, f"corpus{n}")
    split = os.path.join(data, "lmdb", "train")
    if not os.path.exists(os.path.join(split, "pairs", "data.mdb")):
        subprocess.run([cnclip, "synth", "--out", data, "--train", str(n), "--valid", "32", "--test", "4"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run([cnclip, "build-lmdb", "--data-dir", data, "--splits", "train,valid"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return split


def steady(intervals, warmup):
    timed = intervals[warmup:]
    return len(timed) / sum(timed), len(timed)


def reference_loop(args):
    """cn_clip's modules, one replica; prints the per-step intervals as JSON."""
    import types
    import torch
    import torch.nn as nn
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler
    sys.path.insert(0, HARNESS_DIR)
    from cnclip_ref import install_cpu_shim, model_info
    from cn_clip.clip.model import CLIP
    from cn_clip.training.data import LMDBDataset, pad_dataset
    from cn_clip.training.scheduler import cosine_lr
    from cn_clip.training.train import get_loss

    install_cpu_shim()  # get_loss moves its labels with .cuda(local_device_rank)
    torch.manual_seed(SEED)
    with open(args.config) as f:
        info = model_info(json.load(f))
    model = CLIP(**info).float()
    model.train()
    dataset = LMDBDataset(args.train_data, split="train", max_txt_length=CONTEXT, use_augment=False,
                          resolution=info["image_resolution"])
    pad_dataset(dataset, args.batch_size)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=SEED)
    loader = DataLoader(dataset, batch_size=args.batch_size, pin_memory=False, num_workers=args.num_workers,
                        sampler=sampler)
    exclude = lambda n: "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n) and p.requires_grad], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n) and p.requires_grad], "weight_decay": WD}],
        lr=LR, betas=(BETA1, BETA2), eps=EPS)
    scheduler = cosine_lr(optimizer, LR, WARMUP_LR, args.steps)
    loss_img, loss_txt = nn.CrossEntropyLoss(), nn.CrossEntropyLoss()
    loss_args = types.SimpleNamespace(accum_freq=1, mask_ratio=0.0, distillation=False, aggregate=False,
                                      report_training_batch_acc=False, local_device_rank=0)
    epoch = 0
    sampler.set_epoch(epoch)
    batches = iter(loader)
    marks = [time.perf_counter()]
    for step in range(args.steps):
        try:
            images, texts, _eos = next(batches)
        except StopIteration:  # a new epoch, as train.py's caller starts one
            epoch += 1
            sampler.set_epoch(epoch)
            batches = iter(loader)
            images, texts, _eos = next(batches)
        scheduler(step)
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            total_loss, _acc = get_loss(model, images, texts, loss_img, loss_txt, loss_args)
        total_loss.backward()
        optimizer.step()
        model.logit_scale.data = torch.clamp(model.logit_scale.data, 0, 4.6052)
        marks.append(time.perf_counter())
    print(json.dumps({"intervals": [b - a for a, b in zip(marks, marks[1:])], "loss": total_loss.item(),
                      "threads": torch.get_num_threads()}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup-steps", type=int, default=5, help="first steps left out of the timing")
    p.add_argument("--samples", type=int, default=0, help="training pairs (default batch × steps: one epoch)")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader processes / cnclip pipeline threads")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="fp32 on both sides, or bf16 autocast on both")
    p.add_argument("--cnclip", default="target/release/cnclip")
    p.add_argument("--work", default="/tmp/cnclip-bench-train")
    p.add_argument("--reference-loop", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--train-data", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.reference_loop:
        return reference_loop(args)
    if args.steps <= args.warmup_steps:
        sys.exit("--steps must exceed --warmup-steps")
    cnclip = os.path.abspath(args.cnclip)
    os.makedirs(args.work, exist_ok=True)
    samples = args.samples or args.batch_size * args.steps
    split = corpus(args.work, cnclip, samples)
    config = os.path.join(args.work, "tiny.json")
    with open(config, "w") as f:
        json.dump(TINY, f)

    ref_cmd = [sys.executable, os.path.abspath(__file__), "--reference-loop", "--train-data", split, "--config", config,
               "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--num-workers", str(args.num_workers),
               "--precision", args.precision]
    start = time.perf_counter()
    out = subprocess.run(ref_cmd, check=True, capture_output=True, text=True)
    ref_wall = time.perf_counter() - start
    ref = json.loads(out.stdout.strip().splitlines()[-1])
    ref_rate, timed = steady(ref["intervals"], args.warmup_steps)

    logs = os.path.join(args.work, "logs")
    subprocess.run(["rm", "-rf", os.path.join(logs, "bench")], check=True)
    ours_cmd = [cnclip, "train", "--train-data", split, "--model-config", config, "--batch-size", str(args.batch_size),
                "--max-steps", str(args.steps), "--lr", str(LR), "--beta1", str(BETA1), "--beta2", str(BETA2),
                "--eps", str(EPS), "--wd", str(WD), "--warmup", str(WARMUP_LR), "--context-length", str(CONTEXT),
                "--num-workers", str(args.num_workers), "--logs", logs, "--name", "bench", "--log-interval", "1",
                "--valid-epoch-interval", "0", "--save-epoch-frequency", "0", "--precision", args.precision,
                "--seed", str(SEED)]
    start = time.perf_counter()
    subprocess.run(ours_cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ours_wall = time.perf_counter() - start
    import pyarrow.parquet as pq
    rows = pq.read_table(os.path.join(logs, "bench", "metrics.parquet")).to_pylist()
    rows = sorted((r for r in rows if r["kind"] == "train"), key=lambda r: r["step"])
    if len(rows) != args.steps:
        sys.exit(f"cnclip train logged {len(rows)} steps, expected {args.steps}")
    ours_rate, _ = steady([args.batch_size / r["samples_per_s"] for r in rows], args.warmup_steps)

    epochs = -(-args.steps * args.batch_size // samples)
    print(f"training, CPU {args.precision}, {os.cpu_count()} cores (torch threads: default, {ref['threads']} in the reference); "
          f"tiny ViT/RoBERTa (embed 64, image 64/patch 16, 2+2 layers of width 128, context {CONTEXT})")
    print(f"  batch {args.batch_size}, {args.steps} steps ({epochs} epoch{'s' if epochs > 1 else ''} of {samples} "
          f"pairs), {args.num_workers} workers; steady steps/s over steps {args.warmup_steps + 1}-{args.steps} "
          f"({timed} steps); {cnclip}")
    print(f"  cn_clip (python loop): {ref_rate:7.2f} steps/s  ({ref_rate * args.batch_size:7.1f} samples/s; "
          f"whole run {ref_wall:5.1f} s incl. start-up)")
    print(f"  cnclip train:          {ours_rate:7.2f} steps/s  ({ours_rate * args.batch_size:7.1f} samples/s; "
          f"whole run {ours_wall:5.1f} s incl. start-up)")
    print(f"  ratio cnclip/cn_clip: {ours_rate / ref_rate:.2f}x (goal >= 1.0x)")


if __name__ == "__main__":
    main()
