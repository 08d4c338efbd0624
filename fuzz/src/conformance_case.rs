//! The bytes as one normcase/1 case file, parsed and run by the conformance
//! runner. Besides not crashing, the report line must be exactly one line
//! starting with PASS or FAIL: file-provided text cannot forge report lines.

use crate::conformance;

/// Runs one case from `data` and checks its report line.
pub fn conformance_case(data: &[u8]) {
    let outcome = conformance::run_case(data, "fuzz\ncase");
    let mut out = Vec::new();
    conformance::write_outcome(&mut out, &outcome).expect("writing to a Vec");
    let line = String::from_utf8(out).expect("the report is UTF-8");
    let body = line
        .strip_suffix('\n')
        .expect("the line ends with a newline");
    assert!(
        !body.contains(['\n', '\r']) && !body.contains(['\u{2028}', '\u{2029}', '\u{85}']),
        "report line breaks: {line:?}"
    );
    assert!(
        body.starts_with(if outcome.passed { "PASS " } else { "FAIL " }),
        "{line:?}"
    );
}
