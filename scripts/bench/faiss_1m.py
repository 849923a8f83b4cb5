"""Approximate kNN at scale: cnclip `make-topk-predictions` with FAISS IVF and HNSW indexes vs
exact search (`--index Flat`) on a 1M × 512 gallery — recall@10 against the exact top-10,
queries/s of each, index build time and bytes per vector.

    .venv/bin/python scripts/bench/faiss_1m.py [--gallery 1000000] [--queries 10000]
        [--index IVF4096,Flat --nprobe 64] [--hnsw HNSW32 --ef-search 128] [--cnclip target/release/cnclip]

The features are clustered like real embeddings (a Gaussian mixture of 4,096 centres on the unit
sphere, L2-normalised), written as our Parquet feature tables; queries are drawn from the same
mixture. Each index is built once and saved with `--index-path` (build time); then a run with
one query (start-up: reading the gallery and loading the index) and a run with every query give
queries/s = queries / (all − start-up). Threads: all cores (FAISS uses OpenMP).
"""
import argparse
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def features_table(ids, feats):
    flat = pa.array(feats.reshape(-1), type=pa.float32())
    lists = pa.FixedSizeListArray.from_arrays(flat, feats.shape[1])
    schema = pa.schema([pa.field("id", pa.int64(), nullable=False),
                        pa.field("feature", pa.list_(pa.field("item", pa.float32()), feats.shape[1]), nullable=False)])
    return pa.Table.from_arrays([pa.array(ids, type=pa.int64()), lists], schema=schema)


def mixture(rng, centres, n, spread):
    picks = rng.integers(0, len(centres), n)
    x = centres[picks] + rng.standard_normal((n, centres.shape[1]), dtype=np.float32) * spread
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def data(work, n, q, dim, seed=0):
    gallery, queries = os.path.join(work, f"gallery-{n}"), os.path.join(work, f"queries-{q}.parquet")
    if os.path.exists(os.path.join(gallery, "_done")) and os.path.exists(queries):
        return gallery, queries
    os.makedirs(gallery, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((4096, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spread = 1.0 / np.sqrt(dim)  # noise of norm ~1, as far from the centre as the centres are apart
    part = 100_000
    for start in range(0, n, part):
        m = min(part, n - start)
        table = features_table(np.arange(start, start + m), mixture(rng, centres, m, spread))
        pq.write_table(table, os.path.join(gallery, f"part-{start // part:05}.parquet"), row_group_size=16384)
    pq.write_table(features_table(np.arange(10**9, 10**9 + q), mixture(rng, centres, q, spread)), queries)
    open(os.path.join(gallery, "_done"), "w").close()
    return gallery, queries


def knn(cnclip, gallery, queries, out, index, extra, index_path):
    cmd = [cnclip, "make-topk-predictions", "--image-feats", gallery, "--text-feats", queries, "--top-k", "10",
           "--output", out, "--index", index, "--index-path", index_path] + extra
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def top10(path):
    t = pq.read_table(path)
    return {q: set(n) for q, n in zip(t.column("query_id").to_pylist(), t.column("neighbour_ids").to_pylist())}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gallery", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--index", default="IVF4096,Flat")
    p.add_argument("--nprobe", type=int, default=64)
    p.add_argument("--hnsw", default="HNSW32")
    p.add_argument("--ef-search", type=int, default=128)
    p.add_argument("--train-sample", type=int, default=200_000)
    p.add_argument("--cnclip", default="target/release/cnclip")
    p.add_argument("--work", default="/tmp/cnclip-bench-faiss")
    args = p.parse_args()
    cnclip = os.path.abspath(args.cnclip)
    os.makedirs(args.work, exist_ok=True)
    start = time.perf_counter()
    gallery, queries = data(args.work, args.gallery, args.queries, args.dim)
    one = os.path.join(args.work, "one-query.parquet")
    pq.write_table(pq.read_table(queries).slice(0, 1), one)
    print(f"gallery {args.gallery} x {args.dim}, {args.queries} queries, top-10, {os.cpu_count()} cores "
          f"(data {time.perf_counter() - start:.0f} s)")
    runs = [("exact (Flat)", "Flat", []),
            (f"{args.index} nprobe={args.nprobe}", args.index, ["--nprobe", str(args.nprobe),
                                                                 "--train-sample", str(args.train_sample)]),
            (f"{args.hnsw} efSearch={args.ef_search}", args.hnsw, ["--ef-search", str(args.ef_search)])]
    exact = None
    exact_qps = None
    for name, index, extra in runs:
        tag = index.replace(",", "_")
        index_path = os.path.join(args.work, f"{tag}-{args.gallery}.faiss")
        if os.path.exists(index_path):
            os.remove(index_path)
        out = os.path.join(args.work, f"{tag}.parquet")
        build = knn(cnclip, gallery, one, os.path.join(args.work, "build.parquet"), index, extra, index_path)
        size = os.path.getsize(index_path)
        startup = knn(cnclip, gallery, one, os.path.join(args.work, "startup.parquet"), index, extra, index_path)
        total = knn(cnclip, gallery, queries, out, index, extra, index_path)
        qps = args.queries / max(total - startup, 1e-9)
        found = top10(out)
        if exact is None:
            exact, exact_qps = found, qps
            recall = 1.0
        else:
            recall = float(np.mean([len(found[q] & exact[q]) / len(exact[q]) for q in exact]))
        print(f"  {name:28} recall@10 vs exact {recall:.4f}  {qps:9.1f} queries/s ({qps / exact_qps:6.1f}x exact)  "
              f"build+save {build - startup:6.1f} s  index {size / args.gallery:7.1f} bytes/vector")
    print("  goal: recall@10 vs exact >= 0.95 for IVF or HNSW")


if __name__ == "__main__":
    sys.exit(main())
