"""Peak memory of `cnclip train` with and without `--grad-checkpointing`: a ViT-B-16-sized vision
tower (ViT-B-16@RBT3-chinese, random weights, 224 px), batch 64, CPU fp32, a few steps.

    .venv/bin/python scripts/bench/grad_checkpointing.py [--batch-size 64] [--steps 2] [--runs 1]
        [--vision-model ViT-B-16] [--text-model RBT3-chinese] [--cnclip target/release/cnclip]
        [--work /tmp/cnclip-bench-ckpt]

Each run is its own process; its peak RSS is its `ru_maxrss`, read by a wrapper process that
runs nothing else. The step time is the run's mean over its steps after the first (from
`metrics.parquet`'s samples/s). Data: `cnclip synth` pairs in an LMDB split (as
`scripts/bench/train.py` makes them), resized to 224 by the pipeline.
"""
import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import corpus  # noqa: E402

WRAP = """
import json, resource, subprocess, sys
ran = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
print(json.dumps({"code": ran.returncode, "stderr": ran.stderr[-2000:],
                  "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def run(args, split, logs, name, checkpointed):
    cmd = [os.path.abspath(args.cnclip), "train", "--train-data", split, "--vision-model", args.vision_model,
           "--text-model", args.text_model, "--batch-size", str(args.batch_size), "--max-steps", str(args.steps),
           "--context-length", "24", "--num-workers", "2", "--logs", logs, "--name", name, "--log-interval", "1",
           "--valid-epoch-interval", "0", "--save-epoch-frequency", "0", "--precision", "fp32", "--seed", "1"]
    if checkpointed:
        cmd.append("--grad-checkpointing")
    subprocess.run(["rm", "-rf", os.path.join(logs, name)], check=True)
    out = subprocess.run([sys.executable, "-c", WRAP, *cmd], check=True, capture_output=True, text=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    if report["code"] != 0:
        sys.exit(f"cnclip train failed ({report['code']}): {report['stderr']}")
    import pyarrow.parquet as pq
    rows = pq.read_table(os.path.join(logs, name, "metrics.parquet")).to_pylist()
    rows = sorted((r for r in rows if r["kind"] == "train"), key=lambda r: r["step"])
    timed = rows[1:] or rows
    seconds = sum(args.batch_size / r["samples_per_s"] for r in timed) / len(timed)
    return report["maxrss_kib"] / 1024, seconds


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--runs", type=int, default=1, help="runs of each (the range is printed)")
    p.add_argument("--vision-model", default="ViT-B-16")
    p.add_argument("--text-model", default="RBT3-chinese")
    p.add_argument("--cnclip", default="target/release/cnclip")
    p.add_argument("--work", default="/tmp/cnclip-bench-ckpt")
    args = p.parse_args()
    os.makedirs(args.work, exist_ok=True)
    split = corpus(args.work, os.path.abspath(args.cnclip), args.batch_size * args.steps)
    logs = os.path.join(args.work, "logs")
    results = {False: [], True: []}
    for _ in range(args.runs):
        for checkpointed in (False, True):
            results[checkpointed].append(run(args, split, logs, f"ckpt{int(checkpointed)}", checkpointed))
    print(f"--grad-checkpointing, CPU fp32, {args.vision_model}@{args.text_model}, batch {args.batch_size}, "
          f"{args.steps} steps, {args.runs} run(s) each; {args.cnclip}")
    for checkpointed, label in ((False, "without"), (True, "with   ")):
        rss = [r for r, _ in results[checkpointed]]
        step = [s for _, s in results[checkpointed]]
        print(f"  {label}: peak RSS {min(rss):8.0f}-{max(rss):8.0f} MiB, step {min(step):6.1f}-{max(step):6.1f} s")
    lower = [1 - c[0] / p[0] for p, c in zip(results[False], results[True])]
    slower = [c[1] / p[1] for p, c in zip(results[False], results[True])]
    print(f"  peak RSS lower by {100 * min(lower):.1f}-{100 * max(lower):.1f} %, step time x{min(slower):.2f}-"
          f"{max(slower):.2f}")


if __name__ == "__main__":
    main()
