//! A floor worker (`pskv-net floor-worker`): per server, a sending thread
//! that pushes the round's parts in order and a receiving thread that
//! takes the answers in whatever order they come; the process's main
//! thread starts each round and times it. After the last round every
//! answer is checked (the sum of W pushes of the pattern in rank order, or
//! the worker's own push), so a floor that moved the wrong bytes fails.

use std::net::TcpStream;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use super::wire::{die, header, pattern, read_header, send, sum_into, tune, Buf};
use super::{child_workload, watchdog, Workload};
use crate::{Args, NetError};

pub(crate) fn floor_worker(args: &Args) -> Result<(), NetError> {
    let w = child_workload(args)?;
    let ports: Vec<u16> = args
        .value("--ports")
        .ok_or_else(|| NetError::Usage("--ports is needed".into()))?
        .split(',')
        .map(|p| {
            p.parse()
                .map_err(|_| NetError::Usage(format!("--ports: '{p}' is not a port")))
        })
        .collect::<Result<_, _>>()?;
    if ports.len() != w.servers {
        return Err(NetError::Usage(format!(
            "--ports names {} servers, --servers {}",
            ports.len(),
            w.servers
        )));
    }
    watchdog("floor-worker");
    // Every thread of this process meets at each round's start and end.
    let meet = Arc::new(Barrier::new(2 * w.servers + 1));
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for (k, port) in ports.iter().enumerate() {
        let s = TcpStream::connect(("127.0.0.1", *port))?;
        tune(&s, w.sndbuf)?;
        let lens = w.parts(k);
        let out = s.try_clone()?;
        let (m, rounds) = (meet.clone(), w.rounds);
        let pushes: Vec<Buf> = lens.iter().map(|&n| pattern(n)).collect();
        senders.push(std::thread::spawn(move || {
            push_parts(out, pushes, rounds, &m)
        }));
        let (m, rounds) = (meet.clone(), w.rounds);
        receivers.push(std::thread::spawn(move || {
            take_answers(s, lens, rounds, &m)
        }));
    }
    let mut times = Vec::with_capacity(w.rounds);
    for _ in 0..w.rounds {
        meet.wait();
        let t = Instant::now();
        meet.wait();
        times.push(t.elapsed().as_secs_f64());
    }
    for t in senders {
        t.join()
            .unwrap_or_else(|_| die("floor-worker", "a sending thread panicked"));
    }
    for (k, t) in receivers.into_iter().enumerate() {
        let answers = t
            .join()
            .unwrap_or_else(|_| die("floor-worker", "a receiving thread panicked"));
        check(&w, k, &answers)?;
    }
    let mut kept = times.split_off(w.rounds / 5);
    kept.sort_by(f64::total_cmp);
    println!("median_s={}", kept[kept.len() / 2]);
    Ok(())
}

/// The sending thread of one server's connection.
fn push_parts(mut s: TcpStream, pushes: Vec<Buf>, rounds: usize, meet: &Barrier) {
    for round in 0..rounds {
        meet.wait();
        for (q, b) in pushes.iter().enumerate() {
            send(&mut s, &header(b.floats().len() * 4, q, round), b.wire())
                .unwrap_or_else(|e| die("floor-worker", e));
        }
        meet.wait();
    }
}

/// The receiving thread of one server's connection: each round's answers,
/// in the order the server sends them. Returns the last round's.
fn take_answers(mut s: TcpStream, lens: Vec<usize>, rounds: usize, meet: &Barrier) -> Vec<Buf> {
    let mut answers: Vec<Buf> = lens.iter().map(|&n| Buf::new(n)).collect();
    for round in 0..rounds {
        meet.wait();
        for _ in 0..lens.len() {
            let (len, q, rd) = read_header(&mut s).unwrap_or_else(|e| die("floor-worker", e));
            if q >= lens.len() || len != lens[q] || rd != round {
                die(
                    "floor-worker",
                    format!(
                        "an answer of part {q}, {len} bytes, round {rd} (round {round} expected)"
                    ),
                );
            }
            std::io::Read::read_exact(&mut s, answers[q].wire_mut())
                .unwrap_or_else(|e| die("floor-worker", e));
        }
        meet.wait();
    }
    answers
}

/// Whether server k's answers of the last round are what the workload
/// makes: the sum of every worker's push (all the same pattern) in rank
/// order, or this worker's own push.
fn check(w: &Workload, k: usize, answers: &[Buf]) -> Result<(), NetError> {
    for (q, a) in answers.iter().enumerate() {
        let push = pattern(a.floats().len() * 4);
        let want = if w.sum {
            let mut s = Buf::new(a.floats().len() * 4);
            let ins: Vec<&[f32]> = (0..w.workers).map(|_| push.floats()).collect();
            sum_into(s.floats_mut(), &ins);
            s
        } else {
            push
        };
        if a.floats() != want.floats() {
            return Err(NetError::Failed(format!(
                "server {k} answered part {q} with bytes other than the workload's"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_checked_against_the_workload() {
        let mut w = Workload {
            workers: 3,
            servers: 1,
            sizes: vec![1024],
            rounds: 1,
            sndbuf: 0,
            part: 0,
            sum: false,
        };
        // Without sums: the worker's own push back.
        let mut answers = vec![pattern(1024)];
        assert!(check(&w, 0, &answers).is_ok());
        answers[0].floats_mut()[10] += 1.0;
        assert!(check(&w, 0, &answers).is_err());
        // With sums: three pushes added in rank order.
        w.sum = true;
        let mut sum = Buf::new(1024);
        for (i, x) in sum.floats_mut().iter_mut().enumerate() {
            let p = pattern(1024).floats()[i];
            *x = (p + p) + p;
        }
        assert!(check(&w, 0, &[sum]).is_ok());
        assert!(check(&w, 0, &[pattern(1024)]).is_err());
    }
}
