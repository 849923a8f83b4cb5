"""build-lmdb throughput: cnclip vs cn_clip's build_lmdb_dataset.py vs a plain copy, one run of
each per round (--repeat rounds, interleaved; medians and ranges printed), same machine, on the
same TSV/JSONL (default 20k 192×192 JPEGs of ~23 KB, ≈ 0.6 GB of TSV).

    .venv/bin/python scripts/bench/build_lmdb.py [--images 20000] [--work /tmp/cnclip-bench-lmdb]
        [--cnclip target/release/cnclip] [--repeat 4]

The corpus is generated once and kept in --work. MB/s is TSV+JSONL bytes / wall seconds. The
input is read once before each timed run, so the page cache is warm for all three; each output
goes to the same filesystem. Both builders sync their LMDB to disk at the end (cnclip writes its
values with O_DIRECT where the filesystem allows, so they are on disk as it goes) and `cp` does
not, so `cp + sync` is printed too.
"""
import argparse
import base64
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
from PIL import Image


def make_corpus(data, n):
    marker = os.path.join(data, f".complete-{n}-192")
    if os.path.exists(marker):
        return
    os.makedirs(data, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (192, 192, 3), dtype=np.uint8)
    with open(os.path.join(data, "train_imgs.tsv"), "w") as f:
        for i in range(n):
            noise = rng.integers(-40, 40, base.shape)
            image = Image.fromarray(np.clip(base.astype(int) + noise, 0, 255).astype(np.uint8))
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=75)
            f.write(f"{i}\t{base64.urlsafe_b64encode(buf.getvalue()).decode()}\n")
    with open(os.path.join(data, "train_texts.jsonl"), "w") as f:
        for t in range(n):
            f.write(json.dumps({"text_id": t, "text": f"第{t}张图片：一只可爱的小猫", "image_ids": [t, (t * 7) % n]}, ensure_ascii=False) + "\n")
    open(marker, "w").close()


def warm(paths):
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def timed(cmd, inputs, **kw):
    warm(inputs)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--work", default="/tmp/cnclip-bench-lmdb")
    p.add_argument("--cnclip", default="target/release/cnclip")
    p.add_argument("--repeat", type=int, default=4)
    args = p.parse_args()
    data = os.path.join(args.work, "data")
    make_corpus(data, args.images)
    size = sum(os.path.getsize(os.path.join(data, f)) for f in ("train_imgs.tsv", "train_texts.jsonl"))
    mb = size / 1e6

    inputs = [os.path.join(data, "train_imgs.tsv"), os.path.join(data, "train_texts.jsonl")]
    copy_dir = os.path.join(args.work, "copy")
    theirs = os.path.join(args.work, "theirs")
    ours = os.path.join(args.work, "ours")

    def fresh(path):
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run(["sync"], check=True)  # no writeback of the previous run competes

    def cp():
        fresh(copy_dir)
        os.makedirs(copy_dir)
        return timed(["cp", *inputs, copy_dir], inputs)

    def cp_sync():
        fresh(copy_dir)
        os.makedirs(copy_dir)
        return timed(["sh", "-c", f"cp {inputs[0]} {inputs[1]} {copy_dir} && sync"], inputs)

    def reference():
        fresh(theirs)
        return timed([sys.executable, "-m", "cn_clip.preprocess.build_lmdb_dataset", "--data_dir", data, "--splits", "train",
                      "--lmdb_dir", theirs], inputs)

    def cnclip():
        fresh(ours)
        return timed([args.cnclip, "build-lmdb", "--data-dir", data, "--splits", "train", "--lmdb-dir", ours], inputs)

    # Interleaved rounds, so a slow spell of the machine hits every contender alike, with the
    # order rotated each round, so no contender always runs right after the same one (a run
    # after the reference's 1.3 GB of synced writes is measurably slower here); medians.
    contenders = [("cp", cp), ("cp_sync", cp_sync), ("ref", reference), ("ours", cnclip)]
    runs = {name: [] for name, _ in contenders}
    for round in range(args.repeat):
        k = round % len(contenders)
        for name, run in contenders[k:] + contenders[:k]:
            runs[name].append(run())
    cp_s, cp_sync_s, ref_s, our_s = (statistics.median(runs[n]) for n in ("cp", "cp_sync", "ref", "ours"))
    spread = {n: f"{min(v):.2f}–{max(v):.2f}" for n, v in runs.items()}

    print(f"{args.images} images, {mb:.0f} MB of TSV+JSONL; median of {args.repeat} interleaved runs (range)")
    print(f"  cp (plain copy):            {cp_s:6.2f} s  {mb / cp_s:7.0f} MB/s  ({spread['cp']} s)")
    print(f"  cp + sync:                  {cp_sync_s:6.2f} s  {mb / cp_sync_s:7.0f} MB/s  ({spread['cp_sync']} s)")
    print(f"  build_lmdb_dataset.py:      {ref_s:6.2f} s  {mb / ref_s:7.0f} MB/s  ({spread['ref']} s)")
    print(f"  cnclip build-lmdb:          {our_s:6.2f} s  {mb / our_s:7.0f} MB/s  ({spread['ours']} s)")
    print(f"  cnclip vs cn_clip: {ref_s / our_s:.2f}x; cnclip time / cp time: {our_s / cp_s:.2f} "
          f"(/ cp + sync: {our_s / cp_sync_s:.2f}); goal >= 1.0x and <= 2")


if __name__ == "__main__":
    main()
