"""Reference harness: runs cn_clip 1.6.0 on CPU for cnclip's parity tests.

Run with the project venv's python (scripts/setup.sh makes it):

    .venv/bin/python tests/reference/cnclip_ref.py tokenize --context-length 52 < texts.jsonl
    .venv/bin/python tests/reference/cnclip_ref.py build-model --config cfg.json --seed 0 --out m.pt
    .venv/bin/python tests/reference/cnclip_ref.py run-module cn_clip.eval.extract_features --help

Every command uses cn_clip's own code; nothing here re-implements it. Input texts travel as one
JSON string per line so that empty lines, whitespace and control characters survive the trip.

`run-module` first installs a small CPU shim: cn_clip's eval scripts call
`torch.cuda.set_device`, `Module.cuda`, `Tensor.cuda` and `.to(0)` unconditionally.
"""

import argparse
import json
import runpy
import sys


def install_cpu_shim():
    """Makes cn_clip's hard-coded CUDA calls no-ops so its scripts run on a CPU-only machine."""
    import torch

    def _no_device(device):
        return isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")) or (
            isinstance(device, torch.device) and device.type == "cuda")

    torch.cuda.set_device = lambda *a, **k: None
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.Tensor.cuda = lambda self, *a, **k: self

    original_module_to = torch.nn.Module.to
    original_tensor_to = torch.Tensor.to

    def module_to(self, *args, **kwargs):
        if args and _no_device(args[0]):
            args = ("cpu",) + args[1:]
        return original_module_to(self, *args, **kwargs)

    def tensor_to(self, *args, **kwargs):
        if args and _no_device(args[0]):
            args = ("cpu",) + args[1:]
        if _no_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return original_tensor_to(self, *args, **kwargs)

    torch.nn.Module.to = module_to
    torch.Tensor.to = tensor_to


def read_texts(stream):
    for number, line in enumerate(stream, 1):
        line = line.rstrip("\n")
        if not line:
            continue
        try:
            text = json.loads(line)
        except json.JSONDecodeError as e:
            sys.exit(f"stdin line {number}: not a JSON string: {e}")
        if not isinstance(text, str):
            sys.exit(f"stdin line {number}: expected a JSON string, got {type(text).__name__}")
        yield text


def cmd_tokenize(args):
    from cn_clip.clip import tokenize

    out = sys.stdout
    for text in read_texts(sys.stdin):
        ids = tokenize([text], context_length=args.context_length)[0].tolist()
        out.write(json.dumps(ids) + "\n")


def model_info(config):
    """cn_clip's CLIP(**model_info): presets by "Vision@Text" name, or a dict of its arguments."""
    import os
    from pathlib import Path
    import cn_clip.clip

    if isinstance(config, str):
        from cn_clip.clip.utils import _MODEL_INFO
        if config in _MODEL_INFO:  # a released name, e.g. "ViT-B-16"
            config = _MODEL_INFO[config]["struct"]
        vision, text = config.split("@")
        configs = Path(cn_clip.clip.__file__).parent / "model_configs"
        info = {}
        for name in (vision, text):
            path = configs / f"{name.replace('/', '-')}.json"
            if not os.path.exists(path):
                sys.exit(f"no cn_clip model config {path}")
            info.update(json.loads(path.read_text()))
    else:
        info = dict(config)
    if isinstance(info.get("vision_layers"), str):
        # cn_clip stores RN50's layers as the string "[3, 4, 6, 3]" and eval()s it; we parse it.
        info["vision_layers"] = json.loads(info["vision_layers"])
    return info


def cmd_build_model(args):
    """Builds a randomly initialised CLIP from cn_clip's classes and saves it as cn_clip does."""
    import torch
    from cn_clip.clip.model import CLIP, convert_weights

    config = json.loads(args.config) if args.config.lstrip().startswith("{") else args.config
    info = model_info(config)
    torch.manual_seed(args.seed)
    model = CLIP(**info)
    if args.perturb:
        # cn_clip zero-initialises some weights (e.g. ResNet bn3); perturb every parameter so
        # that parity tests exercise all of them.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * args.perturb)
    if args.calibrate_bn:
        # Running BatchNorm statistics of random images (cumulative average), so that a model
        # used in eval mode (a frozen RN50) does not map every image to the same feature.
        r = info["image_resolution"]
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.momentum = None
                    m.reset_running_stats()
            model.train()
            model.encode_image(torch.randn(args.calibrate_bn, 3, r, r))
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.momentum = 0.1
    if args.fp16:
        convert_weights(model)  # what released checkpoints hold
    model.eval()
    state_dict = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save(
        {"epoch": 1, "step": 1, "name": "cnclip-reference", "state_dict": state_dict, "optimizer": {}},
        args.out,
    )
    json.dump(
        {
            "model_info": info,
            "parameters": sum(p.numel() for p in model.parameters()),
            "keys": len(state_dict),
            "fp16": args.fp16,
        },
        sys.stdout,
    )
    sys.stdout.write("\n")


def load_checkpoint_model(config, path):
    """Loads a cn_clip-format checkpoint the way cn_clip's create_model and eval scripts do."""
    import torch
    from cn_clip.clip.model import CLIP

    model = CLIP(**model_info(config))
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    sd = checkpoint["state_dict"]
    if next(iter(sd.items()))[0].startswith("module"):
        sd = {k[len("module."):]: v for k, v in sd.items() if "bert.pooler" not in k}
    model.load_state_dict(sd)
    return model.float().eval(), checkpoint


def cmd_encode(args):
    """Image and text features of a checkpoint for a seeded random image batch and given texts."""
    import torch
    from cn_clip.clip import tokenize

    config = json.loads(args.config) if args.config.lstrip().startswith("{") else args.config
    model, checkpoint = load_checkpoint_model(config, args.checkpoint)
    resolution = model.visual.input_resolution
    if args.image_files:
        # cn_clip's own transform on the files, as its eval datasets apply it.
        from PIL import Image
        from cn_clip.clip.utils import image_transform
        transform = image_transform(resolution)
        images = torch.stack([transform(Image.open(path)) for path in args.image_files])
    else:
        generator = torch.Generator().manual_seed(args.seed)
        images = torch.randn(args.images, 3, resolution, resolution, generator=generator)
    texts = list(read_texts(sys.stdin))
    ids = tokenize(texts, context_length=args.context_length)
    with torch.no_grad():
        image_features = model.encode_image(images)
        text_features = model.encode_text(ids)
        logits_per_image, _ = model.get_similarity(images, ids)
    if args.out:
        # Inputs and outputs side by side, for a parity test to replay the same inputs.
        from safetensors.torch import save_file
        save_file(
            {
                "images": images.contiguous(),
                "text_ids": ids.contiguous(),
                "image_features": image_features.contiguous(),
                "text_features": text_features.contiguous(),
                "logits_per_image": logits_per_image.contiguous(),
                "logit_scale": model.logit_scale.detach().reshape([1]).contiguous(),
            },
            args.out,
        )
        return
    json.dump(
        {
            "epoch": checkpoint["epoch"],
            "step": checkpoint["step"],
            "image_features": image_features.tolist(),
            "text_features": text_features.tolist(),
            "logit_scale": model.logit_scale.item(),
        },
        sys.stdout,
    )
    sys.stdout.write("\n")


def cmd_preprocess(args):
    """cn_clip's image_transform up to ToTensor (Resize then convert("RGB")), as uint8 pixels."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from cn_clip.clip.utils import image_transform

    resize, to_rgb = image_transform(args.resolution).transforms[:2]
    pixels, modes = {}, []
    for i, path in enumerate(args.files):
        image = Image.open(path)
        modes.append(image.mode)
        pixels[str(i)] = torch.from_numpy(np.array(to_rgb(resize(image)), dtype=np.uint8).copy())
    save_file(pixels, args.out)
    json.dump({"modes": modes}, sys.stdout)
    sys.stdout.write("\n")


def cmd_run_module(args):
    install_cpu_shim()
    sys.argv = [args.module] + args.args
    runpy.run_module(args.module, run_name="__main__", alter_sys=True)


def _augment_steps(resolution):
    """cn_clip's `--use-augment` train transform (`LMDBDataset._build_transform`) up to ToTensor:
    timm's RandomResizedCropAndInterpolation, RandomHorizontalFlip, cn_clip's _convert_to_rgb and
    timm's AutoAugment('original')."""
    import types
    from timm.data.auto_augment import AutoAugment
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from cn_clip.training.data import LMDBDataset

    owner = types.SimpleNamespace(split="train", use_augment=True)
    steps = LMDBDataset._build_transform(owner, resolution).transforms
    crop, flip, to_rgb, auto = steps[:4]
    assert isinstance(crop, RandomResizedCropAndInterpolation) and isinstance(auto, AutoAugment), steps
    assert type(flip).__name__ == "RandomHorizontalFlip" and to_rgb.__name__ == "_convert_to_rgb", steps
    assert [type(t).__name__ for t in steps[4:]] == ["MaybeToTensor", "Normalize"], steps
    return crop, flip, to_rgb, auto


def _write_rgb(path, image):
    import numpy as np

    assert image.mode == "RGB", image.mode
    path.write_bytes(np.asarray(image, dtype=np.uint8).tobytes())


def cmd_augment_op(args):
    """One step of the augmentation, by timm's own code, per stdin JSON line:
    {"image", "crop": [i, j, h, w], "flip"}: resized_crop with the transform's size and
    interpolation, hflip, convert("RGB"), from the file as opened;
    {"image", "op", "magnitude", "negate"}: AugmentOp(op, prob=1, magnitude) with the transform's
    hparams, `_randomly_negate` fixed to `negate`, on the image converted to RGB;
    {"image", "function", "args"}: timm.data.auto_augment.<function>(img, *args, **kwargs).
    Writes OUT/N.rgb (the result) and, for ops, OUT/N.in.rgb (their RGB input); prints sizes."""
    from pathlib import Path
    from PIL import Image
    import torchvision.transforms.functional as F
    import timm.data.auto_augment as aa

    crop, _, to_rgb, auto = _augment_steps(args.resolution)
    template = auto.policy[0][0]  # every op of the policy has the same hparams and kwargs
    randomly_negate = aa._randomly_negate
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for n, line in enumerate(sys.stdin):
        case = json.loads(line)
        image = Image.open(case["image"])
        if "crop" in case:
            i, j, h, w = case["crop"]
            result = F.resized_crop(image, i, j, h, w, list(crop.size), crop.interpolation)
            if case.get("flip"):
                result = F.hflip(result)
            result = to_rgb(result)
        else:
            image = image.convert("RGB")
            _write_rgb(out / f"{n}.in.rgb", image)
            if "function" in case:
                result = getattr(aa, case["function"])(image, *case.get("args", []), **template.kwargs)
            else:
                op = aa.AugmentOp(case["op"], prob=1.0, magnitude=case["magnitude"], hparams=template.hparams)
                negate = bool(case.get("negate"))
                aa._randomly_negate = lambda v: -v if negate else v
                try:
                    result = op(image)
                finally:
                    aa._randomly_negate = randomly_negate
        _write_rgb(out / f"{n}.rgb", result)
        print(json.dumps({"width": result.width, "height": result.height, "source_mode": Image.open(case["image"]).mode}))


def cmd_augment_replay(args):
    """The whole augmentation of each stdin JSON line {"image", "seed", "key"} with Python's
    `random` seeded `seed << 64 | key` (what cnclip's `random_augment` draws from). The flip
    draws `random.random() < 0.5` from the same generator instead of `torch.rand`; the rest is
    cn_clip's transform untouched. Writes OUT/N.rgb; prints the crop drawn."""
    import random
    from pathlib import Path
    from PIL import Image
    import torchvision.transforms.functional as F

    crop, _, to_rgb, auto = _augment_steps(args.resolution)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for n, line in enumerate(sys.stdin):
        case = json.loads(line)
        random.seed((case["seed"] << 64) | (case["key"] & (2**64 - 1)))
        image = Image.open(case["image"])
        # RandomResizedCropAndInterpolation.__call__, keeping its parameters to report.
        i, j, h, w = crop.get_params(image, crop.scale, crop.ratio)
        image = F.resized_crop(image, i, j, h, w, list(crop.size), crop.interpolation)
        flip = random.random() < 0.5
        if flip:
            image = F.hflip(image)
        image = auto(to_rgb(image))
        _write_rgb(out / f"{n}.rgb", image)
        print(json.dumps({"crop": [i, j, h, w], "flip": flip}))


def _train_rank(rank, args):
    """One DDP rank (gloo, CPU) of cn_clip's own training loop, `cn_clip.training.train.train`."""
    import logging
    import types
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file
    import cn_clip.training.train as train_module
    from cn_clip.training.scheduler import cosine_lr

    install_cpu_shim()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{args.rendezvous}", rank=rank, world_size=args.world)
    config = json.loads(args.config)
    model, _ = load_checkpoint_model(config, args.checkpoint)
    data = load_file(args.data)
    images, texts = data["images"], data["texts"]  # [S, A, W, n, ...]
    steps, accum = images.shape[0], images.shape[1]
    vision_model = args.vision_model
    # main.py: freeze the vision tower (and RN50's BatchNorm statistics) before DDP.
    if args.freeze_vision:
        for _, v in model.visual.named_parameters():
            v.requires_grad = False
    model.train()
    model = torch.nn.parallel.DistributedDataParallel(model)
    exclude = lambda n: "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n) and p.requires_grad], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n) and p.requires_grad], "weight_decay": args.wd}],
        lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps)
    scheduler = cosine_lr(optimizer, args.lr, args.warmup, steps)
    names = {id(p): n[len("module."):] for n, p in named}
    first = {}
    original_step = optimizer.step

    def step(*a, **k):
        if not first:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        first[names[id(p)]] = p.grad.detach().clone()
        return original_step(*a, **k)

    optimizer.step = step
    losses = []
    original_get_loss = train_module.get_loss

    def get_loss(*a, **k):
        loss, acc = original_get_loss(*a, **k)
        losses.append(loss.item())
        return loss, acc

    train_module.get_loss = get_loss
    # Mixed precision as main.py sets it up for `--precision amp`, on the CPU: autocast in
    # --autocast's dtype (cn_clip's torch.cuda.amp.autocast does nothing there) and, with
    # --scaler, torch's GradScaler for the CPU; the scale after each step is recorded.
    precision, scaler, scales = "fp32", None, []
    if args.autocast != "none" or args.scaler:
        import contextlib
        precision = "amp"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.autocast)
        train_module.autocast = (
            (lambda enabled=True: torch.autocast("cpu", dtype=dtype, enabled=enabled)) if dtype is not None
            else (lambda enabled=True: contextlib.nullcontext()))
        scaler = torch.amp.GradScaler("cpu", enabled=args.scaler, growth_interval=args.growth_interval)
        original_update = scaler.update

        def update(*a, **k):
            original_update(*a, **k)
            scales.append(scaler.get_scale() if args.scaler else 1.0)

        scaler.update = update
    teacher = None
    if args.teacher:
        teacher_model, _ = load_checkpoint_model(json.loads(args.teacher_config), args.teacher)
        teacher = types.SimpleNamespace(module=types.SimpleNamespace(get_feature=teacher_model.encode_image))

    class Loader:
        num_batches = steps * accum
        num_samples = steps * accum * images.shape[3] * args.world

        def __iter__(self):
            for s in range(steps):
                for j in range(accum):
                    yield images[s, j, rank], texts[s, j, rank], torch.zeros(images.shape[3], dtype=torch.long)

    train_args = types.SimpleNamespace(
        accum_freq=accum, mask_ratio=args.mask_ratio, distillation=teacher is not None, aggregate=not args.skip_aggregate,
        gather_with_grad=args.gather_with_grad, report_training_batch_acc=True, kd_loss_weight=args.kd_loss_weight,
        local_device_rank=0, precision=precision, rank=rank, world_size=args.world, max_steps=steps, log_interval=10**9,
        val_data=None, valid_step_interval=None, should_save=False, save_step_frequency=-1,
        freeze_vision=args.freeze_vision, vision_model=vision_model, use_flash_attention=False)
    logging.disable(logging.CRITICAL)
    torch.manual_seed(args.seed)
    data_dict = {"train": types.SimpleNamespace(dataloader=Loader(), sampler=None)}
    train_module.train(model, data_dict, 0, optimizer, scaler, scheduler, train_args, 0, teacher)
    if rank == 0:
        # The loss of the last micro-batch of each step (what cn_clip logs); accum runs also
        # call get_loss for every micro-batch.
        per_step = losses[accum - 1::accum] if accum > 1 else losses
        out = {"loss": torch.tensor(per_step, dtype=torch.float64)}
        if scales:
            out["scale"] = torch.tensor(scales, dtype=torch.float64)
        out.update({f"grad.{k}": v.contiguous() for k, v in first.items()})
        out.update({f"param.{k}": v.detach().contiguous() for k, v in model.module.state_dict().items()})
        save_file(out, args.out)
    dist.destroy_process_group()


def cmd_train_steps(args):
    """Runs cn_clip's training loop for every step of --data on --world gloo ranks and saves the
    losses, the first step's (all-reduced) gradients and the final parameters."""
    import tempfile
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        args.rendezvous = f"{tmp}/rendezvous"
        mp.spawn(_train_rank, args=(args,), nprocs=args.world, join=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tokenize", help="stdin: one JSON string per line; stdout: one JSON id list per line")
    p.add_argument("--context-length", type=int, default=52)
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("build-model", help="random-init CLIP saved in cn_clip's checkpoint format")
    p.add_argument("--config", required=True, help='"ViT-B-16@RBT3-chinese" or a JSON object of CLIP(**kwargs)')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--perturb", type=float, default=0.0)
    p.add_argument("--calibrate-bn", type=int, default=0, help="set BatchNorm statistics from N random images")
    p.add_argument("--fp16", action="store_true", help="convert weights to fp16 as released checkpoints are")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_build_model)

    p = sub.add_parser("encode", help="features of a checkpoint for seeded random images and stdin texts")
    p.add_argument("--config", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--context-length", type=int, default=52)
    p.add_argument("--out", help="write inputs and outputs as safetensors instead of JSON to stdout")
    p.add_argument("--image-files", nargs="*", help="encode these images (cn_clip's transform) instead of random ones")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("preprocess", help="cn_clip's Resize + convert(RGB) of image files, as uint8 safetensors")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--out", required=True)
    p.add_argument("files", nargs="+")
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("train-steps", help="cn_clip's training loop over given batches on gloo CPU ranks")
    p.add_argument("--config", required=True, help="JSON of CLIP(**kwargs)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="safetensors: images [S, A, W, n, 3, R, R], texts [S, A, W, n, L]")
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--vision-model", default="ViT-B-16", help="cn_clip tests 'RN' in it for --freeze-vision")
    p.add_argument("--freeze-vision", action="store_true")
    p.add_argument("--mask-ratio", type=float, default=0.0)
    p.add_argument("--skip-aggregate", action="store_true")
    p.add_argument("--gather-with-grad", action="store_true")
    p.add_argument("--teacher")
    p.add_argument("--teacher-config")
    p.add_argument("--kd-loss-weight", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.98)
    p.add_argument("--eps", type=float, default=1e-6)
    p.add_argument("--wd", type=float, default=0.2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="none",
                   help="run the loop as --precision amp with CPU autocast in this dtype")
    p.add_argument("--scaler", action="store_true", help="--precision amp's GradScaler (torch's, for the CPU)")
    p.add_argument("--growth-interval", type=int, default=2000, help="the GradScaler's growth_interval")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_train_steps)

    p = sub.add_parser("run-module", help="run a cn_clip script (python -m MODULE) with the CPU shim")
    p.add_argument("module")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_run_module)

    p = sub.add_parser("augment-op", help="one step of cn_clip's --use-augment transform (timm's code) per stdin line")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--out", required=True, help="directory for the N.rgb results")
    p.set_defaults(func=cmd_augment_op)

    p = sub.add_parser("augment-replay", help="cn_clip's --use-augment transform with Python's random seeded per line")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--out", required=True, help="directory for the N.rgb results")
    p.set_defaults(func=cmd_augment_replay)

    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
