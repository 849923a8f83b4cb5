"""Extraction input from WebDataset shards (issue #25): cnclip reading the shards from an S3
server on this machine vs the same shard files on local disk (goal ≥ 0.8×), vs the `webdataset`
Python package's reader + PIL + cn_clip's transform (goal ≥ 3× per core); with --rss, cnclip's
peak RSS reading --samples and --samples-large samples from the server (goal: within 10%).

    .venv/bin/python scripts/bench/webdataset_read.py [--samples 10000] [--rounds 3]
        [--rss [--samples-large 100000]] [--work /tmp/cnclip-bench-wds] [--cnclip PATH]

"Extraction input" is what extract-features does before the encoder: read the shards, decode
the JPEGs, resize to --resolution². cnclip runs `webdataset` → `preprocess` → `discard` (the
sink that counts rows and writes nothing: the reference writes nothing either); with
--sink write, → `write_parquet` as before (zstd over 3·224² bytes a sample, in cnclip's figures
and not in the reference's). A read-only pair (`webdataset` → `discard`, or with --sink write
→ `write_webdataset`, against the reference's bare `webdataset` loop) isolates the reading of
the shards, where the server's cost shows; --rss runs it (or, with --rss-pipeline full, the
whole pipeline). Outputs go to --out (tmpfs by default: 10k samples are 1.5 GB of pixels), each
deleted after its run.

Shards are made once in --work with `webdataset.TarWriter`: 1,000 samples each, keys %09d, a
.jpg (96–192 px a side, ~9 KiB: a smooth background, shapes, grain) and a .txt. They are the
files of the server's bucket (WORK/s3/bench/shards/NNNNNN.tar), so the local runs read the
very same files, read once before the rounds so that every run finds them in the page cache.
Beside each, the ETag record s3s-fs keeps for an uploaded object is written: without it s3s-fs
hashes the whole object (MD5) on every HEAD and ranged GET, a cost no real store has. The
server is s3s-fs on 127.0.0.1 (what the tests use; scripts/setup.sh builds it), started here
and stopped at the end. It shares this machine's cores: its CPU time is added to the server
runs'. s3s-fs streams a GET's body in 4 KiB file reads (s3.rs: ReaderStream::with_capacity(file,
4096)), about 70 MB/s a connection even to curl: a ceiling of the test server, not of a store.

Figures, each the median (min–max) over --rounds rounds, the runs interleaved (the order
reversed every other round): samples/s (wall); CPU s (user + sys of the run, plus the server's
for a server run; the reference's is its loop's, without torch's import); per core (samples/s
÷ the cores the run may use: cnclip's --threads or all of this machine's, the reference's 1);
samples per CPU second. Peak RSS is the child's ru_maxrss (os.wait4). Every cnclip run is
checked to have written its samples' rows (its summary's count) and quarantined nothing.

Runs are timed on a quiet machine: before each, the script waits (--max-wait) until no rustc,
clippy-driver or rustdoc runs and other processes use under 0.2 cores; a run during which other
processes used more (from /proc/stat, less the run's and the server's CPU) is run again, up to
3 times; the report counts both.
"""
import argparse
import base64
import hashlib
import io
import json
import multiprocessing
import os
import re
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
COMPILERS = ("rustc", "clippy-driver", "rustdoc")
# Other processes using more cores than this during a run (or the second before it) make it noisy.
QUIET = 0.2
# Runs done again for noise, and noisy runs kept (after 3 tries).
NOISY = [0, 0]

PIPELINE = """
[job]
quarantine = "{out}/quarantine.jsonl"

[nodes.source]
kind = "webdataset"
paths = ["{shards}"]
{nodes}"""

# Decode and preprocess, the pixels to Parquet (`write_webdataset` takes no pixels).
FULL = """
[nodes.pixels]
kind = "preprocess"
input = "source"
resolution = {resolution}

{sink}"""

# Read only: the samples' JPEG bytes and keys straight out to tar shards, which costs little
# and holds nothing back (the Parquet writer zstd-compresses the bytes and keeps a 64 MiB row
# group and every page's index until it closes: its peak grows with the rows).
READ = """
{sink}"""

# The sinks: nothing written (the default), or the formats (--sink write).
SINKS = {
    ("discard", False): '[nodes.out]\nkind = "discard"\ninput = "pixels"\n',
    ("discard", True): '[nodes.out]\nkind = "discard"\ninput = "source"\n',
    ("write", False): '[nodes.out]\nkind = "write_parquet"\ninput = "pixels"\npath = "{out}/out.parquet"\n',
    ("write", True): '[nodes.out]\nkind = "write_webdataset"\ninput = "source"\npath = "{out}/out"\n',
}

# The reference (run as `--reference full|read --urls …` in a process of its own).
REFERENCE = "webdataset + PIL (reference)"
REFERENCE_READ = "webdataset read only (ref.)"


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


def etag_record(work, number):
    """Where s3s-fs keeps an uploaded object's ETag (fs.rs get_internal_info_path)."""
    encode = lambda s: base64.urlsafe_b64encode(s.encode()).decode().rstrip("=")
    return os.path.join(work, "s3", f".bucket-{encode(BUCKET)}.object-{encode(f'{PREFIX}/{number:06d}.tar')}.internal.json")


def make_shards(work, samples):
    """The first samples / 1000 shards (the missing ones made with one process per core) and
    their ETag records; returns their bytes, having read them all once (into the page cache)."""
    os.makedirs(shard_dir(work), exist_ok=True)
    paths = [os.path.join(shard_dir(work), f"{n:06d}.tar") for n in range(samples // SHARD_SAMPLES)]
    missing = [(n, p) for n, p in enumerate(paths) if not os.path.exists(p)]
    if missing:
        print(f"making {len(missing)} shards of {SHARD_SAMPLES} samples in {shard_dir(work)} …", file=sys.stderr,
              flush=True)
        start = time.perf_counter()
        with multiprocessing.Pool(os.cpu_count()) as pool:
            for _ in pool.imap_unordered(write_shard, missing):
                pass
        print(f"  {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    for n, path in enumerate(paths):
        md5 = hashlib.md5()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                md5.update(chunk)
        record, kept = etag_record(work, n), None
        if os.path.exists(record):
            with open(record) as f:
                kept = json.load(f).get("e_tag")
        if kept != md5.hexdigest():
            with open(record + ".tmp", "w") as f:
                json.dump({"e_tag": md5.hexdigest()}, f)
            os.replace(record + ".tmp", record)
    return sum(os.path.getsize(p) for p in paths)


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

def compiling():
    """Whether a compiler runs on this machine (any process's name in COMPILERS)."""
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() in COMPILERS:
                    return True
        except (OSError, ValueError):
            continue
    return False


def busy_seconds():
    """CPU seconds this machine has spent busy (all cores, all processes), from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


def wait_until_quiet(max_wait):
    """Waits (at most `max_wait` s) until no compiler runs here and other processes use less
    than QUIET cores; says so when it waits."""
    deadline, said = time.monotonic() + max_wait, False
    while time.monotonic() < deadline:
        before = busy_seconds()
        time.sleep(1)
        if busy_seconds() - before < QUIET and not compiling():
            return
        if not said:
            print("waiting for this machine to be quiet (a compiler or another process is running) …",
                  file=sys.stderr, flush=True)
            said = True
        time.sleep(4)
    print(f"still not quiet after {max_wait} s: timing anyway", file=sys.stderr, flush=True)


def run_child(args, command, env=None, meter=lambda: 0.0):
    """Runs `command` on a quiet machine: run again (up to 3 times) when other processes took
    more than QUIET cores during it or a compiler started. Returns (seconds, CPU seconds, peak
    RSS MiB, output, the growth of `meter` over the run)."""
    for attempt in range(4):
        wait_until_quiet(args.max_wait)
        metered, busy = meter(), busy_seconds()
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) as child:
            try:
                start = time.perf_counter()
                log = child.stdout.read().decode(errors="replace")
                _, status, usage = os.wait4(child.pid, 0)
                seconds = time.perf_counter() - start
                child.returncode = os.waitstatus_to_exitcode(status)
            except BaseException:
                child.kill()
                raise
        metered, busy = meter() - metered, busy_seconds() - busy
        if child.returncode != 0:
            sys.exit(f"{' '.join(command)} failed ({child.returncode}):\n{log}")
        cpu = usage.ru_utime + usage.ru_stime
        others = (busy - cpu - metered) / seconds
        if others < QUIET and not compiling():
            break
        NOISY[attempt == 3] += 1
        if attempt < 3:
            print(f"other processes took {others:.2f} cores during the run: running it again", file=sys.stderr,
                  flush=True)
    return seconds, cpu, usage.ru_maxrss / 1024, log, metered


def cnclip_run(args, server, samples, remote, read_only):
    """One `cnclip run`: returns its figures (the server's CPU time added for a remote run)."""
    out = os.path.join(args.out, "out")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    shards = (f"s3://{BUCKET}/{PREFIX}/" if remote else shard_dir(args.work) + "/") + pattern(samples)
    sink = SINKS[(args.sink, read_only)].format(out=out)
    nodes = (READ if read_only else FULL).format(out=out, resolution=args.resolution, sink=sink)
    pipeline = os.path.join(args.work, "pipeline.toml")
    with open(pipeline, "w") as f:
        f.write(PIPELINE.format(out=out, shards=shards, nodes=nodes))
    command = [args.cnclip, "--progress", "none", "run", pipeline]
    if args.threads:
        command += ["--threads", str(args.threads)]
    seconds, cpu, rss, log, server_cpu = run_child(args, command, env=server.environment(), meter=server.cpu_seconds)
    written = re.search(r"^\s+out: (\d+) rows → ", log, re.M)
    rows = int(written[1]) if written else None
    quarantine = os.path.join(out, "quarantine.jsonl")
    if rows != samples or (os.path.exists(quarantine) and os.path.getsize(quarantine)):
        bad = open(quarantine).read()[:2000] if os.path.exists(quarantine) else ""
        sys.exit(f"cnclip wrote {rows} rows of {samples} from {shards}:\n{bad}\n{log}")
    shutil.rmtree(out)
    # The run's summary: `  NODE  … rows in … rows out … rows/s  busy  S s  queue …`.
    busy = {m[1]: float(m[2]) for m in re.finditer(r"^\s+(\S+)\s+\d+ rows in .* busy\s+([\d.]+) s", log, re.M)}
    requests = re.search(r"object storage: (\d+) requests", log)
    return {"samples": samples, "seconds": seconds, "cpu": cpu + (server_cpu if remote else 0), "rss": rss,
            "busy": busy, "requests": int(requests[1]) if requests else 0,
            "server_cpu": server_cpu if remote else 0}


def reference_run(args, samples, read_only):
    """The reference in a process of its own (--reference below), torch on one thread."""
    urls = os.path.join(shard_dir(args.work), pattern(samples))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [sys.executable, os.path.abspath(__file__), "--reference", "read" if read_only else "full",
               "--resolution", str(args.resolution), "--urls", urls]
    _, _, rss, log, _ = run_child(args, command, env=env)
    count, seconds, cpu = log.strip().splitlines()[-1].split()
    if int(count) != samples:
        sys.exit(f"the reference read {count} samples of {samples}:\n{log}")
    # Its own clocks: torch's import is not the reader's.
    return {"samples": samples, "seconds": float(seconds), "cpu": float(cpu), "rss": rss}


def reference(kind, urls, resolution):
    """`webdataset.WebDataset(urls)` samples; `full` also decodes and transforms each .jpg as
    cn_clip's datasets do (Image.open, image_transform: Resize bicubic, RGB, ToTensor, Normalize).
    Prints the samples, the loop's seconds and its CPU seconds."""
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
    start, cpu = time.perf_counter(), time.process_time()
    for sample in webdataset.WebDataset(urls, shardshuffle=False, empty_check=False):
        if kind == "full":
            transform(Image.open(io.BytesIO(sample["jpg"])))
        count += 1
    print(count, time.perf_counter() - start, time.process_time() - cpu)


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
    p.add_argument("--rss-pipeline", choices=["full", "read"], default="read",
                   help="what the --rss runs do: read only (the default), or read + preprocess + Parquet of "
                        "pixels (full: 150 KB of output a sample, 15 GB for 100k)")
    p.add_argument("--resolution", type=int, default=224, help="preprocess resolution (cn_clip's 224 for ViT-B-16)")
    p.add_argument("--threads", type=int, default=0, help="cnclip run --threads (0: one per core)")
    p.add_argument("--sink", choices=["discard", "write"], default="discard",
                   help="cnclip's sink: discard (nothing written, as the reference) or write (Parquet pixels; "
                        "tar shards for the read-only runs)")
    p.add_argument("--work", default="/tmp/cnclip-bench-wds", help="shards (kept) and the server's directory")
    p.add_argument("--out", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                   help="where cnclip's outputs go, deleted after each run (default: /dev/shm, else --work)")
    p.add_argument("--cnclip", default=None,
                   help="release cnclip (default: target/release/cnclip, else $CARGO_TARGET_DIR/release/cnclip)")
    p.add_argument("--s3s-fs", default=None,
                   help="the S3 server (default: $CNCLIP_TOOLS/s3s-fs/bin/s3s-fs, else .tools/s3s-fs/bin/s3s-fs)")
    p.add_argument("--max-wait", type=int, default=1800,
                   help="seconds to wait, before a run, for this machine to be quiet (then it is timed anyway)")
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
    out = os.path.abspath(args.out or args.work)
    cores = args.threads or os.cpu_count()

    shard_bytes = make_shards(args.work, max(sizes))
    full = max([args.samples] + ([args.samples_large] if args.rss and args.rss_pipeline == "full" else []))
    need = max(3 * args.resolution ** 2 * full, shard_bytes) * 1.1
    if need > shutil.disk_usage(out).free:
        sys.exit(f"cnclip's outputs need up to {need / 2**30:.1f} GiB in {out}: "
                 f"{shutil.disk_usage(out).free / 2**30:.1f} GiB free (pass another --out)")
    args.out = os.path.join(out, f"cnclip-bench-wds-{os.getpid()}")
    os.makedirs(args.out)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    server = None
    try:
        server = Server(args.s3s_fs, args.work)
        n = args.samples
        variants = [("cnclip, local disk", lambda: cnclip_run(args, server, n, False, False)),
                    ("cnclip, server", lambda: cnclip_run(args, server, n, True, False)),
                    (REFERENCE, lambda: reference_run(args, n, False)),
                    ("cnclip read only, local disk", lambda: cnclip_run(args, server, n, False, True)),
                    ("cnclip read only, server", lambda: cnclip_run(args, server, n, True, True)),
                    (REFERENCE_READ, lambda: reference_run(args, n, True))]
        if args.rss:
            read = args.rss_pipeline == "read"
            variants += [(f"rss: server, {n} samples", lambda n=n: cnclip_run(args, server, n, True, read))
                         for n in (args.samples, args.samples_large)]
        results = {name: [] for name, _ in variants}
        for round_ in range(args.rounds):
            for name, variant in variants if round_ % 2 == 0 else variants[::-1]:
                results[name].append(variant())
                print(f"round {round_ + 1}: {name}: {results[name][-1]['seconds']:.1f} s", file=sys.stderr,
                      flush=True)
    finally:
        if server:
            server.stop()
        shutil.rmtree(args.out, ignore_errors=True)
    report(args, results, cores, shard_bytes / max(sizes), server.endpoint)


def report(args, results, cores, sample_bytes, endpoint):
    print(f"{args.samples} samples in {args.samples // SHARD_SAMPLES} shards of {SHARD_SAMPLES} "
          f"({sample_bytes / 1024:.1f} KiB a sample), resolution {args.resolution}, "
          f"{args.rounds} rounds interleaved, median (min–max)")
    print(f"cnclip: {args.cnclip}, {cores} threads of {os.cpu_count()} cores; server: s3s-fs at {endpoint}")
    print(f"runs done again because other processes used > {QUIET} cores meanwhile: {NOISY[0]}; "
          f"noisy runs kept after 3 tries: {NOISY[1]}")
    print(f"{'run':<30} {'samples/s':>18} {'CPU s (+server)':>18} {'per core /s':>18} {'per CPU s':>18} "
          f"{'peak RSS MiB':>18}")
    rate, per_cpu = {}, {}
    for name, runs in results.items():
        rates = [r["samples"] / r["seconds"] for r in runs]
        rate[name] = statistics.median(rates)
        per_cpu[name] = statistics.median(r["samples"] / r["cpu"] for r in runs)
        threads = 1 if name in (REFERENCE, REFERENCE_READ) else cores
        print(f"{name:<30} {span(rates):>18} {span([r['cpu'] for r in runs], '{:.2f}'):>18} "
              f"{span([x / threads for x in rates]):>18} {span([r['samples'] / r['cpu'] for r in runs]):>18} "
              f"{span([r['rss'] for r in runs]):>18}")
    print()
    print("cnclip's nodes, busy s (its run summary), the server's CPU s and the object store requests:")
    print(f"{'run':<30} {'source':>18} {'pixels':>18} {'out (sink)':>18} {'server CPU s':>18} {'requests':>9}")
    for name, runs in results.items():
        if name in (REFERENCE, REFERENCE_READ):
            continue
        busy = lambda node: span([r["busy"][node] for r in runs], "{:.2f}") if node in runs[0]["busy"] else "–"
        print(f"{name:<30} {busy('source'):>18} {busy('pixels'):>18} {busy('out'):>18} "
              f"{span([r['server_cpu'] for r in runs], '{:.2f}'):>18} {runs[0]['requests']:>9}")
    print()
    ratio = rate["cnclip, server"] / rate["cnclip, local disk"]
    print(f"server / local disk, samples/s:                {ratio:6.2f}x  ({goal(ratio, 0.8)})")
    ratio = rate["cnclip read only, server"] / rate["cnclip read only, local disk"]
    print(f"server / local disk, read only:                {ratio:6.2f}x")
    core = rate["cnclip, server"] / cores / rate[REFERENCE]
    print(f"cnclip server / reference, per core:           {core:6.2f}x  ({goal(core, 3)})")
    print(f"cnclip server / reference, per CPU s:          {per_cpu['cnclip, server'] / per_cpu[REFERENCE]:6.2f}x"
          "  (the server's CPU counted)")
    if args.sink == "write":
        without = statistics.median(r["samples"] / (r["cpu"] - r["busy"]["out"]) for r in results["cnclip, server"])
        print(f"  the same without the Parquet writer's busy s: {without / per_cpu[REFERENCE]:6.2f}x  (an estimate)")
    if args.rss:
        small, large = ([r["rss"] for r in results[f"rss: server, {n} samples"]]
                        for n in (args.samples, args.samples_large))
        ratio = statistics.median(large) / statistics.median(small)
        print(f"peak RSS from the server, {args.samples_large} / {args.samples} samples "
              f"({args.rss_pipeline} pipeline): {span(large)} / {span(small)} MiB = {ratio:.3f}  "
              f"({goal(ratio, 1.10, False)})")


if __name__ == "__main__":
    main()
