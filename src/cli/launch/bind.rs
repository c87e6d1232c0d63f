//! `--bind cores`: each worker of a local job on cores of its own, as
//! `mpirun` binds its ranks.
//!
//! A round of a job on one host hands its data between processes on the
//! host's cores. Left to the kernel, two workers may share a core while
//! another is idle, or move between cores and leave their caches behind;
//! each hand-off then waits for a core. Bound, every worker keeps its
//! cores (BENCHMARKS.md, "Workers bound to cores", has what it changes).
//!
//! The plan ([`worker_cpus`]) starts from the CPUs this launcher may run on
//! (`sched_getaffinity`: a cgroup's, `taskset`'s or a batch system's
//! allocation is kept), `C` of them, for `W` workers:
//! - `C >= W`: worker `i` gets the `i`-th of `W` blocks of consecutive CPUs
//!   in that list (their sizes differ by at most one), so a worker's
//!   threads (its engine's, its links' readers, the caller) share only its
//!   own cores, and the block is what its training code may use too;
//! - `C < W`: worker `i` gets CPU `i mod C` alone (`mpirun
//!   --oversubscribe --bind-to core` does the same).
//!
//! The scheduler and the servers are not bound. A server works in bursts
//! (a round's sums and answers, between the workers' phases), and on a host
//! with no core to spare it runs best where a worker has just gone to wait:
//! a server bound beside one worker was slower than one free to run on
//! either (measured on 2 vCPUs, BENCHMARKS.md). A restarted server is free
//! likewise.
//!
//! Only members started on this host are bound: the launcher cannot see
//! another host's cores (ssh), and under `mpirun` or `srun` their own
//! binding options place the ranks (`--bind-to core`, `--cpu-bind=cores`),
//! so `--bind cores` with those launchers is refused.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

use crate::cli::error::{CliError, CliResult};

/// How the members of a local job are placed on the host's cores
/// (`--bind`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Bind {
    /// Where the kernel puts them.
    #[default]
    None,
    /// Each worker on cores of its own (servers and scheduler free).
    Cores,
}

/// The CPUs the calling thread may run on, in increasing order.
pub fn allowed_cpus() -> CliResult<Vec<usize>> {
    // SAFETY: sched_getaffinity(2) fills a zeroed set of the size given.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(CliError::io("reading the CPUs this process may run on")(
                io::Error::last_os_error(),
            ));
        }
        set
    };
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: a bit test of a set we own, inside its size.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect();
    if cpus.is_empty() {
        return Err(CliError::Failed(
            "this process may run on no CPU (sched_getaffinity returned an empty set)".into(),
        ));
    }
    Ok(cpus)
}

/// The CPUs of worker `i` of `workers` on a host whose usable CPUs are
/// `allowed` (not empty): see the module's plan.
pub fn worker_cpus(allowed: &[usize], workers: u32, i: u32) -> Vec<usize> {
    let (c, w, i) = (allowed.len(), workers.max(1) as usize, i as usize);
    if c < w {
        return vec![allowed[i % c]];
    }
    // Blocks of c / w, the first c % w of them one larger.
    let (base, extra) = (c / w, c % w);
    let start = i * base + i.min(extra);
    let len = base + usize::from(i < extra);
    allowed[start..start + len].to_vec()
}

/// `0-3,6` for `[0, 1, 2, 3, 6]` (the kernel's list format).
pub fn cpu_list(cpus: &[usize]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        if !out.is_empty() {
            out.push(',');
        }
        if j == i {
            out.push_str(&cpus[i].to_string());
        } else {
            out.push_str(&format!("{}-{}", cpus[i], cpus[j]));
        }
        i = j + 1;
    }
    out
}

/// Makes the process `c` starts run on `cpus` only (threads it starts
/// inherit the mask); the spawn fails with the kernel's error if it
/// cannot.
pub(super) fn bind_child(c: &mut Command, cpus: &[usize]) {
    // SAFETY: CPU_SET on a zeroed set we own, for CPUs below CPU_SETSIZE
    // (they came from sched_getaffinity).
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        set
    };
    // SAFETY: the closure runs between fork and exec and only calls
    // sched_setaffinity(2), a plain system call, on a set copied in.
    unsafe {
        c.pre_exec(move || {
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_get_blocks_of_cores_or_one_core_each() {
        let c8: Vec<usize> = (0..8).collect();
        assert_eq!(worker_cpus(&c8, 2, 0), vec![0, 1, 2, 3]);
        assert_eq!(worker_cpus(&c8, 2, 1), vec![4, 5, 6, 7]);
        // 8 over 3: 3, 3, 2.
        assert_eq!(worker_cpus(&c8, 3, 0), vec![0, 1, 2]);
        assert_eq!(worker_cpus(&c8, 3, 1), vec![3, 4, 5]);
        assert_eq!(worker_cpus(&c8, 3, 2), vec![6, 7]);
        // More workers than CPUs: one each, round-robin.
        let c2 = vec![0, 1];
        let got: Vec<_> = (0..4).map(|i| worker_cpus(&c2, 4, i)).collect();
        assert_eq!(got, vec![vec![0], vec![1], vec![0], vec![1]]);
        // The allowed list, not 0..C: a cpuset of 2, 5, 9.
        let odd = vec![2, 5, 9];
        assert_eq!(worker_cpus(&odd, 2, 0), vec![2, 5]);
        assert_eq!(worker_cpus(&odd, 2, 1), vec![9]);
        assert_eq!(worker_cpus(&odd, 1, 0), odd);
        // Every CPU used once when C >= W.
        for w in 1..=8u32 {
            let all: Vec<usize> = (0..w).flat_map(|i| worker_cpus(&c8, w, i)).collect();
            assert_eq!(all, c8, "{w} workers");
        }
    }

    #[test]
    fn cpu_lists_in_the_kernels_format() {
        assert_eq!(cpu_list(&[0]), "0");
        assert_eq!(cpu_list(&[0, 1, 2, 3, 6]), "0-3,6");
        assert_eq!(cpu_list(&[1, 3, 4]), "1,3-4");
        assert_eq!(cpu_list(&[]), "");
    }

    #[test]
    fn this_process_may_run_somewhere() {
        assert!(!allowed_cpus().unwrap().is_empty());
    }

    /// A child bound to one CPU reports only it (`Cpus_allowed_list`).
    #[test]
    fn a_bound_child_runs_on_its_cpus_only() {
        let cpu = *allowed_cpus().unwrap().last().unwrap();
        let mut c = Command::new("sh");
        c.args(["-c", "grep Cpus_allowed_list /proc/self/status"]);
        bind_child(&mut c, &[cpu]);
        let out = c.output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            text.split_whitespace().last(),
            Some(cpu.to_string().as_str()),
            "{text}"
        );
    }
}
