//! Device memory and device work behind one small interface, [`Device`]:
//! buffers on a device, page-locked ("pinned") host buffers, copies
//! host-to-device, device-to-host and device-to-device, and the kernels,
//! each queued on one of the device's two *lanes* (compute and copy, CUDA
//! streams); [`Device::then`] says when the work queued on a lane so far is
//! done (a CUDA event).
//!
//! Two implementations:
//! - `cuda::CudaDevice` (feature `cuda`): a GPU through cudarc, two streams,
//!   the kernels of `crate::cuda`, events waited for on a thread of their own
//!   (no worker thread is held while the GPU works);
//! - [`emulated::EmulatedDevice`]: a device emulated in host memory, so that
//!   everything above it runs where there is no GPU (CI). Its buffers are
//!   allocations of their own that only its lanes touch, every copy is
//!   explicit, each lane is a thread that runs its work in queue order, and
//!   its kernels are the CPU kernels, which agree with the CUDA ones bit for
//!   bit.
//!
//! [`open`] picks one at run time: `PSKV_GPU=auto|cuda|emulated` (auto: CUDA
//! when a device is present, else the emulated device).
//!
//! # The contract of queued work
//!
//! A call queues work and returns at once; the buffers it names are kept
//! alive (they are reference-counted) until the work is done. Work on one
//! lane runs in queue order; work on two lanes may overlap. So a caller
//! that writes a buffer on one lane and reads it on another must wait for
//! the first (`then`) before queuing the second: the kvstore does, because
//! each engine op completes only once its device work is done, and the
//! engine orders ops by the buffers' vars.
//!
//! Host memory a download writes into is the caller's to keep valid and
//! untouched until `then` reports the download done (the `unsafe` of
//! [`Device::download`]).

pub mod emulated;

use std::sync::{Arc, OnceLock};

use crate::{Bits, KernelError};

/// One of a device's two queues of work.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Lane {
    /// Kernels (and device-to-device copies made for them).
    Compute,
    /// Copies between host and device.
    Copy,
}

/// The element type of a sum.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum SumType {
    /// f32.
    F32,
    /// f64.
    F64,
    /// f16 (summed in f32, rounded once).
    F16,
}

impl SumType {
    /// Bytes of one element.
    pub fn size(self) -> usize {
        match self {
            SumType::F32 => 4,
            SumType::F64 => 8,
            SumType::F16 => 2,
        }
    }
}

/// What runs when a lane's work so far is done: with the first error of
/// that work, if any.
pub type Done = Box<dyn FnOnce(Result<(), KernelError>) + Send + 'static>;

/// Host bytes a device may read until its work is done (an upload's
/// source).
pub type HostBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A buffer in a device's memory (reference-counted: clones name the same
/// memory). Host code cannot read it: only the device's work can.
#[derive(Clone)]
pub struct DeviceMem {
    pub(crate) device: u32,
    pub(crate) len: usize,
    pub(crate) raw: RawMem,
}

#[derive(Clone)]
pub(crate) enum RawMem {
    Emulated(Arc<emulated::Cell>),
    #[cfg(feature = "cuda")]
    Cuda(Arc<cuda::CudaMem>),
}

impl DeviceMem {
    /// Its bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device it is on.
    pub fn device(&self) -> u32 {
        self.device
    }

    /// Its address on the device (a CUDA device pointer; on the emulated
    /// device, a host address), as `Device::borrow` takes.
    pub fn address(&self) -> u64 {
        match &self.raw {
            RawMem::Emulated(c) => c.address(),
            #[cfg(feature = "cuda")]
            RawMem::Cuda(c) => c.address(),
        }
    }

    /// Whether `self` and `other` are the same memory.
    pub fn same(&self, other: &DeviceMem) -> bool {
        match (&self.raw, &other.raw) {
            (RawMem::Emulated(a), RawMem::Emulated(b)) => Arc::ptr_eq(a, b),
            #[cfg(feature = "cuda")]
            (RawMem::Cuda(a), RawMem::Cuda(b)) => Arc::ptr_eq(a, b),
            #[cfg(feature = "cuda")]
            _ => false,
        }
    }
}

impl std::fmt::Debug for DeviceMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceMem")
            .field("device", &self.device)
            .field("len", &self.len)
            .finish()
    }
}

/// Page-locked host memory (copies to and from a device run at full speed
/// and asynchronously). Host code reads and writes it as any host memory.
pub struct PinnedMem {
    pub(crate) raw: PinnedRaw,
    pub(crate) len: usize,
}

pub(crate) enum PinnedRaw {
    /// The emulated device's: ordinary memory, 8-byte aligned.
    Heap(Box<[u64]>),
    #[cfg(feature = "cuda")]
    Cuda(cuda::CudaPinned),
}

impl PinnedMem {
    /// Its bytes.
    pub fn bytes(&self) -> &[u8] {
        match &self.raw {
            PinnedRaw::Heap(w) => &bytemuck_bytes(w)[..self.len],
            #[cfg(feature = "cuda")]
            PinnedRaw::Cuda(p) => p.bytes(self.len),
        }
    }

    /// Its bytes, to write.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        match &mut self.raw {
            PinnedRaw::Heap(w) => &mut bytemuck_bytes_mut(w)[..len],
            #[cfg(feature = "cuda")]
            PinnedRaw::Cuda(p) => p.bytes_mut(len),
        }
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::fmt::Debug for PinnedMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedMem").field("len", &self.len).finish()
    }
}

pub(crate) fn bytemuck_bytes(w: &[u64]) -> &[u8] {
    // SAFETY: u64 has no padding; any u64 slice is a valid byte slice of
    // eight times its length, with the same lifetime.
    unsafe { std::slice::from_raw_parts(w.as_ptr() as *const u8, w.len() * 8) }
}

pub(crate) fn bytemuck_bytes_mut(w: &mut [u64]) -> &mut [u8] {
    // SAFETY: as above, and the borrow is unique.
    unsafe { std::slice::from_raw_parts_mut(w.as_mut_ptr() as *mut u8, w.len() * 8) }
}

/// A device: its memory, its two lanes of work, and the kernels.
///
/// Every call checks its arguments (lengths, offsets, devices) and returns
/// an error rather than queuing bad work; errors of queued work come back
/// through `then`.
pub trait Device: Send + Sync + 'static {
    /// Its ordinal (the n of `Context::Gpu(n)`).
    fn ordinal(&self) -> u32;

    /// What it is, for reports (`"NVIDIA H200, sm_90"`, `"emulated device 1"`).
    fn describe(&self) -> String;

    /// Whether it is the emulated device.
    fn is_emulated(&self) -> bool;

    /// `bytes` of device memory, zeroed.
    fn alloc(&self, bytes: usize) -> Result<DeviceMem, KernelError>;

    /// `bytes` of pinned host memory, zeroed.
    fn alloc_pinned(&self, bytes: usize) -> Result<PinnedMem, KernelError>;

    /// The caller's memory of this device, `bytes` from address `ptr`, as a
    /// buffer that pskv never frees (a CUDA device pointer; on the emulated
    /// device, a host address). `ptr` must be 8-byte aligned.
    ///
    /// # Safety
    /// The memory is valid for `bytes` of reads and writes on this device,
    /// and nothing but work queued here touches it until the last clone of
    /// the buffer is dropped and its work is done.
    unsafe fn borrow(&self, ptr: u64, bytes: usize) -> Result<DeviceMem, KernelError>;

    /// Queues a copy of `src` into `dst` from byte `at`.
    fn upload(
        &self,
        lane: Lane,
        src: HostBytes,
        dst: &DeviceMem,
        at: usize,
    ) -> Result<(), KernelError>;

    /// Queues a copy of `len` bytes of `src` from byte `at` into host
    /// memory at `dst`.
    ///
    /// # Safety
    /// `dst` is valid for `len` bytes of writes, and nothing else reads or
    /// writes them until `then` on this lane reports this work done.
    unsafe fn download(
        &self,
        lane: Lane,
        src: &DeviceMem,
        at: usize,
        dst: *mut u8,
        len: usize,
    ) -> Result<(), KernelError>;

    /// Queues a copy of `len` bytes from `src` (from byte `src_at`) to `dst`
    /// (from byte `dst_at`), on this device (both buffers are on it).
    fn copy(
        &self,
        lane: Lane,
        src: &DeviceMem,
        src_at: usize,
        dst: &DeviceMem,
        dst_at: usize,
        len: usize,
    ) -> Result<(), KernelError>;

    /// Queues a copy of all of `src`, a buffer of *another* device of the
    /// same backend, into `dst` on this device (a peer copy). The work on
    /// `src` must be done (the caller waited for it).
    fn copy_from_peer(
        &self,
        lane: Lane,
        src: &DeviceMem,
        dst: &DeviceMem,
    ) -> Result<(), KernelError>;

    /// Queues `out = inputs[0] + inputs[1] + ...`, element by element, in
    /// input order (f16 summed in f32, rounded once).
    fn sum(
        &self,
        lane: Lane,
        ty: SumType,
        out: &DeviceMem,
        inputs: &[DeviceMem],
    ) -> Result<(), KernelError>;

    /// Queues the quantize of `grad` (f32) with error feedback in
    /// `residual` (f32), MXNet's 2-bit or the 1-bit (MXNet 2.0), writing
    /// `bits`' words of codes (`layout::words_2bit(n)` or `words_1bit(n)`)
    /// to `codes`. The threshold is checked here.
    fn quantize(
        &self,
        lane: Lane,
        bits: Bits,
        grad: &DeviceMem,
        residual: &DeviceMem,
        codes: &DeviceMem,
        threshold: f32,
    ) -> Result<(), KernelError>;

    /// Queues the dequantize of `codes` into `out` (f32): `+threshold`,
    /// `-threshold` or 0 for 2-bit, +1 or -1 for 1-bit (which ignores
    /// `threshold`).
    fn dequantize(
        &self,
        lane: Lane,
        bits: Bits,
        codes: &DeviceMem,
        out: &DeviceMem,
        threshold: f32,
    ) -> Result<(), KernelError>;

    /// Runs `done` (on a thread of the device's, not the caller's) once the
    /// work queued on `lane` so far is done, with its first error.
    fn then(&self, lane: Lane, done: Done);
}

/// Which devices a process uses: `PSKV_GPU`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// CUDA when a device is present, else emulated.
    Auto,
    /// CUDA only: an error where there is none.
    Cuda,
    /// The emulated device, even where a GPU is.
    Emulated,
}

impl Backend {
    /// From `PSKV_GPU`'s value (None: auto).
    pub fn parse(v: Option<&str>) -> Result<Backend, KernelError> {
        match v.map(str::trim) {
            None | Some("") | Some("auto") => Ok(Backend::Auto),
            Some("cuda") => Ok(Backend::Cuda),
            Some("emulated") => Ok(Backend::Emulated),
            Some(other) => Err(KernelError::Config(format!(
                "PSKV_GPU={other}: expected auto, cuda or emulated"
            ))),
        }
    }

    /// From the environment.
    pub fn from_env() -> Result<Backend, KernelError> {
        Backend::parse(std::env::var("PSKV_GPU").ok().as_deref())
    }
}

/// The most devices the emulated backend offers (ordinals 0 to 15).
pub const EMULATED_DEVICES: u32 = 16;

/// Whether CUDA devices are usable here, and how many.
pub fn cuda_devices() -> Result<usize, KernelError> {
    #[cfg(feature = "cuda")]
    {
        crate::cuda::device_count()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(KernelError::CudaUnavailable(
            "pskv was built without the `cuda` feature".into(),
        ))
    }
}

/// Device `ordinal` of the backend `PSKV_GPU` picks (one per process and
/// ordinal, made on first use).
pub fn open(ordinal: u32) -> Result<Arc<dyn Device>, KernelError> {
    static BACKEND: OnceLock<Result<Backend, String>> = OnceLock::new();
    let backend = BACKEND
        .get_or_init(|| Backend::from_env().map_err(|e| e.to_string()))
        .clone()
        .map_err(KernelError::Config)?;
    open_with(backend, ordinal)
}

/// Device `ordinal` of `backend`.
pub fn open_with(backend: Backend, ordinal: u32) -> Result<Arc<dyn Device>, KernelError> {
    let cuda = match backend {
        Backend::Emulated => false,
        Backend::Cuda => true,
        Backend::Auto => cuda_devices().is_ok(),
    };
    if cuda {
        #[cfg(feature = "cuda")]
        {
            return cuda::CudaDevice::open(ordinal);
        }
        #[cfg(not(feature = "cuda"))]
        {
            return Err(KernelError::CudaUnavailable(
                "PSKV_GPU=cuda, but pskv was built without the `cuda` feature".into(),
            ));
        }
    }
    emulated::EmulatedDevice::open(ordinal)
}

#[cfg(feature = "cuda")]
pub mod cuda;

/// Checks a borrowed address: not null, 8-byte aligned.
pub(crate) fn check_borrow(ptr: u64) -> Result<(), KernelError> {
    if ptr == 0 {
        return Err(KernelError::Config(
            "a borrowed device buffer at address 0".into(),
        ));
    }
    if ptr % 8 != 0 {
        return Err(KernelError::Config(format!(
            "a borrowed device buffer at {ptr:#x}: not 8-byte aligned"
        )));
    }
    Ok(())
}

pub(crate) fn check_range(
    what: &'static str,
    at: usize,
    len: usize,
    have: usize,
) -> Result<(), KernelError> {
    match at.checked_add(len) {
        Some(end) if end <= have => Ok(()),
        _ => Err(KernelError::Range {
            what,
            at,
            len,
            have,
        }),
    }
}
