"""Model-only encode throughput: cnclip vs cn_clip 1.6.0, same machine, batch and threads.

    .venv/bin/python scripts/bench/encode.py [--model ViT-B-16] [--batch-size 32] [--iters 5]
        [--threads 2] [--cnclip target/release/cnclip]

Both sides use random weights (speed does not depend on them), fp32 on CPU, `torch.no_grad`,
one warm-up batch, then `iters` timed batches of images and of 52-token texts. cnclip runs as
`cnclip benchmark encode` with the same arguments; its line is printed next to ours.
"""
import argparse
import re
import subprocess
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cnclip", default="target/release/cnclip")
    args = p.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    from cn_clip.clip import tokenize
    from cn_clip.clip.model import CLIP
    from cn_clip.clip.utils import _MODEL_INFO
    import json
    from pathlib import Path
    import cn_clip.clip

    struct = _MODEL_INFO[args.model]["struct"] if args.model in _MODEL_INFO else args.model
    info = {}
    for name in struct.split("@"):
        info.update(json.loads((Path(cn_clip.clip.__file__).parent / "model_configs" / f"{name}.json").read_text()))
    if isinstance(info["vision_layers"], str):
        info["vision_layers"] = json.loads(info["vision_layers"])
    model = CLIP(**info).float().eval()
    r = info["image_resolution"]
    images = torch.randn(args.batch_size, 3, r, r)
    captions = ["一只可爱的小猫在草地上玩耍。", "左上角有一个红色的大圆形", "A photo of a dog playing frisbee."]
    ids = tokenize([captions[i % 3] for i in range(args.batch_size)], context_length=52)

    def rate(f):
        with torch.no_grad():
            f()
            start = time.perf_counter()
            for _ in range(args.iters):
                f()
            return args.batch_size * args.iters / (time.perf_counter() - start)

    ref_image = rate(lambda: model.encode_image(images))
    ref_text = rate(lambda: model.encode_text(ids))
    del model

    out = subprocess.run(
        [args.cnclip, "benchmark", "encode", "--model", args.model, "--batch-size", str(args.batch_size),
         "--iters", str(args.iters), "--threads", str(args.threads)],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    ours_image, ours_text = map(float, re.search(r"image ([\d.]+)/s, text ([\d.]+)/s", out).groups())
    print(f"{args.model}, batch {args.batch_size}, {args.threads} threads, fp32 CPU, {args.iters} batches")
    print(f"  image: cn_clip {ref_image:8.1f}/s  cnclip {ours_image:8.1f}/s  ratio {ours_image / ref_image:.2f}x")
    print(f"  text:  cn_clip {ref_text:8.1f}/s  cnclip {ours_text:8.1f}/s  ratio {ours_text / ref_text:.2f}x")


if __name__ == "__main__":
    main()
