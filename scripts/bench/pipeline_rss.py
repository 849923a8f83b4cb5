"""Peak memory of a streaming pipeline: decode → preprocess → Parquet over a small and a large
corpus (default 10k and 100k synthetic images), one run each, same machine. Streaming means the
peak RSS must not grow with the corpus: the goal is the large run within 10% of the small one.

    .venv/bin/python scripts/bench/pipeline_rss.py [--small 10000] [--large 100000]
        [--resolution 224] [--work /tmp/cnclip-bench-rss] [--cnclip target/release/cnclip]

Corpora come from `cnclip synth` (96×96 JPEG shapes) and are kept in --work. Peak RSS is the
child's ru_maxrss (os.wait4); the outputs are deleted after each run.
"""
import argparse
import os
import subprocess
import sys
import time

PIPELINE = """
[job]
quarantine = "{out}/quarantine.jsonl"

[nodes.imgs]
kind = "tsv"
paths = ["{data}/train_imgs.tsv"]

[nodes.decoded]
kind = "decode_base64"
input = "imgs"

[nodes.pixels]
kind = "preprocess"
input = "decoded"
resolution = {resolution}

[nodes.out]
kind = "write_parquet"
input = "pixels"
path = "{out}/pixels.parquet"
"""


def corpus(cnclip, work, n):
    data = os.path.join(work, f"synth-{n}")
    if not os.path.exists(os.path.join(data, ".complete")):
        subprocess.run([cnclip, "synth", "--out", data, "--train", str(n), "--valid", "0", "--test", "0",
                        "--zeroshot-per-class", "1"], check=True, capture_output=True)
        open(os.path.join(data, ".complete"), "w").close()
    return data


def run(cnclip, work, data, n, resolution):
    out = os.path.join(work, f"out-{n}")
    os.makedirs(out, exist_ok=True)
    pipeline = os.path.join(work, f"pipeline-{n}.toml")
    with open(pipeline, "w") as f:
        f.write(PIPELINE.format(data=data, out=out, resolution=resolution))
    start = time.perf_counter()
    child = subprocess.Popen([cnclip, "run", pipeline], stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    log = child.stderr.read()
    if status != 0:
        sys.exit(f"cnclip run failed:\n{log}")
    size = os.path.getsize(os.path.join(out, "pixels.parquet"))
    for name in os.listdir(out):
        os.remove(os.path.join(out, name))
    return usage.ru_maxrss / 1024, seconds, size


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", type=int, default=10_000)
    p.add_argument("--large", type=int, default=100_000)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--work", default="/tmp/cnclip-bench-rss")
    p.add_argument("--cnclip", default="target/release/cnclip")
    args = p.parse_args()
    os.makedirs(args.work, exist_ok=True)
    results = {}
    for n in (args.small, args.large):
        data = corpus(args.cnclip, args.work, n)
        rss, seconds, size = run(args.cnclip, args.work, data, n, args.resolution)
        results[n] = rss
        print(f"{n:>8} images: peak RSS {rss:8.1f} MiB, {seconds:6.1f} s ({n / seconds:6.0f} images/s), "
              f"{size / 2**20:8.1f} MiB of Parquet ({args.resolution}² pixels)")
    ratio = results[args.large] / results[args.small]
    print(f"peak RSS {args.large} / {args.small} images: {ratio:.3f} (goal ≤ 1.10: {'met' if ratio <= 1.10 else 'NOT met'})")


if __name__ == "__main__":
    main()
