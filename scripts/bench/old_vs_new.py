"""A refactor's no-regression check: runs build_lmdb.py, pipeline_rss.py, extract.py and
sql_cluster.py (`--only sql_cluster`: its one-process query, and with `--cluster` its local
Ballista cluster of 2 executors too) with an
old and a new pair of binaries, interleaved (old, new, then new, old, … one run of each per
round), and prints each figure's range per build and the median new/old ratio.

    .venv/bin/python scripts/bench/old_vs_new.py OLD_DIR NEW_DIR [--rounds 3] [--quick]

OLD_DIR and NEW_DIR each hold `cnclip` and `cnclip-torch` (release builds). --quick runs smaller
inputs (build_lmdb 5000 images, pipeline_rss 2000/20000, extract 128 images) to fit a session.
The benchmarks' own reference runs (cn_clip, cp) run too; their figures are left out here.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# (bench, figure name, regex on the script's output, unit)
FIGURES = [
    ("build_lmdb", "cnclip build-lmdb", r"cnclip build-lmdb:\s+([\d.]+) s", "s"),
    ("pipeline_rss", "large run peak RSS", r"^\s*(\d+) images: peak RSS\s+([\d.]+) MiB", "MiB"),
    ("pipeline_rss", "large run time", r"^\s*(\d+) images: peak RSS\s+[\d.]+ MiB,\s+([\d.]+) s", "s"),
    ("extract", "cnclip extract", r"cnclip extract:\s+([\d.]+) s", "s"),
    ("sql_cluster", "sql recall, one process", r"^one process \(reference\)\s+([\d.]+)", "s"),
    ("sql_cluster", "sql recall, 2 executors", r"^cluster, 2 executors\s+([\d.]+)", "s"),
]


def arguments(bench, quick, work, cluster):
    if bench == "build_lmdb":
        return ["--repeat", "1", "--work", f"{work}/lmdb"] + (["--images", "5000"] if quick else [])
    if bench == "pipeline_rss":
        return ["--work", f"{work}/rss"] + (["--small", "2000", "--large", "20000"] if quick else [])
    if bench == "sql_cluster":
        return ["--work", f"{work}/sql", "--runs", "1", "--executors", "2" if cluster else ""] + (
            ["--queries", "200000", "--gallery", "200000"] if quick else [])
    return ["--work", f"{work}/extract"] + (["--images", "128"] if quick else [])


def figure(bench, pattern, output):
    """The figure of the largest run in `output` (pipeline_rss prints a small and a large run)."""
    found = [m.groups() for m in re.finditer(pattern, output, re.M)]
    if not found:
        sys.exit(f"{bench}: no line matches {pattern!r} in:\n{output}")
    if len(found[0]) == 2:
        return float(max(found, key=lambda g: int(g[0]))[1])
    return float(found[-1][0])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--work", default="/tmp/cnclip-bench-old-vs-new")
    p.add_argument("--only", default="build_lmdb,pipeline_rss,extract")
    p.add_argument("--cluster", action="store_true", help="sql_cluster: also time a cluster of 2 executors")
    args = p.parse_args()
    benches = args.only.split(",")
    values = {(b, name, build): [] for b, name, _, _ in FIGURES for build in ("old", "new")}
    for round_ in range(args.rounds):
        order = ["old", "new"] if round_ % 2 == 0 else ["new", "old"]
        for bench in benches:
            for build in order:
                binary = os.path.join(getattr(args, build), "cnclip")
                command = [sys.executable, os.path.join(HERE, f"{bench}.py"), "--cnclip", binary]
                command += arguments(bench, args.quick, args.work, args.cluster)
                run = subprocess.run(command, capture_output=True, text=True)
                if run.returncode != 0:
                    sys.exit(f"{' '.join(command)} failed:\n{run.stdout}\n{run.stderr}")
                for b, name, pattern, _ in FIGURES:
                    if b == bench and (name != "sql recall, 2 executors" or args.cluster):
                        values[(b, name, build)].append(figure(bench, pattern, run.stdout))
                print(f"round {round_ + 1}: {bench} {build} done", file=sys.stderr, flush=True)
    print(f"old: {args.old}\nnew: {args.new}\n{args.rounds} rounds, interleaved{' (--quick)' if args.quick else ''}")
    print(f"{'figure':<36} {'old (range)':>24} {'new (range)':>24} {'new/old':>8}")
    for bench, name, _, unit in FIGURES:
        if bench not in benches or not values[(bench, name, "old")]:
            continue
        old, new = values[(bench, name, "old")], values[(bench, name, "new")]
        span = lambda v: f"{statistics.median(v):.2f} ({min(v):.2f}–{max(v):.2f}) {unit}"
        ratio = statistics.median(new) / statistics.median(old)
        print(f"{bench + ': ' + name:<36} {span(old):>24} {span(new):>24} {ratio:>8.3f}")


if __name__ == "__main__":
    main()
