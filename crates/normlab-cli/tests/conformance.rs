//! `normlab conformance`: the vendored cases pass, and a wrong, malformed or
//! wrongly accepted case fails the run.

use std::path::{Path, PathBuf};
use std::process::Command;

fn normlab() -> Command {
    Command::new(env!("CARGO_BIN_EXE_normlab"))
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn count_json(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            if p.is_dir() {
                count_json(&p)
            } else {
                usize::from(p.extension().is_some_and(|e| e == "json"))
            }
        })
        .sum()
}

#[test]
fn every_vendored_case_passes() {
    let data = workspace().join("tests/data");
    let out = normlab().arg("conformance").arg(&data).output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let cases = count_json(&data);
    assert!(cases >= 53 + 100, "only {cases} cases under tests/data");
    assert!(out.status.success(), "{stdout}");
    assert_eq!(
        stdout.lines().last().unwrap(),
        format!("{cases} passed, 0 failed")
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("PASS ")).count(),
        cases
    );
}

fn case(name: &str, body: &str) -> String {
    format!(r#"{{"format":"normcase/1","name":"{name}","source":"test","op":"layer_norm",{body}}}"#)
}

#[test]
fn wrong_malformed_and_wrongly_accepted_cases_fail() {
    let dir = tempfile::tempdir().unwrap();
    let x = r#""inputs":{"x":{"shape":[1,2],"data":[1.0,3.0]}}"#;
    let files = [
        (
            "right",
            case(
                "right",
                &format!(
                    r#""attrs":{{"eps":0.0,"axis":-1}},{x},"expected":{{"y":{{"shape":[1,2],"data":[-1.0,1.0]}}}}"#
                ),
            ),
        ),
        (
            "wrong",
            case(
                "wrong",
                &format!(
                    r#""attrs":{{"eps":0.0,"axis":-1}},{x},"expected":{{"y":{{"shape":[1,2],"data":[-1.0,1.5]}}}}"#
                ),
            ),
        ),
        (
            "accepted",
            case(
                "accepted",
                &format!(r#""attrs":{{"eps":0.0,"axis":-1}},{x},"expect_error":true"#),
            ),
        ),
        (
            "refused",
            case(
                "refused",
                &format!(r#""attrs":{{"eps":0.0,"axis":5}},{x},"expect_error":true"#),
            ),
        ),
        (
            "malformed",
            case(
                "malformed",
                r#""attrs":{},"inputs":{"x":{"shape":[3],"data":[1.0]}},"expect_error":true"#,
            ),
        ),
        (
            "bad_grad",
            case(
                "bad_grad",
                &format!(
                    r#""attrs":{{"eps":0.0,"axis":-1}},{x},"expected":{{"y":{{"shape":[1,2],"data":[-1.0,1.0]}}}},"backward":{{"dy":{{"shape":[1,2],"data":[1.0,1.0]}},"expected":{{"dx":{{"shape":[1,2],"data":[0.5,0.0]}}}}}}"#
                ),
            ),
        ),
    ];
    for (name, text) in &files {
        std::fs::write(dir.path().join(format!("{name}.json")), text).unwrap();
    }
    let out = normlab()
        .arg("conformance")
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let verdict = |name: &str| {
        stdout
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap()
            .to_string()
    };
    assert!(verdict("right").starts_with("PASS"));
    assert!(verdict("refused").starts_with("PASS"));
    assert!(
        verdict("wrong").starts_with("FAIL") && verdict("wrong").contains("y[1]"),
        "{}",
        verdict("wrong")
    );
    assert!(verdict("accepted").starts_with("FAIL"));
    assert!(verdict("malformed").starts_with("FAIL") && verdict("malformed").contains("malformed"));
    assert!(verdict("bad_grad").starts_with("FAIL") && verdict("bad_grad").contains("dx[0]"));
    assert_eq!(stdout.lines().last().unwrap(), "2 passed, 4 failed");
}

#[test]
fn a_missing_path_is_a_clear_error() {
    let out = normlab()
        .args(["conformance", "no/such/dir"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.starts_with("error: no/such/dir"), "{stderr}");
}
