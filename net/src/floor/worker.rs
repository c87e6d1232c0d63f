//! A floor worker (`pskv-net floor-worker --rank R`): per server, a
//! sending thread that pushes the round's parts in order and a receiving
//! thread that takes the answers in whatever order they come; the
//! process's main thread starts each round and times it.
//!
//! # A round
//!
//! Every thread of the process (two per server and the main thread, in
//! all twice the servers plus one) meets at a barrier twice a round: at
//! the start (the main thread reads the clock after it) and at the end
//! (the senders have sent every part, the receivers have every answer). A thread that fails ends the
//! process (`die`, or a panic through the child's hook), so no barrier
//! waits for a thread that is gone; socket reads and writes are bounded.
//!
//! Checks: each answer names its part and round, and each part comes once
//! a round; after the last round every answer must be what the workload
//! makes (the sum of every worker's push of the part in rank order, each
//! worker's pushes seeded by its rank, the server and the part; or this
//! worker's own push), so a floor that moved the wrong bytes fails.

use std::net::TcpStream;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use super::wire::{die, header, pattern, read_header, seed, send, sum_into, tune, Buf, HELLO};
use super::{child_workload, place, watchdog, Workload};
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
    let rank = place(args, "--rank", w.workers, "workers")?;
    watchdog("floor-worker");
    let meet = Arc::new(Barrier::new(2 * w.servers + 1));
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for (k, port) in ports.iter().enumerate() {
        let mut s = TcpStream::connect(("127.0.0.1", *port))?;
        tune(&s, w.sndbuf)?;
        send(&mut s, &header(0, rank, HELLO), &[])?;
        let lens = w.parts(k);
        let out = s.try_clone()?;
        let (m, rounds) = (meet.clone(), w.rounds);
        let pushes: Vec<Buf> = (lens.iter().enumerate())
            .map(|(q, &n)| pattern(n, seed(rank, k, q)))
            .collect();
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
        check(&w, rank, k, &answers)?;
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
/// in the order the server sends them, each part once. Returns the last
/// round's.
fn take_answers(mut s: TcpStream, lens: Vec<usize>, rounds: usize, meet: &Barrier) -> Vec<Buf> {
    let mut answers: Vec<Buf> = lens.iter().map(|&n| Buf::new(n)).collect();
    let mut seen = vec![usize::MAX; lens.len()];
    for round in 0..rounds {
        meet.wait();
        for _ in 0..lens.len() {
            let (len, q, rd) = read_header(&mut s).unwrap_or_else(|e| die("floor-worker", e));
            if q >= lens.len() || len != lens[q] || rd != round || seen[q] == round {
                die(
                    "floor-worker",
                    format!("an answer of part {q}, {len} bytes, round {rd} (round {round} expected, each part once)"),
                );
            }
            seen[q] = round;
            std::io::Read::read_exact(&mut s, answers[q].wire_mut())
                .unwrap_or_else(|e| die("floor-worker", e));
        }
        meet.wait();
    }
    answers
}

/// Whether server k's answers of the last round to worker `rank` are what
/// the workload makes: the sum of every worker's push of the part in rank
/// order, or this worker's own push.
fn check(w: &Workload, rank: usize, k: usize, answers: &[Buf]) -> Result<(), NetError> {
    for (q, a) in answers.iter().enumerate() {
        let len = a.floats().len() * 4;
        let want = if w.sum {
            let pushes: Vec<Buf> = (0..w.workers)
                .map(|r| pattern(len, seed(r, k, q)))
                .collect();
            let ins: Vec<&[f32]> = pushes.iter().map(|p| p.floats()).collect();
            let mut s = Buf::new(len);
            sum_into(s.floats_mut(), &ins);
            s
        } else {
            pattern(len, seed(rank, k, q))
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
            servers: 2,
            sizes: vec![1024],
            rounds: 1,
            sndbuf: 0,
            part: 0,
            sum: false,
        };
        // Without sums: the worker's own push back, not another's.
        let mut answers = vec![pattern(512, seed(1, 1, 0))];
        assert!(check(&w, 1, 1, &answers).is_ok());
        assert!(check(&w, 2, 1, &answers).is_err());
        answers[0].floats_mut()[10] += 1.0;
        assert!(check(&w, 1, 1, &answers).is_err());
        // With sums: the three workers' pushes added in rank order; one
        // push added three times is another sum.
        w.sum = true;
        let p: Vec<Buf> = (0..3).map(|r| pattern(512, seed(r, 1, 0))).collect();
        let mut sum = Buf::new(512);
        for (i, x) in sum.floats_mut().iter_mut().enumerate() {
            *x = (p[0].floats()[i] + p[1].floats()[i]) + p[2].floats()[i];
        }
        assert!(check(&w, 0, 1, &[sum]).is_ok());
        let mut thrice = Buf::new(512);
        for (i, x) in thrice.floats_mut().iter_mut().enumerate() {
            let v = p[0].floats()[i];
            *x = (v + v) + v;
        }
        assert!(check(&w, 0, 1, &[thrice]).is_err());
    }
}
