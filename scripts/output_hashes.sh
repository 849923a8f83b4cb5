#!/usr/bin/env bash
# Every subcommand on the demo corpus, then the sha256 of every output it wrote: run it with two
# builds and diff the listings to show a refactor changed no output.
#
#   scripts/output_hashes.sh BIN_DIR WORK_DIR > hashes.txt
#   diff <(scripts/output_hashes.sh old-bin /tmp/a) <(scripts/output_hashes.sh new-bin /tmp/b)
#
# BIN_DIR holds `cnclip` and `cnclip-torch`. Paths are printed relative to WORK_DIR (emptied
# first). Left out, with the reason: `benchmark` (prints timings), `cluster` (servers; its SQL
# runs are compared with local ones by the tests), the demo's report (its durations) and the
# training log (its timestamps). Training is deterministic on one worker and one thread.
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 BIN_DIR WORK_DIR" >&2
  exit 2
fi
bin=$(cd "$1" && pwd)
work=$2
rm -rf "$work"
mkdir -p "$work"
cd "$work"
export OMP_NUM_THREADS=1
cnclip() { "$bin/cnclip" "$@" 2> >(sed 's/^/  | /' >&2); }
exec 3>&1 1>&2 # commands print to stderr; only the listing goes to stdout

step() { echo "== $*" >&2; }

step demo: synth, build-lmdb, train, convert, extract-features, make-topk-predictions, evaluation, zeroshot-evaluation
cnclip demo --out demo --train 200 --test 20 --epochs 1 --batch-size 32 --num-workers 1
c=demo/corpus
ckpt=demo/model.safetensors

step tokenize
printf '一只猫\n北京的秋天很美\nA photo of a 狗\n' | cnclip tokenize --context-length 24 > tokens.jsonl
printf '一只猫\n北京的秋天\n' | cnclip tokenize --preprocess > tokens_pre.jsonl

step import and export
cnclip import --data-dir $c --splits train,valid,test --out tables
cnclip import --lmdb-dir $c/lmdb --splits valid,test --out tables_lmdb
cnclip export --parquet-dir tables --splits valid,test --out exported_tsv
cnclip export --parquet-dir tables --splits valid --out exported_lmdb --format lmdb
cnclip export --parquet-dir tables --splits test --out exported_lmdb_txn --format lmdb --writer txn
cnclip build-lmdb --data-dir exported_tsv --splits valid --lmdb-dir rebuilt_lmdb

step run
cat > pipeline.toml <<'EOF'
[job]
quarantine = "run/quarantine.jsonl"

[nodes.imgs]
kind = "tsv"
paths = ["demo/corpus/test_imgs.tsv"]

[nodes.decoded]
kind = "decode_base64"
input = "imgs"

[nodes.pixels]
kind = "preprocess"
input = "decoded"
resolution = 32

[nodes.pixels_out]
kind = "write_parquet"
input = "pixels"
path = "run/pixels.parquet"

[nodes.texts]
kind = "jsonl"
paths = ["demo/corpus/test_texts.jsonl"]

[nodes.tokens]
kind = "tokenize"
input = "texts"
context_length = 32
preprocess = true

[nodes.tokens_out]
kind = "write_parquet"
input = "tokens"
path = "run/tokens.parquet"
EOF
cnclip run pipeline.toml

step synth
cnclip synth --out synth --train 5 --valid 3 --test 3 --seed 7

step sql
mkdir -p sql eval
cnclip sql --table texts=tables/test_texts.parquet \
  "SELECT text_id, text FROM texts ORDER BY text_id" --format jsonl --output sql/texts.jsonl
cnclip sql --table texts=tables/valid_texts.parquet \
  "SELECT count(*) AS n FROM texts" --format csv --output sql/count.csv

step evaluation and the image → text direction
cnclip evaluation $c/test_texts.jsonl demo/results/test_predictions.jsonl eval/direct.json
cnclip evaluation --engine sql $c/test_texts.jsonl demo/results/test_predictions.jsonl eval/sql.json
cnclip transform-ir-annotation-to-tr --input $c/test_texts.jsonl
cnclip make-topk-predictions-tr --image-feats demo/features/test_imgs.img_feat.jsonl \
  --text-feats demo/features/test_texts.txt_feat.jsonl --top-k 10 --output eval/tr_predictions.jsonl
cnclip evaluation-tr $c/test_texts.tr.jsonl eval/tr_predictions.jsonl eval/tr.json

step extract-features to Parquet parts, sharded, then manifest check
for shard in 0/2 1/2; do
  cnclip extract-features --extract-image-feats --extract-text-feats --image-data $c/test_imgs.tsv \
    --text-data $c/test_texts.jsonl --image-feat-output-path parts/imgs --text-feat-output-path parts/texts \
    --resume $ckpt --context-length 32 --num-workers 1 --part-rows 7 --shard $shard
done
cnclip manifest check parts/imgs --image-data $c/test_imgs.tsv > manifest_imgs.txt
cnclip manifest check parts/texts --text-data $c/test_texts.jsonl > manifest_texts.txt

step similarity, convert, init-model
cnclip similarity --resume $ckpt --image $c/zeroshot/test/000/0.jpg --image $c/zeroshot/test/001/0.jpg \
  --text 红色的圆 --text 蓝色的方块 --context-length 32 --json > similarity.json
cnclip convert --input $ckpt --output converted.pt
cnclip convert --input converted.pt --model-config demo/model.json --output reconverted.safetensors
cnclip init-model --model-config demo/model.json --seed 3 --output init.safetensors

step build-index and a search of it
cnclip build-index --features demo/features/test_imgs.img_feat.jsonl --index IVF2,Flat --train-sample 20 \
  --shard-rows 8 --index-path index --nprobe 2
cnclip make-topk-predictions --text-feats demo/features/test_texts.txt_feat.jsonl --index-path index \
  --top-k 5 --output index_predictions.jsonl

step bench-suite
cat > suite.toml <<'EOF'
[suite]
out = "bench"

[[runs]]
name = "demo-test"
task = "retrieval"
checkpoint = "demo/model.safetensors"
dataset = "test"
images = "demo/corpus/test_imgs.tsv"
texts = "demo/corpus/test_texts.jsonl"

[[runs]]
name = "demo-zeroshot"
task = "zeroshot"
checkpoint = "demo/model.safetensors"
dataset = "synth-shapes"
datapath = "demo/corpus/zeroshot/test"
label_file = "demo/corpus/zeroshot/label_cn.txt"
EOF
cnclip bench-suite suite.toml

# Every file but LMDB's lock files, the demo's report (its durations) and the training's text
# logs (timestamps), with what records the time of a run left out: file times and durations in
# JSON records (`created`, `modified`, `seconds` and what is hashed from them, `made_from`),
# the timing columns of the training metrics, the date in a params file's name.
find . -type f ! -path './demo/report/*' ! -name lock.mdb ! -name '*.log' -print0 | LC_ALL=C sort -z |
  "${CNCLIP_VENV:-$HOME/.cache/cnclip/venv}/bin/python" -c '
import hashlib, json, re, sys
import pyarrow as pa, pyarrow.parquet as pq

VOLATILE = {"created", "modified", "seconds", "made_from", "samples_per_s", "rss_bytes"}

def clean(value):
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [clean(v) for v in value]
    if isinstance(value, str) and value.startswith("{"):
        try:
            return json.dumps(clean(json.loads(value)), sort_keys=True)
        except ValueError:
            return value
    return value

for path in sys.stdin.buffer.read().decode().split("\0")[:-1]:
    data = open(path, "rb").read()
    if path.endswith(".json"):
        data = json.dumps(clean(json.loads(data)), sort_keys=True, ensure_ascii=False).encode()
    elif path.endswith("metrics.parquet"):
        table = pq.read_table(path)
        table = table.drop_columns([c for c in table.column_names if c in VOLATILE])
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        data = sink.getvalue().to_pybytes()
    print(hashlib.sha256(data).hexdigest(), re.sub(r"params_[0-9-]+\.txt$", "params_DATE.txt", path))
' >&3
