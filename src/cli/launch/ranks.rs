//! Under `mpirun` or `srun`: this process is one rank of the job; it takes
//! its role from the rank variables (rank 0 the scheduler, ranks 1..=S
//! servers, the rest workers) and replaces itself with that role.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::Command;

use super::spawn::pskv_exe;
use super::{Failure, JobSpec, Launcher};
use crate::cli::error::{CliError, CliResult};

/// The rank and size of this process under `mpirun` or `srun`.
fn rank_and_size(
    launcher: Launcher,
    get: &dyn Fn(&str) -> Option<String>,
) -> CliResult<(u32, u32)> {
    let pairs: &[(&str, &str)] = match launcher {
        Launcher::Slurm => &[
            ("SLURM_PROCID", "SLURM_NTASKS"),
            ("SLURM_PROCID", "SLURM_NPROCS"),
        ],
        _ => &[
            ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
            ("PMI_RANK", "PMI_SIZE"),
            ("PMIX_RANK", "PMIX_SIZE"),
            ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"),
        ],
    };
    for (r, s) in pairs {
        if let (Some(rv), Some(sv)) = (get(r), get(s)) {
            let parse = |name: &str, v: &str| {
                v.trim()
                    .parse::<u32>()
                    .map_err(|_| CliError::Usage(format!("{name}={v}: not a number")))
            };
            return Ok((parse(r, &rv)?, parse(s, &sv)?));
        }
    }
    let names: Vec<String> = pairs.iter().map(|(r, s)| format!("{r}/{s}")).collect();
    Err(CliError::Usage(format!(
        "the {launcher:?} launcher runs as one rank of mpirun/srun, but none of {} is set",
        names.join(", ")
    )))
}

/// The first host of a Slurm node list (`node[01-04,7],gpu2` → `node01`).
fn first_slurm_host(list: &str) -> Option<String> {
    let list = list.trim();
    let end = list
        .char_indices()
        .scan(0i32, |depth, (i, c)| {
            match c {
                '[' => *depth += 1,
                ']' => *depth -= 1,
                _ => {}
            }
            Some((i, c, *depth))
        })
        .find(|&(_, c, d)| c == ',' && d == 0)
        .map(|(i, _, _)| i)
        .unwrap_or(list.len());
    let first = &list[..end];
    if first.is_empty() {
        return None;
    }
    match first.find('[') {
        None => Some(first.to_string()),
        Some(b) => {
            let inner = first[b + 1..].trim_end_matches(']');
            let lo = inner.split([',', '-']).next()?;
            if lo.is_empty() {
                return None;
            }
            Some(format!("{}{}", &first[..b], lo))
        }
    }
}

/// A rank's program (with its arguments) and the environment to run it with.
type RankPlan = (Vec<OsString>, Vec<(String, String)>);

/// What one rank under `mpirun`/`srun` runs: its role's program and the
/// environment to run it with.
fn rank_plan(
    spec: &JobSpec,
    launcher: Launcher,
    get: &dyn Fn(&str) -> Option<String>,
) -> CliResult<RankPlan> {
    let (rank, size) = rank_and_size(launcher, get)?;
    let want = 1 + spec.servers + spec.workers;
    if size != want {
        return Err(CliError::Usage(format!(
            "{size} ranks were started, but 1 scheduler + {} servers + {} workers need {want}",
            spec.servers, spec.workers
        )));
    }
    if rank >= size {
        return Err(CliError::Usage(format!(
            "rank {rank} is not below the size {size}"
        )));
    }
    let root = match spec.root_uri.clone().or_else(|| get("DMLC_PS_ROOT_URI")) {
        Some(r) => r,
        None => {
            let local_size = get("OMPI_COMM_WORLD_LOCAL_SIZE")
                .or_else(|| get("MPI_LOCALNRANKS"))
                .or_else(|| get("SLURM_NTASKS_PER_NODE"));
            let nodelist = get("SLURM_JOB_NODELIST").or_else(|| get("SLURM_NODELIST"));
            match (launcher, nodelist, local_size) {
                (Launcher::Slurm, Some(l), _) => first_slurm_host(&l).ok_or_else(|| {
                    CliError::Usage(format!(
                        "cannot read the first host of SLURM_JOB_NODELIST={l}"
                    ))
                })?,
                (_, _, Some(n)) if n.trim() == size.to_string() => "127.0.0.1".to_string(),
                _ => {
                    return Err(CliError::Usage(
                        "set DMLC_PS_ROOT_URI (or --root-uri) to rank 0's host: \
                         the ranks span several hosts"
                            .into(),
                    ))
                }
            }
        }
    };
    // Every rank must agree on the port without talking: the environment's,
    // or one derived from the job id, or 9091.
    let port = match get("DMLC_PS_ROOT_PORT") {
        Some(p) => p,
        None => {
            let job = get("SLURM_JOB_ID")
                .or_else(|| get("OMPI_MCA_ess_base_jobid"))
                .and_then(|j| j.trim().parse::<u64>().ok());
            (9091 + job.map(|j| j % 20000).unwrap_or(0)).to_string()
        }
    };
    let mut env: Vec<(String, String)> = vec![
        ("DMLC_PS_ROOT_URI".into(), root),
        ("DMLC_PS_ROOT_PORT".into(), port),
        ("DMLC_NUM_WORKER".into(), spec.workers.to_string()),
        ("DMLC_NUM_SERVER".into(), spec.servers.to_string()),
    ];
    let exe = OsString::from(pskv_exe()?);
    let program = if rank == 0 {
        env.push(("DMLC_ROLE".into(), "scheduler".into()));
        vec![exe, "scheduler".into()]
    } else if rank <= spec.servers {
        env.push(("DMLC_ROLE".into(), "server".into()));
        env.push(("DMLC_SERVER_ID".into(), (rank - 1).to_string()));
        vec![exe, "server".into()]
    } else {
        env.push(("DMLC_ROLE".into(), "worker".into()));
        env.push((
            "DMLC_WORKER_ID".into(),
            (rank - 1 - spec.servers).to_string(),
        ));
        spec.command.clone()
    };
    env.extend(spec.env.iter().cloned());
    Ok((program, env))
}

/// Under `mpirun`/`srun`: becomes this rank's role (does not return unless
/// it cannot).
pub fn exec_rank(spec: &JobSpec, launcher: Launcher) -> Failure {
    if spec.command.is_empty() {
        return Failure::new("no worker command given (pskv launch ... -- CMD ARGS)", 2);
    }
    match rank_plan(spec, launcher, &|k| std::env::var(k).ok()) {
        Err(e) => Failure::new(e.to_string(), 2),
        Ok((program, env)) => {
            let err = Command::new(&program[0])
                .args(&program[1..])
                .envs(env.iter().map(|(k, v)| (k, v)))
                .exec();
            Failure::new(format!("running {:?}: {err}", program[0]), 1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slurm_node_lists() {
        assert_eq!(
            first_slurm_host("node[01-04,7],gpu2").as_deref(),
            Some("node01")
        );
        assert_eq!(first_slurm_host("a1,b2").as_deref(), Some("a1"));
        assert_eq!(first_slurm_host("gpu[3]").as_deref(), Some("gpu3"));
        assert_eq!(first_slurm_host("x[2,5-6]").as_deref(), Some("x2"));
        assert_eq!(first_slurm_host(""), None);
    }

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let v: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k: &str| v.iter().find(|(kk, _)| kk == k).map(|(_, vv)| vv.clone())
    }

    #[test]
    fn ranks_take_their_roles() {
        let spec = JobSpec::local(2, 1, vec!["prog".into(), "arg".into()]);
        let env = |r: &str| {
            lookup(&[
                ("OMPI_COMM_WORLD_RANK", r),
                ("OMPI_COMM_WORLD_SIZE", "4"),
                ("OMPI_COMM_WORLD_LOCAL_SIZE", "4"),
            ])
        };
        let role = |e: &[(String, String)]| {
            e.iter()
                .find(|(k, _)| k == "DMLC_ROLE")
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        let (p, e) = rank_plan(&spec, Launcher::Mpi, &env("0")).unwrap();
        assert_eq!(role(&e), "scheduler");
        assert_eq!(p[1], "scheduler");
        let (_, e) = rank_plan(&spec, Launcher::Mpi, &env("1")).unwrap();
        assert_eq!(role(&e), "server");
        let (p, e) = rank_plan(&spec, Launcher::Mpi, &env("3")).unwrap();
        assert_eq!(role(&e), "worker");
        assert_eq!(p, vec![OsString::from("prog"), OsString::from("arg")]);
        assert!(e.contains(&("DMLC_WORKER_ID".into(), "1".into())));
        assert!(e.contains(&("DMLC_PS_ROOT_URI".into(), "127.0.0.1".into())));

        // Wrong size, no rank variables, several hosts without a root.
        let bad = lookup(&[("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "3")]);
        assert!(rank_plan(&spec, Launcher::Mpi, &bad)
            .unwrap_err()
            .to_string()
            .contains("need 4"));
        assert!(rank_plan(&spec, Launcher::Mpi, &lookup(&[]))
            .unwrap_err()
            .to_string()
            .contains("OMPI_COMM_WORLD_RANK"));
        let multi = lookup(&[("PMI_RANK", "2"), ("PMI_SIZE", "4")]);
        assert!(rank_plan(&spec, Launcher::Mpi, &multi)
            .unwrap_err()
            .to_string()
            .contains("DMLC_PS_ROOT_URI"));
        let slurm = lookup(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_JOB_NODELIST", "n[07-09]"),
            ("SLURM_JOB_ID", "12"),
        ]);
        let (_, e) = rank_plan(&spec, Launcher::Slurm, &slurm).unwrap();
        assert!(e.contains(&("DMLC_PS_ROOT_URI".into(), "n07".into())));
        assert!(e.contains(&("DMLC_PS_ROOT_PORT".into(), "9103".into())));
    }
}
