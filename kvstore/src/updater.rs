//! What runs where the weights are stored when a push arrives: a built-in
//! [`Optimizer`] (with per-key state) or a custom [`Updater`].

use std::sync::Arc;

use half::f16;

use crate::dtype::{DType, Elem};
use crate::error::Fault;
use crate::key::Key;
use crate::optimizer::{GradRef, OptState, Optimizer, WeightMut};

/// A gradient (or merged push) as an updater sees it.
#[derive(Debug)]
pub struct Values<'a> {
    pub(crate) dtype: DType,
    pub(crate) shape: &'a [usize],
    pub(crate) rows: Option<&'a [i64]>,
    pub(crate) bytes: &'a [u8],
}

impl<'a> Values<'a> {
    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The key's full shape.
    pub fn shape(&self) -> &[usize] {
        self.shape
    }

    /// For a row-sparse gradient, the rows it holds (the elements are those
    /// rows, packed); None for a dense one.
    pub fn rows(&self) -> Option<&[i64]> {
        self.rows
    }

    /// The elements, if they are `T`.
    pub fn as_slice<T: Elem>(&self) -> Option<&'a [T]> {
        (T::DTYPE == self.dtype).then(|| bytemuck::cast_slice(self.bytes))
    }

    /// The elements' bytes (native order, aligned for the dtype).
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

/// The stored weight an updater changes (dense, the key's full shape).
#[derive(Debug)]
pub struct ValuesMut<'a> {
    pub(crate) dtype: DType,
    pub(crate) shape: &'a [usize],
    pub(crate) bytes: &'a mut [u8],
}

impl ValuesMut<'_> {
    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        self.shape
    }

    /// The elements, if they are `T`.
    pub fn as_mut_slice<T: Elem>(&mut self) -> Option<&mut [T]> {
        (T::DTYPE == self.dtype).then(|| bytemuck::cast_slice_mut(&mut *self.bytes))
    }

    /// The elements' bytes, to change in place (native order, aligned for
    /// the dtype).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        self.bytes
    }
}

/// A custom update rule, MXNet's `updater(key, grad, weight)`.
///
/// ```
/// use pskv_kvstore::{Key, Updater, Values, ValuesMut};
/// struct Halve;
/// impl Updater for Halve {
///     fn update(&self, _key: &Key, grad: &Values<'_>, weight: &mut ValuesMut<'_>) -> Result<(), String> {
///         let g = grad.as_slice::<f32>().ok_or("f32 only")?;
///         let w = weight.as_mut_slice::<f32>().ok_or("f32 only")?;
///         for (w, g) in w.iter_mut().zip(g) {
///             *w -= 0.5 * g;
///         }
///         Ok(())
///     }
/// }
/// ```
pub trait Updater: Send + Sync + 'static {
    /// Applies `grad` to `weight`. An error fails the push (and is stored
    /// on the key for the next pull to report).
    fn update(
        &self,
        key: &Key,
        grad: &Values<'_>,
        weight: &mut ValuesMut<'_>,
    ) -> Result<(), String>;
}

impl<F> Updater for F
where
    F: Fn(&Key, &Values<'_>, &mut ValuesMut<'_>) -> Result<(), String> + Send + Sync + 'static,
{
    fn update(
        &self,
        key: &Key,
        grad: &Values<'_>,
        weight: &mut ValuesMut<'_>,
    ) -> Result<(), String> {
        self(key, grad, weight)
    }
}

/// The rule a store applies, with a generation so that state made by an
/// earlier optimizer is dropped when a new one is set (as MXNet's
/// `set_optimizer` starts a fresh `Updater`).
#[derive(Clone)]
pub(crate) enum Rule {
    Optimizer {
        opt: Arc<Optimizer>,
        generation: u64,
    },
    Custom(Arc<dyn Updater>),
}

/// Per-key state of a rule.
#[derive(Default)]
pub(crate) struct KeyState {
    pub(crate) generation: u64,
    pub(crate) state: Option<OptState>,
}

impl Rule {
    /// Applies the rule to a key's stored weight (dense bytes of `dtype`).
    /// `id` is the key's id; `key` the key itself where it is known (a
    /// server knows ids only, and runs built-in optimizers only).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn apply(
        &self,
        id: u64,
        key: Option<&Key>,
        dtype: DType,
        shape: &[usize],
        grad: &[u8],
        rows: Option<&[i64]>,
        weight: &mut [u8],
        st: &mut KeyState,
    ) -> Result<(), Fault> {
        // Subtle: the gradient may come from a plain byte buffer (a
        // server's sum, a message): the typed views below need it aligned,
        // and an empty `Vec<u8>`'s pointer is not (a push without rows).
        let mut holder = Vec::new();
        let grad = aligned(grad, &mut holder);
        match self {
            Rule::Custom(u) => u
                .update(
                    key.ok_or_else(|| {
                        Fault::Unavailable("a custom updater needs the key itself".into())
                    })?,
                    &Values {
                        dtype,
                        shape,
                        rows,
                        bytes: grad,
                    },
                    &mut ValuesMut {
                        dtype,
                        shape,
                        bytes: weight,
                    },
                )
                .map_err(Fault::Failed),
            Rule::Optimizer { opt, generation } => {
                if st.generation != *generation {
                    st.generation = *generation;
                    st.state = None;
                }
                let row_len = shape.iter().skip(1).product::<usize>();
                let (w, g) = match dtype {
                    DType::F32 => (
                        WeightMut::F32(bytemuck::cast_slice_mut(weight)),
                        GradRef::F32(bytemuck::cast_slice(grad)),
                    ),
                    DType::F64 => (
                        WeightMut::F64(bytemuck::cast_slice_mut(weight)),
                        GradRef::F64(bytemuck::cast_slice(grad)),
                    ),
                    DType::F16 => (
                        WeightMut::F16(bytemuck::cast_slice_mut::<u8, f16>(weight)),
                        GradRef::F16(bytemuck::cast_slice::<u8, f16>(grad)),
                    ),
                    DType::I32 | DType::I64 => {
                        return Err(Fault::Mismatch(format!(
                            "optimizer {} updates float weights only; {} holds {dtype}",
                            opt.name(),
                            describe(id, key)
                        )))
                    }
                };
                let r = match rows {
                    None => opt.update(id, w, g, &mut st.state),
                    Some(rows) => opt.update_rows(id, w, rows, row_len, g, &mut st.state),
                };
                r.map_err(|e| {
                    Fault::Failed(format!(
                        "optimizer {} on {}: {e}",
                        opt.name(),
                        describe(id, key)
                    ))
                })
            }
        }
    }
}

/// `bytes`, or a copy of them in `holder` if they are not 8-byte aligned.
fn aligned<'a>(bytes: &'a [u8], holder: &'a mut Vec<u64>) -> &'a [u8] {
    if bytes.as_ptr().align_offset(8) == 0 {
        return bytes;
    }
    holder.resize(bytes.len().div_ceil(8), 0);
    let out = &mut bytemuck::cast_slice_mut::<u64, u8>(holder)[..bytes.len()];
    out.copy_from_slice(bytes);
    out
}

fn describe(id: u64, key: Option<&Key>) -> String {
    match key {
        Some(k) => format!("key {k}"),
        None => format!("key id {id}"),
    }
}
