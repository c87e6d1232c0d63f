//! The TCP van: one connection per peer pair.
//!
//! Receive: a 64 KiB read buffer serves small frames (several per read
//! call); a frame whose body does not fit gets a buffer of exactly its size,
//! into which the rest is read straight from the socket, so a large payload
//! is received into one buffer with no further copy. The header's lengths
//! are checked against the limits before that buffer is allocated.
//!
//! Send: when the link is idle, the calling thread writes the frame itself
//! (a non-blocking vectored write; see `link` for the hand-off when the
//! socket fills up); otherwise the writer task takes batches from the
//! link's priority queue. Either way each frame's head and payload go out
//! with vectored writes: the payload is never copied into a send buffer.
//!
//! Receive buffers of large bodies are reused: when the application has
//! dropped the previous large body, its allocation takes the next one (no
//! fresh pages to fault in per message).

use std::io::IoSlice;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{end, FrameSink, Half, Start, Van, VanError};
use crate::link::{Link, Work};
use crate::wire::{decode_body, decode_header, Frame, Limits, VanId, WireError, HEADER_LEN};

/// Read-buffer size for small frames.
const READ_CHUNK: usize = 64 * 1024;
/// Most bytes written per batch.
const BATCH_BYTES: usize = 1 << 20;

/// Why reading a frame stopped.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The peer closed the connection cleanly between frames.
    Eof,
    /// A socket error, or the peer closed in the middle of a frame.
    Io(String),
    /// A malformed frame.
    Wire(WireError),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Eof => f.write_str("the peer closed the connection"),
            ReadError::Io(e) => write!(f, "read failed: {e}"),
            ReadError::Wire(e) => write!(f, "malformed frame: {e}"),
        }
    }
}

/// Reads frames from a byte stream, with a small-frame buffer.
pub(crate) struct FrameReader<R> {
    rd: R,
    buf: BytesMut,
    /// Where large bodies are received (reclaimed when they are dropped).
    big: BytesMut,
    limits: Limits,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(crate) fn new(rd: R, limits: Limits) -> Self {
        // A handshake's frames are small: its buffer starts small too (a
        // flood of connections that never finish one then costs little),
        // and grows by READ_CHUNK once data flows.
        let start = if limits.max_payload == Limits::HANDSHAKE.max_payload {
            1024
        } else {
            READ_CHUNK
        };
        FrameReader {
            rd,
            buf: BytesMut::with_capacity(start),
            big: BytesMut::new(),
            limits,
        }
    }

    async fn fill(&mut self, need: usize) -> Result<(), ReadError> {
        while self.buf.len() < need {
            if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
                self.buf.reserve(READ_CHUNK);
            }
            match self.rd.read_buf(&mut self.buf).await {
                Ok(0) if self.buf.is_empty() => return Err(ReadError::Eof),
                Ok(0) => {
                    return Err(ReadError::Io(
                        "the peer closed the connection in the middle of a frame".into(),
                    ))
                }
                Ok(_) => {}
                Err(e) => return Err(ReadError::Io(e.to_string())),
            }
        }
        Ok(())
    }

    /// The same reader with other limits (after the handshake), keeping any
    /// bytes already buffered.
    pub(crate) fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The stream back, with any bytes read past the last frame.
    pub(crate) fn into_parts(self) -> (R, BytesMut) {
        (self.rd, self.buf)
    }

    /// The next frame.
    pub(crate) async fn read(&mut self) -> Result<Frame, ReadError> {
        self.fill(HEADER_LEN).await?;
        let h = decode_header(&self.buf[..HEADER_LEN], &self.limits).map_err(ReadError::Wire)?;
        self.buf.advance(HEADER_LEN);
        let need = h.body_len() as usize;
        let body = if need <= self.buf.len() || need <= READ_CHUNK {
            self.fill(need).await?;
            self.buf.split_to(need).freeze()
        } else {
            // A large body: one buffer of its size (the previous one's, if
            // it was dropped); what is already buffered is copied in, the
            // rest is read straight into it.
            let big = &mut self.big;
            big.clear();
            big.reserve(need);
            big.extend_from_slice(&self.buf);
            self.buf.clear();
            while big.len() < need {
                let want = (need - big.len()) as u64;
                match (&mut self.rd).take(want).read_buf(big).await {
                    Ok(0) => {
                        return Err(ReadError::Io(
                            "the peer closed the connection in the middle of a frame".into(),
                        ))
                    }
                    Ok(_) => {}
                    Err(e) => return Err(ReadError::Io(e.to_string())),
                }
            }
            big.split_to(need).freeze()
        };
        decode_body(h, body).map_err(ReadError::Wire)
    }
}

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

/// Writes `parts` in order with vectored writes, waiting for the socket.
async fn write_parts(wr: &tokio::net::tcp::OwnedWriteHalf, parts: &[Bytes]) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
    let mut rest: &mut [IoSlice<'_>] = &mut slices;
    while !rest.is_empty() {
        wr.writable().await?;
        match wr.try_write_vectored(rest) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    "the socket took no bytes",
                ))
            }
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
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
        use std::os::fd::AsRawFd;
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
        Box::new(TcpHalf(self.limits))
    }
}

/// Either side of a TCP link: the limits its reader switches to.
struct TcpHalf(Limits);

impl Half for TcpHalf {
    fn start(self: Box<Self>, on: Start<'_>) -> Result<(), VanError> {
        let Start {
            conn,
            link,
            sink,
            rt,
        } = on;
        start(conn.reader.with_limits(self.0), conn.wr, link, sink, rt);
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
) {
    let (l, s) = (link.clone(), sink.clone());
    rt.spawn(async move {
        let mut reader = reader;
        loop {
            match reader.read().await {
                Ok(frame) => s.on_frame(&l, frame),
                Err(e) => {
                    if matches!(e, ReadError::Wire(_)) {
                        tracing::warn!(link = l.id, peer = l.peer(), "closing the connection: {e}");
                    }
                    end(&l, &s, e.to_string());
                    return;
                }
            }
            if l.is_closed() {
                return;
            }
        }
    });
    let wr = Arc::new(wr);
    link.set_direct(Arc::new(TcpDirect { wr: wr.clone() }));
    rt.spawn(async move {
        while let Some(work) = link.next_work(BATCH_BYTES).await {
            let r = match work {
                Work::Rest(parts) => write_parts(&wr, &parts).await,
                Work::Frames(frames) => write_parts(&wr, &wire_parts(&frames)).await,
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

/// Connects with TCP_NODELAY, or fails within `timeout`.
pub(crate) async fn connect(addr: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    let s = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connect to {addr} timed out"),
            )
        })??;
    s.set_nodelay(true)?;
    Ok(s)
}
