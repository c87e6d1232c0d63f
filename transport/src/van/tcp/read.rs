//! Receiving on the TCP van: [`FrameReader`] reads frames from a byte
//! stream into a small-frame buffer, or a large body into a buffer of its
//! own (`spares`) or a request's [`Landing`], raising the socket's receive
//! low-water mark meanwhile (the parent module's docs say how and why).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::spares;
use crate::landing::Landing;
use crate::wire::{
    decode_body, decode_body_landed, decode_header, Flags, Frame, Header, Kind, Limits, WireError,
    HEADER_LEN,
};

/// The most bytes a large body's read waits for before its task wakes
/// (the socket's `SO_RCVLOWAT`; current kernels grow an unlocked receive
/// buffer to twice the mark, and cap the mark to half the largest one).
const LOW_WATER: usize = 1 << 20;
/// How long a read with a raised mark may wait before the link reads with
/// a mark of 1 (module docs).
const MARK_PATIENCE: Duration = Duration::from_millis(50);

/// Read-buffer size for small frames.
const READ_CHUNK: usize = 64 * 1024;
/// Most bytes a read takes past the frame being read (module docs).
const READ_AHEAD: usize = 8 * 1024;
/// Answers with at least this many payload bytes look for a landing (a
/// smaller one is copied out of the read buffer at little cost, and the
/// lookup takes a lock).
const LAND_BYTES: u64 = 16 * 1024;
/// Bodies of at least this many bytes are read into a buffer of their own
/// (`spares`), not split off the small-frame buffer: a split keeps the
/// whole 64 KiB block it came from alive for as long as the frame lives
/// (a server holds a round's pushes until all are in), so the next reads
/// go to fresh blocks, whose pages fault in (module docs of `mod.rs`).
const SPARE_MIN: usize = 16 * 1024;
/// The least rest of a body that raises the socket's low-water mark: a
/// shorter one comes in a segment or two, and raising the mark and
/// lowering it again costs two system calls.
const RAISE_MIN: usize = 64 * 1024;

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

impl ReadError {
    /// The peer closed the connection after part of a frame.
    fn mid_frame() -> ReadError {
        ReadError::Io("the peer closed the connection in the middle of a frame".into())
    }
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
    limits: Limits,
    /// The TCP socket `rd` reads, whose receive low-water mark a large
    /// body's read raises (None: the handshake's reader, tests' streams,
    /// or a link whose raised reads did not wake), and the mark set now.
    socket: Option<(RawFd, usize)>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(crate) fn new(rd: R, limits: Limits) -> Self {
        FrameReader {
            rd,
            buf: BytesMut::with_capacity(chunk_for(&limits)),
            limits,
            socket: None,
        }
    }

    /// Sets the socket's receive low-water mark to `n` bytes, within
    /// `1..=LOW_WATER`, if it is not that already.
    fn set_mark(&mut self, n: usize) {
        let Some((fd, mark)) = &mut self.socket else {
            return;
        };
        let v = n.clamp(1, LOW_WATER);
        if *mark == v {
            return;
        }
        *mark = v;
        set_low_water(*fd, v);
    }

    /// Reads with a mark of 1 on this link from now on (a raised read
    /// waited `MARK_PATIENCE`).
    fn give_up_low_water(&mut self) {
        self.set_mark(1);
        self.socket = None;
    }

    /// Fills `dst` with the bytes already buffered, then from the socket
    /// with the mark raised (a large body's rest, or a landed payload),
    /// and lowers the mark again.
    async fn read_rest(&mut self, dst: &mut [u8]) -> Result<(), ReadError> {
        let mut at = self.buf.len().min(dst.len());
        crate::copy::copy(&mut dst[..at], &self.buf[..at]);
        self.buf.advance(at);
        while at < dst.len() {
            match self.read_raised_into(&mut dst[at..]).await {
                Ok(0) => return Err(ReadError::mid_frame()),
                Ok(n) => at += n,
                Err(e) => return Err(ReadError::Io(e.to_string())),
            }
        }
        self.set_mark(1);
        Ok(())
    }

    /// Reads into `dst` with the mark raised to its length (module docs).
    async fn read_raised_into(&mut self, dst: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.socket.is_none() {
                return self.rd.read(dst).await;
            }
            if dst.len() < RAISE_MIN {
                // Lowered after a raised read, or never raised.
                self.set_mark(1);
                return self.rd.read(dst).await;
            }
            self.set_mark(dst.len());
            match tokio::time::timeout(MARK_PATIENCE, self.rd.read(dst)).await {
                Ok(r) => return r,
                Err(_) => self.give_up_low_water(),
            }
        }
    }

    async fn fill(&mut self, need: usize) -> Result<(), ReadError> {
        let chunk = chunk_for(&self.limits);
        while self.buf.len() < need {
            if self.buf.capacity() - self.buf.len() < chunk / 4 {
                self.buf.reserve(chunk);
            }
            let most = need - self.buf.len() + READ_AHEAD;
            match (&mut self.rd)
                .take(most as u64)
                .read_buf(&mut self.buf)
                .await
            {
                Ok(0) if self.buf.is_empty() => return Err(ReadError::Eof),
                Ok(0) => return Err(ReadError::mid_frame()),
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
        self.read_landing(|_| None).await
    }

    /// The next frame; an answer's payload goes into the landing `landing`
    /// gives for its header, if any (see the module docs).
    pub(crate) async fn read_landing(
        &mut self,
        landing: impl FnOnce(&Header) -> Option<Arc<Landing>>,
    ) -> Result<Frame, ReadError> {
        self.fill(HEADER_LEN).await?;
        let h = decode_header(&self.buf[..HEADER_LEN], &self.limits).map_err(ReadError::Wire)?;
        self.buf.advance(HEADER_LEN);
        if h.kind == Kind::Response
            && !h.flags.contains(Flags::ERROR)
            && h.payload_len >= LAND_BYTES
        {
            if let Some(l) = landing(&h) {
                if let Some(dst) = l.claim(h.payload_len) {
                    let mut claim = Claim(&l, false);
                    let frame = self.read_landed(h, dst).await?;
                    claim.1 = true;
                    return Ok(frame);
                }
            }
        }
        let need = h.body_len() as usize;
        let body = if need < SPARE_MIN {
            self.fill(need).await?;
            self.buf.split_to(need).freeze()
        } else {
            // A large body: a buffer of its own (a dropped one's, if
            // any); what is already buffered (at most `READ_AHEAD` bytes
            // past the header) is copied in, the rest is read straight
            // into it.
            let mut big = spares::take(need);
            self.read_rest(&mut big[..need]).await?;
            spares::freeze(big, need)
        };
        decode_body(h, body).map_err(ReadError::Wire)
    }

    /// Reads an answer's keys and meta, then its payload into `dst`.
    async fn read_landed(&mut self, h: Header, dst: &mut [u8]) -> Result<Frame, ReadError> {
        let head_len = (h.body_len() - h.payload_len) as usize;
        self.fill(head_len).await?;
        let head = self.buf.split_to(head_len).freeze();
        self.read_rest(dst).await?;
        decode_body_landed(h, head).map_err(ReadError::Wire)
    }
}

impl FrameReader<tokio::net::tcp::OwnedReadHalf> {
    /// The same reader, raising its socket's receive low-water mark while
    /// it reads the rest of a large body (module docs).
    pub(crate) fn low_water(mut self) -> Self {
        self.socket = Some((self.rd.as_ref().as_raw_fd(), 1));
        self
    }

    /// The socket it reads, open while the reader lives.
    pub(crate) fn socket(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(self.rd.as_ref())
    }
}

/// How much a reader under `limits` grows its small-frame buffer by (and
/// starts it with): a handshake's frames are small, so its buffer grows by
/// 1 KiB at a time (a flood of connections that never finish one then
/// costs little); after the handshake (`with_limits`), by `READ_CHUNK`.
fn chunk_for(limits: &Limits) -> usize {
    if limits.max_payload == Limits::HANDSHAKE.max_payload {
        1024
    } else {
        READ_CHUNK
    }
}

/// Sets socket `fd`'s receive low-water mark to `n` bytes. It cannot fail
/// on a live TCP socket (a value above the buffer is capped); on a dead one
/// the link is ending anyway. The descriptor is the reader's own read
/// half's, which keeps it open (`FrameReader::low_water` takes it there).
fn set_low_water(fd: RawFd, n: usize) {
    let _ = super::set_int_option(fd, libc::SO_RCVLOWAT, n);
}

/// A claimed landing, released when dropped: filled if `.1` was set, else
/// open again (an error, or the reader's task dropped mid-read at shutdown).
struct Claim<'a>(&'a Landing, bool);

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.0.release(self.1);
    }
}

#[cfg(test)]
mod tests {
    use super::super::write_frame;
    use super::*;
    use bytes::Bytes;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;

    fn low_water_of(fd: RawFd) -> libc::c_int {
        super::super::int_option(fd, libc::SO_RCVLOWAT)
    }

    fn frame(n: usize, tag: u8) -> Frame {
        let mut f = Frame::new(Kind::Request);
        f.flags = Flags::PUSH;
        f.keys = vec![tag as u64];
        f.lens = vec![n as u32];
        f.payload = Bytes::from(vec![tag; n]);
        f
    }

    /// The next frame of `reader` (within 10 s), checked to be `n` bytes of
    /// `tag`.
    async fn read_tagged(
        reader: &mut FrameReader<tokio::net::tcp::OwnedReadHalf>,
        n: usize,
        tag: u8,
    ) -> Frame {
        let f = tokio::time::timeout(Duration::from_secs(10), reader.read())
            .await
            .unwrap_or_else(|_| panic!("frame {tag} did not arrive"))
            .unwrap();
        assert_eq!(f.payload.len(), n, "frame {tag}");
        assert!(f.payload.iter().all(|&b| b == tag), "frame {tag}");
        f
    }

    /// A client's stream and the reader of the server's end (raising its
    /// mark), with that socket and its write half.
    async fn connected() -> (
        TcpStream,
        FrameReader<tokio::net::tcp::OwnedReadHalf>,
        RawFd,
        tokio::net::tcp::OwnedWriteHalf,
    ) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (client, server) =
            tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
        let (client, (server, _)) = (client.unwrap(), server.unwrap());
        let fd = server.as_raw_fd();
        let (rd, wr) = server.into_split();
        (
            client,
            FrameReader::new(rd, Limits::default()).low_water(),
            fd,
            wr,
        )
    }

    /// A large body read with the socket's low-water mark raised arrives
    /// whole, the mark is 1 again after it, and a small frame behind it is
    /// read at once (a mark left high would wait for bytes that never come).
    #[tokio::test]
    async fn a_large_body_raises_the_low_water_mark_and_lowers_it_after() {
        let (mut client, mut reader, fd, _wr) = connected().await;
        let writer = tokio::spawn(async move {
            for (n, tag) in [(3 << 20, 7u8), (10, 8), (5 << 20, 9), (3, 10)] {
                write_frame(&mut client, &frame(n, tag)).await.unwrap();
                // Let the reader reach the small frame's wait first.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            client
        });
        for (n, tag) in [(3 << 20, 7u8), (10, 8), (5 << 20, 9), (3, 10)] {
            read_tagged(&mut reader, n, tag).await;
            assert_eq!(low_water_of(fd), 1, "after frame {tag}");
        }
        drop(writer.await.unwrap());
    }

    /// A small frame's read takes at most `READ_AHEAD` bytes of the large
    /// frame behind it (the rest is read into the large body's own
    /// buffer, not copied out of the small-frame buffer), and both arrive
    /// whole.
    #[tokio::test]
    async fn a_read_takes_little_of_the_next_frame() {
        let (mut client, mut reader, _fd, _wr) = connected().await;
        let mut both = frame(10, 3).encode().to_vec();
        both.extend_from_slice(&frame(1 << 20, 4).encode());
        let writer = tokio::spawn(async move {
            client.write_all(&both).await.unwrap();
            client
        });
        // Let the socket fill before the first read (a test that waits too
        // little passes without checking, it cannot fail wrongly).
        tokio::time::sleep(Duration::from_millis(50)).await;
        let small = reader.read().await.unwrap();
        assert_eq!(&small.payload[..], &[3u8; 10][..]);
        assert!(
            reader.buf.len() <= READ_AHEAD,
            "{} bytes of the next frame were read ahead",
            reader.buf.len()
        );
        let large = reader.read().await.unwrap();
        assert_eq!(large.payload.len(), 1 << 20);
        assert!(large.payload.iter().all(|&b| b == 4));
        drop(writer.await.unwrap());
    }

    /// A body of `SPARE_MIN` bytes or more that fits the small-frame
    /// buffer still gets a buffer of its own: a body split off that buffer
    /// would end where the buffer's next bytes begin (and keep its block
    /// alive while held), and a smaller one is split off it.
    #[tokio::test]
    async fn a_mid_sized_body_is_not_split_off_the_read_buffer() {
        let (mut client, mut reader, _fd, _wr) = connected().await;
        let sizes = [(40 << 10, 1u8), (SPARE_MIN - 200, 2), (10, 3)];
        let writer = tokio::spawn(async move {
            for (n, tag) in sizes {
                write_frame(&mut client, &frame(n, tag)).await.unwrap();
            }
            client
        });
        let mut held = Vec::new();
        for (n, tag) in sizes {
            let f = read_tagged(&mut reader, n, tag).await;
            let end = f.payload.as_ptr() as usize + n;
            let split = end == reader.buf.as_ptr() as usize;
            assert_eq!(split, n < SPARE_MIN, "frame {tag} of {n} bytes");
            held.push(f);
        }
        drop(writer.await.unwrap());
    }

    /// A large body read into a buffer that a longer, dropped one used
    /// holds its own bytes only, at its own length.
    #[tokio::test]
    async fn a_recycled_buffer_carries_the_next_body_whole() {
        let (mut client, mut reader, _fd, _wr) = connected().await;
        let writer = tokio::spawn(async move {
            for (n, tag) in [(3 << 20, 1u8), (2 << 20, 2), (2 << 20, 3)] {
                write_frame(&mut client, &frame(n, tag)).await.unwrap();
            }
            client
        });
        for (n, tag) in [(3 << 20, 1u8), (2 << 20, 2), (2 << 20, 3)] {
            // Dropped at once: the next frame may be read into its buffer.
            drop(read_tagged(&mut reader, n, tag).await);
        }
        drop(writer.await.unwrap());
    }

    /// A raised read that waits longer than `MARK_PATIENCE` (here: the
    /// peer pauses mid-body) reads on with a mark of 1, for good on that
    /// link; the frame still arrives whole.
    #[tokio::test]
    async fn a_raised_read_that_waits_falls_back_to_a_mark_of_one() {
        let (mut client, mut reader, fd, _wr) = connected().await;
        let bytes = frame(3 << 20, 5).encode();
        let half = bytes.len() / 2;
        let writer = tokio::spawn(async move {
            client.write_all(&bytes[..half]).await.unwrap();
            tokio::time::sleep(MARK_PATIENCE * 4).await;
            client.write_all(&bytes[half..]).await.unwrap();
            client
        });
        let f = tokio::time::timeout(Duration::from_secs(10), reader.read())
            .await
            .expect("the frame did not arrive")
            .unwrap();
        assert_eq!(f.payload.len(), 3 << 20);
        assert!(f.payload.iter().all(|&b| b == 5));
        assert!(reader.socket.is_none(), "the link still raises its mark");
        assert_eq!(low_water_of(fd), 1);
        drop(writer.await.unwrap());
    }
}
