"""Decode + preprocess throughput per core: cnclip vs PIL + cn_clip's transform, one thread each,
same images (the first --limit lines of a cn_clip image TSV).

    .venv/bin/python scripts/bench/preprocess.py --tsv /tmp/cnclip-bench-lmdb/data/train_imgs.tsv [--limit 2000]

The reference is what cn_clip's datasets do per image: `urlsafe_b64decode`, `Image.open`,
`image_transform(224)` (Resize BICUBIC, RGB, ToTensor, Normalize), with torch on one thread.
"""
import argparse
import base64
import io
import re
import subprocess
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tsv", required=True)
    p.add_argument("--limit", type=int, default=2000)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--cnclip", default="target/release/cnclip")
    args = p.parse_args()

    import torch
    torch.set_num_threads(1)
    from PIL import Image
    from cn_clip.clip.utils import image_transform

    with open(args.tsv) as f:
        lines = [next(f) for _ in range(args.limit)]
    transform = image_transform(args.resolution)
    start = time.perf_counter()
    for line in lines:
        b64 = line.rstrip("\n").split("\t")[1]
        transform(Image.open(io.BytesIO(base64.urlsafe_b64decode(b64))))
    ref = len(lines) / (time.perf_counter() - start)

    out = subprocess.run([args.cnclip, "benchmark", "preprocess", "--tsv", args.tsv, "--limit", str(args.limit),
                          "--resolution", str(args.resolution)], check=True, capture_output=True, text=True).stdout
    ours = float(re.search(r"([\d.]+) images/s", out).group(1))
    print(f"{len(lines)} images, resolution {args.resolution}, 1 thread each")
    print(f"  PIL + cn_clip transform: {ref:8.1f} images/s")
    print(f"  cnclip:                  {ours:8.1f} images/s")
    print(f"  ratio: {ours / ref:.2f}x")


if __name__ == "__main__":
    main()
