//! A floor server (`pskv-net floor-server --index K`): one connection per
//! worker, ordered by the rank each names in its first message (`HELLO`),
//! each with a reading and a writing thread. A thread that fails ends the
//! process (`die`, or a panic through the child's hook); every socket read
//! and write, the wait for the workers' connections and each writer's wait
//! for a ready part are bounded.
//!
//! # A part's round
//!
//! ```text
//!   reader r: push of part q into ins[r][q] ── arrived[q] += 1
//!        │ the W-th arrival of the round:
//!        ▼
//!   (--sum) outs[q] = ins[0][q] + ins[1][q] + ... (rank order)
//!        │
//!        ▼
//!   q sent to every writer ──► writer r: answers outs[q] (--sum) or ins[r][q]
//! ```
//!
//! Why a lock per buffer is enough, and taken without a wait in a run
//! that goes right: worker r pushes part q of round t + 1 only after it
//! has every answer of round t, so reader r writes `ins[r][q]` again only
//! after writer r has sent its answer of q (which, with sums, came after
//! the summer of q had read `ins[r][q]`). Subtle: with sums, writer r2 may
//! still be sending `outs[q]` of round t when worker r's push of round t + 1
//! arrives; `outs[q]` is written again only by the summer of round t + 1,
//! the W-th arrival, which counts worker r2's push, made after r2 had
//! `outs[q]` whole. The locks (read locks where threads only read) turn a
//! mistake in this argument into a wait, not a torn buffer. `arrived`
//! counts a part's arrivals over all rounds: no push of round t + 1
//! arrives before the W-th of round t, so the count modulo W finds the
//! last of each round.

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;

use super::wire::{die, header, read_header, send, sum_into, tune, Buf, HELLO};
use super::{child_workload, place, watchdog, Workload, IO_TIMEOUT};
use crate::{Args, NetError};

/// What a server's threads share.
struct Shared {
    w: Workload,
    /// Bytes of each part.
    lens: Vec<usize>,
    /// `ins[r][q]`: worker r's push of part q.
    ins: Vec<Vec<RwLock<Buf>>>,
    /// `outs[q]`: the sum of part q (with `--sum`; empty without).
    outs: Vec<RwLock<Buf>>,
    /// Pushes of each part that arrived, over all rounds.
    arrived: Vec<AtomicUsize>,
    /// To each writer: the parts it may answer.
    ready: Vec<Sender<usize>>,
}

pub(crate) fn floor_server(args: &Args) -> Result<(), NetError> {
    let w = child_workload(args)?;
    let index = place(args, "--index", w.servers, "servers")?;
    watchdog("floor-server");
    let listener = TcpListener::bind("127.0.0.1:0")?;
    println!("port={}", listener.local_addr()?.port());
    use std::io::Write;
    std::io::stdout().flush()?;
    let lens = w.parts(index);
    let workers = w.workers;
    let conns = accept_workers(&listener, workers, w.sndbuf)?;
    let (ready, inboxes): (Vec<Sender<usize>>, Vec<Receiver<usize>>) =
        (0..workers).map(|_| channel()).unzip();
    let shared = Arc::new(Shared {
        ins: (0..workers)
            .map(|_| lens.iter().map(|&n| RwLock::new(Buf::new(n))).collect())
            .collect(),
        outs: if w.sum {
            lens.iter().map(|&n| RwLock::new(Buf::new(n))).collect()
        } else {
            Vec::new()
        },
        arrived: lens.iter().map(|_| AtomicUsize::new(0)).collect(),
        lens,
        ready,
        w,
    });
    let mut threads = Vec::new();
    for (r, (s, inbox)) in conns.into_iter().zip(inboxes).enumerate() {
        let out = s.try_clone()?;
        let sh = shared.clone();
        threads.push(std::thread::spawn(move || read_pushes(&sh, r, s)));
        let sh = shared.clone();
        threads.push(std::thread::spawn(move || {
            write_answers(&sh, r, out, inbox)
        }));
    }
    for t in threads {
        if t.join().is_err() {
            die("floor-server", "a connection's thread panicked");
        }
    }
    Ok(())
}

/// The connections of all `workers`, by rank (each names its rank first,
/// `HELLO`), accepted within `IO_TIMEOUT`.
fn accept_workers(
    listener: &TcpListener,
    workers: usize,
    sndbuf: usize,
) -> Result<Vec<TcpStream>, NetError> {
    let deadline = Instant::now() + IO_TIMEOUT;
    listener.set_nonblocking(true)?;
    let mut conns: Vec<Option<TcpStream>> = (0..workers).map(|_| None).collect();
    let mut got = 0;
    while got < workers {
        let mut s = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(NetError::Failed(format!(
                        "{got} of {workers} workers connected within {} s",
                        IO_TIMEOUT.as_secs()
                    )));
                }
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        s.set_nonblocking(false)?;
        tune(&s, sndbuf)?;
        let (len, rank, round) = read_header(&mut s)?;
        if len != 0 || round != HELLO || rank >= workers || conns[rank].is_some() {
            return Err(NetError::Failed(format!(
                "a connection's first message named rank {rank} (round {round}, {len} bytes): not a new worker's hello"
            )));
        }
        conns[rank] = Some(s);
        got += 1;
    }
    Ok(conns.into_iter().flatten().collect())
}

/// Reader r: every push of worker r, each round's parts in any order, each
/// once; the W-th arrival of a part sums it (with `--sum`) and hands it
/// to the writers.
fn read_pushes(sh: &Shared, r: usize, mut s: TcpStream) {
    let workers = sh.w.workers;
    let mut seen = vec![usize::MAX; sh.lens.len()];
    for round in 0..sh.w.rounds {
        for _ in 0..sh.lens.len() {
            let (len, q, rd) = read_header(&mut s).unwrap_or_else(|e| die("floor-server", e));
            if q >= sh.lens.len() || len != sh.lens[q] || rd != round || seen[q] == round {
                die(
                    "floor-server",
                    format!("worker {r} sent part {q} of {len} bytes in round {rd} (round {round} expected, each part once)"),
                );
            }
            seen[q] = round;
            {
                let mut b = sh.ins[r][q].write();
                std::io::Read::read_exact(&mut s, b.wire_mut())
                    .unwrap_or_else(|e| die("floor-server", e));
            }
            if sh.arrived[q].fetch_add(1, Ordering::AcqRel) % workers != workers - 1 {
                continue;
            }
            if sh.w.sum {
                let mut out = sh.outs[q].write();
                let guards: Vec<_> = (0..workers).map(|i| sh.ins[i][q].read()).collect();
                let ins: Vec<&[f32]> = guards.iter().map(|g| g.floats()).collect();
                sum_into(out.floats_mut(), &ins);
            }
            for tx in &sh.ready {
                // A writer that is gone has failed, and exited the process.
                let _ = tx.send(q);
            }
        }
    }
}

/// Writer r: answers worker r's parts as they become ready.
fn write_answers(sh: &Shared, r: usize, mut s: TcpStream, inbox: Receiver<usize>) {
    for round in 0..sh.w.rounds {
        for _ in 0..sh.lens.len() {
            let q = inbox.recv_timeout(IO_TIMEOUT).unwrap_or_else(|_| {
                die(
                    "floor-server",
                    format!(
                        "no part was ready for worker {r} in {} s",
                        IO_TIMEOUT.as_secs()
                    ),
                )
            });
            let head = header(sh.lens[q], q, round);
            let sent = if sh.w.sum {
                send(&mut s, &head, sh.outs[q].read().wire())
            } else {
                send(&mut s, &head, sh.ins[r][q].read().wire())
            };
            sent.unwrap_or_else(|e| die("floor-server", e));
        }
    }
}
