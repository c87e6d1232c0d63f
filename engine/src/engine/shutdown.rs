//! Shutdown: what the drop of an engine's last handle does.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::Owner;
use crate::core::Core;
use crate::core_ref::Held;
use crate::executor::Executor;
use crate::profiler::write_chrome_trace;

impl Drop for Owner {
    fn drop(&mut self) {
        // Subtle: the last handle can go inside an op closure (one that
        // captured an `Engine`), on a worker of this very engine or inside an
        // inline op. Shutting down there would wait for the op that is running
        // the shutdown; so hand the shutdown to a thread of its own.
        if crate::pool::is_worker_of(self.core.id) || crate::inline::is_active() {
            let core = self.core.clone();
            let spawned = std::thread::Builder::new()
                .name("pskv-engine-shutdown".into())
                .spawn(move || shutdown(&core));
            if spawned.is_ok() {
                return;
            }
        }
        shutdown(&self.core);
    }
}

fn shutdown(core: &Arc<Core>) {
    // The ops failed below finish on this thread, which holds the core.
    let _held = Held::by_handle(core);
    core.shutting_down.store(true, Ordering::Release);
    // Whether ops or workers may still use the core after this returns: then
    // it is never freed (C1 in `core_ref.rs`: ops do not count it).
    let mut leak = false;
    if let Err(e) = core.wait_idle(Some(core.config.shutdown_timeout)) {
        tracing::warn!("engine shutdown: {e}; failing the ops that cannot run");
        leak = true;
    }
    if let Executor::Threaded(pools) = &core.executor {
        for pool in pools.all() {
            for op in pool.stop() {
                crate::inline::run(crate::inline::Task::Stop(op));
            }
        }
        let deadline = Instant::now() + crate::pool::JOIN_GRACE;
        for pool in pools.all() {
            let busy = pool.join(deadline);
            if !busy.is_empty() {
                leak = true;
                tracing::warn!(
                        "engine shutdown: worker(s) {busy:?} are still inside an op closure; left detached"
                    );
            }
        }
    }
    if let Some(path) = core
        .config
        .profile_path
        .as_ref()
        .filter(|_| core.profiler.mark_flushed())
    {
        let events = core.profiler.take();
        if let Err(e) = write_chrome_trace(&events, path) {
            tracing::warn!("engine shutdown: {e}");
        }
    }
    if let Some(f) = core.take_failures() {
        tracing::warn!("engine shutdown: a failure was never waited for: {f}");
    }
    if leak {
        // Subtle: not `core.pending() > 0` alone: a worker left detached may
        // be inside a closure of an op already counted.
        std::mem::forget(core.clone());
    }
}
