//! `evaluation`, `evaluation-tr` and `transform-ir-annotation-to-tr` (issue #11, item 4) against
//! cn_clip's scripts: the same JSON, byte for byte, on valid predictions and on each kind of
//! invalid submission its checks detect; the same image → text annotation file.

use std::path::Path;
use std::process::Command;

use cnclip_tests::venv_python;

fn cnclip(root: &Path, args: &[&str]) {
    let output = Command::new(cnclip_tests::cnclip_bin()).args(args).current_dir(root).output().unwrap();
    assert!(output.status.success(), "cnclip {args:?}:\n{}", String::from_utf8_lossy(&output.stderr));
}

fn cn_clip(root: &Path, module: &str, args: &[&str]) {
    let output = Command::new(venv_python()).arg("-m").arg(module).args(args).current_dir(root).output().unwrap();
    assert!(output.status.success(), "{module} {args:?}:\n{}", String::from_utf8_lossy(&output.stderr));
}

/// 2⁷⁰: an integer Python's `int` holds and no 64-bit type does.
const BIG: &str = "1180591620717411303424";

/// Ground truth for 12 texts; predictions that hit at rank 1, 3, 7 or never.
fn write_inputs(root: &Path) {
    let mut truth = String::new();
    let mut valid = String::new();
    for t in 0..12i64 {
        let images = [100 + t, 200 + t];
        truth.push_str(&format!(
            "{{\"text_id\": {t}, \"text\": \"第{t}句\", \"image_ids\": [{}, {}]}}\n",
            images[0], images[1]
        ));
        let mut predicted: Vec<i64> = (0..10).map(|r| 1000 + 10 * t + r).collect();
        match t % 4 {
            0 => predicted[0] = images[0],
            1 => predicted[2] = images[1],
            2 => predicted[6] = images[0],
            _ => {}
        }
        valid.push_str(&format!("{{\"text_id\": {t}, \"image_ids\": {predicted:?}}}\n"));
    }
    std::fs::write(root.join("truth.jsonl"), truth).unwrap();
    std::fs::write(root.join("valid.jsonl"), &valid).unwrap();
    let lines: Vec<&str> = valid.lines().collect();
    let rest = lines[1..].join("\n") + "\n";
    let all_but_first = lines[1..].join("\n");
    let first_and = |bad: &str| format!("{}\n{bad}\n{}\n", lines[0], lines[2..].join("\n"));
    let invalid: Vec<(&str, String)> = vec![
        ("unparsable", first_and("{\"text_id\": 1, ")),
        ("blank_line", format!("{}\n\n{rest}", lines[0])),
        ("no_text_id", first_and("{\"id\": 1, \"image_ids\": [1,2,3,4,5,6,7,8,9,10]}")),
        ("string_id_first", format!("{{\"text_id\": \"0\", \"image_ids\": [1,2,3,4,5,6,7,8,9,10]}}\n{rest}")),
        ("string_id_later", first_and("{\"text_id\": \"1\", \"image_ids\": [1,2,3,4,5,6,7,8,9,10]}")),
        ("no_image_ids", first_and("{\"text_id\": 1}")),
        ("image_ids_not_list", first_and("{\"text_id\": 1, \"image_ids\": 5}")),
        ("too_few", first_and("{\"text_id\": 1, \"image_ids\": [1,2,3]}")),
        ("string_image_id", first_and("{\"text_id\": 1, \"image_ids\": [1,2,3,4,\"5\",6,7,8,9,10]}")),
        ("float_image_id", first_and("{\"text_id\": 1, \"image_ids\": [1,2,3,4,5.0,6,7,8,9,10]}")),
        ("duplicates", first_and("{\"text_id\": 1, \"image_ids\": [1,2,3,4,5,6,7,8,9,9]}")),
        ("missing_query", format!("{}\n{}\n", lines[0], lines[2..].join("\n"))),
        ("array_line", first_and("[1, 2]")),
        ("number_line", first_and("7")),
        ("non_ascii", first_and("{\"text_id\": 1, \"image_ids\": [\"一\",2,3,4,5,6,7,8,9,10]}")),
        ("no_trailing_newline", format!("{}\n{all_but_first}", lines[0])),
        // What only Python's json reads (issue #23): integers past 64 bits, NaN, Infinity,
        // numbers past f64's range, the integer -0.
        ("big_text_id", first_and(&format!("{{\"text_id\": {BIG}, \"image_ids\": [1,2,3,4,5,6,7,8,9,10]}}"))),
        ("big_text_id_few", first_and(&format!("{{\"text_id\": {BIG}, \"image_ids\": [1,2]}}"))),
        ("big_image_id", first_and(&format!("{{\"text_id\": 1, \"image_ids\": [{BIG},2,3,4,5,6,7,8,9,10]}}"))),
        (
            "big_image_ids_twice",
            first_and(&format!("{{\"text_id\": 1, \"image_ids\": [{BIG},2,3,4,5,6,7,8,9,{BIG}]}}")),
        ),
        ("u64_image_id", first_and("{\"text_id\": 1, \"image_ids\": [18446744073709551615,2,3,4,5,6,7,8,9,10]}")),
        ("big_line", first_and(BIG)),
        ("nan_image_id", first_and("{\"text_id\": 1, \"image_ids\": [NaN,2,3,4,5,6,7,8,9,10]}")),
        ("infinite_image_id", first_and("{\"text_id\": 1, \"image_ids\": [-Infinity,2,3,4,5,6,7,8,9,10]}")),
        ("e400_image_id", first_and("{\"text_id\": 1, \"image_ids\": [1e400,2,3,4,5,6,7,8,9,10]}")),
        ("e400_text_id", first_and("{\"text_id\": 1e400, \"image_ids\": [1,2,3,4,5,6,7,8,9,10]}")),
        ("nan_line", first_and("NaN")),
        ("negative_zero_text_id", first_and("{\"text_id\": -0, \"image_ids\": [1,2,3,4,5,6,7,8,9,10]}")),
    ];
    for (name, content) in invalid {
        std::fs::write(root.join(format!("{name}.jsonl")), content).unwrap();
    }
    // What cn_clip reports by the exception's argument (issue #23): a directory (errno 21) and
    // bytes that are not UTF-8.
    std::fs::create_dir(root.join("a_directory.jsonl")).unwrap();
    let mut bytes = format!("{}\n", lines[0]).into_bytes();
    bytes.extend_from_slice(b"{\"text_id\": 1, \"image_ids\": [1,2,3,4,5,6,7,8,9,10], \"x\": \"\xff\xfe\"}\n");
    bytes.extend_from_slice(rest.split_once('\n').map_or("", |(_, r)| r).as_bytes());
    std::fs::write(root.join("not_utf8.jsonl"), bytes).unwrap();
}

#[test]
fn evaluation_json_equals_cn_clips_on_valid_and_invalid_submissions() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_inputs(root);
    let mut names: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "truth.jsonl")
        .collect();
    names.push("does_not_exist.jsonl".into());
    names.sort();
    for name in &names {
        cn_clip(root, "cn_clip.eval.evaluation", &["truth.jsonl", name, "theirs.json"]);
        cnclip(root, &["evaluation", "truth.jsonl", name, "ours.json"]);
        let (theirs, ours) = (
            std::fs::read_to_string(root.join("theirs.json")).unwrap(),
            std::fs::read_to_string(root.join("ours.json")).unwrap(),
        );
        assert_eq!(ours, theirs, "{name}");
    }
    let valid = std::fs::read_to_string(root.join("ours.json")).unwrap();
    cnclip(root, &["eval", "truth.jsonl", "valid.jsonl", "ours.json"]);
    let score: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("ours.json")).unwrap()).unwrap();
    assert_eq!(score["success"], true, "{valid}");
    assert_eq!(score["scoreJson"]["r1"], 25.0);

    // Image → text: the annotation turned around, and its evaluation.
    cn_clip(root, "cn_clip.eval.transform_ir_annotation_to_tr", &["--input", "truth.jsonl"]);
    let theirs_tr = std::fs::read_to_string(root.join("truth.tr.jsonl")).unwrap();
    std::fs::remove_file(root.join("truth.tr.jsonl")).unwrap();
    cnclip(root, &["transform-ir-annotation-to-tr", "--input", "truth.jsonl"]);
    assert_eq!(std::fs::read_to_string(root.join("truth.tr.jsonl")).unwrap(), theirs_tr);
    let mut predictions = String::new();
    for (i, line) in theirs_tr.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let image = v["image_id"].as_i64().unwrap();
        let mut texts: Vec<i64> = (0..10).map(|r| 500 + r).collect();
        if i % 3 == 0 {
            texts[i % 10] = v["text_ids"][0].as_i64().unwrap();
        }
        predictions.push_str(&format!("{{\"image_id\": {image}, \"text_ids\": {texts:?}}}\n"));
    }
    std::fs::write(root.join("tr_valid.jsonl"), &predictions).unwrap();
    std::fs::write(root.join("tr_bad.jsonl"), predictions.replacen("\"image_id\": 100", "\"image_id\": \"100\"", 1))
        .unwrap();
    for name in ["tr_valid.jsonl", "tr_bad.jsonl"] {
        cn_clip(root, "cn_clip.eval.evaluation_tr", &["truth.tr.jsonl", name, "theirs.json"]);
        cnclip(root, &["evaluation-tr", "truth.tr.jsonl", name, "ours.json"]);
        assert_eq!(
            std::fs::read_to_string(root.join("ours.json")).unwrap(),
            std::fs::read_to_string(root.join("theirs.json")).unwrap(),
            "{name}"
        );
    }
}
