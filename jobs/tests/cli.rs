//! End-to-end tests of the `cnclip` binary. They live in the binary's own package because only
//! there does cargo build it for tests (`CARGO_BIN_EXE_cnclip`); everything else is in `tests/`.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use cnclip_tests::{corpus, reference_token_ids};

fn cnclip(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cnclip"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cnclip starts");
    let mut pipe = child.stdin.take().unwrap();
    let input = stdin.to_vec();
    let writer = std::thread::spawn(move || pipe.write_all(&input));
    let output = child.wait_with_output().unwrap();
    // A failing cnclip may stop reading before the end: a broken pipe here is fine.
    let _ = writer.join().unwrap();
    output
}

/// The CLI reads lines, so texts without line breaks go through it; the ids must equal cn_clip's.
#[test]
fn tokenize_matches_cn_clip() {
    let texts: Vec<String> = corpus::texts(400, 3).into_iter().map(|t| t.replace(['\n', '\r'], " ")).collect();
    let expected = reference_token_ids(&texts, 24);
    let output = cnclip(&["tokenize", "--context-length", "24"], (texts.join("\n") + "\n").as_bytes());
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let got: Vec<Vec<i64>> =
        String::from_utf8(output.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(got.len(), expected.len(), "one output line per input line");
    for ((text, got), want) in texts.iter().zip(&got).zip(&expected) {
        assert_eq!(got, want, "text {text:?}");
    }
}

#[test]
fn tokenize_accepts_crlf_and_a_last_line_without_newline() {
    let output = cnclip(&["tokenize", "--context-length", "6"], "皮卡丘\r\n皮卡丘".as_bytes());
    assert!(output.status.success());
    assert_eq!(String::from_utf8(output.stdout).unwrap(), "[101, 4649, 1305, 687, 102, 0]\n".repeat(2));
}

#[test]
fn tokenize_names_the_line_that_is_not_utf8() {
    let output = cnclip(&["tokenize"], b"ok\n\xff\xfe bad\n");
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("stdin line 2 is not valid UTF-8"), "{stderr}");
}

#[test]
fn tokenize_rejects_a_context_too_small_for_cls_and_sep() {
    let output = cnclip(&["tokenize", "--context-length", "1"], b"cat\n");
    assert!(!output.status.success());
    assert!(String::from_utf8(output.stderr).unwrap().contains("context length 1 is too small"));
}
