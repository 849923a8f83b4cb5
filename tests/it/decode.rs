//! Base64 parity (issue #4): both alphabets, padded or not, decode to the bytes Python's
//! `base64.urlsafe_b64decode` gives (for the padded form; Python refuses unpadded input).

use cnclip_operators::decoders::base64::decode;
use cnclip_operators::sources::tsv::plausible_base64;
use cnclip_tests::python;

#[test]
fn base64_both_alphabets_match_python_urlsafe_b64decode() {
    let script = r#"
import base64, json, os, random
random.seed(1)
cases = []
for n in list(range(0, 70)) + [random.randrange(70, 5000) for _ in range(200)]:
    raw = os.urandom(n)
    std, url = base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()
    cases.append({"forms": [std, std.rstrip("="), url, url.rstrip("=")],
                  "python": base64.urlsafe_b64decode(url).hex(), "python_std": base64.urlsafe_b64decode(std).hex()})
print(json.dumps(cases))
"#;
    let cases: Vec<serde_json::Value> = serde_json::from_str(&python(script, &[], "")).unwrap();
    assert!(cases.len() > 250);
    for case in cases {
        let expected = case["python"].as_str().unwrap();
        assert_eq!(case["python_std"].as_str().unwrap(), expected, "Python decodes the standard form the same");
        for form in case["forms"].as_array().unwrap() {
            let form = form.as_str().unwrap().as_bytes();
            let ours: String = decode(form).unwrap().iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(ours, expected, "{}", String::from_utf8_lossy(form));
            assert!(plausible_base64(form).is_ok());
        }
    }
}
