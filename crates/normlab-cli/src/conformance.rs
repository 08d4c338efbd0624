//! Runner for normcase/1 conformance cases (see `tests/data/FORMAT.md`).
//!
//! A case names an operation, its attributes and inputs, and the expected
//! outputs (forward, running-statistics updates, and optionally gradients),
//! or says the input must be refused (`expect_error`). Values are float32,
//! parsed straight from their decimal text to f32.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use normlab::kernels::batch_norm::{
    batch_norm, batch_norm_backward, BatchNormOptions, RunningStatsMut,
};
use normlab::kernels::group_norm::{group_norm, group_norm_backward};
use normlab::kernels::instance_norm::{instance_norm, instance_norm_backward};
use normlab::kernels::layer_norm::{layer_norm, layer_norm_backward};
use normlab::kernels::lrn::{lrn, lrn_backward};
use normlab::kernels::rms_norm::{rms_norm, rms_norm_backward};
use normlab::{
    EpsPlacement, Epsilon, EvenWindow, Grads, LrnOptions, LrnRegion, Momentum, NormError,
    RunningVarEstimator, Saved, Tensor,
};
use serde_json::{Map, Value};

/// A float32 tensor as stored in a case.
type T32 = Tensor<f32>;

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

fn evaluate(case: &Value) -> CaseResult<Report> {
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
    let inputs = tensors(case.get("inputs"))?;
    let x = inputs
        .get("x")
        .ok_or_else(|| Failure::Malformed("no input `x`".into()))?;
    let dy = match case.get("backward") {
        Some(b) => {
            let dy = b
                .get("dy")
                .ok_or_else(|| Failure::Malformed("backward without `dy`".into()))?;
            Some(tensor(dy).map_err(|e| match e {
                Failure::Malformed(msg) => Failure::Malformed(format!("`dy`: {msg}")),
                refused => refused,
            })?)
        }
        None => None,
    };
    let (forward, grads) = run_op(op, &attrs, x, &inputs, dy.as_ref())?;
    let mut results = Vec::new();
    if let Some(expected) = case.get("expected") {
        let tol = tolerance(case.get("tolerance"), (1e-5, 1e-4))?;
        results.extend(compare(&tensors(Some(expected))?, &forward, tol)?);
    }
    if let (Some(b), Some(grads)) = (case.get("backward"), grads) {
        let tol = tolerance(b.get("tolerance"), (1e-4, 1e-3))?;
        let mut got = BTreeMap::new();
        got.insert("dx".to_string(), grads.dx.into_data());
        if let Some(t) = grads.dweight {
            got.insert("dweight".to_string(), t.into_data());
        }
        if let Some(t) = grads.dbias {
            got.insert("dbias".to_string(), t.into_data());
        }
        results.extend(compare(&tensors(b.get("expected"))?, &got, tol)?);
    }
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let max_err = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .fold(0.0f64, |a, &b| a.max(b));
    Ok(if failures.is_empty() {
        Report {
            ok: true,
            detail: format!("(max abs err {max_err:.3e})"),
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

/// Compares each expected output; `Ok(max abs err)` or `Err(description)` per key.
fn compare(
    expected: &BTreeMap<String, T32>,
    got: &BTreeMap<String, Vec<f32>>,
    (atol, rtol): (f64, f64),
) -> CaseResult<Vec<Result<f64, String>>> {
    let mut out = Vec::new();
    for (key, want) in expected {
        let Some(have) = got.get(key) else {
            return malformed(format!(
                "the runner does not produce output `{key}` for this op"
            ));
        };
        if have.len() != want.numel() {
            out.push(Err(format!(
                "{key}: {} values, expected {} (shape {:?})",
                have.len(),
                want.numel(),
                want.shape()
            )));
            continue;
        }
        let mut max_err = 0.0f64;
        let mut worst: Option<(usize, f64, f64)> = None;
        for (i, (&h, &w)) in have.iter().zip(want.data()).enumerate() {
            let (h, w) = (h as f64, w as f64);
            let err = (h - w).abs();
            let within = err <= atol + rtol * w.abs() || (h.is_nan() && w.is_nan());
            if !within && worst.is_none() {
                worst = Some((i, h, w));
            }
            if err.is_finite() {
                max_err = max_err.max(err);
            } else if !within {
                max_err = f64::INFINITY;
            }
        }
        out.push(match worst {
            None => Ok(max_err),
            Some((i, h, w)) => Err(format!(
                "{key}[{i}] = {h:e}, expected {w:e} (max abs err {max_err:.3e})"
            )),
        });
    }
    Ok(out)
}

fn tolerance(v: Option<&Value>, default: (f64, f64)) -> CaseResult<(f64, f64)> {
    let Some(v) = v else { return Ok(default) };
    let get = |k: &str, d: f64| {
        v.get(k)
            .map(|x| number(x, k))
            .transpose()
            .map(|o| o.unwrap_or(d))
    };
    Ok((get("atol", default.0)?, get("rtol", default.1)?))
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

/// Parses `{"shape": [...], "data": [...]}`, each value straight to f32.
fn tensor(v: &Value) -> CaseResult<T32> {
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
    let data: Vec<f32> = values
        .iter()
        .map(|d| match d {
            Value::Number(n) => n
                .to_string()
                .parse::<f32>()
                .map_err(|e| Failure::Malformed(format!("value {n}: {e}"))),
            other => malformed(format!("value {other} is not a number")),
        })
        .collect::<CaseResult<_>>()?;
    Tensor::new(shape, data).map_err(|e| Failure::Malformed(e.to_string()))
}

fn tensors(v: Option<&Value>) -> CaseResult<BTreeMap<String, T32>> {
    let mut out = BTreeMap::new();
    if let Some(map) = v.and_then(Value::as_object) {
        for (k, t) in map {
            if !t.is_null() {
                let t = tensor(t).map_err(|e| match e {
                    Failure::Malformed(msg) => Failure::Malformed(format!("`{k}`: {msg}")),
                    refused => refused,
                })?;
                out.insert(k.clone(), t);
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

type Outputs = BTreeMap<String, Vec<f32>>;

fn outputs(y: T32, saved: Option<&Saved>) -> Outputs {
    let mut out = Outputs::new();
    out.insert("y".into(), y.into_data());
    if let Some(s) = saved {
        out.insert("mean".into(), s.mean.iter().map(|&v| v as f32).collect());
        out.insert("rstd".into(), s.rstd.iter().map(|&v| v as f32).collect());
    }
    out
}

/// Runs forward (and backward when `dy` is given) of `op`.
fn run_op(
    op: &str,
    attrs: &Attrs<'_>,
    x: &T32,
    inputs: &BTreeMap<String, T32>,
    dy: Option<&T32>,
) -> CaseResult<(Outputs, Option<Grads<f32>>)> {
    let weight = inputs.get("weight");
    let bias = inputs.get("bias");
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
                    let v = t.data()[0];
                    // f32 holds every integer up to 2^24 exactly; beyond
                    // that the stored count is not the one meant.
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
            let call = if instance { instance_norm } else { batch_norm };
            let (y, saved) = call(x, running, weight, bias, &options)?;
            let mut out = outputs(y, Some(&saved));
            if let (Some(m), Some(v)) = (running_mean, running_var) {
                out.insert("running_mean".into(), m);
                out.insert("running_var".into(), v);
                out.insert("num_batches_tracked".into(), vec![tracked as f32]);
            }
            let grads = match dy {
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
            let (y, saved) = layer_norm(x, axis, weight, bias, eps)?;
            let grads = dy
                .map(|dy| layer_norm_backward(x, dy, axis, weight, bias.is_some(), eps, &saved))
                .transpose()?;
            Ok((outputs(y, Some(&saved)), grads))
        }
        "rms_norm" => {
            let (axis, eps) = (attrs.axis()?, attrs.eps(f32::EPSILON as f64)?);
            let (y, saved) = rms_norm(x, axis, weight, eps)?;
            let grads = dy
                .map(|dy| rms_norm_backward(x, dy, axis, weight, eps, &saved))
                .transpose()?;
            let mut out = outputs(y, None);
            out.insert(
                "rstd".into(),
                saved.rstd.iter().map(|&v| v as f32).collect(),
            );
            Ok((out, grads))
        }
        "group_norm" => {
            let groups = attrs.count("group_norm", "num_groups", None)?;
            let eps = attrs.eps(1e-5)?;
            let (y, saved) = group_norm(x, groups, weight, bias, eps)?;
            let grads = dy
                .map(|dy| group_norm_backward(x, dy, groups, weight, bias.is_some(), eps, &saved))
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
