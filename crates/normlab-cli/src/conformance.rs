//! Runner for normcase/1 conformance cases (see `tests/data/FORMAT.md`).
//!
//! A case names an operation, its attributes and inputs, and the expected
//! outputs (forward, running-statistics updates, and optionally gradients),
//! or says the input must be refused (`expect_error`). Values are of the
//! case's `dtype` (float32 by default, bfloat16 or float16), parsed straight
//! from their decimal text; the operation runs in that type, through one
//! path generic over it ([`Storage`]).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use normlab::kernels::batch_norm::{
    batch_norm, batch_norm_act, batch_norm_act_backward, batch_norm_backward, BatchNormOptions,
    RunningStatsMut,
};
use normlab::kernels::channel_rows::{
    layer_norm_channels, layer_norm_channels_backward, rms_norm_channels,
    rms_norm_channels_backward,
};
use normlab::kernels::group_norm::{
    group_norm, group_norm_act, group_norm_act_backward, group_norm_backward,
};
use normlab::kernels::instance_norm::{instance_norm, instance_norm_backward};
use normlab::kernels::layer_norm::{
    layer_norm, layer_norm_act, layer_norm_act_backward, layer_norm_backward,
};
use normlab::kernels::lrn::{lrn, lrn_backward};
use normlab::kernels::rms_norm::{rms_norm, rms_norm_backward};
use normlab::{
    Activation, EpsPlacement, Epsilon, EvenWindow, Float, Grads, LrnOptions, LrnRegion, Momentum,
    NormError, RunningVarEstimator, Saved, Tensor,
};
use serde_json::{Map, Value};

/// The element types a case can be stored in: parsing a value from its
/// decimal text, and the spacing of the type for the `ulp` tolerance.
trait Storage: Float {
    /// Explicit fraction bits of the significand.
    const FRACTION_BITS: i32;
    /// Exponent of the smallest normal value.
    const MIN_EXP: i32;
    /// The `ulp` tolerance of a case that states none: none for float32
    /// (its `atol`/`rtol` defaults apply), 1 for the 16-bit types.
    const DEFAULT_ULP: Option<f64>;

    /// One value of a tensor, from its decimal text.
    fn parse(text: &str) -> Result<Self, String>;

    /// Spacing of the type at `|v|`: `2^(e - FRACTION_BITS)` for
    /// `2^e <= |v| < 2^(e+1)`, and the subnormal spacing below the smallest
    /// normal (and at 0); infinite for a non-finite `v`.
    fn ulp(v: f64) -> f64 {
        if !v.is_finite() {
            return f64::INFINITY;
        }
        let biased = ((v.to_bits() >> 52) & 0x7ff) as i32;
        // f64 subnormals are far below every smallest normal here.
        let e = if biased == 0 {
            Self::MIN_EXP
        } else {
            (biased - 1023).max(Self::MIN_EXP)
        };
        2f64.powi(e - Self::FRACTION_BITS)
    }
}

impl Storage for f32 {
    const FRACTION_BITS: i32 = 23;
    const MIN_EXP: i32 = -126;
    const DEFAULT_ULP: Option<f64> = None;

    /// Straight to f32, rounding to nearest (normcase/1's rule for float32:
    /// the decimals round-trip, they need not be exact).
    fn parse(text: &str) -> Result<Self, String> {
        text.parse::<f32>()
            .map_err(|e| format!("value {text}: {e}"))
    }
}

impl Storage for half::bf16 {
    const FRACTION_BITS: i32 = 7;
    const MIN_EXP: i32 = -126;
    const DEFAULT_ULP: Option<f64> = Some(1.0);

    fn parse(text: &str) -> Result<Self, String> {
        parse_exact(text)
    }
}

impl Storage for half::f16 {
    const FRACTION_BITS: i32 = 10;
    const MIN_EXP: i32 = -14;
    const DEFAULT_ULP: Option<f64> = Some(1.0);

    fn parse(text: &str) -> Result<Self, String> {
        parse_exact(text)
    }
}

/// A value of a 16-bit type: the decimal must be exactly a finite value of
/// `T`. Reading it as f64 rounds at most once; the f64 is then checked to be
/// a `T` value and to be the decimal itself, digit for digit (a decimal near
/// a `T` value, such as a float32 written with 9 digits, is refused rather
/// than rounded a second time).
fn parse_exact<T: Storage>(text: &str) -> Result<T, String> {
    let v = text
        .parse::<f64>()
        .map_err(|e| format!("value {text}: {e}"))?;
    let t = T::from_f64(v);
    if !v.is_finite() || t.to_f64() != v {
        return Err(format!("value {text} is not a {} value", T::NAME));
    }
    if !decimal_is_exactly(text, v) {
        return Err(format!(
            "value {text} is not exactly a {} value (the nearest is {v:e})",
            T::NAME
        ));
    }
    Ok(t)
}

/// A decimal number reduced to `digits · 10^exp`, `digits` without leading
/// or trailing zeros (empty for zero), sign dropped.
#[derive(Debug, PartialEq)]
struct Decimal {
    digits: String,
    exp: i64,
}

impl Decimal {
    /// Reads JSON number text (`-12.50e-3`); `None` for anything else, or an
    /// exponent beyond i64.
    fn parse(text: &str) -> Option<Decimal> {
        let text = text.strip_prefix('-').unwrap_or(text);
        let (mantissa, exp) = match text.find(['e', 'E']) {
            Some(i) => (&text[..i], Some(&text[i + 1..])),
            None => (text, None),
        };
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !all_digits(int) || !(frac.is_empty() || all_digits(frac)) {
            return None;
        }
        let digits = format!("{int}{frac}");
        let digits = digits.trim_start_matches('0');
        let trimmed = digits.trim_end_matches('0');
        if trimmed.is_empty() {
            // Zero, whatever its exponent.
            return Some(Decimal {
                digits: String::new(),
                exp: 0,
            });
        }
        let exp = match exp {
            None => 0,
            Some(e) => {
                let unsigned = e.strip_prefix(['+', '-']).unwrap_or(e);
                if !all_digits(unsigned) {
                    return None;
                }
                e.parse::<i64>().ok()?
            }
        };
        let exp = exp
            .checked_sub(i64::try_from(frac.len()).ok()?)?
            .checked_add(i64::try_from(digits.len() - trimmed.len()).ok()?)?;
        Some(Decimal {
            digits: trimmed.to_string(),
            exp,
        })
    }
}

/// Whether the decimal `text` is exactly the finite `v`. `v = m·2^e` with
/// `m` odd has exactly `max(0, -e)` decimals, so printing that many (exact in
/// Rust's formatting) gives all of its digits; for the 16-bit types that is
/// at most 133.
fn decimal_is_exactly(text: &str, v: f64) -> bool {
    if !v.is_finite() {
        return false;
    }
    let Some(given) = Decimal::parse(text) else {
        return false;
    };
    if v == 0.0 {
        return given.digits.is_empty();
    }
    let bits = v.to_bits();
    let biased = ((bits >> 52) & 0x7ff) as i64;
    let fraction = bits & ((1 << 52) - 1);
    let (m, e) = if biased == 0 {
        (fraction, -1074)
    } else {
        (fraction | (1 << 52), biased - 1075)
    };
    let e = e + i64::from(m.trailing_zeros());
    let decimals = usize::try_from((-e).max(0)).unwrap_or(0);
    Decimal::parse(&format!("{:.decimals$}", v.abs())) == Some(given)
}

/// How a case can go wrong.
#[derive(Debug)]
enum Failure {
    /// The operation refused the input: right for `expect_error` cases.
    Refused(NormError),
    /// The case itself is malformed (unknown op, bad tensor, …).
    Malformed(String),
}

impl From<NormError> for Failure {
    fn from(e: NormError) -> Self {
        Failure::Refused(e)
    }
}

type CaseResult<T> = Result<T, Failure>;

fn malformed<T>(msg: impl Into<String>) -> CaseResult<T> {
    Err(Failure::Malformed(msg.into()))
}

/// Outcome of one case.
#[derive(Debug)]
pub struct Outcome {
    /// Case name.
    pub name: String,
    /// Passed?
    pub passed: bool,
    /// What to print after PASS/FAIL.
    pub detail: String,
}

/// Pass/fail totals.
#[derive(Debug, Default)]
pub struct Summary {
    /// Cases that passed.
    pub passed: usize,
    /// Cases that failed.
    pub failed: usize,
}

/// Collects `.json` files from files and directories (recursively, sorted).
///
/// Symbolic links are followed, but each directory is walked once, keyed by
/// its canonical path: a link back to an ancestor (`ln -s . loop`) or to a
/// directory already walked adds nothing, so the walk always terminates,
/// while a link to an unrelated directory still contributes its cases.
pub fn collect_cases(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut visited = HashSet::new();
    for path in paths {
        if path.is_dir() {
            let mut stack = vec![path.clone()];
            while let Some(dir) = stack.pop() {
                let canonical = std::fs::canonicalize(&dir)
                    .with_context(|| format!("resolving directory {}", shown(&dir)))?;
                if !visited.insert(canonical) {
                    continue;
                }
                let mut entries = std::fs::read_dir(&dir)
                    .with_context(|| format!("reading directory {}", shown(&dir)))?
                    .map(|entry| entry.map(|e| e.path()))
                    .collect::<std::io::Result<Vec<_>>>()
                    .with_context(|| format!("reading directory {}", shown(&dir)))?;
                // Reverse order on the stack walks each directory in name
                // order, so which alias of a linked directory is reported
                // does not depend on the file system's listing order.
                entries.sort_unstable_by(|a, b| b.cmp(a));
                for p in entries {
                    if p.is_dir() {
                        stack.push(p);
                    } else if p.extension().is_some_and(|e| e == "json") {
                        files.push(p);
                    }
                }
            }
        } else if path.exists() {
            files.push(path.clone());
        } else {
            bail!("{}: no such file or directory", shown(path));
        }
    }
    files.sort();
    Ok(files)
}

/// A path as printable text: control characters escaped, so a file name
/// cannot start a new line of the report.
fn shown(path: &Path) -> String {
    escape(&path.display().to_string())
}

/// Escapes file-provided text for a one-line report: backslashes, control
/// characters (newline, carriage return, escape, …), line and paragraph
/// separators and bidirectional-text controls become `\n`, `\u{2028}`, … as
/// in Rust's `escape_debug`; everything else, quotes included, is kept.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let invisible = matches!(
            c,
            '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{206F}' | '\u{FEFF}'
        );
        if c == '\\' || c.is_control() || invisible {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

/// Writes one case's report line: `PASS name (detail)` or `FAIL name (detail)`,
/// with name and detail escaped so that the line is exactly one line.
///
/// # Errors
/// Errors of `out`.
pub fn write_outcome(out: &mut impl std::io::Write, outcome: &Outcome) -> std::io::Result<()> {
    let verdict = if outcome.passed { "PASS" } else { "FAIL" };
    writeln!(
        out,
        "{verdict} {} {}",
        escape(&outcome.name),
        escape(&outcome.detail)
    )
}

/// Runs every case under `paths`, printing one line per case and the totals.
///
/// A panic inside one case (a bug in the runner or the library, never the
/// expected reaction to bad input) is reported as that case's FAIL, saying
/// it was a panic, and the run goes on with the next case.
pub fn run(paths: &[PathBuf], out: &mut impl std::io::Write) -> anyhow::Result<Summary> {
    let files = collect_cases(paths)?;
    if files.is_empty() {
        bail!("no .json case files under {:?}", paths);
    }
    let mut summary = Summary::default();
    for file in &files {
        let outcome = std::panic::catch_unwind(|| run_file(file)).unwrap_or_else(|payload| {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-text panic payload".into());
            Outcome {
                name: fallback_name(file),
                passed: false,
                detail: format!("(PANIC in the runner or library: {message})"),
            }
        });
        if outcome.passed {
            summary.passed += 1;
        } else {
            summary.failed += 1;
        }
        write_outcome(out, &outcome)?;
    }
    writeln!(out, "{} passed, {} failed", summary.passed, summary.failed)?;
    Ok(summary)
}

/// The name of a case that has none of its own: its file stem.
fn fallback_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Runs one case file.
pub fn run_file(path: &Path) -> Outcome {
    match std::fs::read(path) {
        Ok(bytes) => run_case(&bytes, &fallback_name(path)),
        Err(e) => Outcome {
            name: fallback_name(path),
            passed: false,
            detail: format!("(cannot read {}: {e})", shown(path)),
        },
    }
}

/// Runs one case given as the bytes of its file; `fallback_name` names it
/// when it has no `name` of its own. A UTF-8 byte-order mark is skipped.
/// Never panics on any input (the library's own panics aside); print the
/// result with [`write_outcome`].
pub fn run_case(bytes: &[u8], fallback_name: &str) -> Outcome {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let case: Value = match std::str::from_utf8(bytes)
        .map_err(|e| format!("not UTF-8: {e}"))
        .and_then(|text| serde_json::from_str(text).map_err(|e| format!("not JSON: {e}")))
    {
        Ok(v) => v,
        Err(e) => {
            return Outcome {
                name: fallback_name.to_string(),
                passed: false,
                detail: format!("(cannot read the case: {e})"),
            }
        }
    };
    let name = case
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or(fallback_name)
        .to_string();
    let (passed, detail) = judge(&case);
    Outcome {
        name,
        passed,
        detail,
    }
}

/// Runs a parsed case and says whether it passed, and why.
pub fn judge(case: &Value) -> (bool, String) {
    if case.get("format").and_then(Value::as_str) != Some("normcase/1") {
        return (false, "(not a normcase/1 file)".into());
    }
    let expect_error = match case.get("expect_error") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return (
                false,
                format!(
                    "(malformed case: `expect_error` = {other} is not a boolean (true or false))"
                ),
            )
        }
    };
    match evaluate(case) {
        Err(Failure::Malformed(msg)) => (false, format!("(malformed case: {msg})")),
        Err(Failure::Refused(e)) if expect_error => (true, format!("(refused: {e})")),
        Err(Failure::Refused(e)) => (false, format!("(error: {e})")),
        Ok(_) if expect_error => (false, "(expected an error, got a result)".into()),
        Ok(report) => (report.ok, report.detail),
    }
}

/// Comparison of computed against expected values.
struct Report {
    ok: bool,
    detail: String,
}

/// Reads the case's `dtype` and runs it in that type.
fn evaluate(case: &Value) -> CaseResult<Report> {
    match case.get("dtype") {
        None => evaluate_as::<f32>(case),
        Some(Value::String(s)) => match s.as_str() {
            "float32" => evaluate_as::<f32>(case),
            "bfloat16" => evaluate_as::<half::bf16>(case),
            "float16" => evaluate_as::<half::f16>(case),
            other => malformed(format!(
                "unknown dtype `{other}` (float32, bfloat16 or float16)"
            )),
        },
        Some(other) => malformed(format!("`dtype` = {other} is not a string")),
    }
}

/// Outputs that are statistics rather than values of the storage type: the
/// runner gives them as float32 (rounded from the f64 it keeps) whatever
/// the case's dtype, and reads their expected values as float32.
const STATISTICS: [&str; 3] = ["mean", "rstd", "num_batches_tracked"];

/// Expected outputs, each widened to f64, with the spacing function of the
/// type it is stored in.
type ExpectedSet = BTreeMap<String, (Vec<usize>, Vec<f64>, fn(f64) -> f64)>;

fn expected_set<T: Storage>(v: Option<&Value>) -> CaseResult<ExpectedSet> {
    let mut out = ExpectedSet::new();
    if let Some(map) = v.and_then(Value::as_object) {
        for (k, t) in map {
            if t.is_null() {
                continue;
            }
            let entry = if STATISTICS.contains(&k.as_str()) {
                let t = named_tensor::<f32>(k, t)?;
                (
                    t.shape().to_vec(),
                    widen(t.data()),
                    <f32 as Storage>::ulp as fn(f64) -> f64,
                )
            } else {
                let t = named_tensor::<T>(k, t)?;
                (
                    t.shape().to_vec(),
                    widen(t.data()),
                    <T as Storage>::ulp as fn(f64) -> f64,
                )
            };
            out.insert(k.clone(), entry);
        }
    }
    Ok(out)
}

fn widen<T: Float>(data: &[T]) -> Vec<f64> {
    data.iter().map(|v| v.to_f64()).collect()
}

/// Runs a case whose tensors are stored as `T`.
fn evaluate_as<T: Storage>(case: &Value) -> CaseResult<Report> {
    let op = case
        .get("op")
        .and_then(Value::as_str)
        .ok_or_else(|| Failure::Malformed("no `op`".into()))?;
    let empty = Map::new();
    let attrs = Attrs(
        case.get("attrs")
            .and_then(Value::as_object)
            .unwrap_or(&empty),
    );
    let inputs = tensors::<T>(case.get("inputs"))?;
    let x = inputs
        .get("x")
        .ok_or_else(|| Failure::Malformed("no input `x`".into()))?;
    let dy = match case.get("backward") {
        Some(b) => {
            let dy = b
                .get("dy")
                .ok_or_else(|| Failure::Malformed("backward without `dy`".into()))?;
            Some(named_tensor::<T>("dy", dy)?)
        }
        None => None,
    };
    let (forward, grads) = run_op(op, &attrs, x, &inputs, dy.as_ref())?;
    let default_ulp = T::DEFAULT_ULP;
    let mut results = Vec::new();
    let mut any_ulp = false;
    if let Some(expected) = case.get("expected") {
        let tol = tolerance(case.get("tolerance"), (1e-5, 1e-4), default_ulp)?;
        any_ulp |= tol.ulp.is_some();
        results.extend(compare(&expected_set::<T>(Some(expected))?, &forward, tol)?);
    }
    if let (Some(b), Some(grads)) = (case.get("backward"), grads) {
        let tol = tolerance(b.get("tolerance"), (1e-4, 1e-3), default_ulp)?;
        any_ulp |= tol.ulp.is_some();
        let mut got = Outputs::new();
        got.insert("dx".to_string(), widen(grads.dx.data()));
        if let Some(t) = grads.dweight {
            got.insert("dweight".to_string(), widen(t.data()));
        }
        if let Some(t) = grads.dbias {
            got.insert("dbias".to_string(), widen(t.data()));
        }
        results.extend(compare(&expected_set::<T>(b.get("expected"))?, &got, tol)?);
    }
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let (max_err, max_ulp) = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .fold((0.0f64, 0.0f64), |(a, u), b| (a.max(b.abs), u.max(b.ulp)));
    Ok(if failures.is_empty() {
        Report {
            ok: true,
            detail: if any_ulp {
                format!("(max abs err {max_err:.3e}, max {max_ulp:.2} ulp)")
            } else {
                format!("(max abs err {max_err:.3e})")
            },
        }
    } else {
        Report {
            ok: false,
            detail: format!(
                "({})",
                failures
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        }
    })
}

/// How close computed values must be to expected ones.
#[derive(Clone, Copy, Debug)]
struct Tolerance {
    atol: f64,
    rtol: f64,
    /// Units in the last place of the expected value's type; when given, a
    /// value passes within this many ulp *or* within `atol + rtol·|expected|`.
    ulp: Option<f64>,
}

/// Largest errors of one output: absolute, and in ulp of the expected value.
struct MaxErr {
    abs: f64,
    ulp: f64,
}

/// Compares each expected output; `Ok(max errors)` or `Err(description)` per key.
fn compare(
    expected: &ExpectedSet,
    got: &Outputs,
    tol: Tolerance,
) -> CaseResult<Vec<Result<MaxErr, String>>> {
    let mut out = Vec::new();
    for (key, (shape, want, ulp_of)) in expected {
        let Some(have) = got.get(key) else {
            return malformed(format!(
                "the runner does not produce output `{key}` for this op"
            ));
        };
        if have.len() != want.len() {
            out.push(Err(format!(
                "{key}: {} values, expected {} (shape {shape:?})",
                have.len(),
                want.len(),
            )));
            continue;
        }
        let mut max = MaxErr { abs: 0.0, ulp: 0.0 };
        let mut worst: Option<(usize, f64, f64, f64)> = None;
        for (i, (&h, &w)) in have.iter().zip(want).enumerate() {
            let err = (h - w).abs();
            let ulps = err / ulp_of(w);
            let within = h == w
                || (h.is_nan() && w.is_nan())
                || err <= tol.atol + tol.rtol * w.abs()
                || tol.ulp.is_some_and(|k| ulps <= k);
            if !within && worst.is_none() {
                worst = Some((i, h, w, ulps));
            }
            if err.is_finite() {
                max.abs = max.abs.max(err);
                max.ulp = max.ulp.max(ulps);
            } else if !within {
                max.abs = f64::INFINITY;
                max.ulp = f64::INFINITY;
            }
        }
        out.push(match worst {
            None => Ok(max),
            Some((i, h, w, u)) if tol.ulp.is_some() => Err(format!(
                "{key}[{i}] = {h:e}, expected {w:e} ({u:.2} ulp; max abs err {:.3e}, max {:.2} ulp)",
                max.abs, max.ulp
            )),
            Some((i, h, w, _)) => Err(format!(
                "{key}[{i}] = {h:e}, expected {w:e} (max abs err {:.3e})",
                max.abs
            )),
        });
    }
    Ok(out)
}

/// Reads a tolerance object. Without `ulp` (and without a default one),
/// absent `atol`/`rtol` take `default`; with `ulp`, they default to 0.
fn tolerance(
    v: Option<&Value>,
    default: (f64, f64),
    default_ulp: Option<f64>,
) -> CaseResult<Tolerance> {
    let read = |k: &str| match v.and_then(|v| v.get(k)) {
        Some(x) => number(x, k).map(Some),
        None => Ok(None),
    };
    let ulp = read("ulp")?.or(default_ulp);
    if let Some(k) = ulp {
        if !(k.is_finite() && k >= 0.0) {
            return malformed(format!("`ulp` = {k} is not a finite number >= 0"));
        }
    }
    let (atol, rtol) = if ulp.is_some() { (0.0, 0.0) } else { default };
    Ok(Tolerance {
        atol: read("atol")?.unwrap_or(atol),
        rtol: read("rtol")?.unwrap_or(rtol),
        ulp,
    })
}

fn number(v: &Value, what: &str) -> CaseResult<f64> {
    match v {
        Value::Number(n) => n
            .to_string()
            .parse::<f64>()
            .map_err(|e| Failure::Malformed(format!("`{what}`: {e}"))),
        _ => malformed(format!("`{what}` is not a number")),
    }
}

/// An exact integer: `3`, `-2`, `3.0` or `1e2`; a fraction, or a value
/// beyond ±2^127, is malformed (never silently rounded or saturated).
fn integer(v: &Value, what: &str) -> CaseResult<i128> {
    let Value::Number(n) = v else {
        return malformed(format!("`{what}` = {v} is not a number"));
    };
    let text = n.to_string();
    if let Ok(i) = text.parse::<i128>() {
        return Ok(i);
    }
    let f = text
        .parse::<f64>()
        .map_err(|e| Failure::Malformed(format!("`{what}` = {text}: {e}")))?;
    if !f.is_finite() || f.fract() != 0.0 {
        return malformed(format!("`{what}` = {text} is not an integer"));
    }
    // 2^127: every f64 below it converts to i128 exactly.
    if f.abs() >= 1.7014118346046923e38 {
        return malformed(format!("`{what}` = {text} is out of range"));
    }
    Ok(f as i128)
}

/// Largest product of the non-zero dimensions of an empty tensor. A tensor
/// with values holds them inline, so its size is bounded by the file; an
/// empty one is not, yet operations allocate per-row or per-channel buffers
/// from its other dimensions (`[0, 2^40]` has 2^40 channels).
const MAX_EMPTY_EXTENT: usize = 1 << 24;

/// Reads and checks a shape: non-negative integer dimensions whose product
/// fits in `usize` (computed with `checked_mul`, before anything is
/// allocated from it). Returns the shape and its element count.
fn shape(v: &Value) -> CaseResult<(Vec<usize>, usize)> {
    let dims = v
        .as_array()
        .ok_or_else(|| Failure::Malformed(format!("`shape` = {v} is not an array")))?;
    let mut shape = Vec::with_capacity(dims.len());
    for d in dims {
        let i = integer(d, "shape")?;
        let dim = usize::try_from(i).map_err(|_| {
            Failure::Malformed(format!(
                "shape {v}: dimension {i} is {}",
                if i < 0 {
                    "negative"
                } else {
                    "too large for usize"
                }
            ))
        })?;
        shape.push(dim);
    }
    let count = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            Failure::Malformed(format!("shape {shape:?}: element count overflows usize"))
        })?;
    if count == 0 {
        let extent = shape
            .iter()
            .filter(|&&d| d != 0)
            .try_fold(1usize, |acc, &d| acc.checked_mul(d));
        if !matches!(extent, Some(e) if e <= MAX_EMPTY_EXTENT) {
            return malformed(format!(
                "shape {shape:?}: empty, but its non-zero dimensions multiply to more than \
                 {MAX_EMPTY_EXTENT}; the runner refuses such cases"
            ));
        }
    }
    Ok((shape, count))
}

/// Parses `{"shape": [...], "data": [...]}`, each value straight to `T`
/// ([`Storage::parse`]).
fn tensor<T: Storage>(v: &Value) -> CaseResult<Tensor<T>> {
    let (shape, count) = shape(
        v.get("shape")
            .ok_or_else(|| Failure::Malformed("tensor without `shape`".into()))?,
    )?;
    let values = v
        .get("data")
        .and_then(Value::as_array)
        .ok_or_else(|| Failure::Malformed("tensor without `data`".into()))?;
    if values.len() != count {
        return malformed(format!(
            "shape {shape:?} holds {count} values, `data` has {}",
            values.len()
        ));
    }
    let data: Vec<T> = values
        .iter()
        .map(|d| match d {
            Value::Number(n) => T::parse(&n.to_string()).map_err(Failure::Malformed),
            other => malformed(format!("value {other} is not a number")),
        })
        .collect::<CaseResult<_>>()?;
    Tensor::new(shape, data).map_err(|e| Failure::Malformed(e.to_string()))
}

/// [`tensor`], its messages naming the tensor.
fn named_tensor<T: Storage>(name: &str, v: &Value) -> CaseResult<Tensor<T>> {
    tensor(v).map_err(|e| match e {
        Failure::Malformed(msg) => Failure::Malformed(format!("`{name}`: {msg}")),
        refused => refused,
    })
}

fn tensors<T: Storage>(v: Option<&Value>) -> CaseResult<BTreeMap<String, Tensor<T>>> {
    let mut out = BTreeMap::new();
    if let Some(map) = v.and_then(Value::as_object) {
        for (k, t) in map {
            if !t.is_null() {
                out.insert(k.clone(), named_tensor(k, t)?);
            }
        }
    }
    Ok(out)
}

/// Typed access to a case's attributes.
struct Attrs<'a>(&'a Map<String, Value>);

impl Attrs<'_> {
    fn f64(&self, key: &str, default: f64) -> CaseResult<f64> {
        self.0.get(key).map_or(Ok(default), |v| number(v, key))
    }

    fn bool(&self, key: &str, default: bool) -> CaseResult<bool> {
        match self.0.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => malformed(format!(
                "`{key}` = {other} is not a boolean (true or false)"
            )),
        }
    }

    fn str(&self, key: &str, default: &'static str) -> CaseResult<String> {
        match self.0.get(key) {
            None => Ok(default.to_string()),
            Some(Value::String(s)) => Ok(s.to_ascii_lowercase()),
            Some(other) => malformed(format!("`{key}` = {other} is not a string")),
        }
    }

    /// An integer attribute that must be non-negative: a negative value is
    /// the operation's to refuse, not a malformed case; a fraction or a value
    /// beyond `usize` is malformed.
    fn count(
        &self,
        op: &'static str,
        key: &'static str,
        default: Option<usize>,
    ) -> CaseResult<usize> {
        let Some(v) = self.0.get(key) else {
            return default.ok_or_else(|| Failure::Malformed(format!("missing attribute `{key}`")));
        };
        let i = integer(v, key)?;
        if i < 0 {
            return Err(Failure::Refused(NormError::InvalidArgument {
                op,
                arg: key,
                value: i.to_string(),
                expected: "non-negative",
            }));
        }
        usize::try_from(i)
            .map_err(|_| Failure::Malformed(format!("`{key}` = {v} is too large for usize")))
    }

    fn axis(&self) -> CaseResult<isize> {
        let Some(v) = self.0.get("axis") else {
            return Ok(-1);
        };
        let i = integer(v, "axis")?;
        isize::try_from(i)
            .map_err(|_| Failure::Malformed(format!("`axis` = {v} is out of range for isize")))
    }

    fn eps(&self, default: f64) -> CaseResult<Epsilon> {
        let value = self.f64("eps", default)?;
        let placement = match self.str("eps_placement", "inside_sqrt")?.as_str() {
            "inside_sqrt" => EpsPlacement::InsideSqrt,
            "add_to_std" => EpsPlacement::AddToStd,
            other => return malformed(format!("unknown eps_placement `{other}`")),
        };
        Ok(Epsilon { value, placement })
    }

    fn momentum(&self) -> CaseResult<Momentum> {
        match self.0.get("momentum") {
            Some(Value::Null) => Ok(Momentum::Cumulative),
            None => Ok(Momentum::default()),
            Some(v) => Ok(Momentum::Exponential(number(v, "momentum")?)),
        }
    }

    fn running_var(&self) -> CaseResult<RunningVarEstimator> {
        match self.str("running_var_estimator", "unbiased")?.as_str() {
            "unbiased" => Ok(RunningVarEstimator::Unbiased),
            "biased" => Ok(RunningVarEstimator::Biased),
            other => malformed(format!("unknown running_var_estimator `{other}`")),
        }
    }
}

/// Computed outputs, widened to f64: values of the storage type, and
/// statistics ([`STATISTICS`]) rounded to float32.
type Outputs = BTreeMap<String, Vec<f64>>;

/// A statistic kept in f64, as float32.
fn as_f32(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&v| v as f32 as f64).collect()
}

fn outputs<T: Float>(y: Tensor<T>, saved: Option<&Saved>) -> Outputs {
    let mut out = Outputs::new();
    out.insert("y".into(), widen(y.data()));
    if let Some(s) = saved {
        out.insert("mean".into(), as_f32(&s.mean));
        out.insert("rstd".into(), as_f32(&s.rstd));
    }
    out
}

/// Runs forward (and backward when `dy` is given) of `op`.
fn run_op<T: Float>(
    op: &str,
    attrs: &Attrs<'_>,
    x: &Tensor<T>,
    inputs: &BTreeMap<String, Tensor<T>>,
    dy: Option<&Tensor<T>>,
) -> CaseResult<(Outputs, Option<Grads<T>>)> {
    let weight = inputs.get("weight");
    let bias = inputs.get("bias");
    // `"activation"`: the op followed by it, fused (batch_norm, layer_norm,
    // group_norm).
    let act = match attrs.str("activation", "")?.as_str() {
        "" => None,
        name => match Activation::from_name(name) {
            Some(a) if matches!(op, "batch_norm" | "layer_norm" | "group_norm") => Some(a),
            Some(_) => return malformed(format!("`{op}` has no fused activation")),
            None => return malformed(format!("unknown activation `{name}`")),
        },
    };
    match op {
        "batch_norm" | "instance_norm" => {
            let instance = op == "instance_norm";
            let training = if instance {
                attrs.bool("use_input_stats", attrs.bool("training", true)?)?
            } else {
                attrs.bool("training", false)?
            };
            let options = BatchNormOptions {
                use_batch_stats: attrs.bool("use_batch_stats", training)?,
                update_running_stats: attrs.bool("update_running_stats", training)?,
                eps: attrs.eps(1e-5)?,
                momentum: attrs.momentum()?,
                running_var: attrs.running_var()?,
            };
            let mut running_mean = inputs.get("running_mean").map(|t| t.data().to_vec());
            let mut running_var = inputs.get("running_var").map(|t| t.data().to_vec());
            let mut tracked = match inputs.get("num_batches_tracked") {
                Some(t) if t.numel() == 1 => {
                    let v = t.data()[0].to_f64();
                    // f32 holds every integer up to 2^24 exactly; beyond
                    // that the stored count is not the one meant (the
                    // 16-bit types hold fewer, but only exact values).
                    if !(0.0..=16_777_216.0).contains(&v) || v.fract() != 0.0 {
                        return malformed(format!(
                            "`num_batches_tracked` = {v} is not an integer in 0..=2^24"
                        ));
                    }
                    v as i64
                }
                Some(_) => return malformed("`num_batches_tracked` must hold one value"),
                None => 0,
            };
            let running = match (running_mean.as_mut(), running_var.as_mut()) {
                (Some(mean), Some(var)) => Some(RunningStatsMut {
                    mean,
                    var,
                    num_batches_tracked: &mut tracked,
                }),
                (None, None) => None,
                _ => return malformed("`running_mean` and `running_var` come together"),
            };
            let (y, saved) = match act {
                Some(act) => batch_norm_act(x, running, weight, bias, &options, act)?,
                None if instance => instance_norm(x, running, weight, bias, &options)?,
                None => batch_norm(x, running, weight, bias, &options)?,
            };
            let fused_grads = match (act, dy) {
                (Some(act), Some(dy)) => Some(batch_norm_act_backward(
                    x,
                    Some(&y),
                    dy,
                    weight,
                    bias,
                    act,
                    options.eps,
                    &saved,
                    options.use_batch_stats,
                )?),
                _ => None,
            };
            let mut out = outputs(y, Some(&saved));
            if let (Some(m), Some(v)) = (running_mean, running_var) {
                out.insert("running_mean".into(), widen(&m));
                out.insert("running_var".into(), widen(&v));
                out.insert("num_batches_tracked".into(), vec![tracked as f32 as f64]);
            }
            let grads = match dy {
                _ if fused_grads.is_some() => fused_grads,
                Some(dy) if instance => Some(instance_norm_backward(
                    x,
                    dy,
                    weight,
                    bias.is_some(),
                    options.eps,
                    &saved,
                    options.use_batch_stats,
                )?),
                Some(dy) => Some(batch_norm_backward(
                    x,
                    dy,
                    weight,
                    bias.is_some(),
                    options.eps,
                    &saved,
                    options.use_batch_stats,
                )?),
                None => None,
            };
            Ok((out, grads))
        }
        "layer_norm" => {
            let (axis, eps) = (attrs.axis()?, attrs.eps(1e-5)?);
            let (y, saved) = match act {
                Some(act) => layer_norm_act(x, axis, weight, bias, eps, act)?,
                None => layer_norm(x, axis, weight, bias, eps)?,
            };
            let grads = dy
                .map(|dy| match act {
                    Some(act) => layer_norm_act_backward(
                        x,
                        Some(&y),
                        dy,
                        axis,
                        weight,
                        bias,
                        act,
                        eps,
                        &saved,
                    ),
                    None => layer_norm_backward(x, dy, axis, weight, bias.is_some(), eps, &saved),
                })
                .transpose()?;
            Ok((outputs(y, Some(&saved)), grads))
        }
        "rms_norm" => {
            // PyTorch's default: the machine epsilon of the input's type.
            let (axis, eps) = (attrs.axis()?, attrs.eps(T::EPSILON)?);
            let (y, saved) = rms_norm(x, axis, weight, eps)?;
            let grads = dy
                .map(|dy| rms_norm_backward(x, dy, axis, weight, eps, &saved))
                .transpose()?;
            let mut out = outputs(y, None);
            out.insert("rstd".into(), as_f32(&saved.rstd));
            Ok((out, grads))
        }
        "layer_norm_channels" => {
            let eps = attrs.eps(1e-5)?;
            let (y, saved) = layer_norm_channels(x, weight, bias, eps)?;
            let grads = dy
                .map(|dy| layer_norm_channels_backward(x, dy, weight, bias.is_some(), eps, &saved))
                .transpose()?;
            Ok((outputs(y, None), grads))
        }
        "rms_norm_channels" => {
            // As `rms_norm`: PyTorch's default, the machine epsilon of the type.
            let eps = attrs.eps(T::EPSILON)?;
            let (y, saved) = rms_norm_channels(x, weight, eps)?;
            let grads = dy
                .map(|dy| rms_norm_channels_backward(x, dy, weight, eps, &saved))
                .transpose()?;
            Ok((outputs(y, None), grads))
        }
        "group_norm" => {
            let groups = attrs.count("group_norm", "num_groups", None)?;
            let eps = attrs.eps(1e-5)?;
            let (y, saved) = match act {
                Some(act) => group_norm_act(x, groups, weight, bias, eps, act)?,
                None => group_norm(x, groups, weight, bias, eps)?,
            };
            let grads = dy
                .map(|dy| match act {
                    Some(act) => group_norm_act_backward(
                        x,
                        Some(&y),
                        dy,
                        groups,
                        weight,
                        bias,
                        act,
                        eps,
                        &saved,
                    ),
                    None => group_norm_backward(x, dy, groups, weight, bias.is_some(), eps, &saved),
                })
                .transpose()?;
            Ok((outputs(y, Some(&saved)), grads))
        }
        "lrn" | "local_response_norm" => {
            let options = LrnOptions {
                size: attrs.count("local_response_norm", "size", None)?,
                alpha: attrs.f64("alpha", 1e-4)?,
                beta: attrs.f64("beta", 0.75)?,
                k: attrs.f64("k", 1.0)?,
                alpha_over_size: attrs.bool("alpha_over_size", true)?,
                region: match attrs.str("region", "across_channels")?.as_str() {
                    "across_channels" => LrnRegion::AcrossChannels,
                    "within_channel" => LrnRegion::WithinChannel,
                    other => return malformed(format!("unknown region `{other}`")),
                },
                even_window: match attrs.str("even_window", "torch")?.as_str() {
                    "torch" => EvenWindow::Torch,
                    "onnx" => EvenWindow::Onnx,
                    other => return malformed(format!("unknown even_window `{other}`")),
                },
            };
            let y = lrn(x, &options)?;
            let grads = dy
                .map(|dy| {
                    lrn_backward(x, dy, &options).map(|dx| Grads {
                        dx,
                        dweight: None,
                        dbias: None,
                    })
                })
                .transpose()?;
            Ok((outputs(y, None), grads))
        }
        other => malformed(format!("unknown op `{other}`")),
    }
}
