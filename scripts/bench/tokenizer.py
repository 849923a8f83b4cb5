"""Tokenizer throughput: cnclip vs cn_clip 1.6.0, same machine, one run, one thread each.

    .venv/bin/python scripts/bench/tokenizer.py [--lines 200000] [--cnclip target/release/cnclip]

The reference time is `cn_clip.clip.tokenize(texts)` called in-process on the whole list (no
I/O, no import: its best case). The cnclip time is the `cnclip tokenize` process reading
stdin, tokenizing and writing every row as JSON; it is reported whole and less the process
start-up (measured on empty input; `cnclip` links no libtorch), which is the comparable figure.
Both see the same texts.
"""
import argparse
import random
import subprocess
import sys
import tempfile
import time

SUBJECTS = ["一只猫", "两只狗", "一个小女孩", "红色的汽车", "蓝色的大圆形", "穿着白色衬衫的男人", "iPhone 15", "NBA球星"]
PLACES = ["在草地上", "在海边", "在城市街道上", "在厨房里", "在左上角", "on the beach", "在雪山前"]
ACTIONS = ["玩耍", "奔跑", "休息", "拍照", "吃东西", "playing frisbee", "看书"]
EXTRAS = ["。", "！", "，阳光明媚。", "（高清图片）", "，价格￥1,299。", " 😊", ", very cute!"]


def captions(n, seed=0):
    rng = random.Random(seed)
    return [rng.choice(SUBJECTS) + rng.choice(PLACES) + rng.choice(ACTIONS) + rng.choice(EXTRAS) for _ in range(n)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--cnclip", default="target/release/cnclip")
    parser.add_argument("--context-length", type=int, default=52)
    args = parser.parse_args()

    import torch
    torch.set_num_threads(1)
    from cn_clip.clip import tokenize

    texts = captions(args.lines)
    start = time.perf_counter()
    reference = tokenize(texts, context_length=args.context_length)
    reference_s = time.perf_counter() - start

    def run_cnclip(stdin_path):
        with open(stdin_path, "rb") as stdin, tempfile.TemporaryFile() as out:
            start = time.perf_counter()
            subprocess.run([args.cnclip, "tokenize", "--context-length", str(args.context_length)],
                           stdin=stdin, stdout=out, check=True)
            elapsed = time.perf_counter() - start
            out.seek(0)
            return elapsed, out.readline().decode()

    startup_s = min(run_cnclip("/dev/null")[0] for _ in range(3))
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
        f.write("\n".join(texts) + "\n")
        f.flush()
        ours_s, first = run_cnclip(f.name)
    assert first.strip() == str(reference[0].tolist()), "cnclip and cn_clip disagree on the first row"

    n = len(texts)
    print(f"texts: {n}, context length {args.context_length}")
    print(f"cn_clip.clip.tokenize (in-process, 1 thread): {reference_s:8.2f} s  {n / reference_s:12,.0f} texts/s")
    print(f"cnclip tokenize (whole process, JSON out):    {ours_s:8.2f} s  {n / ours_s:12,.0f} texts/s")
    work_s = ours_s - startup_s
    print(f"cnclip tokenize less start-up ({startup_s:.2f} s):        {work_s:8.2f} s  {n / work_s:12,.0f} texts/s")
    print(f"ratio, whole process: {reference_s / ours_s:.1f}x; less start-up: {reference_s / work_s:.1f}x")


if __name__ == "__main__":
    sys.exit(main())
