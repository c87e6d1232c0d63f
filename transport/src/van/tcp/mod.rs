//! The TCP van: one connection per peer pair.
//!
//! Receive (`read.rs`): a 64 KiB read buffer serves small frames (several
//! per read call); a frame whose body is 16 KiB or more gets a buffer of
//! its own, into which the rest is read straight from the socket, so a
//! large payload is received into one buffer with no further copy. The
//! header's lengths are checked against the limits before that buffer is
//! allocated. A read
//! takes at most `READ_AHEAD` bytes beyond what the frame being read
//! still lacks: what it brings of the next frame's large payload is
//! copied once more (into that frame's buffer or landing), so it is kept
//! small, while a read still brings dozens of small frames (a body of 8 to
//! 16 KiB then takes a second read call).
//!
//! Send: when the link is idle, the calling thread writes the frame itself
//! (a non-blocking vectored write; see `link` for the hand-off when the
//! socket fills up); otherwise the writer task takes batches from the
//! link's priority queue. Either way each frame's head and payload go out
//! with vectored writes: the payload is never copied into a send buffer.
//!
//! Large bodies are read into buffers that come back when the frame is
//! dropped (`spares`): a server holding a round's pushes, or a worker its
//! answers, faults in no fresh pages per message. (A body under 16 KiB is
//! split off the read buffer and keeps its 64 KiB block alive while it is
//! held: a server holding many through a round still takes fresh blocks.)
//!
//! An answer of at least `LAND_BYTES` whose request gave a [`Landing`]
//! skips the receive buffer: after its keys and meta, its payload is read
//! from the socket straight into the landing (a pull's values into the
//! output tensor, with no copy after the kernel's).
//!
//! While the rest of a large body is read (into its buffer or a landing),
//! the socket's receive low-water mark (`SO_RCVLOWAT`) is what is left of
//! it, at most `LOW_WATER` (a rest under 64 KiB leaves the mark at 1):
//! the reader's task wakes once that much has arrived, not at every
//! segment, and each read copies more (BENCHMARKS.md, "The TCP reader
//! wakes per megabyte"). The mark is 1 again before the
//! next frame is read, so a small frame never waits for bytes that will
//! not come. Subtle: older kernels may never signal a mark the receive
//! window cannot reach (before 4.18 the mark is not capped to the buffer);
//! so a raised read that waits `MARK_PATIENCE` falls back to a mark of 1,
//! for good on that link.

use std::io::IoSlice;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

mod idle;
mod read;
mod spares;

pub(crate) use idle::IdlePoll;
pub(crate) use read::{FrameReader, ReadError};

use super::{end, FrameSink, Half, Start, Van, VanError};
use crate::link::{Link, Work};
use crate::wire::{Frame, Limits, VanId};

/// Most bytes written per batch.
const BATCH_BYTES: usize = 1 << 20;

/// The parts of frames as they go on the wire: each head, then its payload.
fn wire_parts(frames: &[Frame]) -> Vec<Bytes> {
    let mut parts = Vec::with_capacity(frames.len() * 2);
    for f in frames {
        parts.push(f.encode_head().freeze());
        if !f.payload.is_empty() {
            parts.push(f.payload.clone());
        }
    }
    parts
}

/// Writes `parts` in order with vectored writes, waiting for the socket
/// (and telling `idle` while it waits: the runtime's threads then do not
/// watch, `idle.rs`). It tries before it waits: a caller's direct write
/// that filled the socket hands the rest over with the socket's write
/// readiness cleared, and the wait that follows is one for room.
async fn write_parts(
    wr: &tokio::net::tcp::OwnedWriteHalf,
    parts: &[Bytes],
    idle: Option<&IdlePoll>,
) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
    let mut rest: &mut [IoSlice<'_>] = &mut slices;
    let mut blocked = None;
    while !rest.is_empty() {
        match wr.try_write_vectored(rest) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    "the socket took no bytes",
                ))
            }
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if blocked.is_none() {
                    blocked = idle.map(IdlePoll::writer_blocked);
                }
                wr.writable().await?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The direct path: a non-blocking write on the caller's thread.
struct TcpDirect {
    wr: Arc<tokio::net::tcp::OwnedWriteHalf>,
}

impl crate::link::DirectSend for TcpDirect {
    fn shutdown(&self) {
        let stream: &tokio::net::TcpStream = (*self.wr).as_ref();
        // SAFETY: shutdown(2) on the socket this link owns (kept open by
        // `wr`); a second call answers ENOTCONN, which is ignored.
        unsafe {
            libc::shutdown(stream.as_raw_fd(), libc::SHUT_RDWR);
        }
    }

    fn try_send(&self, frame: &Frame) -> Result<crate::link::Direct, VanError> {
        use crate::link::Direct;
        let parts = wire_parts(std::slice::from_ref(frame));
        let total: usize = parts.iter().map(Bytes::len).sum();
        let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let mut rest: &mut [IoSlice<'_>] = &mut slices;
        let mut written = 0;
        while !rest.is_empty() {
            match self.wr.try_write_vectored(rest) {
                Ok(0) => return Err(VanError::Closed("socket (it took no bytes)")),
                Ok(n) => {
                    written += n;
                    IoSlice::advance_slices(&mut rest, n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(VanError::system("writing to the socket", e)),
            }
        }
        if written == total {
            return Ok(Direct::Sent);
        }
        if written == 0 {
            return Ok(Direct::NotSent);
        }
        // Hand the rest of the frame to the writer: skip what was written.
        let mut left = written;
        let mut tail = Vec::new();
        for p in parts {
            if left >= p.len() {
                left -= p.len();
                continue;
            }
            tail.push(p.slice(left..));
            left = 0;
        }
        Ok(Direct::Partial(tail))
    }
}

/// Writes one frame (the handshake).
pub(crate) async fn write_frame<W: AsyncWrite + Unpin>(
    wr: &mut W,
    frame: &Frame,
) -> std::io::Result<()> {
    wr.write_all(&frame.encode()).await
}

/// The TCP van: the handshake's stream carries the frames. Its offer and
/// answer are empty.
pub(crate) struct TcpVan {
    /// The frame limits of received frames.
    pub(crate) limits: Limits,
    /// The node's runtime threads' watch of its data links before they
    /// sleep (None: a link to the scheduler, not watched).
    pub(crate) idle: Option<Arc<IdlePoll>>,
}

impl Van for TcpVan {
    fn id(&self) -> VanId {
        VanId::Tcp
    }

    fn offer(&self) -> Result<(Vec<u8>, Box<dyn Half>), VanError> {
        Ok((Vec::new(), self.half()))
    }

    fn accept(&self, _offer: &[u8]) -> Result<(Vec<u8>, Box<dyn Half>), VanError> {
        self.offer()
    }
}

impl TcpVan {
    /// Either side of a TCP link: nothing to agree on, so it cannot fail
    /// (also the fallback where another van was declined).
    pub(crate) fn half(&self) -> Box<dyn Half> {
        Box::new(TcpHalf(self.limits, self.idle.clone()))
    }
}

/// Either side of a TCP link: the limits its reader switches to, and the
/// node's watch of its data links.
struct TcpHalf(Limits, Option<Arc<IdlePoll>>);

impl Half for TcpHalf {
    fn start(self: Box<Self>, on: Start<'_>) -> Result<(), VanError> {
        let Start {
            conn,
            link,
            sink,
            rt,
        } = on;
        let reader = conn.reader.with_limits(self.0).low_water();
        start(reader, conn.wr, link, sink, rt, self.1);
        Ok(())
    }
}

/// Starts the TCP van on an authenticated stream: a reader task delivering
/// to `sink` and a writer task draining `link`'s queue. `reader` carries any
/// bytes already buffered during the handshake.
fn start(
    reader: FrameReader<tokio::net::tcp::OwnedReadHalf>,
    wr: tokio::net::tcp::OwnedWriteHalf,
    link: Arc<Link>,
    sink: Arc<dyn FrameSink>,
    rt: &tokio::runtime::Handle,
    idle: Option<Arc<IdlePoll>>,
) {
    let watched = idle.as_ref().and_then(|i| i.watch(wr.as_ref().as_raw_fd()));
    let (l, s) = (link.clone(), sink.clone());
    rt.spawn(async move {
        let mut reader = reader;
        read_frames(&mut reader, &l, &s).await;
        // Out of the watch while the read half keeps the socket open.
        if let Some(w) = watched {
            w.end(reader.socket());
        }
    });
    let wr = Arc::new(wr);
    link.set_direct(Arc::new(TcpDirect { wr: wr.clone() }));
    rt.spawn(async move {
        while let Some(work) = link.next_work(BATCH_BYTES).await {
            let r = match work {
                Work::Rest(parts) => write_parts(&wr, &parts, idle.as_deref()).await,
                Work::Frames(frames) => {
                    write_parts(&wr, &wire_parts(&frames), idle.as_deref()).await
                }
            };
            link.done_writing();
            if let Err(e) = r {
                end(&link, &sink, format!("write failed: {e}"));
                return;
            }
        }
        // Closed: `Link::close` shut the socket down through the direct
        // path (the peer sees the end, our reader stops).
    });
}

/// A link's reader: delivers its frames to `s` until the link ends.
async fn read_frames(
    reader: &mut FrameReader<tokio::net::tcp::OwnedReadHalf>,
    l: &Arc<Link>,
    s: &Arc<dyn FrameSink>,
) {
    loop {
        let mut landed = 0;
        let read = reader
            .read_landing(|h| {
                let to = s.landing(l, h.request_id)?;
                landed = h.payload_len;
                Some(to)
            })
            .await;
        match read {
            Ok(frame) => {
                if frame.payload.len() as u64 != landed {
                    l.traffic.landed(landed);
                }
                s.on_frame(l, frame)
            }
            Err(e) => {
                if matches!(e, ReadError::Wire(_)) {
                    tracing::warn!(link = l.id, peer = l.peer(), "closing the connection: {e}");
                }
                end(l, s, e.to_string());
                return;
            }
        }
        if l.is_closed() {
            return;
        }
    }
}

/// Connects, or fails within `timeout`; the stream is [`tune`]d.
pub(crate) async fn connect(
    addr: &str,
    timeout: Duration,
    send_buffer: usize,
) -> std::io::Result<TcpStream> {
    let s = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connect to {addr} timed out"),
            )
        })??;
    tune(&s, s.peer_addr()?.ip(), send_buffer)?;
    Ok(s)
}

/// Sets a link's stream up, either end: TCP_NODELAY, and to a `peer` on a
/// loopback address a send buffer of `send_buffer` bytes (`SO_SNDBUF`,
/// which the kernel caps at `net.core.wmem_max` and then doubles; 0:
/// the kernel's autotuning, which every other link keeps: across hosts a
/// fixed buffer would cap a link's rate at a buffer per round trip).
///
/// Over loopback nothing is on the wire: a sent byte waits in the
/// receiver's socket until it reads it, and with the kernel's autotuning
/// a socket keeps up to `tcp_wmem`'s maximum (4 MiB by default) of them,
/// which the receiver then copies from memory rather than from cache.
pub(crate) fn tune(s: &TcpStream, peer: IpAddr, send_buffer: usize) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    if send_buffer > 0 && peer.to_canonical().is_loopback() {
        set_int_option(s.as_raw_fd(), libc::SO_SNDBUF, send_buffer)?;
    }
    Ok(())
}

/// Sets socket-level int option `option` of socket `fd` to `n` (capped at
/// the largest int).
fn set_int_option(fd: RawFd, option: libc::c_int, n: usize) -> std::io::Result<()> {
    let v = n.min(i32::MAX as usize) as libc::c_int;
    // SAFETY: setsockopt(2) with an int value read for the call only; a
    // descriptor that is not a live socket is an error, not a fault.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Socket-level int option `option` of socket `fd` (-1 if it cannot be
/// read).
#[cfg(test)]
fn int_option(fd: RawFd, option: libc::c_int) -> libc::c_int {
    let mut v: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt(2) into a local int.
    unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            &mut v as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        );
    }
    v
}

#[cfg(test)]
mod tests {
    use tokio::net::{TcpListener, TcpStream};

    use super::tune;

    fn send_buffer(s: &TcpStream) -> i32 {
        super::int_option(std::os::fd::AsRawFd::as_raw_fd(s), libc::SO_SNDBUF)
    }

    /// A link to listener `l`: the end that connected (asking for a
    /// 96 KiB send buffer) and the end accepted (not set up).
    async fn pair(l: TcpListener) -> (TcpStream, TcpStream) {
        let addr = l.local_addr().unwrap().to_string();
        let (a, b) = tokio::join!(
            super::connect(&addr, std::time::Duration::from_secs(5), 96 << 10),
            l.accept()
        );
        (a.unwrap(), b.unwrap().0)
    }

    /// A writer that waits for room in its socket stops the runtime's
    /// watch of the links until its write is done (`idle.rs`).
    #[tokio::test]
    async fn a_writer_waiting_for_room_is_counted_until_it_is_done() {
        use tokio::io::AsyncReadExt;
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a, mut b) = pair(l).await;
        let (_rd, wr) = a.into_split();
        // Fill the socket (the peer reads nothing yet).
        let chunk = vec![1u8; 64 << 10];
        let mut sent = 0;
        while wr.try_write(&chunk).map(|n| sent += n).is_ok() {}
        let idle = std::sync::Arc::new(super::IdlePoll::new(std::time::Duration::from_millis(1)));
        let part = bytes::Bytes::from(vec![2u8; 4096]);
        let writer = {
            let idle = idle.clone();
            tokio::spawn(async move {
                super::write_parts(&wr, &[part], Some(&idle)).await.unwrap();
            })
        };
        let t = std::time::Instant::now();
        while !idle.writer_waits() {
            assert!(t.elapsed().as_secs() < 10, "the writer never waited");
            tokio::task::yield_now().await;
        }
        // The peer reads everything: the write ends, and so does the wait.
        let mut got = vec![0u8; sent + 4096];
        b.read_exact(&mut got).await.unwrap();
        writer.await.unwrap();
        assert!(!idle.writer_waits());
        assert_eq!(got[sent..], [2u8; 4096][..]);
    }

    /// A link whose reader ends (its peer closed) takes its socket out of
    /// the node's watch, though the link's writer still holds it open
    /// (`idle.rs`): its end would otherwise end every later watch at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_link_whose_reader_ends_leaves_the_watch() {
        use std::sync::Arc;
        struct Ignore;
        impl crate::van::FrameSink for Ignore {
            fn on_frame(&self, _: &Arc<crate::link::Link>, _: crate::wire::Frame) {}
            fn on_closed(&self, _: &Arc<crate::link::Link>, _: String) {}
        }
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a, b) = pair(l).await;
        let idle = Arc::new(super::IdlePoll::new(std::time::Duration::from_secs(60)));
        let link = Arc::new(crate::link::Link::new(1, 0, crate::wire::VanId::Tcp));
        let (rd, wr) = a.into_split();
        let reader = super::FrameReader::new(rd, crate::wire::Limits::default());
        super::start(
            reader,
            wr,
            link.clone(),
            Arc::new(Ignore),
            &tokio::runtime::Handle::current(),
            Some(idle.clone()),
        );
        assert_eq!(idle.watched_links(), 1);
        assert!(!idle.any_readable());
        drop(b);
        let t = std::time::Instant::now();
        while idle.watched_links() != 0 {
            assert!(
                t.elapsed().as_secs() < 10,
                "the reader never left the watch"
            );
            tokio::task::yield_now().await;
        }
        // The link (alive here) holds the socket open: its end is not in
        // the set.
        assert!(!idle.any_readable());
        drop(link);
    }

    /// Both ends of a loopback link get the send buffer asked for (the
    /// kernel reports it doubled); 0 leaves the kernel's own size.
    #[tokio::test]
    async fn loopback_links_get_the_send_buffer_asked_for() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a, b) = pair(l).await;
        let peer = b.peer_addr().unwrap().ip();
        let kernel = send_buffer(&b);
        tune(&b, peer, 0).unwrap();
        assert_eq!(send_buffer(&b), kernel, "0: left to the kernel");
        tune(&b, peer, 80 << 10).unwrap();
        assert_eq!(send_buffer(&a), 2 * (96 << 10));
        assert_eq!(send_buffer(&b), 2 * (80 << 10));
        assert!(a.nodelay().unwrap() && b.nodelay().unwrap());
    }

    /// This host's IPv4 addresses that are not loopback ones.
    fn other_local_addresses() -> Vec<std::net::Ipv4Addr> {
        if_addrs::get_if_addrs()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|i| match i.ip() {
                std::net::IpAddr::V4(ip) if !ip.is_loopback() => Some(ip),
                _ => None,
            })
            .collect()
    }

    /// A link to an address that is not a loopback one keeps the kernel's
    /// autotuned buffer (across hosts a fixed one would cap its rate).
    #[tokio::test]
    async fn other_links_keep_the_kernels_buffer() {
        // The first address a listener can bind (an interface that is down
        // has its addresses but takes no listener).
        let mut bound = None;
        for ip in other_local_addresses() {
            if let Ok(l) = TcpListener::bind((ip, 0)).await {
                bound = Some(l);
                break;
            }
        }
        let Some(l) = bound else {
            eprintln!("this host has no usable address but loopback: nothing to compare");
            return;
        };
        let (a, b) = pair(l).await;
        let kernel = send_buffer(&b);
        tune(&b, b.peer_addr().unwrap().ip(), 80 << 10).unwrap();
        assert_eq!(send_buffer(&b), kernel);
        assert_ne!(send_buffer(&a), 2 * (96 << 10));
    }
}
