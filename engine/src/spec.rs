//! What a caller pushes: [`OpSpec`] (the op's name, the vars it reads
//! and writes, where it runs, its kind and priority), with [`Context`] and
//! [`Property`]; and `PackedContext`, the context as an op's header keeps
//! it. The op in flight is `op.rs`'s.

use std::borrow::Cow;
use std::fmt;

use smallvec::SmallVec;

use crate::var::Var;

/// Where an op runs.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub enum Context {
    /// Host CPU.
    #[default]
    Cpu,
    /// Page-locked host memory used for transfers to and from GPU `n`; runs on
    /// the CPU pools.
    CpuPinned(u32),
    /// GPU `n`: the op runs on that device's worker pool (compute, or copy for
    /// the copy properties). The engine knows nothing of CUDA; the closure does.
    Gpu(u32),
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Context::Cpu => f.write_str("cpu"),
            Context::CpuPinned(n) => write!(f, "cpu_pinned({n})"),
            Context::Gpu(n) => write!(f, "gpu({n})"),
        }
    }
}

/// What kind of work an op is; chooses its worker pool.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub enum Property {
    /// Ordinary compute: the context's normal pool.
    #[default]
    Normal,
    /// A copy from host to device: the device's copy pool.
    CopyToDevice,
    /// A copy from device to host: the device's copy pool.
    CopyFromDevice,
    /// Urgent CPU work: the CPU priority lane, which normal ops cannot fill.
    CpuPrioritized,
    /// The closure only starts work that completes later (I/O): it runs at once
    /// on the thread that makes it ready, and must not block. That thread may
    /// be one waiting in [`crate::Latch`] (`wait_for_var`, a kvstore wait) that
    /// read an answer itself ([`crate::progress`]): such a closure must not take
    /// a lock its process's waiters may hold.
    Async,
    /// Internal: the op of `delete_var`.
    DeleteVar,
}

/// A description of an op: name, vars, context, property and priority.
///
/// ```
/// use pskv_engine::{Context, OpSpec, Property, Var};
/// let (grad, weight) = (Var::new(), Var::new());
/// let spec = OpSpec::new("sgd_update")
///     .read(&grad)
///     .write(&weight)
///     .context(Context::Cpu)
///     .property(Property::Normal)
///     .priority(-3);
/// assert_eq!(spec.name(), "sgd_update");
/// ```
#[derive(Clone, Debug)]
pub struct OpSpec {
    pub(crate) name: Cow<'static, str>,
    /// The vars read, then the vars written, in one vector: the op's own
    /// list (`OpVars`) is this one, moved (two vectors joined cost about
    /// 90 instructions a push).
    pub(crate) vars: SmallVec<[Var; 4]>,
    /// How many of `vars` are read.
    pub(crate) nreads: usize,
    pub(crate) ctx: Context,
    pub(crate) prop: Property,
    pub(crate) priority: i32,
}

impl OpSpec {
    /// An op with this name, no vars, on the CPU, normal, priority 0.
    pub fn new(name: impl Into<Cow<'static, str>>) -> OpSpec {
        OpSpec {
            name: name.into(),
            vars: SmallVec::new(),
            nreads: 0,
            ctx: Context::Cpu,
            prop: Property::Normal,
            priority: 0,
        }
    }

    /// Adds a var the op reads.
    #[inline]
    pub fn read(mut self, var: &Var) -> OpSpec {
        if self.nreads == self.vars.len() {
            self.vars.push(var.clone());
        } else {
            self.insert_read(var);
        }
        self.nreads += 1;
        self
    }

    /// A read named after a write: in before the writes.
    #[cold]
    fn insert_read(&mut self, var: &Var) {
        self.vars.insert(self.nreads, var.clone());
    }

    /// Adds vars the op reads.
    pub fn reads<'a>(mut self, vars: impl IntoIterator<Item = &'a Var>) -> OpSpec {
        let before = self.vars.len();
        self.vars
            .insert_many(self.nreads, vars.into_iter().cloned());
        self.nreads += self.vars.len() - before;
        self
    }

    /// Adds a var the op writes.
    #[inline]
    pub fn write(mut self, var: &Var) -> OpSpec {
        self.vars.push(var.clone());
        self
    }

    /// Adds vars the op writes.
    pub fn writes<'a>(mut self, vars: impl IntoIterator<Item = &'a Var>) -> OpSpec {
        self.vars.extend(vars.into_iter().cloned());
        self
    }

    /// Sets where the op runs.
    #[inline]
    pub fn context(mut self, ctx: Context) -> OpSpec {
        self.ctx = ctx;
        self
    }

    /// Sets the kind of work.
    #[inline]
    pub fn property(mut self, prop: Property) -> OpSpec {
        self.prop = prop;
        self
    }

    /// Sets the priority: among ready ops of a pool, higher starts first.
    #[inline]
    pub fn priority(mut self, priority: i32) -> OpSpec {
        self.priority = priority;
        self
    }

    /// The op's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The vars read.
    pub(crate) fn read_vars(&self) -> &[Var] {
        &self.vars[..self.nreads]
    }

    /// The vars written.
    pub(crate) fn write_vars(&self) -> &[Var] {
        &self.vars[self.nreads..]
    }

    /// Removes duplicate vars: a var listed twice counts once, and a var both
    /// read and written is written (a write wins). Reads and writes each
    /// end sorted by id (but for a spec of one of each, left as it is).
    pub(crate) fn dedup(&mut self) {
        let nwrites = self.vars.len() - self.nreads;
        if self.nreads <= 1 && nwrites <= 1 {
            // The common spec, a read and a write at most: one comparison.
            if self.nreads == 1 && nwrites == 1 && self.vars[0].is(&self.vars[1]) {
                self.vars.remove(0);
                self.nreads = 0;
            }
            return;
        }
        let (reads, writes) = self.vars.split_at_mut(self.nreads);
        reads.sort_unstable_by_key(Var::id);
        writes.sort_unstable_by_key(Var::id);
        let write_ids: SmallVec<[u64; 4]> = writes.iter().map(Var::id).collect();
        // One pass over both: a read goes if it repeats the read kept
        // before it or is written; a write if it repeats the one before.
        let (nreads, mut i, mut last) = (self.nreads, 0, None);
        let mut kept_reads = 0;
        self.vars.retain(|v| {
            let id = v.id();
            let is_read = i < nreads;
            if i == nreads {
                last = None;
            }
            i += 1;
            let keep = last != Some(id) && !(is_read && write_ids.binary_search(&id).is_ok());
            if keep {
                last = Some(id);
                kept_reads += usize::from(is_read);
            }
            keep
        });
        self.nreads = kept_reads;
    }
}

/// `Context` in four bytes, for an op's header: the kind in the top two
/// bits, the device below. A device number is below `MAX_GPUS` (the push
/// checks it: `core::prepare_pool`), far below the 2^30 this holds.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) struct PackedContext(u32);

const CTX_PINNED: u32 = 1 << 30;
const CTX_GPU: u32 = 2 << 30;
const CTX_DEVICE: u32 = (1 << 30) - 1;

impl PackedContext {
    #[inline]
    pub(crate) fn new(ctx: Context) -> PackedContext {
        let device = |n: u32| {
            debug_assert!(n <= CTX_DEVICE, "device {n} past the packed range");
            n & CTX_DEVICE
        };
        PackedContext(match ctx {
            Context::Cpu => 0,
            Context::CpuPinned(n) => CTX_PINNED | device(n),
            Context::Gpu(n) => CTX_GPU | device(n),
        })
    }

    #[inline]
    pub(crate) fn get(self) -> Context {
        let n = self.0 & CTX_DEVICE;
        match self.0 & !CTX_DEVICE {
            0 => Context::Cpu,
            CTX_PINNED => Context::CpuPinned(n),
            // CTX_GPU: `new` makes no fourth tag.
            _ => Context::Gpu(n),
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn packed_contexts_come_back_as_they_went_in() {
        let max = crate::executor::MAX_GPUS - 1;
        for ctx in [
            Context::Cpu,
            Context::CpuPinned(0),
            Context::CpuPinned(max),
            Context::Gpu(0),
            Context::Gpu(7),
            Context::Gpu(max),
            Context::Gpu(CTX_DEVICE),
        ] {
            assert_eq!(PackedContext::new(ctx).get(), ctx);
        }
    }

    fn ids(vs: &[Var]) -> Vec<u64> {
        vs.iter().map(Var::id).collect()
    }

    /// Reads and writes each once, sorted, and a var read and written only
    /// written; a spec of one read and one write keeps its order.
    #[test]
    fn dedup_keeps_each_var_once_and_a_write_wins() {
        let v: Vec<Var> = (0..5).map(|_| Var::new()).collect();
        let mut spec = OpSpec::new("x")
            .read(&v[3])
            .write(&v[2])
            .read(&v[0])
            .read(&v[3])
            .reads([&v[2], &v[1]])
            .writes([&v[4], &v[2]]);
        spec.dedup();
        assert_eq!(
            ids(spec.read_vars()),
            ids(&[v[0].clone(), v[1].clone(), v[3].clone()])
        );
        assert_eq!(ids(spec.write_vars()), ids(&[v[2].clone(), v[4].clone()]));

        let mut one = OpSpec::new("y").write(&v[4]).read(&v[1]);
        one.dedup();
        assert_eq!(
            (ids(one.read_vars()), ids(one.write_vars())),
            (vec![v[1].id()], vec![v[4].id()])
        );
        let mut same = OpSpec::new("z").read(&v[0]).write(&v[0]);
        same.dedup();
        assert_eq!(
            (ids(same.read_vars()), ids(same.write_vars())),
            (vec![], vec![v[0].id()])
        );
        let mut reads_only = OpSpec::new("r").reads([&v[1], &v[0], &v[1], &v[2], &v[0]]);
        reads_only.dedup();
        assert_eq!(
            ids(reads_only.read_vars()),
            vec![v[0].id(), v[1].id(), v[2].id()]
        );
        assert!(reads_only.write_vars().is_empty());
        let mut writes_only = OpSpec::new("w").writes([&v[3], &v[1], &v[3], &v[1]]);
        writes_only.dedup();
        assert!(writes_only.read_vars().is_empty());
        assert_eq!(ids(writes_only.write_vars()), vec![v[1].id(), v[3].id()]);
        // A read whose id sorts between two written ones, and a write named
        // before the reads (the insert path of `read`).
        let mut between = OpSpec::new("b")
            .write(&v[4])
            .read(&v[2])
            .write(&v[0])
            .reads([&v[4], &v[2]]);
        between.dedup();
        assert_eq!(ids(between.read_vars()), vec![v[2].id()]);
        assert_eq!(ids(between.write_vars()), vec![v[0].id(), v[4].id()]);
    }
}
