//! Typed errors. Every message names the operation, the argument at fault
//! and the shapes involved, so that a user can act on it without a debugger.

use std::fmt;

/// A shape, printed as `[2, 3, 4]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Shape(pub Vec<usize>);

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl From<&[usize]> for Shape {
    fn from(s: &[usize]) -> Self {
        Shape(s.to_vec())
    }
}

impl From<Vec<usize>> for Shape {
    fn from(s: Vec<usize>) -> Self {
        Shape(s)
    }
}

/// Everything that can go wrong in normlab.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NormError {
    /// Batch statistics in training need at least two values per channel.
    #[error("{op}: expected more than 1 {what} when training, got input of shape {shape}")]
    TooFewValues {
        /// Operation name.
        op: &'static str,
        /// What there must be more than one of (`value per channel`, `spatial element`).
        what: &'static str,
        /// Input shape.
        shape: Shape,
    },
    /// An argument has the wrong shape for the input.
    #[error("{op}: `{arg}` has shape {got}, expected {expected} for input of shape {input}")]
    ShapeMismatch {
        /// Operation name.
        op: &'static str,
        /// Argument name.
        arg: &'static str,
        /// Shape given.
        got: Shape,
        /// Shape required.
        expected: Shape,
        /// Input shape.
        input: Shape,
    },
    /// A buffer's length does not match its declared shape.
    #[error("{op}: `{arg}` holds {len} values but its shape {shape} needs {expected}")]
    LengthMismatch {
        /// Operation name.
        op: &'static str,
        /// Argument name.
        arg: &'static str,
        /// Length given.
        len: usize,
        /// Shape declared.
        shape: Shape,
        /// Length that shape needs.
        expected: usize,
    },
    /// The input has too few dimensions.
    #[error("{op}: `{arg}` must have rank at least {min}, got shape {shape}")]
    RankTooLow {
        /// Operation name.
        op: &'static str,
        /// Argument name.
        arg: &'static str,
        /// Minimum rank.
        min: usize,
        /// Shape given.
        shape: Shape,
    },
    /// LayerNorm/RMSNorm: the input must end with the normalized shape.
    #[error("{op}: input of shape {input} does not end with the normalized shape {expected}")]
    TrailingShape {
        /// Operation name.
        op: &'static str,
        /// The layer's normalized shape.
        expected: Shape,
        /// Input shape.
        input: Shape,
    },
    /// GroupNorm: channels must split evenly into groups.
    #[error(
        "{op}: {channels} channels are not divisible by {groups} groups (input shape {shape})"
    )]
    GroupsNotDivisible {
        /// Operation name.
        op: &'static str,
        /// Number of channels.
        channels: usize,
        /// Number of groups.
        groups: usize,
        /// Input shape.
        shape: Shape,
    },
    /// An axis outside `-rank..rank`.
    #[error("{op}: axis {axis} is out of range for input of rank {rank} (shape {shape})")]
    AxisOutOfRange {
        /// Operation name.
        op: &'static str,
        /// Axis given.
        axis: isize,
        /// Rank of the input.
        rank: usize,
        /// Input shape.
        shape: Shape,
    },
    /// A scalar argument outside its domain (ε < 0, momentum ∉ [0, 1], size 0, …).
    #[error("{op}: `{arg}` must be {expected}, got {value}")]
    InvalidArgument {
        /// Operation name.
        op: &'static str,
        /// Argument name.
        arg: &'static str,
        /// The value given, formatted.
        value: String,
        /// The domain, in words.
        expected: &'static str,
    },
    /// A collective between ranks failed (synchronized statistics).
    #[error("{op}: communication between ranks failed: {detail}")]
    Communication {
        /// Collective name.
        op: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// Evaluation with running statistics that are not there.
    #[error("{op}: evaluation needs running statistics (`running_mean` and `running_var`), but none were given")]
    MissingRunningStats {
        /// Operation name.
        op: &'static str,
    },
    /// A training batch produced NaN or infinite statistics, or folding it
    /// into the running statistics would overflow their element type.
    #[error("{op}: {what} of channel {channel} is {value}, not finite in {dtype} (batch mean {mean}, biased batch variance {var}); running statistics left unchanged")]
    NonFiniteStatistics {
        /// Operation name.
        op: &'static str,
        /// First offending channel.
        channel: usize,
        /// Which value is not finite: `batch mean`, `batch variance`,
        /// `updated running_mean` or `updated running_var`.
        what: &'static str,
        /// That value, computed in f64 (finite when only its conversion to
        /// `dtype` overflows).
        value: f64,
        /// The element type it had to fit (`float32`, …).
        dtype: &'static str,
        /// The channel's batch mean.
        mean: f64,
        /// The channel's biased batch variance.
        var: f64,
    },
    /// A shape's element count (or a size derived from it) does not fit in `usize`.
    #[error("{op}: `{arg}` of shape {shape} has more elements than fit in memory addresses (the product of its dimensions overflows)")]
    SizeOverflow {
        /// Operation name.
        op: &'static str,
        /// Argument name.
        arg: &'static str,
        /// The shape.
        shape: Shape,
    },
    /// A buffer could not be allocated (the system refused the memory).
    #[error("{op}: cannot allocate {len} values ({bytes} bytes) for `{arg}`: out of memory")]
    OutOfMemory {
        /// Operation name.
        op: &'static str,
        /// What the buffer is for.
        arg: &'static str,
        /// Number of values.
        len: usize,
        /// Bytes requested (saturated at `usize::MAX`).
        bytes: usize,
    },
    /// A loaded running statistic or counter is outside its domain.
    #[error("state dict: tensor `{name}` {problem} at index {index} (value {value}); nothing was loaded")]
    InvalidState {
        /// Full tensor name (`features.1.running_var`).
        name: String,
        /// What is wrong (`is not finite`, `is negative`).
        problem: &'static str,
        /// Index of the first offending value.
        index: usize,
        /// The value.
        value: f64,
    },
    /// A state-dict tensor is missing, has the wrong dtype, or the file is malformed.
    #[error("state dict: {0}")]
    State(String),
    /// An I/O error while reading or writing a file.
    #[error("{path}: {source}")]
    Io {
        /// File path.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
}

impl NormError {
    /// The same error under the name of the operation a user called: an op
    /// built on another (InstanceNorm on GroupNorm, SyncBatchNorm in
    /// evaluation on BatchNorm) reports its own name.
    pub fn with_op(mut self, name: &'static str) -> Self {
        match &mut self {
            NormError::TooFewValues { op, .. }
            | NormError::ShapeMismatch { op, .. }
            | NormError::LengthMismatch { op, .. }
            | NormError::RankTooLow { op, .. }
            | NormError::TrailingShape { op, .. }
            | NormError::GroupsNotDivisible { op, .. }
            | NormError::AxisOutOfRange { op, .. }
            | NormError::InvalidArgument { op, .. }
            | NormError::Communication { op, .. }
            | NormError::MissingRunningStats { op }
            | NormError::NonFiniteStatistics { op, .. }
            | NormError::SizeOverflow { op, .. }
            | NormError::OutOfMemory { op, .. } => *op = name,
            NormError::InvalidState { .. } | NormError::State(_) | NormError::Io { .. } => {}
        }
        self
    }
}

/// `Result` with [`NormError`].
pub type Result<T, E = NormError> = std::result::Result<T, E>;

/// Checks a scalar against a domain, building the error message on failure.
pub(crate) fn ensure(
    ok: bool,
    op: &'static str,
    arg: &'static str,
    value: impl fmt::Display,
    expected: &'static str,
) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(NormError::InvalidArgument {
            op,
            arg,
            value: value.to_string(),
            expected,
        })
    }
}

/// Checks that an optional per-channel (or per-feature) argument has `expected` shape.
pub(crate) fn check_shape(
    op: &'static str,
    arg: &'static str,
    got: &[usize],
    expected: &[usize],
    input: &[usize],
) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(NormError::ShapeMismatch {
            op,
            arg,
            got: got.into(),
            expected: expected.into(),
            input: input.into(),
        })
    }
}

/// The number of values of `shape`, or [`NormError::SizeOverflow`] when the
/// product of its non-zero dimensions does not fit in `usize`. Every element
/// count derived from a caller's shape goes through here: an unchecked
/// product wraps in release builds, and a wrapped count (0 for
/// `[4, 2^31, 2^31]` on 64 bits) would let a phantom tensor pass every later
/// check.
///
/// Zero dimensions are left out of the check, not exempted from it: an empty
/// `[0, 2^40, 2^40]` is refused too, so that for every accepted shape each
/// product of any of its dimensions (`c·spatial`, `n·groups`, …) fits, and
/// kernels may form them without overflow.
///
/// ```
/// use normlab::error::numel;
/// assert_eq!(numel("op", "x", &[2, 3, 4]).unwrap(), 24);
/// assert_eq!(numel("op", "x", &[]).unwrap(), 1);
/// assert_eq!(numel("op", "x", &[0, 1 << 40]).unwrap(), 0);
/// assert!(numel("op", "x", &[4, 1 << 31, 1 << 31]).is_err());
/// assert!(numel("op", "x", &[0, 1 << 40, 1 << 40]).is_err());
/// ```
pub fn numel(op: &'static str, arg: &'static str, shape: &[usize]) -> Result<usize> {
    let nonzero = shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| NormError::SizeOverflow {
            op,
            arg,
            shape: shape.into(),
        })?;
    Ok(if shape.contains(&0) { 0 } else { nonzero })
}

/// Checks a slice length against the number of values a kernel layout needs.
pub(crate) fn check_len(
    op: &'static str,
    arg: &'static str,
    len: usize,
    shape: &[usize],
) -> Result<()> {
    let expected = numel(op, arg, shape)?;
    if len == expected {
        Ok(())
    } else {
        Err(NormError::LengthMismatch {
            op,
            arg,
            len,
            shape: shape.into(),
            expected,
        })
    }
}
