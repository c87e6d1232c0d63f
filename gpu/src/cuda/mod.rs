//! The CUDA kernels: the sources in `kernels.cu`, compiled at run time by
//! NVRTC (no nvcc, no CUDA headers at build time), launched on a stream
//! through cudarc's driver API.
//!
//! On a machine without an NVIDIA driver, NVRTC or a GPU, every entry point
//! returns [`KernelError::CudaUnavailable`] saying which is missing, and the
//! caller uses [`crate::cpu::CpuKernels`]. cudarc loads the CUDA libraries
//! lazily and panics when one is missing, so presence is checked first and
//! the first calls into a library are guarded against panics.
//!
//! Kernel calls are asynchronous on the kernels' stream: results are visible
//! to later work on the same stream, and to the host after
//! [`CudaKernels::download`] (which synchronizes) or [`CudaKernels::synchronize`].

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, OnceLock};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, LaunchConfig,
    PushKernelArg,
};
use cudarc::nvrtc::{CompileOptions, Ptx};

use crate::error::check_len;
use crate::{Bits, Element, KernelError, Kernels, Scalar};

/// What a kernel call returns.
type Res = Result<(), KernelError>;
type F32s = CudaSlice<f32>;
type U32s = CudaSlice<u32>;

/// The CUDA source of every kernel.
pub const SOURCE: &str = include_str!("kernels.cu");

/// The kernels' names in `SOURCE`.
pub const KERNEL_NAMES: [&str; 7] = [
    "pskv_sum_f32",
    "pskv_sum_f64",
    "pskv_sum_f16",
    "pskv_quantize_2bit",
    "pskv_dequantize_2bit",
    "pskv_quantize_1bit",
    "pskv_dequantize_1bit",
];

/// The virtual architecture the portable PTX targets (Turing and later: the
/// oldest that both CUDA 12's and CUDA 13's NVRTC accept; the driver
/// compiles it for the device it runs on).
pub const PORTABLE_ARCH: &str = "compute_75";

/// Threads per block (a multiple of 32: the quantize kernels assemble words
/// within warps).
const BLOCK: u32 = 256;

fn unavailable(what: impl Into<String>) -> KernelError {
    KernelError::CudaUnavailable(what.into())
}

pub(crate) fn cuda_err(
    context: &'static str,
) -> impl Fn(cudarc::driver::DriverError) -> KernelError {
    move |e| KernelError::Cuda {
        context,
        message: e.to_string(),
    }
}

/// Runs `f`, turning a panic inside cudarc (a missing library or symbol) into
/// an error.
pub(crate) fn guarded<T>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, KernelError>,
) -> Result<T, KernelError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(unavailable(format!("{what}: {msg}")))
    })
}

/// Whether NVRTC (libnvrtc) can be loaded.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to open the library and closes it again.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Whether the CUDA driver (libcuda) can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the library and closes it again.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Compiles every kernel to PTX for `arch` (for example `compute_80`). Needs
/// only NVRTC, not a GPU: CI runs it to prove the kernels compile.
pub fn compile_ptx(arch: &'static str) -> Result<Ptx, KernelError> {
    if !nvrtc_present() {
        return Err(unavailable(
            "libnvrtc not found (install the CUDA toolkit or the nvidia-cuda-nvrtc-cu12 wheel and put its lib/ on LD_LIBRARY_PATH)",
        ));
    }
    guarded("NVRTC", || {
        let opts = CompileOptions {
            arch: Some(arch),
            ftz: Some(false),
            prec_div: Some(true),
            prec_sqrt: Some(true),
            fmad: Some(false),
            ..Default::default()
        };
        cudarc::nvrtc::compile_ptx_with_opts(SOURCE, opts).map_err(|e| KernelError::Cuda {
            context: "NVRTC compile",
            message: e.to_string(),
        })
    })
}

/// The number of CUDA devices, or why there are none usable.
pub fn device_count() -> Result<usize, KernelError> {
    if !driver_present() {
        return Err(unavailable(
            "libcuda not found: no NVIDIA driver on this machine",
        ));
    }
    guarded("CUDA driver", || {
        let n = CudaContext::device_count().map_err(cuda_err("cuDeviceGetCount"))?;
        if n <= 0 {
            Err(unavailable("the NVIDIA driver reports no devices"))
        } else {
            Ok(n as usize)
        }
    })
}

/// The kernels loaded into a context.
pub(crate) struct Loaded {
    pub(crate) module: Arc<CudaModule>,
    pub(crate) f: Functions,
    pub(crate) max_blocks: u32,
    pub(crate) arch: String,
}

/// Compiles (once per architecture) and loads every kernel into `ctx`.
pub(crate) fn load(ctx: &Arc<CudaContext>) -> Result<Loaded, KernelError> {
    let (major, minor) = ctx
        .compute_capability()
        .map_err(cuda_err("compute capability"))?;
    // The device's own architecture if NVRTC knows it, else portable PTX.
    let (arch, ptx) = match arch_of(major, minor).map(|a| (a, ptx_for(a))) {
        Some((a, Ok(p))) => (a, p),
        _ => (PORTABLE_ARCH, ptx_for(PORTABLE_ARCH)?),
    };
    let module = ctx.load_module(ptx).map_err(cuda_err("cuModuleLoadData"))?;
    let load = |name: &str| {
        module
            .load_function(name)
            .map_err(cuda_err("cuModuleGetFunction"))
    };
    let f = Functions {
        sum_f32: load("pskv_sum_f32")?,
        sum_f64: load("pskv_sum_f64")?,
        sum_f16: load("pskv_sum_f16")?,
        quantize_2bit: load("pskv_quantize_2bit")?,
        dequantize_2bit: load("pskv_dequantize_2bit")?,
        quantize_1bit: load("pskv_quantize_1bit")?,
        dequantize_1bit: load("pskv_dequantize_1bit")?,
    };
    let sms = ctx
        .attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )
        .map_err(cuda_err("SM count"))?;
    Ok(Loaded {
        module,
        f,
        max_blocks: (sms.max(1) as u32) * 32,
        arch: format!("sm_{major}{minor} ({arch} PTX)"),
    })
}

/// The launch shape for `threads` threads of `BLOCK`, at most `max_blocks`
/// blocks.
pub(crate) fn launch_config(threads: u64, max_blocks: u32) -> LaunchConfig {
    let blocks = threads.div_ceil(BLOCK as u64).clamp(1, max_blocks as u64) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The kernels' functions in a loaded module.
pub(crate) struct Functions {
    pub(crate) sum_f32: CudaFunction,
    pub(crate) sum_f64: CudaFunction,
    pub(crate) sum_f16: CudaFunction,
    pub(crate) quantize_2bit: CudaFunction,
    pub(crate) dequantize_2bit: CudaFunction,
    pub(crate) quantize_1bit: CudaFunction,
    pub(crate) dequantize_1bit: CudaFunction,
}

/// The kernels on one GPU, with one stream.
///
/// ```no_run
/// use pskv_gpu::{cuda::CudaKernels, Kernels};
/// let k = CudaKernels::new(0)?;
/// let a = k.upload(&[1.0f32, 2.0])?;
/// let b = k.upload(&[3.0f32, 4.0])?;
/// let mut out = k.zeros::<f32>(2)?;
/// k.sum(&mut out, &[&a, &b])?;
/// assert_eq!(k.download(&out)?, vec![4.0, 6.0]);
/// # Ok::<(), pskv_gpu::KernelError>(())
/// ```
pub struct CudaKernels {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    _module: Arc<CudaModule>,
    f: Functions,
    max_blocks: u32,
    arch: String,
}

impl std::fmt::Debug for CudaKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaKernels")
            .field("ordinal", &self.ctx.ordinal())
            .field("arch", &self.arch)
            .finish()
    }
}

/// PTX per architecture, compiled once per process.
fn ptx_for(arch: &'static str) -> Result<Ptx, KernelError> {
    static CACHE: OnceLock<ptx_cache::Cache> = OnceLock::new();
    CACHE.get_or_init(Default::default).get_or_compile(arch)
}

mod ptx_cache {
    //! A tiny arch → PTX cache (std Mutex; compiled at most once per arch).
    use std::collections::HashMap;
    use std::sync::Mutex;

    use cudarc::nvrtc::Ptx;

    use crate::KernelError;

    #[derive(Default)]
    pub(super) struct Cache(Mutex<HashMap<&'static str, Ptx>>);

    impl Cache {
        pub(super) fn get_or_compile(&self, arch: &'static str) -> Result<Ptx, KernelError> {
            let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(p) = map.get(arch) {
                return Ok(p.clone());
            }
            let ptx = super::compile_ptx(arch)?;
            map.insert(arch, ptx.clone());
            Ok(ptx)
        }
    }
}

/// The virtual architecture of a compute capability, if NVRTC may know it.
fn arch_of(major: i32, minor: i32) -> Option<&'static str> {
    Some(match (major, minor) {
        (7, 0) => "compute_70",
        (7, 5) => "compute_75",
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 9) => "compute_89",
        (9, 0) => "compute_90",
        _ => return None,
    })
}

impl CudaKernels {
    /// Opens GPU `ordinal`, compiles the kernels for it and loads them.
    pub fn new(ordinal: usize) -> Result<CudaKernels, KernelError> {
        let n = device_count()?;
        if ordinal >= n {
            return Err(unavailable(format!(
                "GPU {ordinal} asked for, but this machine has {n}"
            )));
        }
        guarded("CUDA setup", || {
            let ctx = CudaContext::new(ordinal).map_err(cuda_err("cuCtx create"))?;
            let stream = ctx.new_stream().map_err(cuda_err("cuStreamCreate"))?;
            let l = load(&ctx)?;
            Ok(CudaKernels {
                ctx,
                stream,
                _module: l.module,
                f: l.f,
                max_blocks: l.max_blocks,
                arch: l.arch,
            })
        })
    }

    /// The device and the PTX architecture in use, for reports.
    pub fn describe(&self) -> String {
        let name = self.ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        format!("{name}, {}", self.arch)
    }

    /// The stream every kernel runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Copies `host` to a new device buffer.
    pub fn upload<T: Scalar>(&self, host: &[T]) -> Result<CudaSlice<T>, KernelError> {
        self.stream.clone_htod(host).map_err(cuda_err("upload"))
    }

    /// A new device buffer of `n` zeros.
    pub fn zeros<T: Scalar>(&self, n: usize) -> Result<CudaSlice<T>, KernelError> {
        self.stream.alloc_zeros::<T>(n).map_err(cuda_err("alloc"))
    }

    /// Copies a device buffer to the host (waits for the stream's work on it).
    pub fn download<T: Scalar>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>, KernelError> {
        self.stream.clone_dtoh(dev).map_err(cuda_err("download"))
    }

    /// Copies `src` to `dst` on the device (the copy-bandwidth baseline).
    pub fn copy<T: Scalar>(
        &self,
        src: &CudaSlice<T>,
        dst: &mut CudaSlice<T>,
    ) -> Result<(), KernelError> {
        check_len("copy", "the destination", src.len(), dst.len())?;
        self.stream.memcpy_dtod(src, dst).map_err(cuda_err("copy"))
    }

    /// Waits for every kernel launched so far.
    pub fn synchronize(&self) -> Result<(), KernelError> {
        self.stream.synchronize().map_err(cuda_err("synchronize"))
    }

    fn config(&self, threads: u64) -> LaunchConfig {
        launch_config(threads, self.max_blocks)
    }

    /// Quantizes `grad` with `residual` into `codes`.
    fn encode(
        &self,
        bits: Bits,
        kernel: &'static str,
        (grad, residual, codes): (&CudaSlice<f32>, &mut CudaSlice<f32>, &mut CudaSlice<u32>),
        t: f32,
    ) -> Result<(), KernelError> {
        bits.check_quantize(kernel, grad.len(), (residual.len(), codes.len()), t)?;
        let n = grad.len() as u64;
        if n == 0 {
            return Ok(());
        }
        let f = match bits {
            Bits::Two => &self.f.quantize_2bit,
            Bits::One => &self.f.quantize_1bit,
        };
        let mut b = self.stream.launch_builder(f);
        b.arg(grad).arg(residual).arg(codes).arg(&n).arg(&t);
        // SAFETY: arguments match the kernel; lengths checked above.
        unsafe { b.launch(self.config(n.div_ceil(4).next_multiple_of(32))) }
            .map_err(cuda_err(kernel))?;
        Ok(())
    }

    /// Dequantizes `codes` into `out`, or (`add` 1) onto it.
    fn decode(
        &self,
        bits: Bits,
        kernel: &'static str,
        (codes, out): (&CudaSlice<u32>, &mut CudaSlice<f32>),
        t: f32,
        add: u32,
    ) -> Result<(), KernelError> {
        bits.check_dequantize(kernel, out.len(), codes.len(), t)?;
        let n = out.len() as u64;
        if n == 0 {
            return Ok(());
        }
        let mut b = match bits {
            Bits::Two => self.stream.launch_builder(&self.f.dequantize_2bit),
            Bits::One => self.stream.launch_builder(&self.f.dequantize_1bit),
        };
        b.arg(codes).arg(out).arg(&n);
        if bits == Bits::Two {
            b.arg(&t);
        }
        b.arg(&add);
        // SAFETY: arguments match the kernel (the 1-bit one takes no
        // threshold); lengths checked above.
        unsafe { b.launch(self.config(n.div_ceil(4))) }.map_err(cuda_err(kernel))?;
        Ok(())
    }
}

impl Kernels for CudaKernels {
    type Buf<T: Scalar> = CudaSlice<T>;

    fn sum<T: Element>(
        &self,
        out: &mut CudaSlice<T>,
        inputs: &[&CudaSlice<T>],
    ) -> Result<(), KernelError> {
        const K: &str = "sum";
        if inputs.is_empty() {
            return Err(KernelError::NoInputs { kernel: K });
        }
        for input in inputs {
            check_len(K, "an input", out.len(), input.len())?;
        }
        let n = out.len() as u64;
        if n == 0 {
            return Ok(());
        }
        let func = match T::NAME {
            "f32" => &self.f.sum_f32,
            "f64" => &self.f.sum_f64,
            _ => &self.f.sum_f16,
        };
        // The device array of input pointers; the guards keep the inputs'
        // stream ordering until the launch is queued.
        let (ptrs, _guards): (Vec<u64>, Vec<_>) =
            inputs.iter().map(|s| s.device_ptr(&self.stream)).unzip();
        let ptrs_dev = self
            .stream
            .clone_htod(&ptrs)
            .map_err(cuda_err("sum: upload pointers"))?;
        let nin = inputs.len() as u32;
        let mut b = self.stream.launch_builder(func);
        b.arg(out).arg(&ptrs_dev).arg(&nin).arg(&n);
        // SAFETY: the argument list matches the kernel's signature; the
        // pointer array and every input hold n elements and outlive the
        // launch on this stream.
        unsafe { b.launch(self.config(n)) }.map_err(cuda_err("sum launch"))?;
        Ok(())
    }

    fn quantize_2bit(&self, g: &F32s, r: &mut F32s, c: &mut U32s, t: f32) -> Res {
        self.encode(Bits::Two, "quantize_2bit", (g, r, c), t)
    }

    fn dequantize_2bit(&self, c: &CudaSlice<u32>, o: &mut CudaSlice<f32>, t: f32) -> Res {
        self.decode(Bits::Two, "dequantize_2bit", (c, o), t, 0)
    }

    fn add_dequantized_2bit(&self, c: &CudaSlice<u32>, o: &mut CudaSlice<f32>, t: f32) -> Res {
        self.decode(Bits::Two, "add_dequantized_2bit", (c, o), t, 1)
    }

    fn quantize_1bit(&self, g: &F32s, r: &mut F32s, c: &mut U32s, t: f32) -> Res {
        self.encode(Bits::One, "quantize_1bit", (g, r, c), t)
    }

    fn dequantize_1bit(&self, c: &CudaSlice<u32>, o: &mut CudaSlice<f32>) -> Res {
        self.decode(Bits::One, "dequantize_1bit", (c, o), 0.0, 0)
    }

    fn add_dequantized_1bit(&self, c: &CudaSlice<u32>, o: &mut CudaSlice<f32>) -> Res {
        self.decode(Bits::One, "add_dequantized_1bit", (c, o), 0.0, 1)
    }
}
