"""End-to-end CPU image extraction: cnclip `extract-features` vs cn_clip's `extract_features.py`
(through the CPU shim), same LMDB, model, batch and threads; and cnclip's pipeline overhead over
model-only encode (`cnclip benchmark encode`, same model, batch, threads). Also peak RSS of
cnclip's extraction of --images vs --images-large (memory must not grow with the corpus).

    .venv/bin/python scripts/bench/extract.py [--model RN50@RBT3-chinese] [--images 256]
        [--images-large 0] [--batch-size 32] [--threads 2] [--cnclip target/release/cnclip]

Random weights (speed does not depend on them), fp32. The LMDB holds `cnclip synth` images
(96×96 JPEGs); both sides decode, resize to the model's resolution and normalise.
"""
import argparse
import os
import re
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = """{"embed_dim": 64, "image_resolution": 224, "vision_layers": 2, "vision_width": 64, "vision_patch_size": 32,
"vocab_size": 21128, "text_attention_probs_dropout_prob": 0.1, "text_hidden_act": "gelu", "text_hidden_dropout_prob": 0.1,
"text_hidden_size": 64, "text_initializer_range": 0.02, "text_intermediate_size": 128, "text_max_position_embeddings": 512,
"text_num_attention_heads": 2, "text_num_hidden_layers": 2, "text_type_vocab_size": 2}"""
HARNESS = os.path.join(HERE, "..", "..", "tests", "reference", "cnclip_ref.py")


def run(cmd, env=None, cwd=None):
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=cwd)
    return time.perf_counter() - start


def peak_rss_mib(cmd, env, cwd):
    """Peak RSS of a child process tree (ru_maxrss of the largest child), via a fresh python."""
    code = ("import resource, subprocess, sys\n"
            "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code] + cmd, check=True, capture_output=True, text=True, env=env, cwd=cwd)
    return float(out.stdout.strip())


def corpus(work, cnclip, n):
    split = os.path.join(work, f"c{n}")
    if not os.path.exists(os.path.join(split, "lmdb", "valid", "imgs", "data.mdb")):
        subprocess.run([cnclip, "synth", "--out", split, "--train", "1", "--valid", str(n), "--test", "1"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run([cnclip, "build-lmdb", "--data-dir", split, "--splits", "valid"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return split


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="RN50@RBT3-chinese")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--images-large", type=int, default=0, help="also peak RSS at --images-large/10 vs --images-large")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cnclip", default="target/release/cnclip")
    p.add_argument("--work", default="/tmp/cnclip-bench-extract")
    args = p.parse_args()
    cnclip = os.path.abspath(args.cnclip)
    os.makedirs(args.work, exist_ok=True)
    vision, text = args.model.split("@")
    ckpt = os.path.join(args.work, f"{vision}.pt")
    if not os.path.exists(ckpt):
        subprocess.run([sys.executable, HARNESS, "build-model", "--config", args.model, "--out", ckpt], check=True,
                       stdout=subprocess.DEVNULL)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    split = corpus(args.work, cnclip, args.images)
    imgs = os.path.join(split, "lmdb", "valid", "imgs")
    model = ["--resume", ckpt, "--vision-model", vision, "--text-model", text, "--precision", "fp32"]
    ref = run([sys.executable, HARNESS, "run-module", "cn_clip.eval.extract_features", "--extract-image-feats",
               "--image-data", imgs, "--image-feat-output-path", os.path.join(args.work, "ref.jsonl"),
               "--img-batch-size", str(args.batch_size)] + model, env=env)
    ours_cmd = [cnclip, "extract-features", "--extract-image-feats", "--image-data", imgs, "--image-feat-output-path",
                os.path.join(args.work, "ours.jsonl"), "--img-batch-size", str(args.batch_size), "--num-workers",
                str(args.threads)] + model
    ours = run(ours_cmd, env=env)
    bench = subprocess.run([cnclip, "benchmark", "encode", "--model", args.model, "--batch-size", str(args.batch_size),
                            "--iters", "4", "--threads", str(args.threads)], check=True, capture_output=True, text=True, env=env)
    model_only = float(re.search(r"image ([\d.]+)/s", bench.stdout).group(1))
    n = args.images
    print(f"{n} images, {args.model}, fp32, batch {args.batch_size}, {args.threads} threads")
    print(f"  extract_features.py: {ref:6.1f} s ({n / ref:6.1f} images/s, includes python/model start-up)")
    print(f"  cnclip extract:      {ours:6.1f} s ({n / ours:6.1f} images/s, includes start-up and checkpoint sha256)")
    print(f"  ratio: {ref / ours:.2f}x (goal >= 1.05x)")
    print(f"  model-only encode:   {model_only:6.1f} images/s -> pipeline overhead {100 * (1 - (n / ours) / model_only):.1f}% "
          f"(goal <= 5%; start-up included)")
    if args.images_large:
        # Memory is the pipeline's, not the model's: a small ViT at 224 keeps 10^5 images quick.
        tiny = os.path.join(args.work, "tiny.safetensors")
        if not os.path.exists(tiny):
            cfg = os.path.join(args.work, "tiny.json")
            with open(cfg, "w") as f:
                f.write(TINY)
            subprocess.run([cnclip, "init-model", "--model-config", cfg, "--output", tiny], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        def cmd(split, out):
            return [cnclip, "extract-features", "--extract-image-feats", "--image-data",
                    os.path.join(split, "lmdb", "valid", "imgs"), "--image-feat-output-path", os.path.join(args.work, out),
                    "--img-batch-size", "256", "--resume", tiny]
        big_split = corpus(args.work, cnclip, args.images_large)
        small_n = args.images_large // 10
        small_split = corpus(args.work, cnclip, small_n)
        start = time.perf_counter()
        small = peak_rss_mib(cmd(small_split, "rss_small.parquet"), env, None)
        big = peak_rss_mib(cmd(big_split, "rss_big.parquet"), env, None)
        took = time.perf_counter() - start
        print(f"  peak RSS (tiny ViT at 224, Parquet out): {small_n} images {small:.1f} MiB, "
              f"{args.images_large} images {big:.1f} MiB, ratio {big / small:.3f} (goal <= 1.10; {took:.0f} s)")


if __name__ == "__main__":
    main()
