//! The bytes of a tensor: [`Buf`] (host memory, ordinary or pinned) and
//! [`Data`] (what a tensor's cell holds: host bytes, or a device buffer,
//! and the rows of a row-sparse tensor); the host copy across storages.

use std::sync::Arc;

use bytes::Bytes;
use pskv_gpu::device::{DeviceMem, PinnedMem};
use pskv_transport::SlotSpan;

use super::Storage;
use crate::dtype::{DType, Elem};

/// A fixed-length host buffer: ordinary memory or memory pinned for a
/// device's copies (`Context::CpuPinned`), both 8-byte aligned, or the
/// caller's memory (aligned for its dtype only).
pub(crate) struct Buf {
    mem: Mem,
    len: usize,
}

enum Mem {
    Heap(Vec<u64>),
    /// Pinned for device `n`'s copies.
    Pinned(PinnedMem, u32),
    /// The caller's memory, used in place and never freed here; its
    /// [`Home`] is told when this buffer is dropped.
    Borrowed(Arc<Home>),
    /// A key's push buffer: this worker's slots of the key's shared
    /// segments, one span (`KvStore::push_buffer`). Once detached (a push
    /// from it failed: `kinds/dist/push_buffer.rs`, L3) a write moves the
    /// tensor to the heap first, as if a message shared the buffer.
    Span(Arc<SlotSpan>),
}

/// Host memory of the caller's that a tensor uses in place (the C ABI's
/// and Python's buffers): where it is, and whether pskv still holds it.
///
/// States: `held` from [`Tensor::from_host_ptr`](super::Tensor::from_host_ptr)
/// until the one buffer (`Buf`) over the memory is dropped (every tensor, message
/// and transfer that shared it is gone), then `released`, for good. The
/// caller may touch the memory again once it is released; a request of
/// the C ABI waits for that before it reports done.
pub struct Home {
    addr: usize,
    len: usize,
    /// Set once, when the buffer over the memory is dropped; a caller that
    /// sees it set sees every access the buffer made before (the latch's
    /// Release/Acquire).
    released: pskv_engine::Latch,
}

impl Home {
    fn new(addr: usize, len: usize) -> Arc<Home> {
        Arc::new(Home {
            addr,
            len,
            released: pskv_engine::Latch::default(),
        })
    }

    /// The address of the memory.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Whether pskv no longer holds the memory.
    pub fn is_released(&self) -> bool {
        self.released.is_set()
    }

    /// Waits until pskv no longer holds the memory, spinning for `spin`
    /// first, at most `timeout` in all; whether it was released.
    pub fn wait_released(&self, spin: std::time::Duration, timeout: std::time::Duration) -> bool {
        self.released.wait_spinning(spin, Some(timeout))
    }

    fn release(&self) {
        self.released.set();
    }

    /// Copies `bytes` into the memory (a result that landed elsewhere
    /// because the buffer was shared when it was written, T2).
    ///
    /// # Safety
    /// Nothing reads or writes the memory meanwhile: the caller's contract
    /// (it leaves the memory alone until its request is done), and no
    /// buffer over it is read (`Buf`s over it are gone or not in use).
    pub(crate) unsafe fn write_back(&self, bytes: &[u8]) {
        let n = bytes.len().min(self.len);
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.addr as *mut u8, n);
    }
}

impl std::fmt::Debug for Home {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes at {:#x}", self.len, self.addr)
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Mem::Borrowed(h) = &self.mem {
            h.release();
        }
    }
}

impl Buf {
    pub(crate) fn zeroed(len: usize) -> Buf {
        Buf {
            mem: Mem::Heap(vec![0u64; len.div_ceil(8)]),
            len,
        }
    }

    /// `len` zero bytes pinned for device `ordinal` (the backend's: page-
    /// locked memory on CUDA, ordinary memory on the emulated device).
    pub(crate) fn pinned(ordinal: u32, len: usize) -> Result<Buf, pskv_gpu::KernelError> {
        let m = pskv_gpu::device::open(ordinal)?.alloc_pinned(len)?;
        Ok(Buf {
            mem: Mem::Pinned(m, ordinal),
            len,
        })
    }

    /// The caller's `len` bytes at `addr`, used in place.
    ///
    /// # Safety
    /// As [`Tensor::from_host_ptr`](super::Tensor::from_host_ptr): the
    /// memory is valid for reads and writes of `len` bytes, and the caller
    /// leaves it alone until the returned home is released.
    pub(crate) unsafe fn borrowed(addr: usize, len: usize) -> (Buf, Arc<Home>) {
        let home = Home::new(addr, len);
        (
            Buf {
                mem: Mem::Borrowed(home.clone()),
                len,
            },
            home,
        )
    }

    /// A zeroed buffer of `len` bytes of the same kind as this one (pinned
    /// stays pinned, if the device can give more; the caller's memory and
    /// a span of slots are never given twice: a heap buffer instead).
    pub(crate) fn zeroed_like(&self, len: usize) -> Buf {
        match &self.mem {
            Mem::Pinned(_, n) => Buf::pinned(*n, len).unwrap_or_else(|_| Buf::zeroed(len)),
            Mem::Heap(_) | Mem::Borrowed(_) | Mem::Span(_) => Buf::zeroed(len),
        }
    }

    /// Whether this buffer is the caller's memory of `home`.
    pub(crate) fn is_home(&self, home: &Home) -> bool {
        matches!(&self.mem, Mem::Borrowed(h) if std::ptr::eq(&**h, home))
    }

    /// A buffer over a whole push buffer's span.
    pub(crate) fn span(span: Arc<SlotSpan>) -> Buf {
        Buf {
            len: span.len(),
            mem: Mem::Span(span),
        }
    }

    /// The push buffer's span this buffer is, if it is one.
    pub(crate) fn slot_span(&self) -> Option<&SlotSpan> {
        match &self.mem {
            Mem::Span(s) => Some(s),
            _ => None,
        }
    }

    /// This buffer, to change in place, if no one else may read it: not
    /// shared (T2) and not a detached push buffer (whose detach may have
    /// failed: the slots may still be its pages).
    pub(crate) fn writable(buf: &mut Arc<Buf>) -> Option<&mut Buf> {
        if matches!(&buf.mem, Mem::Span(s) if s.is_detached()) {
            return None;
        }
        Arc::get_mut(buf)
    }

    /// `buf`, made writable in place (see [`Buf::writable`]): replaced
    /// first by `fresh(buf)` if it is not.
    pub(crate) fn make_writable(buf: &mut Arc<Buf>, fresh: impl FnOnce(&Buf) -> Buf) -> &mut Buf {
        if Buf::writable(buf).is_none() {
            *buf = Arc::new(fresh(buf));
        }
        Arc::get_mut(buf).expect("the buffer was just made unique")
    }

    pub(crate) fn from_bytes(bytes: &[u8]) -> Buf {
        let mut b = Buf::zeroed(bytes.len());
        b.bytes_mut().copy_from_slice(bytes);
        b
    }

    /// A copy of this buffer, of the same kind.
    pub(crate) fn copy_of(&self) -> Buf {
        let mut b = self.zeroed_like(self.len);
        b.bytes_mut().copy_from_slice(self.bytes());
        b
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        match &self.mem {
            Mem::Heap(w) => &bytemuck::cast_slice::<u64, u8>(w)[..self.len],
            Mem::Pinned(p, _) => &p.bytes()[..self.len],
            // SAFETY: valid for `len` bytes while the home is held
            // (`Buf::borrowed`), and it is held while this buffer lives.
            Mem::Borrowed(h) => unsafe {
                std::slice::from_raw_parts(h.addr as *const u8, self.len)
            },
            // SAFETY: the span's memory, mapped while it lives; no other
            // process writes this worker's slots (the server only reads
            // them), and in this process only this buffer's holders reach
            // them (the key's other pushes go by message: `mask_lent` in
            // `kinds/dist/push_buffer.rs`).
            Mem::Span(s) => unsafe { std::slice::from_raw_parts(s.as_ptr(), self.len) },
        }
    }

    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        match &mut self.mem {
            Mem::Heap(w) => &mut bytemuck::cast_slice_mut::<u64, u8>(w)[..len],
            Mem::Pinned(p, _) => &mut p.bytes_mut()[..len],
            // SAFETY: as in `bytes`; `&mut self` makes this the only view.
            Mem::Borrowed(h) => unsafe { std::slice::from_raw_parts_mut(h.addr as *mut u8, len) },
            // SAFETY: as in `bytes`; `&mut self` makes this the only view in
            // this process, and the server reads the slots only between a
            // push from them and its answer, while the push's op holds the
            // tensor (T1), or after a failed one (the span is detached
            // first, and `Buf::writable` refuses it).
            Mem::Span(s) => unsafe { std::slice::from_raw_parts_mut(s.as_ptr(), len) },
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is pinned.
    #[cfg(test)]
    pub(crate) fn is_pinned(&self) -> bool {
        matches!(self.mem, Mem::Pinned(..))
    }
}

impl AsRef<[u8]> for Buf {
    fn as_ref(&self) -> &[u8] {
        self.bytes()
    }
}

/// Lets `Bytes` borrow a shared buffer without a copy.
struct SharedBuf(Arc<Buf>);

impl AsRef<[u8]> for SharedBuf {
    fn as_ref(&self) -> &[u8] {
        self.0.bytes()
    }
}

/// A zero-copy view of some bytes of a shared buffer; the buffer must not
/// be changed in place while shared (T2).
pub(crate) fn share(buf: &Arc<Buf>, range: std::ops::Range<usize>) -> Bytes {
    Bytes::from_owner(SharedBuf(buf.clone())).slice(range)
}

/// What the cell of a tensor holds (see T2, T3): host bytes, or (on a GPU
/// context) a device buffer, and the rows of a row-sparse tensor (on the
/// host either way).
pub(crate) struct Data {
    pub(crate) buf: Arc<Buf>,
    /// The values of a tensor on a GPU context (then `buf` is empty).
    pub(crate) dev: Option<DeviceMem>,
    pub(crate) rows: Vec<i64>,
}

/// Host code that reached a device tensor's bytes: a path that missed its
/// staging copy. Failing loudly (a caught panic fails the op) beats reading
/// the empty host buffer.
fn host_only(d: &Data) {
    assert!(
        d.dev.is_none(),
        "host access to a device tensor's data (a missing device-to-host copy)"
    );
}

impl Data {
    /// Host data (no device buffer).
    pub(crate) fn host(buf: Buf, rows: Vec<i64>) -> Data {
        Data {
            buf: Arc::new(buf),
            dev: None,
            rows,
        }
    }

    /// Device data.
    pub(crate) fn device(dev: DeviceMem, rows: Vec<i64>) -> Data {
        Data {
            buf: Arc::new(Buf::zeroed(0)),
            dev: Some(dev),
            rows,
        }
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        host_only(self);
        self.buf.bytes()
    }

    pub(crate) fn typed<T: Elem>(&self) -> &[T] {
        bytemuck::cast_slice(self.bytes())
    }

    /// The bytes, to change some of them: copies the buffer first if a
    /// message in flight shares it (T2) or it is a detached push buffer.
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        host_only(self);
        Buf::make_writable(&mut self.buf, Buf::copy_of).bytes_mut()
    }

    /// The bytes, to overwrite all of them: a shared buffer is replaced by a
    /// fresh one without copying (T2). The contents are unspecified.
    pub(crate) fn overwrite(&mut self) -> &mut [u8] {
        host_only(self);
        Buf::make_writable(&mut self.buf, |b| b.zeroed_like(b.len())).bytes_mut()
    }

    pub(crate) fn typed_mut<T: Elem>(&mut self) -> &mut [T] {
        bytemuck::cast_slice_mut(self.bytes_mut())
    }

    /// A zero-copy view of some bytes for the transport (T2).
    pub(crate) fn share(&self, range: std::ops::Range<usize>) -> Bytes {
        host_only(self);
        share(&self.buf, range)
    }

    /// Replaces rows and bytes (row-sparse results).
    pub(crate) fn set(&mut self, rows: Vec<i64>, buf: Buf) {
        host_only(self);
        self.rows = rows;
        self.buf = Arc::new(buf);
    }
}

/// Copies `s` into `d` across storages (inside an op that reads the source
/// and writes the destination).
pub(crate) fn copy_data(
    s: &Data,
    s_storage: Storage,
    d: &mut Data,
    d_storage: Storage,
    dtype: DType,
    row_len: usize,
) {
    let row_bytes = row_len * dtype.size();
    match (s_storage, d_storage) {
        (Storage::Dense, Storage::Dense) => d.overwrite().copy_from_slice(s.bytes()),
        (Storage::RowSparse, Storage::RowSparse) => {
            d.set(s.rows.clone(), Buf::from_bytes(s.bytes()));
        }
        (Storage::RowSparse, Storage::Dense) => {
            let out = d.overwrite();
            out.fill(0);
            for (i, &r) in s.rows.iter().enumerate() {
                let r = r as usize;
                out[r * row_bytes..(r + 1) * row_bytes]
                    .copy_from_slice(&s.bytes()[i * row_bytes..(i + 1) * row_bytes]);
            }
        }
        (Storage::Dense, Storage::RowSparse) => {
            let bytes = s.bytes();
            let nrows = bytes.len().checked_div(row_bytes).unwrap_or(0);
            let rows: Vec<i64> = (0..nrows)
                .filter(|&r| {
                    bytes[r * row_bytes..(r + 1) * row_bytes]
                        .iter()
                        .any(|&b| b != 0)
                })
                .map(|r| r as i64)
                .collect();
            let mut buf = Buf::zeroed(rows.len() * row_bytes);
            for (i, &r) in rows.iter().enumerate() {
                let r = r as usize;
                buf.bytes_mut()[i * row_bytes..(i + 1) * row_bytes]
                    .copy_from_slice(&bytes[r * row_bytes..(r + 1) * row_bytes]);
            }
            d.set(rows, buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_buffers_stay_pinned_through_copies() {
        let mut p = Buf::pinned(0, 13).expect("device 0 (emulated without CUDA)");
        assert!(p.is_pinned());
        p.bytes_mut().copy_from_slice(&[7u8; 13]);
        let c = p.copy_of();
        assert!(c.is_pinned());
        assert_eq!(c.bytes(), &[7u8; 13][..]);
        let z = p.zeroed_like(5);
        assert!(z.is_pinned());
        assert_eq!(z.bytes(), &[0u8; 5][..]);
        let h = Buf::from_bytes(&[1, 2, 3]);
        assert!(!h.is_pinned() && !h.copy_of().is_pinned());
        assert_eq!(h.copy_of().bytes(), &[1, 2, 3][..]);
    }
}
