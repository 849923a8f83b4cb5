"""Extraction input from WebDataset shards (issue #25): cnclip reading the shards from an S3
server on this machine vs the same shard files on local disk (goal ≥ 0.8×), vs the `webdataset`
Python package's reader + PIL + cn_clip's transform (goal ≥ 3× per core); with --rss, cnclip's
peak RSS reading --samples and --samples-large samples from the server (goal: within 10%).

    .venv/bin/python scripts/bench/webdataset_read.py [--samples 10000] [--rounds 3]
        [--rss [--samples-large 100000]] [--work /tmp/cnclip-bench-wds] [--cnclip PATH]

"Extraction input" is what extract-features does before the encoder: read the shards, decode
the JPEGs, resize to --resolution². cnclip runs `webdataset` → `preprocess` → `write_parquet`
(as pipeline_rss.py: `cnclip run` has no discarding sink, so the Parquet writer's zstd of the
pixels is in cnclip's figures and not in the reference's). A read-only pair (`webdataset` →
`write_parquet` of the JPEG bytes, against the reference's bare `webdataset` loop) isolates the
reading of the shards, where the server's cost shows.

Shards are made once in --work with `webdataset.TarWriter`: 1,000 samples each, keys %09d, a
.jpg (96–192 px a side, ~9 KiB: a smooth background, shapes, grain) and a .txt. They are the
files of the server's bucket (WORK/s3/bench/shards/NNNNNN.tar), so the local runs read the
very same files; they are read once before the rounds, so every run reads them from the page
cache. The server is s3s-fs on 127.0.0.1 (what the tests use; scripts/setup.sh builds it),
started here and stopped at the end. It shares this machine's cores: its CPU time is added to
the server runs'.

Figures, each the median (min–max) over --rounds rounds, the runs interleaved (the order
reversed every other round): samples/s (wall); CPU s (user + sys of the run, plus the server's
for a server run); per core (samples/s ÷ the cores the run may use: cnclip's --threads or all
of this machine's, the reference's 1); samples per CPU second. Peak RSS is the child's
ru_maxrss (os.wait4). Every cnclip run is checked to have written --samples rows and
quarantined nothing; its output is deleted after it.
"""
import argparse
import io
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

SHARD_SAMPLES = 1000
BUCKET = "bench"
PREFIX = "shards"
ACCESS_KEY, SECRET_KEY = "cnclip-bench", "cnclip-bench-secret"

PIPELINE = """
[job]
quarantine = "{out}/quarantine.jsonl"

[nodes.source]
kind = "webdataset"
paths = ["{shards}"]
{nodes}
[nodes.out]
kind = "write_parquet"
input = "{last}"
path = "{out}/out.parquet"
"""

PREPROCESS = """
[nodes.pixels]
kind = "preprocess"
input = "source"
resolution = {resolution}
"""


# Shards ------------------------------------------------------------------------------------------

def jpeg(rng):
    """A photo-sized small JPEG: a smooth 4×3 colour field upscaled, 3–8 filled shapes, grain."""
    import numpy as np
    from PIL import Image, ImageDraw

    w, h = (int(x) for x in rng.integers(96, 193, size=2))
    image = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(8, w // 2)), y0 + int(rng.integers(8, h // 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.integers(0, 2) else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    grain = rng.integers(-14, 15, (h, w, 1), dtype=np.int16)
    pixels = np.clip(np.asarray(image, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_shard(task):
    """Shard `number` at `path` (written beside it, renamed into place: a shard present is whole)."""
    number, path = task
    import numpy as np
    import webdataset

    rng = np.random.default_rng(number)
    tmp = path + ".tmp"
    with webdataset.TarWriter(tmp) as sink:
        for i in range(number * SHARD_SAMPLES, (number + 1) * SHARD_SAMPLES):
            sink.write({"__key__": f"{i:09d}", "jpg": jpeg(rng), "txt": f"第{i}张图：彩色的形状，编号 {i % 97}。"})
    os.replace(tmp, path)


def shard_dir(work):
    return os.path.join(work, "s3", BUCKET, PREFIX)


def make_shards(work, samples):
    """The first samples / 1000 shards, the missing ones made with one process per core."""
    os.makedirs(shard_dir(work), exist_ok=True)
    count = samples // SHARD_SAMPLES
    missing = [(n, os.path.join(shard_dir(work), f"{n:06d}.tar")) for n in range(count)]
    missing = [(n, p) for n, p in missing if not os.path.exists(p)]
    if missing:
        print(f"making {len(missing)} shards of {SHARD_SAMPLES} samples in {shard_dir(work)} …", file=sys.stderr,
              flush=True)
        start = time.perf_counter()
        with multiprocessing.Pool(os.cpu_count()) as pool:
            for _ in pool.imap_unordered(write_shard, missing):
                pass
        print(f"  {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    size = sum(os.path.getsize(os.path.join(shard_dir(work), f"{n:06d}.tar")) for n in range(count))
    for n in range(count):  # into the page cache, for every run alike
        with open(os.path.join(shard_dir(work), f"{n:06d}.tar"), "rb") as f:
            while f.read(1 << 24):
                pass
    return size


def pattern(samples):
    """`{000000..000009}.tar` for 10,000 samples."""
    last = samples // SHARD_SAMPLES - 1
    return f"{{{0:06d}..{last:06d}}}.tar" if last > 0 else f"{0:06d}.tar"


# The server --------------------------------------------------------------------------------------

class Server:
    """s3s-fs over WORK/s3 on 127.0.0.1 at a free port; its log goes to WORK/s3s-fs.log."""

    def __init__(self, binary, work):
        self.log_path = os.path.join(work, "s3s-fs.log")
        self.log = open(self.log_path, "w")
        env = dict(os.environ, RUST_LOG="info", NO_COLOR="1")
        self.child = subprocess.Popen(
            [binary, "--host", "127.0.0.1", "--port", "0", "--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY,
             os.path.join(work, "s3")], stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        self.endpoint = None
        while self.endpoint is None:
            with open(self.log_path) as f:
                for line in f:
                    if "server is running at " in line:
                        self.endpoint = line.split("server is running at ", 1)[1].strip()
            if self.endpoint is None:
                if self.child.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    with open(self.log_path) as f:
                        sys.exit(f"s3s-fs did not start:\n{f.read()}")
                time.sleep(0.05)

    def cpu_seconds(self):
        with open(f"/proc/{self.child.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def environment(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ENDPOINT_URL=self.endpoint, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                   AWS_REGION="us-east-1", AWS_SHARED_CREDENTIALS_FILE="/dev/null", AWS_CONFIG_FILE="/dev/null")
        return env

    def stop(self):
        if self.child.poll() is None:
            self.child.terminate()
            try:
                self.child.wait(5)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait()
        self.log.close()


# Runs --------------------------------------------------------------------------------------------

def wait_for_compilers():
    """Never time a run while rustc runs on this machine (a build elsewhere takes the cores)."""
    warned = False
    while subprocess.run(["pgrep", "-x", "rustc"], capture_output=True).returncode == 0:
        if not warned:
            print("waiting for rustc to finish before the next run …", file=sys.stderr, flush=True)
            warned = True
        time.sleep(5)


def run_child(command, env=None):
    """Runs `command`; returns (seconds, CPU seconds, peak RSS MiB, output), failing loudly."""
    wait_for_compilers()
    out_path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"cnclip-bench-wds-{os.getpid()}.log")
    with open(out_path, "w+") as out:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        log = out.read()
    os.remove(out_path)
    if status != 0:
        sys.exit(f"{' '.join(command)} failed ({child.returncode}):\n{log}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, log


def cnclip_run(args, server, samples, remote, read_only):
    """One `cnclip run`: returns its figures (the server's CPU time added for a remote run)."""
    out = os.path.join(args.work, "out")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    shards = (f"s3://{BUCKET}/{PREFIX}/" if remote else shard_dir(args.work) + "/") + pattern(samples)
    nodes = "" if read_only else PREPROCESS.format(resolution=args.resolution)
    pipeline = os.path.join(args.work, "pipeline.toml")
    with open(pipeline, "w") as f:
        f.write(PIPELINE.format(out=out, shards=shards, nodes=nodes, last="source" if read_only else "pixels"))
    command = [args.cnclip, "--progress", "none", "run", pipeline]
    if args.threads:
        command += ["--threads", str(args.threads)]
    server_cpu = server.cpu_seconds()
    seconds, cpu, rss, log = run_child(command, env=server.environment())
    cpu += server.cpu_seconds() - server_cpu if remote else 0
    import pyarrow.parquet

    table = os.path.join(out, "out.parquet")
    rows = pyarrow.parquet.ParquetFile(table).metadata.num_rows
    size = os.path.getsize(table)
    quarantine = os.path.join(out, "quarantine.jsonl")
    if rows != samples or (os.path.exists(quarantine) and os.path.getsize(quarantine)):
        bad = open(quarantine).read()[:2000] if os.path.exists(quarantine) else ""
        sys.exit(f"cnclip wrote {rows} rows of {samples} from {shards}:\n{bad}\n{log}")
    shutil.rmtree(out)
    return {"seconds": seconds, "cpu": cpu, "rss": rss, "output": size}


def reference_run(args, samples, read_only):
    """The reference in a process of its own (--reference below), one thread."""
    urls = os.path.join(shard_dir(args.work), pattern(samples))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [sys.executable, os.path.abspath(__file__), "--reference", "read" if read_only else "full",
               "--resolution", str(args.resolution), "--urls", urls]
    _, cpu, rss, log = run_child(command, env=env)
    count, seconds = (float(x) for x in log.strip().splitlines()[-1].split())
    if int(count) != samples:
        sys.exit(f"the reference read {int(count)} samples of {samples}:\n{log}")
    # Its own clock: torch's import (seconds) is not the reader's.
    return {"seconds": seconds, "cpu": cpu, "rss": rss}


def reference(kind, urls, resolution):
    """`webdataset.WebDataset(urls)` samples; `full` also decodes and transforms each .jpg as
    cn_clip's datasets do (Image.open, image_transform: Resize bicubic, RGB, ToTensor, Normalize)."""
    import torch

    torch.set_num_threads(1)
    import webdataset
    from PIL import Image

    try:
        from cn_clip.clip.utils import image_transform
        transform = image_transform(resolution)
    except ImportError:
        from torchvision.transforms import Compose, InterpolationMode, Normalize, Resize, ToTensor
        transform = Compose([Resize((resolution, resolution), interpolation=InterpolationMode.BICUBIC),
                             lambda image: image.convert("RGB"), ToTensor(),
                             Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    count = 0
    start = time.perf_counter()
    for sample in webdataset.WebDataset(urls, shardshuffle=False, empty_check=False):
        if kind == "full":
            transform(Image.open(io.BytesIO(sample["jpg"])))
        count += 1
    print(count, time.perf_counter() - start)


# Report ------------------------------------------------------------------------------------------

def span(values, fmt="{:.0f}"):
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def goal(value, target, above=True):
    met = value >= target if above else value <= target
    return f"goal {'≥' if above else '≤'} {target:g}: {'met' if met else 'NOT met'}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=10_000, help="samples read per run (a multiple of 1000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every variant once, interleaved")
    p.add_argument("--rss", action="store_true",
                   help="also compare cnclip's peak RSS reading --samples and --samples-large from the server")
    p.add_argument("--samples-large", type=int, default=100_000, help="the large run of --rss (a multiple of 1000)")
    p.add_argument("--rss-pipeline", choices=["full", "read"], default="full",
                   help="what the --rss runs do: read + preprocess + Parquet of pixels (full), or read only")
    p.add_argument("--resolution", type=int, default=224, help="preprocess resolution (cn_clip's 224 for ViT-B-16)")
    p.add_argument("--threads", type=int, default=0, help="cnclip run --threads (0: one per core)")
    p.add_argument("--work", default="/tmp/cnclip-bench-wds", help="shards (kept), server data and outputs")
    p.add_argument("--cnclip", default=None,
                   help="release cnclip (default: target/release/cnclip, else $CARGO_TARGET_DIR/release/cnclip)")
    p.add_argument("--s3s-fs", default=None,
                   help="the S3 server (default: $CNCLIP_TOOLS/s3s-fs/bin/s3s-fs, else .tools/s3s-fs/bin/s3s-fs)")
    p.add_argument("--reference", choices=["full", "read"], help=argparse.SUPPRESS)
    p.add_argument("--urls", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.reference:
        return reference(args.reference, args.urls, args.resolution)

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if args.cnclip is None:
        candidates = [os.path.join(root, "target/release/cnclip"),
                      os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(root, "target")), "release/cnclip")]
        args.cnclip = next((c for c in candidates if os.path.exists(c)), None)
        if args.cnclip is None:
            sys.exit(f"no release cnclip at {' or '.join(candidates)}: "
                     "cargo build --release -p cnclip-cli -p cnclip-torch, or pass --cnclip")
    if args.s3s_fs is None:
        tools = os.environ.get("CNCLIP_TOOLS", os.path.join(root, ".tools"))
        args.s3s_fs = os.path.join(tools, "s3s-fs/bin/s3s-fs")
    if not os.path.exists(args.s3s_fs):
        sys.exit(f"{args.s3s_fs} not found: scripts/setup.sh builds it (or pass --s3s-fs)")
    sizes = [args.samples] + ([args.samples_large] if args.rss else [])
    if any(n <= 0 or n % SHARD_SAMPLES for n in sizes):
        sys.exit(f"--samples and --samples-large must be positive multiples of {SHARD_SAMPLES}")
    args.work = os.path.abspath(args.work)
    cores = args.threads or os.cpu_count()

    shard_bytes = make_shards(args.work, max(sizes))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    server = Server(args.s3s_fs, args.work)
    try:
        variants = [("cnclip, local disk", lambda: cnclip_run(args, server, args.samples, False, False)),
                    ("cnclip, server", lambda: cnclip_run(args, server, args.samples, True, False)),
                    ("webdataset + PIL (reference)", lambda: reference_run(args, args.samples, False)),
                    ("cnclip read only, local disk", lambda: cnclip_run(args, server, args.samples, False, True)),
                    ("cnclip read only, server", lambda: cnclip_run(args, server, args.samples, True, True)),
                    ("webdataset read only (ref.)", lambda: reference_run(args, args.samples, True))]
        if args.rss:
            read = args.rss_pipeline == "read"
            variants += [(f"rss: cnclip, server, {n} samples", lambda n=n: cnclip_run(args, server, n, True, read))
                         for n in (args.samples, args.samples_large)]
        results = {name: [] for name, _ in variants}
        for round_ in range(args.rounds):
            order = variants if round_ % 2 == 0 else variants[::-1]
            for name, variant in order:
                if args.rss and name.endswith(f" {args.samples_large} samples") and args.rss_pipeline == "full":
                    check_disk(args, results[f"rss: cnclip, server, {args.samples} samples"] or results["cnclip, server"])
                results[name].append(variant())
                print(f"round {round_ + 1}: {name}: {results[name][-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    finally:
        server.stop()

    per_core = {name: cores if name.startswith(("cnclip", "rss")) else 1 for name in results}
    print(f"{args.samples} samples in {args.samples // SHARD_SAMPLES} shards of {SHARD_SAMPLES} "
          f"({shard_bytes / max(sizes) / 1024:.1f} KiB a sample), resolution {args.resolution}, "
          f"{args.rounds} rounds interleaved, median (min–max)")
    print(f"cnclip: {args.cnclip}, {cores} threads of {os.cpu_count()} cores; server: s3s-fs at {server.endpoint}")
    print(f"{'run':<30} {'samples/s':>18} {'CPU s (+server)':>18} {'per core /s':>18} {'per CPU s':>18} "
          f"{'peak RSS MiB':>18}")
    rate = {}
    for name, runs in results.items():
        n = args.samples_large if name.endswith(f" {args.samples_large} samples") else args.samples
        rates = [n / r["seconds"] for r in runs]
        rate[name] = statistics.median(rates)
        print(f"{name:<30} {span(rates):>18} {span([r['cpu'] for r in runs], '{:.1f}'):>18} "
              f"{span([x / per_core[name] for x in rates]):>18} {span([n / r['cpu'] for r in runs]):>18} "
              f"{span([r['rss'] for r in runs], '{:.0f}'):>18}")
    ratio = rate["cnclip, server"] / rate["cnclip, local disk"]
    print(f"server / local disk, samples/s:            {ratio:6.2f}x  ({goal(ratio, 0.8)})")
    ratio = rate["cnclip read only, server"] / rate["cnclip read only, local disk"]
    print(f"server / local disk, read only:            {ratio:6.2f}x")
    core = rate["cnclip, server"] / cores / rate["webdataset + PIL (reference)"]
    print(f"cnclip server / reference, per core:       {core:6.2f}x  ({goal(core, 3)})")
    cpu = lambda name: statistics.median(args.samples / r["cpu"] for r in results[name])
    print(f"cnclip server / reference, per CPU second: {cpu('cnclip, server') / cpu('webdataset + PIL (reference)'):6.2f}x"
          "  (server's CPU included)")
    if args.rss:
        small, large = (statistics.median(r["rss"] for r in results[f"rss: cnclip, server, {n} samples"])
                        for n in (args.samples, args.samples_large))
        ratio = large / small
        print(f"peak RSS from the server, {args.samples_large} / {args.samples} samples "
              f"({args.rss_pipeline} pipeline): {large:.0f} / {small:.0f} MiB = {ratio:.3f}  ({goal(ratio, 1.10, False)})")


def check_disk(args, small_runs):
    """The large --rss run writes its pixels' Parquet: stop before it if the disk cannot take it."""
    need = max(r["output"] for r in small_runs) * args.samples_large / args.samples
    free = shutil.disk_usage(args.work).free
    if need > free - (1 << 30):
        sys.exit(f"the {args.samples_large}-sample run would write ~{need / 2**30:.1f} GiB of Parquet with "
                 f"{free / 2**30:.1f} GiB free in {args.work}: pass --rss-pipeline read, or another --work")


if __name__ == "__main__":
    main()
