//! A minimal owned, contiguous, row-major tensor: a shape and its values.
//!
//! The core crate has no framework dependency; this type is only the
//! currency of the checked, allocating API. Framework adapters hand the
//! kernels their own buffers directly.

use crate::error::{check_len, numel, Result};
use crate::Float;

/// Contiguous row-major tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor<T> {
    shape: Vec<usize>,
    data: Vec<T>,
}

impl<T: Float> Tensor<T> {
    /// Wraps `data` with `shape`.
    ///
    /// # Errors
    /// [`NormError::LengthMismatch`](crate::NormError::LengthMismatch) when
    /// `data.len()` is not the product of `shape`;
    /// [`NormError::SizeOverflow`](crate::NormError::SizeOverflow) when that
    /// product overflows `usize`.
    ///
    /// ```
    /// let t = normlab::Tensor::new(vec![2, 3], vec![0.0f32; 6]).unwrap();
    /// assert_eq!(t.shape(), &[2, 3]);
    /// assert!(normlab::Tensor::new(vec![2, 3], vec![0.0f32; 5]).is_err());
    /// ```
    pub fn new(shape: Vec<usize>, data: Vec<T>) -> Result<Self> {
        check_len("tensor", "data", data.len(), &shape)?;
        Ok(Self { shape, data })
    }

    /// A tensor of zeros (large ones backed by huge pages, see [`crate::alloc`]).
    ///
    /// # Errors
    /// [`NormError::SizeOverflow`](crate::NormError::SizeOverflow) when the
    /// shape's element count overflows, [`NormError::OutOfMemory`](crate::NormError::OutOfMemory)
    /// when the memory cannot be had.
    pub fn zeros(shape: &[usize]) -> Result<Self> {
        let len = numel("tensor", "shape", shape)?;
        Ok(Self {
            shape: shape.to_vec(),
            data: crate::alloc::zeroed("tensor", "data", len)?,
        })
    }

    /// A tensor of `shape` written by `fill`, which must write every value
    /// of the buffer it is given (all kernels' allocating forms do). The
    /// buffer is not zeroed first. `shape` must have been checked (its
    /// element count fits).
    pub(crate) fn filled_by<R>(
        op: &'static str,
        shape: &[usize],
        fill: impl FnOnce(&mut [std::mem::MaybeUninit<T>]) -> Result<R>,
    ) -> Result<(Self, R)> {
        let len = numel(op, "output", shape)?;
        let mut data = crate::alloc::for_overwrite::<T>(op, "output", len)?;
        let extra = fill(&mut data)?;
        let tensor = Self {
            shape: shape.to_vec(),
            // SAFETY: `fill` returned Ok, having written every value.
            data: unsafe { crate::alloc::assume_init(data) },
        };
        Ok((tensor, extra))
    }

    /// A tensor filled with `value`.
    ///
    /// # Errors
    /// As [`Self::zeros`].
    pub fn full(shape: &[usize], value: f64) -> Result<Self> {
        let len = numel("tensor", "shape", shape)?;
        Ok(Self {
            shape: shape.to_vec(),
            data: crate::alloc::try_filled("tensor", "data", len, T::from_f64(value))?,
        })
    }

    /// A 1-d tensor.
    pub fn from_vec(data: Vec<T>) -> Self {
        Self {
            shape: vec![data.len()],
            data,
        }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The values, row-major.
    pub fn data(&self) -> &[T] {
        &self.data
    }

    /// The values, mutable.
    pub fn data_mut(&mut self) -> &mut [T] {
        &mut self.data
    }

    /// Gives up the values.
    pub fn into_data(mut self) -> Vec<T> {
        std::mem::take(&mut self.data)
    }

    /// Number of values.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Rank (number of dimensions).
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Converts every value to another float type (through f64).
    pub fn cast<U: Float>(&self) -> Tensor<U> {
        Tensor {
            shape: self.shape.clone(),
            data: self.data.iter().map(|v| U::from_f64(v.to_f64())).collect(),
        }
    }

    /// Same values, another shape with the same number of values.
    ///
    /// # Errors
    /// [`NormError::LengthMismatch`](crate::NormError::LengthMismatch) when the counts differ.
    pub fn reshape(self, shape: Vec<usize>) -> Result<Self> {
        Self::new(shape, self.into_data())
    }
}

impl<T> Drop for Tensor<T> {
    /// Large buffers go back to the cache of [`crate::alloc`] for reuse.
    fn drop(&mut self) {
        crate::alloc::recycle(std::mem::take(&mut self.data));
    }
}

/// Read access to a shaped buffer: what the checked functions need of their
/// inputs, so that they take an owned [`Tensor`] or a borrowed [`TensorView`].
pub trait View<T> {
    /// The shape.
    fn shape(&self) -> &[usize];
    /// The values, row-major.
    fn data(&self) -> &[T];
}

impl<T: Float> View<T> for Tensor<T> {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> &[T] {
        &self.data
    }
}

/// A shape over borrowed values (no copy): e.g. a framework tensor's storage.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TensorView<'a, T> {
    shape: &'a [usize],
    data: &'a [T],
}

impl<'a, T: Float> TensorView<'a, T> {
    /// Wraps `data` with `shape`.
    ///
    /// # Errors
    /// [`NormError::LengthMismatch`](crate::NormError::LengthMismatch) when
    /// `data.len()` is not the product of `shape`.
    pub fn new(shape: &'a [usize], data: &'a [T]) -> Result<Self> {
        check_len("tensor", "data", data.len(), shape)?;
        Ok(Self { shape, data })
    }
}

impl<T: Float> View<T> for TensorView<'_, T> {
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> &[T] {
        self.data
    }
}
