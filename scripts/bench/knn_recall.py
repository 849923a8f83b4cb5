"""kNN + recall: cnclip vs cn_clip on the same feature files, one run each, same machine.

cn_clip: `make_topk_predictions.py` (through the CPU shim; its per-text Python loop) then
`evaluation.py`. cnclip: `make-topk-predictions` (FAISS Flat, exact inner product) then
`evaluation`. Inputs: --n images and --n texts of --dim random unit float32 features as cn_clip's
JSON lines, and a ground truth where each text has one image (its own index).

    .venv/bin/python scripts/bench/knn_recall.py [--n 10000] [--dim 512]
        [--cnclip target/release/cnclip] [--work /tmp/cnclip-bench-knn]

Prints each side's seconds (kNN, evaluation, total), the ratio, and whether both scores agree.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HARNESS = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "reference", "cnclip_ref.py")


def make_inputs(work, n, dim):
    marker = os.path.join(work, f".complete-{n}-{dim}")
    if os.path.exists(marker):
        return
    os.makedirs(work, exist_ok=True)
    rng = np.random.default_rng(0)
    def unit(m):
        x = rng.standard_normal((m, dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    images = unit(n)
    # Each text is its image plus noise, so recall is neither 0 nor 1.
    texts = images + 0.9 * unit(n) / np.sqrt(2)
    texts = (texts / np.linalg.norm(texts, axis=1, keepdims=True)).astype(np.float32)
    with open(os.path.join(work, "img.jsonl"), "w") as f:
        for i, v in enumerate(images):
            f.write(json.dumps({"image_id": i, "feature": v.tolist()}) + "\n")
    with open(os.path.join(work, "txt.jsonl"), "w") as f:
        for i, v in enumerate(texts):
            f.write(json.dumps({"text_id": i, "feature": v.tolist()}) + "\n")
    with open(os.path.join(work, "truth.jsonl"), "w") as f:
        for i in range(n):
            f.write(json.dumps({"text_id": i, "text": f"t{i}", "image_ids": [i]}) + "\n")
    open(marker, "w").close()


def timed(cmd, cwd):
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--cnclip", default="target/release/cnclip")
    p.add_argument("--work", default="/tmp/cnclip-bench-knn")
    args = p.parse_args()
    make_inputs(args.work, args.n, args.dim)
    cnclip = os.path.abspath(args.cnclip)
    w = args.work
    knn_ref = timed([sys.executable, HARNESS, "run-module", "cn_clip.eval.make_topk_predictions", "--image-feats", "img.jsonl",
                     "--text-feats", "txt.jsonl", "--top-k", "10", "--output", "ref_pred.jsonl"], w)
    eval_ref = timed([sys.executable, "-m", "cn_clip.eval.evaluation", "truth.jsonl", "ref_pred.jsonl", "ref_score.json"], w)
    knn_ours = timed([cnclip, "make-topk-predictions", "--image-feats", "img.jsonl", "--text-feats", "txt.jsonl",
                      "--top-k", "10", "--output", "our_pred.jsonl"], w)
    eval_ours = timed([cnclip, "evaluation", "truth.jsonl", "our_pred.jsonl", "our_score.json"], w)
    ref_score = json.load(open(os.path.join(w, "ref_score.json")))
    our_score = json.load(open(os.path.join(w, "our_score.json")))
    print(f"{args.n} texts x {args.n} images, {args.dim}-d, top-10 + recall@1/5/10")
    print(f"  cn_clip: make_topk_predictions.py {knn_ref:7.2f} s + evaluation.py {eval_ref:5.2f} s = {knn_ref + eval_ref:7.2f} s")
    print(f"  cnclip:  make-topk-predictions    {knn_ours:7.2f} s + evaluation    {eval_ours:5.2f} s = {knn_ours + eval_ours:7.2f} s")
    print(f"  ratio: {(knn_ref + eval_ref) / (knn_ours + eval_ours):.1f}x (goal >= 20x)")
    print(f"  scores: cn_clip {ref_score['scoreJson']}, cnclip {our_score['scoreJson']}, "
          f"{'equal' if ref_score == our_score else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
