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

/// Runs `normlab conformance dir` and returns (exit code, stdout lines).
fn run_dir(dir: &Path) -> (Option<i32>, Vec<String>) {
    let out = normlab().arg("conformance").arg(dir).output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    (
        out.status.code(),
        stdout.lines().map(String::from).collect(),
    )
}

/// A layer_norm case over `[1, 2]` that passes (`y` right) or fails.
fn ln_case(name_json: &str, right: bool) -> String {
    let y1 = if right { "1.0" } else { "1.5" };
    format!(
        r#"{{"format":"normcase/1","name":{name_json},"op":"layer_norm","attrs":{{"eps":0.0,"axis":-1}},"inputs":{{"x":{{"shape":[1,2],"data":[1.0,3.0]}}}},"expected":{{"y":{{"shape":[1,2],"data":[-1.0,{y1}]}}}}}}"#
    )
}

#[cfg(unix)]
#[test]
fn symlink_cycles_are_walked_once_and_linked_directories_are_found() {
    use std::os::unix::fs::symlink;
    let root = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let sub = root.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(sub.join("inner.json"), ln_case(r#""inner""#, true)).unwrap();
    std::fs::write(other.path().join("outer.json"), ln_case(r#""outer""#, true)).unwrap();
    // Two links to the directory itself, one to its parent, one to the root
    // from below, and a link to an unrelated directory.
    symlink(".", sub.join("self1")).unwrap();
    symlink(".", sub.join("self2")).unwrap();
    symlink("..", sub.join("parent")).unwrap();
    symlink(root.path(), sub.join("root")).unwrap();
    symlink(other.path(), root.path().join("linked")).unwrap();
    let (code, lines) = run_dir(root.path());
    assert_eq!(code, Some(0), "{lines:#?}");
    assert_eq!(
        lines,
        [
            "PASS outer (max abs err 0.000e0)",
            "PASS inner (max abs err 0.000e0)",
            "2 passed, 0 failed"
        ],
    );
}

#[test]
fn a_byte_order_mark_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("\u{FEFF}{}", ln_case(r#""bom""#, true));
    std::fs::write(dir.path().join("bom.json"), text).unwrap();
    let (code, lines) = run_dir(dir.path());
    assert_eq!(code, Some(0), "{lines:#?}");
    assert_eq!(
        lines,
        ["PASS bom (max abs err 0.000e0)", "1 passed, 0 failed"]
    );
}

#[test]
fn names_cannot_forge_report_lines() {
    let dir = tempfile::tempdir().unwrap();
    // A failing case whose name tries to end its line, print a PASS line and
    // a summary, and hide them behind a carriage return, an escape sequence
    // and a Unicode line separator.
    let forged = r#""x\r\nPASS forged (max abs err 0.000e0)\n9 passed, 0 failed\u001b[2K\u2028\\""#;
    std::fs::write(dir.path().join("a.json"), ln_case(forged, false)).unwrap();
    // A file name with a newline, not JSON: its fallback name is escaped too.
    std::fs::write(dir.path().join("b\nPASS c.json"), "not json").unwrap();
    let (code, lines) = run_dir(dir.path());
    assert_eq!(code, Some(1), "{lines:#?}");
    assert_eq!(lines.len(), 3, "{lines:#?}");
    assert!(
        lines[0].starts_with(
            r"FAIL x\r\nPASS forged (max abs err 0.000e0)\n9 passed, 0 failed\u{1b}[2K\u{2028}\\ (y[1]"
        ),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].starts_with(r"FAIL b\nPASS c (cannot read the case: not JSON"),
        "{}",
        lines[1]
    );
    assert_eq!(lines[2], "0 passed, 2 failed");
}

/// Writes `(file stem, case body after "op")` files and runs the directory.
fn run_cases(cases: &[(&str, &str)]) -> (Option<i32>, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    for (name, body) in cases {
        let text = format!(r#"{{"format":"normcase/1","name":"{name}",{body}}}"#);
        std::fs::write(dir.path().join(format!("{name}.json")), text).unwrap();
    }
    run_dir(dir.path())
}

/// The report line of case `name`.
fn line<'a>(lines: &'a [String], name: &str) -> &'a str {
    lines
        .iter()
        .find(|l| l.split(' ').nth(1) == Some(name))
        .unwrap_or_else(|| panic!("no line for {name} in {lines:#?}"))
}

#[test]
fn booleans_are_strict() {
    let bn = r#""op":"batch_norm","inputs":{"x":{"shape":[2,1],"data":[1.0,3.0]},"running_mean":{"shape":[1],"data":[0.0]},"running_var":{"shape":[1],"data":[1.0]}}"#;
    let zero = format!(
        r#"{bn},"attrs":{{"training":0.0}},"expected":{{"y":{{"shape":[2,1],"data":[1.0,3.0]}}}}"#
    );
    let zero_refusal = format!(r#"{bn},"attrs":{{"training":0.0}},"expect_error":true"#);
    let text = format!(
        r#"{bn},"attrs":{{"training":"false"}},"expected":{{"y":{{"shape":[2,1],"data":[1.0,3.0]}}}}"#
    );
    let one = format!(r#"{bn},"attrs":{{"training":false}},"expect_error":1"#);
    // The same case with a real boolean passes: y = x with unit running stats.
    let right = format!(
        r#"{bn},"attrs":{{"training":false,"eps":0.0}},"expected":{{"y":{{"shape":[2,1],"data":[1.0,3.0]}}}}"#
    );
    let (code, lines) = run_cases(&[
        ("zero", zero.as_str()),
        ("zero_refusal", zero_refusal.as_str()),
        ("text", text.as_str()),
        ("one", one.as_str()),
        ("right", right.as_str()),
    ]);
    assert_eq!(code, Some(1), "{lines:#?}");
    for (name, shown) in [
        ("zero", "`training` = 0.0"),
        ("zero_refusal", "`training` = 0.0"),
        ("text", r#"`training` = "false""#),
        ("one", "`expect_error` = 1"),
    ] {
        let l = line(&lines, name);
        assert!(
            l.starts_with("FAIL") && l.contains(shown) && l.contains("is not a boolean"),
            "{l}"
        );
    }
    assert!(line(&lines, "right").starts_with("PASS"), "{lines:#?}");
    assert_eq!(lines.last().unwrap(), "1 passed, 4 failed");
}

#[test]
fn overflowing_shapes_and_out_of_range_attributes_fail_cleanly() {
    let ln = |attrs: &str, shape: &str| {
        format!(
            r#""op":"layer_norm","attrs":{attrs},"inputs":{{"x":{{"shape":{shape},"data":[]}}}},"expect_error":true"#
        )
    };
    let x = r#"{"shape":[1,4,1],"data":[1.0,2.0,3.0,4.0]}"#;
    let gn = |groups: &str| {
        format!(
            r#""op":"group_norm","attrs":{{"num_groups":{groups}}},"inputs":{{"x":{x}}},"expect_error":true"#
        )
    };
    let lrn = |size: &str| {
        format!(r#""op":"lrn","attrs":{{"size":{size}}},"inputs":{{"x":{x}}},"expect_error":true"#)
    };
    let cases = [
        (
            "product",
            ln("{}", "[4294967296,4294967296,2]"),
            "element count overflows usize",
        ),
        (
            "usize_max",
            ln("{}", "[18446744073709551615,2]"),
            "element count overflows usize",
        ),
        (
            "beyond_usize",
            ln("{}", "[18446744073709551616]"),
            "too large for usize",
        ),
        (
            "negative_dim",
            ln("{}", "[-1,2]"),
            "dimension -1 is negative",
        ),
        (
            "fractional_dim",
            ln("{}", "[1.5]"),
            "`shape` = 1.5 is not an integer",
        ),
        (
            "huge_dim",
            ln("{}", "[1e300]"),
            "`shape` = 1e+300 is out of range",
        ),
        (
            "empty_huge",
            ln("{}", "[0,1099511627776]"),
            "empty, but its non-zero dimensions",
        ),
        (
            "axis_huge",
            ln(r#"{"axis":1e30}"#, "[0]"),
            "`axis` = 1e+30 is out of range",
        ),
        (
            "axis_fraction",
            ln(r#"{"axis":0.5}"#, "[0]"),
            "`axis` = 0.5 is not an integer",
        ),
        (
            "groups_huge",
            gn("1e300"),
            "`num_groups` = 1e+300 is out of range",
        ),
        (
            "groups_beyond",
            gn("36893488147419103232"),
            "`num_groups` = 36893488147419103232 is too large",
        ),
        (
            "size_fraction",
            lrn("2.5"),
            "`size` = 2.5 is not an integer",
        ),
        (
            "size_text",
            lrn(r#""3""#),
            r#"`size` = "3" is not a number"#,
        ),
    ];
    let files: Vec<(&str, &str)> = cases.iter().map(|(n, b, _)| (*n, b.as_str())).collect();
    let (code, lines) = run_cases(&files);
    assert_eq!(code, Some(1), "{lines:#?}");
    for (name, _, message) in &cases {
        let l = line(&lines, name);
        assert!(
            l.starts_with("FAIL") && l.contains("malformed case") && l.contains(message),
            "{l}"
        );
    }
    assert!(!lines.iter().any(|l| l.contains("PANIC")), "{lines:#?}");
    assert_eq!(
        lines.last().unwrap(),
        &format!("0 passed, {} failed", cases.len())
    );
}

#[test]
fn refusable_attribute_values_reach_the_operation() {
    // A negative count and an out-of-range axis are the operation's to
    // refuse: such cases pass as expect_error.
    let x = r#"{"shape":[1,4,1],"data":[1.0,2.0,3.0,4.0]}"#;
    let negative = format!(
        r#""op":"group_norm","attrs":{{"num_groups":-2}},"inputs":{{"x":{x}}},"expect_error":true"#
    );
    let too_many = format!(
        r#""op":"group_norm","attrs":{{"num_groups":1e18}},"inputs":{{"x":{x}}},"expect_error":true"#
    );
    let axis = format!(
        r#""op":"layer_norm","attrs":{{"axis":-9223372036854775808}},"inputs":{{"x":{x}}},"expect_error":true"#
    );
    let (code, lines) = run_cases(&[
        ("negative", negative.as_str()),
        ("too_many", too_many.as_str()),
        ("axis", axis.as_str()),
    ]);
    assert_eq!(code, Some(0), "{lines:#?}");
    assert_eq!(lines.last().unwrap(), "3 passed, 0 failed");
}

/// A layer_norm case over x = [1, 2, 4] (ε = 0) stored as `dtype`, with the
/// given `y` and extra top-level JSON.
fn ln16(dtype: &str, x: &str, y: &str, extra: &str) -> String {
    format!(
        r#""dtype":"{dtype}","op":"layer_norm","attrs":{{"eps":0.0,"axis":-1}},"inputs":{{"x":{{"shape":[1,3],"data":[{x}]}}}},"expected":{{"y":{{"shape":[1,3],"data":[{y}]}}}}{extra}"#
    )
}

#[test]
fn sixteen_bit_cases_are_compared_in_ulp_of_their_type() {
    // y = [-1.06904…, -0.26726…, 1.33630…] rounded to bfloat16 and float16;
    // mean 7/3 and rstd 0.80178… as float32.
    let bf = "-1.0703125,-0.267578125,1.3359375";
    let f16 = "-1.0693359375,-0.267333984375,1.3359375";
    let x = "1.0,2.0,4.0";
    let stats = r#","tolerance":{"ulp":1},"expected":{"y":{"shape":[1,3],"data":[-1.0703125,-0.267578125,1.3359375]},"mean":{"shape":[1,1],"data":[2.3333333]},"rstd":{"shape":[1,1],"data":[0.80178374]}}"#;
    // 1.3359375 + 1 and + 2 bfloat16 ulp (2^-7 at 1.34).
    let one_ulp = "-1.0703125,-0.267578125,1.34375";
    let two_ulp = "-1.0703125,-0.267578125,1.3515625";
    let cases = [
        ("bf16", ln16("bfloat16", x, bf, "")),
        ("f16", ln16("float16", x, f16, "")),
        (
            "f32_named",
            ln16("float32", x, "-1.0690449676,-0.2672612419,1.3363062096", ""),
        ),
        // A later key wins in serde_json: the stats replace `expected`.
        ("bf16_stats", ln16("bfloat16", x, bf, stats)),
        ("bf16_one_ulp", ln16("bfloat16", x, one_ulp, "")),
        ("bf16_two_ulp", ln16("bfloat16", x, two_ulp, "")),
        (
            "bf16_two_ulp_atol",
            ln16(
                "bfloat16",
                x,
                two_ulp,
                r#","tolerance":{"ulp":1,"atol":0.016}"#,
            ),
        ),
        (
            "bf16_two_ulp_k2",
            ln16("bfloat16", x, two_ulp, r#","tolerance":{"ulp":2}"#),
        ),
        // float16's y[0] 2 float16 ulp (2^-10 each) further from 0.
        (
            "f16_two_ulp",
            ln16("float16", x, "-1.0712890625,-0.267333984375,1.3359375", ""),
        ),
    ];
    let files: Vec<(&str, &str)> = cases.iter().map(|(n, b)| (*n, b.as_str())).collect();
    let (code, lines) = run_cases(&files);
    assert_eq!(code, Some(1), "{lines:#?}");
    for name in ["bf16", "f16", "bf16_stats"] {
        assert_eq!(
            line(&lines, name),
            format!("PASS {name} (max abs err 0.000e0, max 0.00 ulp)")
        );
    }
    assert!(line(&lines, "f32_named").starts_with("PASS f32_named (max abs err"));
    assert!(!line(&lines, "f32_named").contains("ulp"));
    assert_eq!(
        line(&lines, "bf16_one_ulp"),
        "PASS bf16_one_ulp (max abs err 7.812e-3, max 1.00 ulp)"
    );
    let l = line(&lines, "bf16_two_ulp");
    assert!(
        l.starts_with("FAIL") && l.contains("y[2] = 1.3359375e0, expected 1.3515625e0 (2.00 ulp"),
        "{l}"
    );
    assert!(line(&lines, "bf16_two_ulp_atol").starts_with("PASS"));
    assert!(line(&lines, "bf16_two_ulp_k2").starts_with("PASS"));
    let l = line(&lines, "f16_two_ulp");
    assert!(
        l.starts_with("FAIL") && l.contains("y[0]") && l.contains("(2.00 ulp"),
        "{l}"
    );
    assert_eq!(lines.last().unwrap(), "7 passed, 2 failed");
}

#[test]
fn sixteen_bit_values_must_be_exact() {
    let y = "-1.0703125,-0.267578125,1.3359375";
    let bad_x = |dtype: &str, x: &str| ln16(dtype, &format!("{x},2.0,4.0"), y, "");
    let cases = [
        // 0.1 is no bfloat16 value; its float32 (9 digits) is no bfloat16 either.
        (
            "tenth",
            bad_x("bfloat16", "0.1"),
            "value 0.1 is not a bfloat16 value",
        ),
        // Within f64's rounding of 1.0, but not 1.0.
        (
            "near_one",
            bad_x("bfloat16", "1.0000000000000000001"),
            "is not exactly a bfloat16 value (the nearest is 1e0)",
        ),
        (
            "f16_range",
            bad_x("float16", "70000"),
            "is not a float16 value",
        ),
        (
            "beyond_f64",
            bad_x("bfloat16", "1e400"),
            "is not a bfloat16 value",
        ),
        (
            "below_f64",
            bad_x("float16", "1e-400"),
            "is not exactly a float16 value",
        ),
        // An exact decimal of a value within bfloat16's range but not in it.
        (
            "f32_value",
            bad_x("bfloat16", "1.00000011920928955078125"),
            "is not a bfloat16 value",
        ),
        (
            "expected_too",
            ln16(
                "bfloat16",
                "1.0,2.0,4.0",
                "-1.0690449676,-0.267578125,1.3359375",
                "",
            ),
            "`y`: value -1.0690449676 is not a bfloat16 value",
        ),
        (
            "unknown",
            ln16("float64", "1.0,2.0,4.0", y, ""),
            "unknown dtype `float64`",
        ),
        (
            "not_text",
            ln16("bfloat16", "1.0,2.0,4.0", y, "").replace(r#""bfloat16""#, "16"),
            "`dtype` = 16 is not a string",
        ),
        (
            "negative_ulp",
            ln16("bfloat16", "1.0,2.0,4.0", y, r#","tolerance":{"ulp":-1}"#),
            "`ulp` = -1 is not a finite number >= 0",
        ),
    ];
    // Exact decimals in any notation are read: 2^-20, float16's smallest
    // subnormal 2^-24 and largest value, bfloat16's smallest subnormal 2^-133
    // written out, -0 and zero with a huge exponent. These cases expect the
    // operation to refuse its axis, which it can only do once every value
    // has been read.
    let refused = |dtype: &str, x: &str| {
        format!(
            r#""dtype":"{dtype}","op":"layer_norm","attrs":{{"axis":5}},"inputs":{{"x":{{"shape":[1,3],"data":[{x}]}}}},"expect_error":true"#
        )
    };
    let fine = [
        ("pow_m20", refused("bfloat16", "9.5367431640625E-7,2.0,4.0")),
        (
            "f16_extremes",
            refused("float16", "5.9604644775390625e-8,65504,-65504.000"),
        ),
        (
            "bf16_subnormal",
            refused(
                "bfloat16",
                "91.8354961579912115600575419704879435795832466228193376178712270530013483949005603790283203125e-42,-0,0e999999999999999999999",
            ),
        ),
    ];
    let mut files: Vec<(&str, &str)> = cases.iter().map(|(n, b, _)| (*n, b.as_str())).collect();
    files.extend(fine.iter().map(|(n, b)| (*n, b.as_str())));
    let (code, lines) = run_cases(&files);
    assert_eq!(code, Some(1), "{lines:#?}");
    for (name, _, message) in &cases {
        let l = line(&lines, name);
        assert!(
            l.starts_with("FAIL") && l.contains("malformed case") && l.contains(message),
            "{l}"
        );
    }
    for (name, _) in &fine {
        let l = line(&lines, name);
        assert!(l.starts_with("PASS"), "{l}");
    }
    assert_eq!(
        lines.last().unwrap(),
        &format!("{} passed, {} failed", fine.len(), cases.len())
    );
}
