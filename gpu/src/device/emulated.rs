//! A device emulated in host memory: what runs the device paths of the
//! kvstore where there is no GPU (CI), with the same contract as a CUDA
//! device (`device/mod.rs`).
//!
//! - Memory: each buffer is an allocation of its own (8-byte aligned) that
//!   only the device's lanes read or write; host code reaches it through
//!   uploads and downloads, as on a GPU.
//! - Lanes: each is a thread that runs the work queued on it in queue
//!   order; the two lanes run independently.
//! - Kernels: the CPU kernels (single-threaded), which agree with the CUDA
//!   kernels bit for bit, so results on the emulated device are those of a
//!   GPU.
//!
//! # Why the cells may be shared (memory-ordering invariant)
//!
//! A `Cell` is read and written only by lane threads, inside queued work.
//! Two pieces of work that touch one cell, one of them writing, never run
//! at once: on one lane they run in order; across lanes the caller waits
//! for the first (`then`) before queuing the second (the contract in
//! `device/mod.rs`, which the kvstore's engine ops keep). The queue's
//! channel and `then`'s callback carry the happens-before edges.

use std::cell::UnsafeCell;
use std::collections::HashMap;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, OnceLock};

use super::{
    check_range, Device, DeviceMem, Done, HostBytes, Lane, PinnedMem, PinnedRaw, RawMem, SumType,
    EMULATED_DEVICES,
};
use crate::cpu::CpuKernels;
use crate::{Bits, KernelError, Kernels};

/// The memory of one emulated buffer: an allocation of its own, or the
/// caller's memory (`Device::borrow`), reached through one address.
pub(crate) struct Cell {
    ptr: *mut u8,
    /// The allocation `ptr` points into (None: borrowed, never freed here).
    _own: Option<UnsafeCell<Box<[u64]>>>,
}

// SAFETY: only lane threads touch the bytes, never two at once when one
// writes (the invariant at the top of this file); borrowed memory is the
// caller's to keep valid (`Device::borrow`'s contract).
unsafe impl Sync for Cell {}
unsafe impl Send for Cell {}

impl Cell {
    fn new(bytes: usize) -> Cell {
        let mut words = vec![0u64; bytes.div_ceil(8).max(1)].into_boxed_slice();
        // Subtle: the pointer stays valid when the box moves into the cell
        // (the heap block does not move).
        let ptr = words.as_mut_ptr() as *mut u8;
        Cell {
            ptr,
            _own: Some(UnsafeCell::new(words)),
        }
    }

    pub(crate) fn address(&self) -> u64 {
        self.ptr as u64
    }

    /// # Safety
    /// As `Device::borrow`.
    unsafe fn borrowed(ptr: u64) -> Cell {
        Cell {
            ptr: ptr as *mut u8,
            _own: None,
        }
    }

    /// # Safety
    /// Inside queued work; no work writes the cell meanwhile; `len` is at
    /// most the buffer's length.
    unsafe fn bytes(&self, len: usize) -> &[u8] {
        std::slice::from_raw_parts(self.ptr, len)
    }

    /// # Safety
    /// Inside queued work; no other work touches the cell meanwhile; `len`
    /// is at most the buffer's length.
    #[allow(clippy::mut_from_ref)]
    unsafe fn bytes_mut(&self, len: usize) -> &mut [u8] {
        std::slice::from_raw_parts_mut(self.ptr, len)
    }
}

fn cell(m: &DeviceMem) -> Result<&Arc<Cell>, KernelError> {
    match &m.raw {
        RawMem::Emulated(c) => Ok(c),
        #[cfg(feature = "cuda")]
        RawMem::Cuda(_) => Err(KernelError::Config(
            "a CUDA buffer given to the emulated device".into(),
        )),
    }
}

/// Work for a lane: runs on its thread; an error is kept for the next
/// `then`.
type Work = Box<dyn FnOnce() -> Result<(), KernelError> + Send>;

enum Task {
    Work(Work),
    Then(Done),
}

/// A device emulated in host memory.
pub struct EmulatedDevice {
    ordinal: u32,
    compute: Mutex<Sender<Task>>,
    copy: Mutex<Sender<Task>>,
}

impl std::fmt::Debug for EmulatedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatedDevice")
            .field("ordinal", &self.ordinal)
            .finish()
    }
}

fn kernels() -> &'static CpuKernels {
    static K: OnceLock<CpuKernels> = OnceLock::new();
    K.get_or_init(CpuKernels::single_threaded)
}

/// Starts a lane's thread.
fn lane(name: String) -> Result<Sender<Task>, KernelError> {
    let (tx, rx) = channel::<Task>();
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let mut first_err: Option<KernelError> = None;
            for task in rx {
                match task {
                    Task::Work(w) => {
                        if let Err(e) = w() {
                            first_err.get_or_insert(e);
                        }
                    }
                    Task::Then(done) => done(first_err.take().map_or(Ok(()), Err)),
                }
            }
        })
        .map_err(|e| KernelError::Threads {
            threads: 1,
            message: e.to_string(),
        })?;
    Ok(tx)
}

impl EmulatedDevice {
    /// Emulated device `ordinal` (one per process and ordinal).
    pub fn open(ordinal: u32) -> Result<Arc<dyn Device>, KernelError> {
        if ordinal >= EMULATED_DEVICES {
            return Err(KernelError::NoDevice {
                ordinal,
                have: EMULATED_DEVICES as usize,
                what: "emulated devices",
            });
        }
        static DEVICES: OnceLock<Mutex<HashMap<u32, Arc<EmulatedDevice>>>> = OnceLock::new();
        let mut all = DEVICES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(d) = all.get(&ordinal) {
            return Ok(d.clone());
        }
        let d = Arc::new(EmulatedDevice {
            ordinal,
            compute: Mutex::new(lane(format!("pskv-emu{ordinal}-compute"))?),
            copy: Mutex::new(lane(format!("pskv-emu{ordinal}-copy"))?),
        });
        all.insert(ordinal, d.clone());
        Ok(d)
    }

    fn queue(&self, lane: Lane, task: Task) {
        let tx = match lane {
            Lane::Compute => &self.compute,
            Lane::Copy => &self.copy,
        };
        // The lane's thread lives as long as the process (devices are
        // never dropped from the table), so the send cannot fail.
        let _ = tx.lock().unwrap_or_else(|p| p.into_inner()).send(task);
    }

    fn work(&self, lane: Lane, w: impl FnOnce() -> Result<(), KernelError> + Send + 'static) {
        self.queue(lane, Task::Work(Box::new(w)));
    }

    fn check_mine(&self, m: &DeviceMem, what: &'static str) -> Result<Arc<Cell>, KernelError> {
        if m.device != self.ordinal {
            return Err(KernelError::WrongDevice {
                what,
                on: m.device,
                device: self.ordinal,
            });
        }
        cell(m).cloned()
    }
}

/// `bytes` as `n` elements of `T` (aligned: cells are 8-byte aligned).
///
/// # Safety
/// `bytes` holds `n * size_of::<T>()` bytes of valid `T`s, aligned.
unsafe fn typed<T>(bytes: &[u8]) -> &[T] {
    std::slice::from_raw_parts(
        bytes.as_ptr() as *const T,
        bytes.len() / std::mem::size_of::<T>(),
    )
}

/// # Safety
/// As `typed`, and the bytes are not aliased.
unsafe fn typed_mut<T>(bytes: &mut [u8]) -> &mut [T] {
    std::slice::from_raw_parts_mut(
        bytes.as_mut_ptr() as *mut T,
        bytes.len() / std::mem::size_of::<T>(),
    )
}

impl Device for EmulatedDevice {
    fn ordinal(&self) -> u32 {
        self.ordinal
    }

    fn describe(&self) -> String {
        format!("emulated device {} (host memory)", self.ordinal)
    }

    fn is_emulated(&self) -> bool {
        true
    }

    fn alloc(&self, bytes: usize) -> Result<DeviceMem, KernelError> {
        Ok(DeviceMem {
            device: self.ordinal,
            len: bytes,
            raw: RawMem::Emulated(Arc::new(Cell::new(bytes))),
        })
    }

    fn alloc_pinned(&self, bytes: usize) -> Result<PinnedMem, KernelError> {
        Ok(PinnedMem {
            raw: PinnedRaw::Heap(vec![0u64; bytes.div_ceil(8)].into_boxed_slice()),
            len: bytes,
        })
    }

    unsafe fn borrow(&self, ptr: u64, bytes: usize) -> Result<DeviceMem, KernelError> {
        super::check_borrow(ptr)?;
        Ok(DeviceMem {
            device: self.ordinal,
            len: bytes,
            raw: RawMem::Emulated(Arc::new(Cell::borrowed(ptr))),
        })
    }

    fn upload(
        &self,
        lane: Lane,
        src: HostBytes,
        dst: &DeviceMem,
        at: usize,
    ) -> Result<(), KernelError> {
        let c = self.check_mine(dst, "an upload's destination")?;
        let n = (*src).as_ref().len();
        check_range("an upload", at, n, dst.len)?;
        let len = dst.len;
        self.work(lane, move || {
            // SAFETY: queued work, the only writer of `c` now (module docs).
            let d = unsafe { c.bytes_mut(len) };
            d[at..at + n].copy_from_slice((*src).as_ref());
            Ok(())
        });
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
        let c = self.check_mine(src, "a download's source")?;
        check_range("a download", at, len, src.len)?;
        let have = src.len;
        let dst = SendPtr(dst);
        self.work(lane, move || {
            let dst = dst;
            // SAFETY: queued work reading `c`; `dst` is the caller's to keep
            // valid and untouched until `then` (the contract of `download`).
            unsafe {
                let s = &c.bytes(have)[at..at + len];
                std::ptr::copy_nonoverlapping(s.as_ptr(), dst.0, len);
            }
            Ok(())
        });
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
        let s = self.check_mine(src, "a copy's source")?;
        let d = self.check_mine(dst, "a copy's destination")?;
        check_range("a copy's source", src_at, len, src.len)?;
        check_range("a copy's destination", dst_at, len, dst.len)?;
        let (slen, dlen) = (src.len, dst.len);
        let same = Arc::ptr_eq(&s, &d);
        self.work(lane, move || {
            if same {
                // SAFETY: queued work, the only one touching the cell.
                let b = unsafe { d.bytes_mut(dlen) };
                b.copy_within(src_at..src_at + len, dst_at);
            } else {
                // SAFETY: two cells; this work reads one and writes the other.
                let (sb, db) = unsafe { (s.bytes(slen), d.bytes_mut(dlen)) };
                db[dst_at..dst_at + len].copy_from_slice(&sb[src_at..src_at + len]);
            }
            Ok(())
        });
        Ok(())
    }

    fn copy_from_peer(
        &self,
        lane: Lane,
        src: &DeviceMem,
        dst: &DeviceMem,
    ) -> Result<(), KernelError> {
        let s = cell(src)?.clone();
        let d = self.check_mine(dst, "a peer copy's destination")?;
        crate::error::check_len(
            "copy_from_peer",
            "the destination (bytes)",
            src.len,
            dst.len,
        )?;
        if Arc::ptr_eq(&s, &d) {
            return Err(KernelError::Config("a peer copy onto itself".into()));
        }
        let len = src.len;
        self.work(lane, move || {
            // SAFETY: the source's device has finished its work on it (the
            // caller waited); this work alone writes the destination.
            let (sb, db) = unsafe { (s.bytes(len), d.bytes_mut(len)) };
            db.copy_from_slice(sb);
            Ok(())
        });
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
        let o = self.check_mine(out, "the sum's output")?;
        let mut ins = Vec::with_capacity(inputs.len());
        for i in inputs {
            crate::error::check_len(K, "an input (bytes)", out.len, i.len)?;
            if i.same(out) {
                return Err(KernelError::Config(
                    "sum: the output is also an input".into(),
                ));
            }
            ins.push(self.check_mine(i, "a sum's input")?);
        }
        if out.len % ty.size() != 0 {
            return Err(KernelError::Length {
                kernel: K,
                what: "the output (bytes, a whole number of elements)",
                expected: out.len / ty.size() * ty.size(),
                got: out.len,
            });
        }
        let len = out.len;
        self.work(lane, move || {
            // SAFETY: queued work reading the inputs and writing the
            // output, a cell of its own (checked above).
            unsafe {
                let ob = o.bytes_mut(len);
                let ibs: Vec<&[u8]> = ins.iter().map(|c| c.bytes(len)).collect();
                match ty {
                    SumType::F32 => {
                        let v: Vec<&[f32]> = ibs.iter().map(|b| typed(b)).collect();
                        kernels().sum(typed_mut(ob), &v)
                    }
                    SumType::F64 => {
                        let v: Vec<&[f64]> = ibs.iter().map(|b| typed(b)).collect();
                        kernels().sum(typed_mut(ob), &v)
                    }
                    SumType::F16 => {
                        let v: Vec<&[half::f16]> = ibs.iter().map(|b| typed(b)).collect();
                        kernels().sum(typed_mut(ob), &v)
                    }
                }
            }
        });
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
        let g = self.check_mine(grad, "a quantize's gradient")?;
        let r = self.check_mine(residual, "a quantize's residual")?;
        let c = self.check_mine(codes, "a quantize's codes")?;
        let words = bits.words(grad.len / 4);
        crate::error::check_len(k, "the residual (bytes)", grad.len, residual.len)?;
        crate::error::check_len(k, "the codes (bytes)", words * 4, codes.len)?;
        let (gl, rl, cl) = (grad.len, residual.len, codes.len);
        self.work(lane, move || {
            // SAFETY: queued work; three distinct cells (the caller's
            // buffers), one read and two written.
            unsafe {
                let gv: &[f32] = typed(g.bytes(gl));
                let rv: &mut [f32] = typed_mut(r.bytes_mut(rl));
                let cv: &mut [u32] = typed_mut(c.bytes_mut(cl));
                match bits {
                    Bits::Two => kernels().quantize_2bit(gv, rv, cv, threshold),
                    Bits::One => kernels().quantize_1bit(gv, rv, cv, threshold),
                }
            }
        });
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
        let c = self.check_mine(codes, "a dequantize's codes")?;
        let o = self.check_mine(out, "a dequantize's output")?;
        crate::error::check_len(
            k,
            "the codes (bytes)",
            bits.words(out.len / 4) * 4,
            codes.len,
        )?;
        let (cl, ol) = (codes.len, out.len);
        self.work(lane, move || {
            // SAFETY: queued work; two distinct cells, one read, one written.
            unsafe {
                let cv: &[u32] = typed(c.bytes(cl));
                let ov: &mut [f32] = typed_mut(o.bytes_mut(ol));
                match bits {
                    Bits::Two => kernels().dequantize_2bit(cv, ov, threshold),
                    Bits::One => kernels().dequantize_1bit(cv, ov),
                }
            }
        });
        Ok(())
    }

    fn then(&self, lane: Lane, done: Done) {
        self.queue(lane, Task::Then(done));
    }
}

/// A host pointer moved into queued work (see `download`'s contract).
struct SendPtr(*mut u8);
// SAFETY: the caller of `download` keeps the memory valid and untouched
// until the work is done; only that work writes through the pointer.
unsafe impl Send for SendPtr {}
