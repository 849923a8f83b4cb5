//! WebDataset in (issue #25 item 2): the `webdataset` source reads tar shards as the
//! `webdataset` Python package writes and reads them — samples grouped by key, brace patterns
//! and globs expanded in its order, ids `(shard << 32) | sample` — into images and texts tables;
//! samples without an image or text, truncated tars and corrupt member headers are quarantined
//! and the rest read; `--shard i/n` splits by tar file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cnclip_tests::python;
use serde_json::{Value, json};

fn cnclip(args: &[&str]) -> Output {
    Command::new(cnclip_tests::cnclip_bin()).args(args).output().unwrap()
}

fn ok(output: Output) -> String {
    assert!(output.status.success(), "cnclip failed:\n{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// `shards/000000.tar`, `000001.tar`, … with `webdataset.TarWriter`, a count of samples each:
/// img2dataset's keys, a small random JPEG, a Chinese caption and a JSON member per sample.
pub(crate) const MAKE_SHARDS: &str = r#"
import io, os, sys, numpy as np, webdataset as wds
from PIL import Image
out, counts = sys.argv[1], [int(n) for n in sys.argv[2:]]
rng = np.random.default_rng(25)
os.makedirs(f"{out}/shards", exist_ok=True)
for shard, n in enumerate(counts):
    with wds.TarWriter(f"{out}/shards/{shard:06d}.tar") as sink:
        for i in range(n):
            buf = io.BytesIO()
            pixels = rng.integers(0, 255, (int(rng.integers(16, 48)), int(rng.integers(16, 48)), 3), dtype=np.uint8)
            Image.fromarray(pixels).save(buf, format="JPEG")
            # img2dataset's keys: the shard's number, then the sample's, 9 digits in all.
            sink.write({"__key__": f"{shard:05d}{i:04d}", "jpg": buf.getvalue(),
                        "txt": f"第{shard}组第{i}张图：一只“可爱”的猫", "json": {"i": i}})
"#;

/// What `webdataset.WebDataset` reads from a node's `paths` (brace patterns expanded by
/// `braceexpand`, globs sorted): `[id, key, jpg as hex, txt]` per sample, the id being the
/// number of a key of decimal digits, else `(shard << 32) | sample`.
const READ_SHARDS: &str = r#"
import glob, json, re, sys, webdataset as wds
from braceexpand import braceexpand
root, patterns = sys.argv[1], json.loads(sys.argv[2])
urls = [u for p in patterns for u in (sorted(glob.glob(f"{root}/{p}")) if "*" in p else braceexpand(f"{root}/{p}"))]
rows, counts = [], {}
for s in wds.WebDataset(urls, shardshuffle=False):
    shard = urls.index(s["__url__"])
    i = counts[shard] = counts.get(shard, -1) + 1
    key = s["__key__"]
    number = int(key) if re.fullmatch(r"[0-9]+", key) and int(key) < 2**63 else None
    rows.append([number if number is not None else (shard << 32) | i, key, s["jpg"].hex(), s["txt"].decode()])
print(json.dumps(rows, ensure_ascii=False))
"#;

/// A Parquet table: its fields (`[name, type]`) and its columns by name, bytes as hex.
const TABLE: &str = r#"
import json, sys, pyarrow as pa, pyarrow.parquet as pq
t = pq.read_table(sys.argv[1])
kind = lambda ty: f"list<{ty.value_type}>" if pa.types.is_list(ty) else str(ty)
value = lambda v: v.hex() if isinstance(v, bytes) else v
columns = {c: [value(v) for v in t.column(c).to_pylist()] for c in t.column_names}
print(json.dumps({"schema": [[f.name, kind(f.type)] for f in t.schema], "columns": columns}, ensure_ascii=False))
"#;

/// `bad/gaps.tar`, `bad/truncated.tar` and `bad/corrupt.tar` (the last two from
/// `shards/000000.tar`); prints what webdataset reads of `gaps.tar` and of the good shard:
/// `[key, image as hex or null, text or null (not UTF-8)]` per sample.
const MAKE_BAD: &str = r#"
import io, json, os, sys, tarfile, numpy as np, webdataset as wds
from PIL import Image
root = sys.argv[1]
good, bad = f"{root}/shards/000000.tar", f"{root}/bad"
os.makedirs(bad)
rng = np.random.default_rng(7)
def image(fmt):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()
# gaps.tar: keys with a dot in their folder; a sample with no image, one whose text is not
# UTF-8, an upper-case extension, a PNG; a member without extension and a meta member.
k = [f"part.v1/{i:09d}" for i in range(6)]
members = [("README", b"not a sample"), (f"{k[0]}.jpg", image("JPEG")), (f"{k[0]}.txt", "第一张".encode()),
           (f"{k[1]}.json", b"{}"), (f"{k[1]}.txt", "没有图".encode()),
           (f"{k[2]}.jpg", image("JPEG")), (f"{k[2]}.txt", "第三张".encode()), ("__info__", b"{}"),
           (f"{k[3]}.jpg", image("JPEG")), (f"{k[3]}.txt", b"\xff\xfe not UTF-8"),
           (f"{k[4]}.JPEG", image("JPEG")), (f"{k[4]}.txt", "大写扩展名".encode()),
           (f"{k[5]}.png", image("PNG")), (f"{k[5]}.txt", "PNG 图".encode())]
with tarfile.open(f"{bad}/gaps.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
    for name, data in members:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
# truncated.tar: the good shard cut in the middle of its 4th sample's jpg.
jpgs = [m for m in tarfile.open(good).getmembers() if m.name.endswith(".jpg")]
with open(good, "rb") as f:
    data = f.read()
open(f"{bad}/truncated.tar", "wb").write(data[: jpgs[3].offset_data + jpgs[3].size // 2])
# corrupt.tar: the 3rd sample's jpg header's name overwritten, so its checksum fails. (TarWriter
# puts a PAX header, for the float mtime, before each member: `offset` is that one's.)
corrupt = bytearray(data)
header = jpgs[2].offset_data - tarfile.BLOCKSIZE
corrupt[header : header + 20] = b"X" * 20
open(f"{bad}/corrupt.tar", "wb").write(corrupt)
try:  # Python's tarfile, so webdataset, stops there.
    list(tarfile.open(f"{bad}/corrupt.tar"))
    raise AssertionError("the corrupt header still reads")
except tarfile.ReadError as e:
    assert "checksum" in str(e), e
def read(url):
    def text(s):
        try:
            return s["txt"].decode()
        except UnicodeDecodeError:
            return None
    pick = lambda s: next((s[e].hex() for e in ("jpg", "jpeg", "png", "webp") if e in s), None)
    return [[s["__key__"], pick(s), text(s)] for s in wds.WebDataset(url, shardshuffle=False)]
print(json.dumps({"gaps": read(f"{bad}/gaps.tar"), "good": read(good)}, ensure_ascii=False))
"#;

fn make_shards(root: &Path, counts: &[usize]) {
    let mut args = vec![root.to_str().unwrap().to_string()];
    args.extend(counts.iter().map(usize::to_string));
    python(MAKE_SHARDS, &args.iter().map(String::as_str).collect::<Vec<_>>(), "");
}

fn webdataset_rows(root: &Path, paths: &[&str]) -> Vec<Value> {
    let rows = python(READ_SHARDS, &[root.to_str().unwrap(), &serde_json::to_string(paths).unwrap()], "");
    parse(&rows).as_array().unwrap().clone()
}

fn table(path: &Path) -> Value {
    parse(&python(TABLE, &[path.to_str().unwrap()], ""))
}

/// `pipeline.toml` in `root`: per `(name, paths, table)` a `webdataset` node and a
/// `write_parquet` sink to `OUT/name.parquet`.
fn pipeline(root: &Path, out: &str, nodes: &[(&str, &[&str], &str)]) -> PathBuf {
    let mut toml = String::new();
    for (name, paths, contract) in nodes {
        let paths = serde_json::to_string(paths).unwrap();
        toml += &format!(
            "[nodes.{name}]\nkind = \"webdataset\"\npaths = {paths}\ntable = \"{contract}\"\n\n\
             [nodes.{name}_out]\nkind = \"write_parquet\"\ninput = \"{name}\"\npath = \"{out}/{name}.parquet\"\n\n"
        );
    }
    let path = root.join("pipeline.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

/// The images table of `[id, key, jpg hex, txt]` rows, as [`TABLE`] prints its columns.
fn images_of(rows: &[Value]) -> Value {
    let column = |i: usize| rows.iter().map(|r| r[i].clone()).collect::<Vec<_>>();
    json!({"image_id": column(0), "image": column(2), "key": column(1)})
}

/// The texts table of the same rows: each text's `image_ids` is its sample's image id.
fn texts_of(rows: &[Value]) -> Value {
    let column = |i: usize| rows.iter().map(|r| r[i].clone()).collect::<Vec<_>>();
    let image_ids: Vec<Value> = rows.iter().map(|r| json!([r[0]])).collect();
    json!({"text_id": column(0), "text": column(3), "image_ids": image_ids, "key": column(1)})
}

#[test]
fn webdataset_shards_read_as_the_webdataset_package_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    make_shards(root, &[6, 7]);
    let paths: &[&str] = &["shards/{000000..000001}.tar"];
    let file = pipeline(root, "out", &[("images", paths, "images"), ("texts", paths, "texts")]);
    ok(cnclip(&["run", file.to_str().unwrap()]));
    let reference = webdataset_rows(root, paths);
    assert_eq!(reference.len(), 13);
    for row in &reference {
        // Key `SSSSSIIII` (img2dataset's: shard SSSSS, sample IIII) is decimal: the id is its number.
        let key = row[1].as_str().unwrap();
        assert_eq!(row[0], key.parse::<u64>().unwrap(), "{row}");
    }
    let images = table(&root.join("out/images.parquet"));
    assert_eq!(images["schema"], json!([["image_id", "int64"], ["image", "binary"], ["key", "string"]]));
    assert_eq!(images["columns"], images_of(&reference));
    let texts = table(&root.join("out/texts.parquet"));
    let fields = json!([["text_id", "int64"], ["text", "string"], ["image_ids", "list<int64>"], ["key", "string"]]);
    assert_eq!(texts["schema"], fields);
    assert_eq!(texts["columns"], texts_of(&reference));
}

#[test]
fn brace_patterns_and_globs_name_the_shards_in_braceexpand_order() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    make_shards(root, &[5, 6, 7]);
    let cases: [(&str, &[&str]); 5] = [
        ("range", &["shards/{000000..000002}.tar"]),
        ("list", &["shards/000000.tar", "shards/000001.tar", "shards/000002.tar"]),
        ("alternatives", &["shards/00000{2,0}.tar"]),
        ("mixed", &["shards/000002.tar", "shards/{000000..000001}.tar"]),
        ("glob", &["shards/*.tar"]),
    ];
    let nodes: Vec<(&str, &[&str], &str)> = cases.iter().map(|&(name, paths)| (name, paths, "images")).collect();
    ok(cnclip(&["run", pipeline(root, "out", &nodes).to_str().unwrap()]));
    let read = |name: &str| table(&root.join(format!("out/{name}.parquet")))["columns"].clone();
    for (name, paths) in cases {
        assert_eq!(read(name), images_of(&webdataset_rows(root, paths)), "{name}: {paths:?}");
    }
    assert_eq!(read("range"), read("list"));
    assert_eq!(read("range"), read("glob"));
    assert_eq!(read("alternatives")["image_id"].as_array().unwrap().len(), 7 + 5);

    // A range naming a shard that does not exist stops the job before it runs, naming it.
    let file = pipeline(root, "missing", &[("range", &["shards/{000001..000003}.tar"], "images")]);
    let file = file.to_str().unwrap();
    for args in [&["run", "--check", file][..], &["run", file][..]] {
        let output = cnclip(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains("000003.tar") && !stderr.contains("000002.tar"), "{args:?}: {stderr}");
    }
    assert!(!root.join("missing").exists(), "a job that failed to start wrote its output");
}

#[test]
fn bad_samples_truncated_tars_and_corrupt_headers_are_quarantined_and_the_rest_read() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    make_shards(root, &[6]);
    let reference = parse(&python(MAKE_BAD, &[root.to_str().unwrap()], ""));
    let (gaps, good) = (reference["gaps"].as_array().unwrap(), reference["good"].as_array().unwrap());
    let tars: &[&str] = &["bad/gaps.tar", "bad/truncated.tar", "bad/corrupt.tar"];
    let file = pipeline(root, "out", &[("images", tars, "images"), ("texts", &["bad/gaps.tar"], "texts")]);
    let log = ok(cnclip(&["run", file.to_str().unwrap()]));

    // `[id, key, image, text]` rows: a decimal key's number, else (s << 32) | i for sample i of tar
    // s (counting every sample, quarantined or not).
    let row = |shard: u64, i: usize, sample: &Value| {
        let key = sample[0].as_str().unwrap();
        let number = key.bytes().all(|b| b.is_ascii_digit()).then(|| key.parse::<u64>().ok()).flatten();
        json!([number.unwrap_or((shard << 32) | i as u64), sample[0], sample[1], sample[2]])
    };
    let gaps_rows: Vec<Value> = gaps.iter().enumerate().map(|(i, s)| row(0, i, s)).collect();
    let mut images: Vec<Value> = gaps_rows.iter().filter(|r| !r[2].is_null()).cloned().collect();
    images.extend((0..3).map(|i| row(1, i, &good[i]))); // before the cut in the 4th sample
    images.extend([0, 1, 3, 4, 5].map(|i| row(2, i, &good[i]))); // before and after the bad header
    assert_eq!(table(&root.join("out/images.parquet"))["columns"], images_of(&images), "{log}");
    let texts: Vec<Value> = gaps_rows.iter().filter(|r| !r[3].is_null()).cloned().collect();
    assert_eq!(texts.len(), 5, "gaps.tar has one text that is not UTF-8");
    assert_eq!(table(&root.join("out/texts.parquet"))["columns"], texts_of(&texts));

    // The quarantine (beside the pipeline file by default): node by node, each in file order.
    let quarantine = std::fs::read_to_string(root.join("quarantine.jsonl")).unwrap();
    let rows: Vec<Value> = quarantine.lines().map(parse).collect();
    let (samples, damage): (Vec<&Value>, Vec<&Value>) = rows.iter().partition(|r| !r["id"].is_null());
    let expected = [
        ("images", "gaps.tar", "part.v1/000000001", "no image"),
        ("images", "truncated.tar", "000000003", "truncated"),
        ("images", "corrupt.tar", "000000002", "corrupt"),
        ("texts", "gaps.tar", "part.v1/000000003", "UTF-8"),
    ];
    assert_eq!(samples.len(), expected.len(), "{quarantine}");
    for (row, (node, tar, key, reason)) in samples.iter().zip(expected) {
        assert!(row["source"].as_str().unwrap().ends_with(tar), "{node}: {row}");
        assert_eq!(row["id"], key, "{node}: {row}");
        assert!(row["reason"].as_str().unwrap().contains(reason), "{node}: {row}");
        assert!(row["location"].is_string(), "{node}: {row}");
    }
    // The bad header itself has a record of its own, with no key to name.
    assert_eq!(damage.len(), 1, "{quarantine}");
    for row in damage {
        assert!(row["source"].as_str().unwrap().ends_with("corrupt.tar"), "{row}");
        assert!(row["reason"].as_str().unwrap().contains("corrupt"), "{row}");
    }
    assert!(log.contains(&format!("{} records quarantined", rows.len())), "{log}");
}

#[test]
fn shard_i_of_n_reads_the_tars_whose_number_is_i_mod_n() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    make_shards(root, &[5, 6, 7]);
    let paths: &[&str] = &["shards/{000000..000002}.tar"];
    let file = pipeline(root, "out", &[("images", paths, "images")]);
    let reference = webdataset_rows(root, paths);
    for (share, tars) in [("0/2", &[0, 2][..]), ("1/2", &[1][..])] {
        ok(cnclip(&["run", file.to_str().unwrap(), "--shard", share]));
        let rows: Vec<Value> =
            // Key `SSSSSIIII`: sample IIII of shard SSSSS.
            reference.iter().filter(|r| tars.contains(&r[1].as_str().unwrap()[..5].parse().unwrap())).cloned().collect();
        assert_eq!(table(&root.join("out/images.parquet"))["columns"], images_of(&rows), "--shard {share}");
    }
}

/// What `webdataset.WebDataset` reads from shards cnclip wrote: `[key, member extensions,
/// image as hex or null, text or null]` per sample.
const READ_WRITTEN: &str = r#"
import json, sys, webdataset as wds
rows = []
for s in wds.WebDataset(sys.argv[1], shardshuffle=False):
    exts = sorted(k for k in s if not k.startswith("__"))
    image = next((s[e].hex() for e in ("jpg", "png", "webp", "gif") if e in s), None)
    rows.append([s["__key__"], exts, image, s["txt"].decode() if "txt" in s else None])
print(json.dumps(rows, ensure_ascii=False))
"#;

/// `write_webdataset` writes shards the `webdataset` package reads back sample for sample
/// (keys, image bytes, captions), `samples_per_shard` each, the same bytes on a rerun; a table
/// without a `key` column is keyed by its id in nine digits.
#[test]
fn write_webdataset_writes_shards_the_webdataset_package_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    make_shards(root, &[6, 7]);
    let reference = webdataset_rows(root, &["shards/{000000..000001}.tar"]);
    let toml = "[nodes.images]\nkind = \"webdataset\"\npaths = [\"shards/*.tar\"]\n\n\
                [nodes.texts]\nkind = \"webdataset\"\npaths = [\"shards/*.tar\"]\ntable = \"texts\"\n\n\
                [nodes.images_out]\nkind = \"write_webdataset\"\ninput = \"images\"\npath = \"out/images\"\nsamples_per_shard = 5\n\n\
                [nodes.texts_out]\nkind = \"write_webdataset\"\ninput = \"texts\"\npath = \"out/texts\"\nsamples_per_shard = 5\n";
    std::fs::write(root.join("write.toml"), toml).unwrap();
    ok(cnclip(&["run", root.join("write.toml").to_str().unwrap()]));
    let shards = |name: &str| {
        let mut names: Vec<String> = std::fs::read_dir(root.join("out").join(name))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(shards("images"), ["000000.tar", "000001.tar", "000002.tar"], "13 samples, 5 a shard");
    let read = |name: &str| {
        let pattern = root.join("out").join(name).join("{000000..000002}.tar");
        parse(&python(READ_WRITTEN, &[pattern.to_str().unwrap()], ""))
    };
    let expected_images: Vec<Value> = reference.iter().map(|r| json!([r[1], ["jpg"], r[2], null])).collect();
    assert_eq!(read("images"), json!(expected_images));
    let expected_texts: Vec<Value> = reference.iter().map(|r| json!([r[1], ["txt"], null, r[3]])).collect();
    assert_eq!(read("texts"), json!(expected_texts));

    // A rerun writes the same bytes.
    let bytes = |name: &str| std::fs::read(root.join("out/images").join(name)).unwrap();
    let before: Vec<Vec<u8>> = shards("images").iter().map(|n| bytes(n)).collect();
    ok(cnclip(&["run", root.join("write.toml").to_str().unwrap()]));
    assert_eq!(shards("images").iter().map(|n| bytes(n)).collect::<Vec<_>>(), before);

    // No key column: the id, nine digits.
    let tsv = "7\taGk=\n12\taGk=\n";
    std::fs::write(root.join("imgs.tsv"), tsv).unwrap();
    let toml = "[nodes.b64]\nkind = \"tsv\"\npaths = [\"imgs.tsv\"]\n\n\
                [nodes.images]\nkind = \"decode_base64\"\ninput = \"b64\"\n\n\
                [nodes.out]\nkind = \"write_webdataset\"\ninput = \"images\"\npath = \"out/from_tsv\"\n";
    std::fs::write(root.join("tsv.toml"), toml).unwrap();
    ok(cnclip(&["run", root.join("tsv.toml").to_str().unwrap()]));
    let pattern = root.join("out/from_tsv/000000.tar");
    let rows = parse(&python(READ_WRITTEN, &[pattern.to_str().unwrap()], ""));
    assert_eq!(rows, json!([["000000007", ["jpg"], "6869", null], ["000000012", ["jpg"], "6869", null]]));
}

/// A shard that is not a tar (here gzip-compressed) stops the job naming it, as Python's
/// `tarfile` refuses it; the sink refuses a key that webdataset would read back as another
/// (a file name with a `.`), naming it, and leaves no output behind.
#[test]
fn a_compressed_shard_and_a_key_webdataset_would_misread_stop_the_job_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    make_shards(root, &[3]);
    python(
        "import gzip, shutil, sys\nwith open(sys.argv[1], 'rb') as f, gzip.open(sys.argv[2], 'wb') as g: shutil.copyfileobj(f, g)",
        &[root.join("shards/000000.tar").to_str().unwrap(), root.join("packed.tar").to_str().unwrap()],
        "",
    );
    let toml = "[nodes.s]\nkind = \"webdataset\"\npaths = [\"packed.tar\"]\n\n\
                [nodes.o]\nkind = \"write_parquet\"\ninput = \"s\"\npath = \"out/s.parquet\"\n";
    let stderr = fails(root, "gz.toml", toml);
    assert!(stderr.contains("packed.tar") && stderr.contains("gzip"), "{stderr}");
    assert!(!root.join("out/s.parquet").exists());

    python(
        "import sys, pyarrow as pa, pyarrow.parquet as pq\n\
         pq.write_table(pa.table({'image_id': pa.array([1, 2], pa.int64()), 'image': pa.array([b'a', b'b']), \
         'key': ['ok_1', 'img_002.jpg']}), sys.argv[1])",
        &[root.join("keyed.parquet").to_str().unwrap()],
        "",
    );
    let toml = "[nodes.s]\nkind = \"parquet\"\npaths = [\"keyed.parquet\"]\n\n\
                [nodes.o]\nkind = \"write_webdataset\"\ninput = \"s\"\npath = \"out/wds\"\n";
    let stderr = fails(root, "keys.toml", toml);
    assert!(stderr.contains("img_002.jpg") && stderr.contains("first `.`"), "{stderr}");
    assert!(!root.join("out/wds").exists(), "a failed job left its shards");
    let leftovers: Vec<_> = std::fs::read_dir(root.join("out")).map(|d| d.flatten().collect()).unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Runs the pipeline `toml`, written to `root/name`, which must fail; its stderr.
fn fails(root: &Path, name: &str, toml: &str) -> String {
    std::fs::write(root.join(name), toml).unwrap();
    let output = cnclip(&["run", root.join(name).to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "{stderr}");
    stderr
}
