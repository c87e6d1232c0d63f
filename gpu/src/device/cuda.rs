//! A CUDA GPU behind [`Device`]: memory from the driver (raw allocations),
//! pinned host memory, two streams (the compute and copy lanes), the
//! kernels of `crate::cuda`, and `then` through events that a thread per
//! lane waits for (so no engine worker is held while the GPU works).
//!
//! What queued work names stays alive until the lane's next `then` has
//! seen the work done: each lane keeps the buffers (and upload sources) of
//! the work queued since its last `then` and hands them to the waiter with
//! the event, which drops them once the event completed.

use std::any::Any;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{result, sys, CudaContext, CudaEvent, CudaModule, CudaStream, PushKernelArg};

use super::{
    check_range, Device, DeviceMem, Done, HostBytes, Lane, PinnedMem, PinnedRaw, RawMem, SumType,
};
use crate::cuda::{cuda_err, guarded, launch_config, load, Functions};
use crate::{Bits, KernelError};

/// Device memory from the driver.
pub(crate) struct CudaMem {
    ptr: sys::CUdeviceptr,
    ctx: Arc<CudaContext>,
    /// Allocated here (freed on drop), or the caller's (`Device::borrow`).
    owned: bool,
}

// SAFETY: a device pointer is an address on the device; the driver calls
// that use it bind the context first.
unsafe impl Send for CudaMem {}
unsafe impl Sync for CudaMem {}

impl CudaMem {
    pub(crate) fn address(&self) -> u64 {
        self.ptr
    }
}

impl Drop for CudaMem {
    fn drop(&mut self) {
        if self.owned && self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by `malloc_sync` in this context, freed once.
            unsafe {
                let _ = result::free_sync(self.ptr);
            }
        }
    }
}

/// Page-locked host memory from the driver.
pub(crate) struct CudaPinned {
    ptr: *mut u8,
    ctx: Arc<CudaContext>,
}

// SAFETY: plain host memory; who writes it when is the caller's contract.
unsafe impl Send for CudaPinned {}
unsafe impl Sync for CudaPinned {}

impl CudaPinned {
    pub(crate) fn bytes(&self, len: usize) -> &[u8] {
        // SAFETY: `len` bytes were allocated (PinnedMem keeps its length).
        unsafe { std::slice::from_raw_parts(self.ptr, len) }
    }

    pub(crate) fn bytes_mut(&mut self, len: usize) -> &mut [u8] {
        // SAFETY: as above, borrowed uniquely.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }
}

impl Drop for CudaPinned {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by `malloc_host`, freed once.
            unsafe {
                let _ = result::free_host(self.ptr as *mut std::ffi::c_void);
            }
        }
    }
}

type Keep = Box<dyn Any + Send>;

/// What a lane's waiter gets for each `then`: the event (or why there is
/// none), what the work since the last `then` names, and the callback.
type Wait = (Result<CudaEvent, KernelError>, Vec<Keep>, Done);

/// Launches `func` on `lane` of `dev` for `threads` threads with `args`.
///
/// Safety (of the expansion): the callers pass arguments that match the
/// kernel's signature, with lengths checked, and keep the buffers alive
/// until the lane's next `then`.
macro_rules! launch {
    ($dev:expr, $lane:expr, $func:expr, $threads:expr; $($arg:expr),+) => {{
        $dev.bind()?;
        let mut b = $dev.lane($lane).stream.launch_builder($func);
        $( b.arg($arg); )+
        // SAFETY: see the macro's docs.
        unsafe { b.launch(launch_config($threads, $dev.max_blocks)) }
            .map_err(cuda_err("kernel launch"))?;
    }};
}

struct LaneState {
    stream: Arc<CudaStream>,
    /// What the work queued since the last `then` names.
    keep: Mutex<Vec<Keep>>,
    /// The thread that waits for each `then`'s event.
    waiter: Mutex<Sender<Wait>>,
}

/// A CUDA GPU.
pub struct CudaDevice {
    ordinal: u32,
    ctx: Arc<CudaContext>,
    compute: LaneState,
    copy: LaneState,
    _module: Arc<CudaModule>,
    f: Functions,
    max_blocks: u32,
    arch: String,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.ordinal)
            .field("arch", &self.arch)
            .finish()
    }
}

fn lane_state(ctx: &Arc<CudaContext>, name: String) -> Result<LaneState, KernelError> {
    let stream = ctx.new_stream().map_err(cuda_err("cuStreamCreate"))?;
    let (tx, rx) = channel::<Wait>();
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            for (event, keep, done) in rx {
                let r = event.and_then(|e| e.synchronize().map_err(cuda_err("event wait")));
                drop(keep);
                done(r);
            }
        })
        .map_err(|e| KernelError::Threads {
            threads: 1,
            message: e.to_string(),
        })?;
    Ok(LaneState {
        stream,
        keep: Mutex::new(Vec::new()),
        waiter: Mutex::new(tx),
    })
}

impl CudaDevice {
    /// GPU `ordinal` (one per process and ordinal).
    pub fn open(ordinal: u32) -> Result<Arc<dyn Device>, KernelError> {
        static DEVICES: OnceLock<Mutex<std::collections::HashMap<u32, Arc<CudaDevice>>>> =
            OnceLock::new();
        let mut all = DEVICES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(d) = all.get(&ordinal) {
            return Ok(d.clone());
        }
        let n = crate::cuda::device_count()?;
        if ordinal as usize >= n {
            return Err(KernelError::NoDevice {
                ordinal,
                have: n,
                what: "CUDA devices",
            });
        }
        let d = guarded("CUDA setup", || {
            let ctx = CudaContext::new(ordinal as usize).map_err(cuda_err("cuCtx create"))?;
            let l = load(&ctx)?;
            Ok(Arc::new(CudaDevice {
                ordinal,
                compute: lane_state(&ctx, format!("pskv-gpu{ordinal}-compute"))?,
                copy: lane_state(&ctx, format!("pskv-gpu{ordinal}-copy"))?,
                ctx,
                _module: l.module,
                f: l.f,
                max_blocks: l.max_blocks,
                arch: l.arch,
            }))
        })?;
        all.insert(ordinal, d.clone());
        Ok(d)
    }

    fn lane(&self, lane: Lane) -> &LaneState {
        match lane {
            Lane::Compute => &self.compute,
            Lane::Copy => &self.copy,
        }
    }

    fn bind(&self) -> Result<(), KernelError> {
        self.ctx.bind_to_thread().map_err(cuda_err("bind context"))
    }

    /// The device pointer of `m`, checked to be on this device.
    fn ptr(&self, m: &DeviceMem, what: &'static str) -> Result<sys::CUdeviceptr, KernelError> {
        if m.device != self.ordinal {
            return Err(KernelError::WrongDevice {
                what,
                on: m.device,
                device: self.ordinal,
            });
        }
        match &m.raw {
            RawMem::Cuda(c) => Ok(c.ptr),
            RawMem::Emulated(_) => Err(KernelError::Config(format!(
                "{what}: an emulated buffer given to a CUDA device"
            ))),
        }
    }

    fn keep(&self, lane: Lane, k: Keep) {
        self.lane(lane)
            .keep
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(k);
    }

    fn raw_alloc(&self, bytes: usize) -> Result<Arc<CudaMem>, KernelError> {
        self.bind()?;
        // SAFETY: a fresh allocation of at least one byte, zeroed before use.
        let ptr = unsafe { result::malloc_sync(bytes.max(1)) }.map_err(cuda_err("cuMemAlloc"))?;
        let mem = Arc::new(CudaMem {
            ptr,
            ctx: self.ctx.clone(),
            owned: true,
        });
        // SAFETY: the allocation above holds `bytes.max(1)` bytes.
        unsafe { result::memset_d8_sync(ptr, 0, bytes.max(1)) }.map_err(cuda_err("cuMemsetD8"))?;
        Ok(mem)
    }
}

impl Device for CudaDevice {
    fn ordinal(&self) -> u32 {
        self.ordinal
    }

    fn describe(&self) -> String {
        let name = self.ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        format!("{name}, {}", self.arch)
    }

    fn is_emulated(&self) -> bool {
        false
    }

    fn alloc(&self, bytes: usize) -> Result<DeviceMem, KernelError> {
        Ok(DeviceMem {
            device: self.ordinal,
            len: bytes,
            raw: RawMem::Cuda(self.raw_alloc(bytes)?),
        })
    }

    unsafe fn borrow(&self, ptr: u64, bytes: usize) -> Result<DeviceMem, KernelError> {
        super::check_borrow(ptr)?;
        Ok(DeviceMem {
            device: self.ordinal,
            len: bytes,
            raw: RawMem::Cuda(Arc::new(CudaMem {
                ptr,
                ctx: self.ctx.clone(),
                owned: false,
            })),
        })
    }

    fn alloc_pinned(&self, bytes: usize) -> Result<PinnedMem, KernelError> {
        self.bind()?;
        // SAFETY: a fresh page-locked allocation, zeroed below.
        let p =
            unsafe { result::malloc_host(bytes.max(1), 0) }.map_err(cuda_err("cuMemHostAlloc"))?;
        let ptr = p as *mut u8;
        // SAFETY: `bytes.max(1)` bytes were allocated.
        unsafe { std::ptr::write_bytes(ptr, 0, bytes.max(1)) };
        Ok(PinnedMem {
            raw: PinnedRaw::Cuda(CudaPinned {
                ptr,
                ctx: self.ctx.clone(),
            }),
            len: bytes,
        })
    }

    fn upload(
        &self,
        lane: Lane,
        src: HostBytes,
        dst: &DeviceMem,
        at: usize,
    ) -> Result<(), KernelError> {
        let d = self.ptr(dst, "an upload's destination")?;
        let bytes: &[u8] = (*src).as_ref();
        check_range("an upload", at, bytes.len(), dst.len)?;
        if bytes.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: in bounds (checked); `src` is kept alive until the lane's
        // next `then`, so the host bytes outlive the copy.
        unsafe {
            result::memcpy_htod_async(d + at as u64, bytes, self.lane(lane).stream.cu_stream())
        }
        .map_err(cuda_err("cuMemcpyHtoDAsync"))?;
        self.keep(lane, Box::new(src));
        self.keep(lane, Box::new(dst.clone()));
        Ok(())
    }

    unsafe fn download(
        &self,
        lane: Lane,
        src: &DeviceMem,
        at: usize,
        dst: *mut u8,
        len: usize,
    ) -> Result<(), KernelError> {
        let s = self.ptr(src, "a download's source")?;
        check_range("a download", at, len, src.len)?;
        if len == 0 {
            return Ok(());
        }
        self.bind()?;
        let out = std::slice::from_raw_parts_mut(dst, len);
        result::memcpy_dtoh_async(out, s + at as u64, self.lane(lane).stream.cu_stream())
            .map_err(cuda_err("cuMemcpyDtoHAsync"))?;
        self.keep(lane, Box::new(src.clone()));
        Ok(())
    }

    fn copy(
        &self,
        lane: Lane,
        src: &DeviceMem,
        src_at: usize,
        dst: &DeviceMem,
        dst_at: usize,
        len: usize,
    ) -> Result<(), KernelError> {
        let s = self.ptr(src, "a copy's source")?;
        let d = self.ptr(dst, "a copy's destination")?;
        check_range("a copy's source", src_at, len, src.len)?;
        check_range("a copy's destination", dst_at, len, dst.len)?;
        if len == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: both ranges are in bounds (checked); the buffers are kept.
        unsafe {
            result::memcpy_dtod_async(
                d + dst_at as u64,
                s + src_at as u64,
                len,
                self.lane(lane).stream.cu_stream(),
            )
        }
        .map_err(cuda_err("cuMemcpyDtoDAsync"))?;
        self.keep(lane, Box::new((src.clone(), dst.clone())));
        Ok(())
    }

    fn copy_from_peer(
        &self,
        lane: Lane,
        src: &DeviceMem,
        dst: &DeviceMem,
    ) -> Result<(), KernelError> {
        let d = self.ptr(dst, "a peer copy's destination")?;
        crate::error::check_len(
            "copy_from_peer",
            "the destination (bytes)",
            src.len,
            dst.len,
        )?;
        let (s, src_ctx) = match &src.raw {
            RawMem::Cuda(c) => (c.ptr, c.ctx.clone()),
            RawMem::Emulated(_) => {
                return Err(KernelError::Config(
                    "a peer copy from an emulated buffer to a CUDA device".into(),
                ))
            }
        };
        if src.len == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: both buffers hold `src.len` bytes (checked), in their
        // contexts; both are kept until the lane's next `then`.
        unsafe {
            result::memcpy_peer_async(
                self.ctx.cu_ctx(),
                d,
                src_ctx.cu_ctx(),
                s,
                src.len,
                self.lane(lane).stream.cu_stream(),
            )
        }
        .map_err(cuda_err("cuMemcpyPeerAsync"))?;
        self.keep(lane, Box::new((src.clone(), dst.clone())));
        Ok(())
    }

    fn sum(
        &self,
        lane: Lane,
        ty: SumType,
        out: &DeviceMem,
        inputs: &[DeviceMem],
    ) -> Result<(), KernelError> {
        const K: &str = "sum";
        if inputs.is_empty() {
            return Err(KernelError::NoInputs { kernel: K });
        }
        let o = self.ptr(out, "the sum's output")?;
        let mut ptrs: Vec<u64> = Vec::with_capacity(inputs.len());
        for i in inputs {
            crate::error::check_len(K, "an input (bytes)", out.len, i.len)?;
            if i.same(out) {
                return Err(KernelError::Config(
                    "sum: the output is also an input".into(),
                ));
            }
            ptrs.push(self.ptr(i, "a sum's input")?);
        }
        let n = (out.len / ty.size()) as u64;
        if n == 0 {
            return Ok(());
        }
        // The device array of input pointers.
        let table = self.raw_alloc(ptrs.len() * 8)?;
        let ptrs = Arc::new(ptrs);
        self.bind()?;
        // SAFETY: `table` holds the pointers' bytes; `ptrs` is kept alive.
        unsafe {
            result::memcpy_htod_async(table.ptr, &ptrs[..], self.lane(lane).stream.cu_stream())
        }
        .map_err(cuda_err("sum: upload pointers"))?;
        let func = match ty {
            SumType::F32 => &self.f.sum_f32,
            SumType::F64 => &self.f.sum_f64,
            SumType::F16 => &self.f.sum_f16,
        };
        let nin = inputs.len() as u32;
        let tp = table.ptr;
        launch!(self, lane, func, n; &o, &tp, &nin, &n);
        self.keep(lane, Box::new((table, ptrs, out.clone(), inputs.to_vec())));
        Ok(())
    }

    fn quantize(
        &self,
        lane: Lane,
        bits: Bits,
        grad: &DeviceMem,
        residual: &DeviceMem,
        codes: &DeviceMem,
        threshold: f32,
    ) -> Result<(), KernelError> {
        let k = bits.quantize_name();
        bits.check_threshold(k, threshold)?;
        let g = self.ptr(grad, "a quantize's gradient")?;
        let r = self.ptr(residual, "a quantize's residual")?;
        let c = self.ptr(codes, "a quantize's codes")?;
        let n = (grad.len / 4) as u64;
        let words = bits.words(n as usize);
        crate::error::check_len(k, "the residual (bytes)", grad.len, residual.len)?;
        crate::error::check_len(k, "the codes (bytes)", words * 4, codes.len)?;
        if n == 0 {
            return Ok(());
        }
        let func = match bits {
            Bits::Two => &self.f.quantize_2bit,
            Bits::One => &self.f.quantize_1bit,
        };
        launch!(self, lane, func, n.div_ceil(4).next_multiple_of(32); &g, &r, &c, &n, &threshold);
        self.keep(
            lane,
            Box::new((grad.clone(), residual.clone(), codes.clone())),
        );
        Ok(())
    }

    fn dequantize(
        &self,
        lane: Lane,
        bits: Bits,
        codes: &DeviceMem,
        out: &DeviceMem,
        threshold: f32,
    ) -> Result<(), KernelError> {
        let k = bits.dequantize_name();
        if bits == Bits::Two {
            bits.check_threshold(k, threshold)?;
        }
        let c = self.ptr(codes, "a dequantize's codes")?;
        let o = self.ptr(out, "a dequantize's output")?;
        let n = (out.len / 4) as u64;
        crate::error::check_len(
            k,
            "the codes (bytes)",
            bits.words(n as usize) * 4,
            codes.len,
        )?;
        if n == 0 {
            return Ok(());
        }
        // The kernels' last argument: 0 stores, 1 would add.
        let store = 0u32;
        match bits {
            Bits::Two => {
                let t = threshold;
                launch!(self, lane, &self.f.dequantize_2bit, n.div_ceil(4); &c, &o, &n, &t, &store)
            }
            Bits::One => {
                launch!(self, lane, &self.f.dequantize_1bit, n.div_ceil(4); &c, &o, &n, &store)
            }
        }
        self.keep(lane, Box::new((codes.clone(), out.clone())));
        Ok(())
    }

    fn then(&self, lane: Lane, done: Done) {
        let l = self.lane(lane);
        let keep = std::mem::take(&mut *l.keep.lock().unwrap_or_else(|p| p.into_inner()));
        let event = self.bind().and_then(|()| {
            l.stream
                .record_event(Some(sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC))
                .map_err(cuda_err("cuEventRecord"))
        });
        let sent = l
            .waiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send((event, keep, done));
        if let Err(std::sync::mpsc::SendError((_, keep, done))) = sent {
            drop(keep);
            done(Err(KernelError::Config(
                "the device's waiter thread is gone".into(),
            )));
        }
    }
}
