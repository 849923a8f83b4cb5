//! `cnclip sql` (issue #11, item 6): DataFusion over Parquet feature tables (a file, a directory
//! of parts) with `dot` and `cosine_similarity`; a SQL top-1 join equals the exact kNN's top-1;
//! every output format is read back by pyarrow / Python.

use std::path::Path;
use std::process::Command;

use cnclip_tests::python;

const MAKE_TABLES: &str = r#"
import sys, os, numpy as np, pyarrow as pa, pyarrow.parquet as pq
root = sys.argv[1]
rng = np.random.default_rng(5)
def unit(n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)
def table(ids, feats):
    return pa.table({"id": pa.array(ids, pa.int64()),
                     "feature": pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1), pa.float32()), feats.shape[1])})
images, texts = unit(120, 16), unit(20, 16)
os.makedirs(f"{root}/img")
pq.write_table(table(list(range(60)), images[:60]), f"{root}/img/part-00000.parquet")
pq.write_table(table(list(range(60, 120)), images[60:]), f"{root}/img/part-00001.parquet")
pq.write_table(table(list(range(20)), texts), f"{root}/txt.parquet")
best = (texts.astype(np.float64) @ images.astype(np.float64).T).argmax(axis=1)
print(",".join(str(b) for b in best))
"#;

fn cnclip(root: &Path, args: &[&str]) -> String {
    let output = Command::new(cnclip_tests::cnclip_bin()).args(args).current_dir(root).output().unwrap();
    assert!(output.status.success(), "cnclip {args:?}:\n{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

const TOP1: &str = "SELECT text_id, image_id, s FROM (SELECT t.id AS text_id, i.id AS image_id, dot(t.feature, i.feature) AS s, \
                    cosine_similarity(t.feature, i.feature) AS c, \
                    row_number() OVER (PARTITION BY t.id ORDER BY dot(t.feature, i.feature) DESC) AS r \
                    FROM txt t CROSS JOIN img i) WHERE r = 1 AND abs(s - c) < 1e-6 ORDER BY text_id";

#[test]
fn sql_top1_join_equals_exact_knn_and_every_format_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let best: Vec<i64> =
        python(MAKE_TABLES, &[root.to_str().unwrap()], "").trim().split(',').map(|b| b.parse().unwrap()).collect();
    let tables = ["--table", "img=img", "--table", "txt=txt.parquet"];
    let lines = cnclip(root, &[&["sql", TOP1, "--format", "jsonl"][..], &tables[..]].concat());
    let rows: Vec<serde_json::Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 20, "{lines}");
    let found: Vec<i64> = rows.iter().map(|r| r["image_id"].as_i64().unwrap()).collect();
    assert_eq!(found, best, "SQL top-1 differs from the exact top-1");

    // The same as a table, as CSV and as Parquet.
    let table = cnclip(root, &[&["sql", "SELECT count(*) AS n FROM img"][..], &tables[..]].concat());
    assert!(table.contains("| 120 |"), "{table}");
    let csv = cnclip(root, &[&["sql", TOP1, "--format", "csv"][..], &tables[..]].concat());
    assert_eq!(csv.lines().next(), Some("text_id,image_id,s"));
    assert_eq!(csv.lines().count(), 21);
    cnclip(root, &[&["sql", TOP1, "--format", "parquet", "--output", "top1.parquet"][..], &tables[..]].concat());
    let ids = python(
        "import sys, pyarrow.parquet as pq\nprint(pq.read_table(sys.argv[1]).column('image_id').to_pylist())",
        &[root.join("top1.parquet").to_str().unwrap()],
        "",
    );
    assert_eq!(ids.trim(), format!("{best:?}"));

    // A wrong query or table is an error naming it.
    let output = Command::new(cnclip_tests::cnclip_bin())
        .args(["sql", "SELECT dot(id, id) FROM img", "--table", "img=img"])
        .current_dir(root)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("dot(a, b) takes two lists of floats"));
    let output = Command::new(cnclip_tests::cnclip_bin())
        .args(["sql", "SELECT 1", "--table", "x=nope.parquet"])
        .current_dir(root)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains("nope.parquet does not exist"));
}
