"""SQL recall@1/5/10 over 1M × 1M ids: `cnclip sql` with jobs/sql/recall.sql in one process
(DataFusion, the reference run) vs on a local Ballista cluster (`cnclip cluster`) of 1 and of 2
executors, same tables, same query; rows (queries) per second, ratios against the one-process
run, and a check that every run gives the same numbers.

    .venv/bin/python scripts/bench/sql_cluster.py [--queries 1000000] [--gallery 1000000]
        [--tasks 1] [--runs 3] [--executors 1,2] [--cnclip target/release/cnclip] [--work /tmp/cnclip-bench-sql]

Tables (Parquet, 8 parts each, in --work; every process reads them at the same path):
`truth` (query_id, targets: 1–3 ids of 1..--gallery) and `predictions` (query_id, predicted:
10 ids, a third of the queries with a target among them). Each executor runs --tasks tasks at
once (default 1, so 2 executors = 2 cores on a 2-core machine; the one-process run uses every
core; `--executors ''` runs the one-process query only). Timing: the client's wall time per query (the cluster already up, executors
registered; plan, schedule, scan, shuffle, result), best of --runs after one warm-up run.
"""
import argparse
import os
import re
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
RECALL_SQL = open(os.path.join(HERE, "..", "..", "jobs", "sql", "recall.sql")).read()
PARTS = 8


def tables(work, queries, gallery):
    done = os.path.join(work, f"tables-{queries}-{gallery}")
    if os.path.exists(os.path.join(done, "ok")):
        return done
    rng = np.random.default_rng(0)
    for name in ("truth", "predictions"):
        os.makedirs(os.path.join(done, name), exist_ok=True)
    ids = np.arange(queries, dtype=np.int64)
    counts = rng.integers(1, 4, queries)
    targets = rng.integers(0, gallery, counts.sum())
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    predicted = rng.integers(0, gallery, (queries, 10))
    hit = rng.random(queries) < 1 / 3
    slot = rng.integers(0, 10, queries)
    predicted[hit, slot[hit]] = targets[offsets[:-1][hit]]
    step = -(-queries // PARTS)
    for p in range(PARTS):
        lo, hi = p * step, min((p + 1) * step, queries)
        t = pa.ListArray.from_arrays(pa.array(offsets[lo:hi + 1] - offsets[lo]), pa.array(targets[offsets[lo]:offsets[hi]]))
        pq.write_table(pa.table({"query_id": ids[lo:hi], "targets": t}), os.path.join(done, "truth", f"part-{p:05d}.parquet"))
        flat = pa.array(predicted[lo:hi].reshape(-1))
        lists = pa.ListArray.from_arrays(pa.array(np.arange(0, (hi - lo) * 10 + 1, 10, dtype=np.int32)), flat)
        pq.write_table(pa.table({"query_id": ids[lo:hi], "predicted": lists}),
                       os.path.join(done, "predictions", f"part-{p:05d}.parquet"))
    open(os.path.join(done, "ok"), "w").close()
    return done


def run_query(cnclip, data, cluster):
    args = [cnclip, "sql", "--table", f"truth={data}/truth", "--table", f"predictions={data}/predictions",
            "--format", "csv"]
    if cluster:
        args += ["--cluster", cluster]
    args += ["--", RECALL_SQL]  # the query starts with `--` comments
    start = time.perf_counter()
    out = subprocess.run(args, check=True, capture_output=True, text=True)
    return time.perf_counter() - start, out.stdout.strip().splitlines()[-1]


class Cluster:
    def __init__(self, cnclip, executors, tasks, work):
        self.procs = []
        scheduler = subprocess.Popen([cnclip, "cluster", "scheduler", "--bind", "127.0.0.1:0"], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        self.procs.append(scheduler)
        line = scheduler.stdout.readline()
        self.address = re.search(r"127\.0\.0\.1:\d+", line).group(0)
        self.work_dirs = []
        for e in range(executors):
            wd = os.path.join(work, f"executor-{executors}-{e}")
            os.makedirs(wd, exist_ok=True)
            self.work_dirs.append(wd)
            p = subprocess.Popen([cnclip, "cluster", "executor", "--scheduler", self.address, "--bind-host", "127.0.0.1",
                                  "--concurrent-tasks", str(tasks), "--work-dir", wd], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True)
            p.stdout.readline()
            self.procs.append(p)
        self.url = f"df://{self.address}"

    def used(self):
        return sum(1 for d in self.work_dirs if os.listdir(d))

    def stop(self):
        for p in self.procs:
            p.kill()
            p.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=1_000_000)
    ap.add_argument("--gallery", type=int, default=1_000_000)
    ap.add_argument("--tasks", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--executors", default="1,2", help="cluster sizes to run, comma-separated; '' for none")
    ap.add_argument("--cnclip", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release", "cnclip"))
    ap.add_argument("--work", default="/tmp/cnclip-bench-sql")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    data = tables(a.work, a.queries, a.gallery)
    print(f"recall@1/5/10 over {a.queries:,} queries × {a.gallery:,} gallery ids ({PARTS} parts per table), "
          f"{os.cpu_count()} cores, {a.tasks} task(s) per executor")
    results = {}

    def timed(label, cluster):
        run_query(a.cnclip, data, cluster)  # warm-up (page cache, executor sessions)
        best, answer = min(run_query(a.cnclip, data, cluster) for _ in range(a.runs))
        results[label] = (best, answer)
        return best

    timed("one process (reference)", None)
    for executors in [int(n) for n in a.executors.split(",") if n]:
        cluster = Cluster(a.cnclip, executors, a.tasks, a.work)
        try:
            timed(f"cluster, {executors} executor{'s' if executors > 1 else ''}", cluster.url)
            used = cluster.used()
        finally:
            cluster.stop()
        if used != executors:
            print(f"warning: only {used} of {executors} executors ran tasks", file=sys.stderr)
    ref = results["one process (reference)"][0]
    print(f"{'run':<26} {'seconds':>8} {'queries/s':>12} {'vs one process':>15}   r1,r5,r10")
    for label, (seconds, answer) in results.items():
        print(f"{label:<26} {seconds:8.2f} {a.queries / seconds:12,.0f} {ref / seconds:14.2f}×   {answer}")
    if "cluster, 1 executor" in results and "cluster, 2 executors" in results:
        one, two = results["cluster, 1 executor"][0], results["cluster, 2 executors"][0]
        print(f"2 executors vs 1: {one / two:.2f}×")
    answers = {answer for _, answer in results.values()}
    if len(answers) != 1:
        sys.exit(f"the runs disagree: {answers}")
    print("every run gave the same recall")


if __name__ == "__main__":
    main()
