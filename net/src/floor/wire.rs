//! What the floor's processes share: buffers on 64-byte bounds, the
//! 64-byte message header, the socket settings, the test pattern and the
//! sum.

use std::io::{IoSlice, Read, Write};
use std::net::TcpStream;

use super::IO_TIMEOUT;

/// Header size, payload padding and buffer alignment (module docs of
/// `scripts/raw_tcp_ps.py`, "Alignment").
pub(super) const ALIGN: usize = 64;

/// `n` rounded up to `ALIGN`.
pub(super) fn padded(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// A zeroed buffer of `padded(len)` bytes that starts on an `ALIGN`
/// boundary (a `Vec` with room to spare, used from the first aligned
/// byte).
pub(super) struct Buf {
    mem: Vec<u8>,
    at: usize,
    len: usize,
}

impl Buf {
    pub(super) fn new(len: usize) -> Buf {
        let mem = vec![0u8; padded(len) + ALIGN];
        let at = mem.as_ptr().align_offset(ALIGN);
        Buf { mem, at, len }
    }

    /// The payload's bytes on the wire (padded).
    pub(super) fn wire(&self) -> &[u8] {
        &self.mem[self.at..self.at + padded(self.len)]
    }

    pub(super) fn wire_mut(&mut self) -> &mut [u8] {
        let n = padded(self.len);
        &mut self.mem[self.at..self.at + n]
    }

    /// The payload as float32 (its length is a multiple of 4, its start on
    /// a 64-byte bound).
    pub(super) fn floats(&self) -> &[f32] {
        bytemuck::cast_slice(&self.mem[self.at..self.at + self.len])
    }

    pub(super) fn floats_mut(&mut self) -> &mut [f32] {
        bytemuck::cast_slice_mut(&mut self.mem[self.at..self.at + self.len])
    }
}

/// A buffer of `len` bytes of float32 values from 1 to 2, every page
/// written (normal numbers, so that a sum runs at full speed, as a
/// gradient's would; and no page left to the kernel's shared zero page);
/// `seed` shifts the pattern, so that the pushes of different workers,
/// servers and parts differ (`seed`).
pub(super) fn pattern(len: usize, seed: usize) -> Buf {
    let mut b = Buf::new(len);
    for (i, x) in b.floats_mut().iter_mut().enumerate() {
        *x = 1.0 + ((i + seed) % 255) as f32 / 256.0;
    }
    b
}

/// The pattern's seed of worker `rank`'s push of part `q` to server `k`:
/// pushes that a server mixed up (two parts, two workers, one input
/// added twice) make another sum.
pub(super) fn seed(rank: usize, k: usize, q: usize) -> usize {
    7 * rank + 31 * k + 101 * q
}

/// What a worker sends first on each connection: a header naming its rank
/// (as the part, with no payload and the round `HELLO`), so that a server
/// sums in the workers' rank order, not in the order they connected.
pub(super) const HELLO: usize = u32::MAX as usize;

/// A message's header: the payload's length, the part's index and the
/// round, then zeros to `ALIGN` bytes.
pub(super) fn header(len: usize, part: usize, round: usize) -> [u8; ALIGN] {
    let mut h = [0u8; ALIGN];
    h[..8].copy_from_slice(&(len as u64).to_le_bytes());
    h[8..12].copy_from_slice(&(part as u32).to_le_bytes());
    h[12..16].copy_from_slice(&(round as u32).to_le_bytes());
    h
}

/// Reads a header: (length, part, round).
pub(super) fn read_header(s: &mut TcpStream) -> std::io::Result<(usize, usize, usize)> {
    let mut h = [0u8; ALIGN];
    s.read_exact(&mut h)?;
    let field = |lo: usize, hi: usize| {
        let mut b = [0u8; 8];
        b[..hi - lo].copy_from_slice(&h[lo..hi]);
        u64::from_le_bytes(b) as usize
    };
    Ok((field(0, 8), field(8, 12), field(12, 16)))
}

/// Sends a header and its (padded) payload, in one system call where the
/// socket takes it all.
pub(super) fn send(s: &mut TcpStream, head: &[u8; ALIGN], payload: &[u8]) -> std::io::Result<()> {
    crate::write_all_vectored(s, &mut [IoSlice::new(head), IoSlice::new(payload)])
}

/// No Nagle, the send buffer when asked for, and the time bound of every
/// read and write.
pub(super) fn tune(s: &TcpStream, sndbuf: usize) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    if sndbuf > 0 {
        socket2::SockRef::from(s).set_send_buffer_size(sndbuf)?;
    }
    Ok(())
}

/// Elements summed at a time: the output's chunk stays in the core's
/// first-level cache while each input is added to it.
const CHUNK: usize = 2048;

/// `out = ((ins[0] + ins[1]) + ins[2]) + ...`, element by element, in
/// that order (the same bits whatever the chunking); one input is copied.
/// (pskv's own kernel, `pskv_gpu::cpu`, adds the same way; the floor uses
/// nothing of pskv's, so that it measures plain sockets and plain code.)
pub(super) fn sum_into(out: &mut [f32], ins: &[&[f32]]) {
    assert!(
        !ins.is_empty() && ins.iter().all(|i| i.len() == out.len()),
        "a sum of one or more inputs of the output's length"
    );
    for (c, o) in out.chunks_mut(CHUNK).enumerate() {
        let lo = c * CHUNK;
        let hi = lo + o.len();
        match ins.get(1) {
            None => o.copy_from_slice(&ins[0][lo..hi]),
            Some(b) => {
                for ((x, a), b) in o.iter_mut().zip(&ins[0][lo..hi]).zip(&b[lo..hi]) {
                    *x = a + b;
                }
            }
        }
        for i in ins.iter().skip(2) {
            for (x, y) in o.iter_mut().zip(&i[lo..hi]) {
                *x += y;
            }
        }
    }
}

/// Exits the process with `what` failed (a floor process that fails stops:
/// its peers' reads then fail too, and the run reports it).
pub(super) fn die(who: &str, what: impl std::fmt::Display) -> ! {
    eprintln!("pskv-net {who}: {what}");
    let _ = std::io::stdout().flush();
    std::process::exit(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_padded() {
        for len in [4, 60, 64, 68, 4096, 1 << 20] {
            let mut b = Buf::new(len);
            assert_eq!(b.wire().as_ptr() as usize % ALIGN, 0);
            assert_eq!(b.wire().len(), padded(len));
            assert_eq!(b.floats().len(), len / 4);
            b.floats_mut()[len / 4 - 1] = 3.0;
            assert_eq!(b.wire()[len - 4..len], 3.0f32.to_le_bytes());
        }
    }

    #[test]
    fn sums_in_rank_order_across_chunks() {
        let n = CHUNK * 2 + 5;
        let a: Vec<f32> = (0..n).map(|i| 1e8 + i as f32).collect();
        let b: Vec<f32> = (0..n).map(|i| -1e8 + (i % 7) as f32).collect();
        let c: Vec<f32> = (0..n).map(|i| 0.5 + (i % 3) as f32 * 1e-3).collect();
        let mut out = vec![0f32; n];
        sum_into(&mut out, &[&a, &b, &c]);
        for i in 0..n {
            assert_eq!(
                out[i].to_bits(),
                ((a[i] + b[i]) + c[i]).to_bits(),
                "element {i}"
            );
        }
    }

    #[test]
    fn headers_round_trip_over_a_socket() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut rx, _) = l.accept().unwrap();
        tune(&tx, 65536).unwrap();
        tune(&rx, 0).unwrap();
        let p = pattern(100, 3);
        send(&mut tx, &header(100, 7, 3), p.wire()).unwrap();
        assert_eq!(read_header(&mut rx).unwrap(), (100, 7, 3));
        let mut back = Buf::new(100);
        rx.read_exact(back.wire_mut()).unwrap();
        assert_eq!(back.floats(), p.floats());
    }
}
