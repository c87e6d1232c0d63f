//! Frames: encoding, and a decoder that bounds everything it reads.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// "PSKV" read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"PSKV");
/// The version this code speaks: 2 since the status and clock messages
/// (`Stats`, `StatusQuery`, `Status`, `BarrierMissed`, `Clock`), 3 since
/// `LeaveAck` (a node of version 2 would not decode it, and a new node
/// would wait out its shutdown grace for an answer an old scheduler never
/// sends); a node of another version is refused at its first frame,
/// naming both versions.
pub const VERSION: u8 = 3;
/// Bytes in the fixed header.
pub const HEADER_LEN: usize = 64;

/// What a frame is.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Cluster control (registration, barriers, heartbeats, ...): the meta
    /// holds a [`crate::wire::Control`]; no keys, no payload.
    Control = 1,
    /// A key/value or command request.
    Request = 2,
    /// The answer to a request.
    Response = 3,
    /// Acknowledges `msg_id` (resend mode); nothing else.
    Ack = 4,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Control,
            2 => Kind::Request,
            3 => Kind::Response,
            4 => Kind::Ack,
            _ => return None,
        })
    }
}

/// Frame flags.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flags(pub u16);

impl Flags {
    /// A request carries values to store (push).
    pub const PUSH: Flags = Flags(1);
    /// A request wants values back (pull).
    pub const PULL: Flags = Flags(2);
    /// A response reports an error (the meta holds its text).
    pub const ERROR: Flags = Flags(4);
    /// The sender wants an acknowledgement (resend mode).
    pub const NEEDS_ACK: Flags = Flags(8);
    /// A request without keys that carries a command body in the meta.
    pub const COMMAND: Flags = Flags(16);
    /// A request that timed out, as its sender's resends carry it from
    /// then on (resend mode): its message number only, so the receiver's
    /// count of numbers has no gap; the receiver acknowledges and drops it.
    pub const VOID: Flags = Flags(32);
    const ALL: u16 = 63;

    /// Whether every flag of `other` is set.
    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        Flags(self.0 | rhs.0)
    }
}

/// Bounds the decoder enforces before allocating.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Keys per frame.
    pub max_keys: u32,
    /// Bytes of metadata per frame.
    pub max_meta: u32,
    /// Bytes of payload per frame.
    pub max_payload: u64,
}

impl Default for Limits {
    /// 1 Mi keys, 16 MiB of metadata, 2 GiB of payload.
    fn default() -> Self {
        Limits {
            max_keys: 1 << 20,
            max_meta: 16 << 20,
            max_payload: 2 << 30,
        }
    }
}

impl Limits {
    /// The limits of the authentication handshake: tiny frames only.
    pub const HANDSHAKE: Limits = Limits {
        max_keys: 0,
        max_meta: 1024,
        max_payload: 0,
    };
}

/// Everything that can be wrong with a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The first four bytes are not "PSKV": not a pskv peer, or a stream that
    /// lost its framing.
    #[error("bad magic {0:#010x}: not a pskv frame")]
    BadMagic(u32),
    /// A version this build does not speak.
    #[error("unsupported wire version {got} (this build speaks {VERSION})")]
    UnsupportedVersion {
        /// The version in the header.
        got: u8,
    },
    /// An unknown frame kind.
    #[error("unknown frame kind {0}")]
    BadKind(u8),
    /// Flags this version does not define.
    #[error("unknown flags {0:#06x}")]
    BadFlags(u16),
    /// The reserved header field is not zero.
    #[error("reserved header bytes are not zero")]
    Reserved,
    /// A length above the configured limit.
    #[error("{what} {got} exceeds the limit {max}")]
    TooLarge {
        /// Which length.
        what: &'static str,
        /// The length claimed.
        got: u64,
        /// The limit.
        max: u64,
    },
    /// The buffer ended before the frame did.
    #[error("frame truncated: {need} bytes needed, {got} present")]
    Truncated {
        /// Bytes the header announced.
        need: usize,
        /// Bytes present.
        got: usize,
    },
    /// Keys must be strictly ascending.
    #[error("keys are not strictly ascending at index {index}")]
    KeysNotSorted {
        /// The first key out of order.
        index: usize,
    },
    /// The per-key lengths do not add up to the payload.
    #[error("key lengths add up to {sum} bytes but the payload has {payload}")]
    LensMismatch {
        /// Sum of the lengths.
        sum: u64,
        /// Payload bytes.
        payload: u64,
    },
    /// A field that must be empty for this kind is not.
    #[error("a {kind:?} frame must not carry {what}")]
    Unexpected {
        /// The frame kind.
        kind: Kind,
        /// What it carried.
        what: &'static str,
    },
    /// A control body that does not decode.
    #[error("bad control body: {0}")]
    BadControl(String),
}

/// A decoded header.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The frame kind.
    pub kind: Kind,
    /// Flags.
    pub flags: Flags,
    /// Sending node.
    pub sender: u32,
    /// Receiving node.
    pub recipient: u32,
    /// Per-sender message id (resend and acknowledgement).
    pub msg_id: u64,
    /// Matches a response to its request.
    pub request_id: u64,
    /// Application command.
    pub cmd: i32,
    /// Priority: higher is sent first.
    pub priority: i32,
    /// Number of keys.
    pub nkeys: u32,
    /// Metadata bytes.
    pub meta_len: u32,
    /// Payload bytes.
    pub payload_len: u64,
}

impl Header {
    /// Bytes after the header: keys, lengths, meta and payload.
    pub fn body_len(&self) -> u64 {
        // Cannot overflow: nkeys < 2^32, meta < 2^32, payload checked against
        // limits first by the decoder (and at most u64::MAX / 2 in any case).
        self.nkeys as u64 * 12 + self.meta_len as u64 + self.payload_len
    }
}

/// Decodes and checks the fixed header (64 bytes).
pub fn decode_header(head: &[u8], limits: &Limits) -> Result<Header, WireError> {
    if head.len() < HEADER_LEN {
        return Err(WireError::Truncated {
            need: HEADER_LEN,
            got: head.len(),
        });
    }
    let mut b = &head[..HEADER_LEN];
    let magic = b.get_u32_le();
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    let version = b.get_u8();
    if version != VERSION {
        return Err(WireError::UnsupportedVersion { got: version });
    }
    let kind_raw = b.get_u8();
    let kind = Kind::from_u8(kind_raw).ok_or(WireError::BadKind(kind_raw))?;
    let flags = b.get_u16_le();
    if flags & !Flags::ALL != 0 {
        return Err(WireError::BadFlags(flags));
    }
    let h = Header {
        kind,
        flags: Flags(flags),
        sender: b.get_u32_le(),
        recipient: b.get_u32_le(),
        msg_id: b.get_u64_le(),
        request_id: b.get_u64_le(),
        cmd: b.get_i32_le(),
        priority: b.get_i32_le(),
        nkeys: b.get_u32_le(),
        meta_len: b.get_u32_le(),
        payload_len: b.get_u64_le(),
    };
    if b.get_u64_le() != 0 {
        return Err(WireError::Reserved);
    }
    let too_large = |what, got: u64, max: u64| WireError::TooLarge { what, got, max };
    if h.nkeys > limits.max_keys {
        return Err(too_large(
            "key count",
            h.nkeys as u64,
            limits.max_keys as u64,
        ));
    }
    if h.meta_len > limits.max_meta {
        return Err(too_large(
            "meta length",
            h.meta_len as u64,
            limits.max_meta as u64,
        ));
    }
    if h.payload_len > limits.max_payload {
        return Err(too_large(
            "payload length",
            h.payload_len,
            limits.max_payload,
        ));
    }
    match h.kind {
        Kind::Control | Kind::Ack if h.nkeys != 0 => {
            return Err(WireError::Unexpected { kind, what: "keys" })
        }
        Kind::Control | Kind::Ack if h.payload_len != 0 => {
            return Err(WireError::Unexpected {
                kind,
                what: "a payload",
            })
        }
        Kind::Ack if h.meta_len != 0 => {
            return Err(WireError::Unexpected {
                kind,
                what: "metadata",
            })
        }
        _ => {}
    }
    Ok(h)
}

/// Decodes a whole frame held in one buffer (header, then body), checking
/// every length against `limits`: how the vans that receive whole records
/// (shared memory, RDMA) read them. The body is sliced, not copied.
pub fn decode_frame(bytes: Bytes, limits: &Limits) -> Result<Frame, WireError> {
    if bytes.len() < HEADER_LEN {
        return Err(WireError::Truncated {
            need: HEADER_LEN,
            got: bytes.len(),
        });
    }
    let h = decode_header(&bytes[..HEADER_LEN], limits)?;
    decode_body(h, bytes.slice(HEADER_LEN..))
}

/// Splits a body (exactly `header.body_len()` bytes, received into one
/// buffer) into a frame. The payload and meta are slices of `body`: no copy.
pub fn decode_body(h: Header, body: Bytes) -> Result<Frame, WireError> {
    decode(h, body, false)
}

/// Decodes the body of a frame whose payload was received elsewhere (a
/// `Landing`): `head` holds the keys, lengths and meta; the frame's payload
/// is empty, and the lengths must add up to the header's payload length.
pub(crate) fn decode_body_landed(h: Header, head: Bytes) -> Result<Frame, WireError> {
    decode(h, head, true)
}

fn decode(h: Header, body: Bytes, landed: bool) -> Result<Frame, WireError> {
    let need = if landed {
        h.body_len() - h.payload_len
    } else {
        h.body_len()
    };
    if (body.len() as u64) != need {
        return Err(WireError::Truncated {
            need: need as usize,
            got: body.len(),
        });
    }
    let n = h.nkeys as usize;
    let mut b = &body[..];
    let mut keys = Vec::with_capacity(n);
    for i in 0..n {
        let k = b.get_u64_le();
        if i > 0 && k <= keys[i - 1] {
            return Err(WireError::KeysNotSorted { index: i });
        }
        keys.push(k);
    }
    let mut lens = Vec::with_capacity(n);
    let mut sum = 0u64;
    for _ in 0..n {
        let l = b.get_u32_le();
        sum += l as u64;
        lens.push(l);
    }
    let meta_at = n * 12;
    let payload_at = meta_at + h.meta_len as usize;
    let meta = body.slice(meta_at..payload_at);
    let payload = if landed {
        Bytes::new()
    } else {
        body.slice(payload_at..)
    };
    let must_add_up = match h.kind {
        Kind::Request => h.flags.contains(Flags::PUSH),
        Kind::Response => !h.flags.contains(Flags::ERROR) && n > 0,
        _ => false,
    };
    if must_add_up && sum != h.payload_len {
        return Err(WireError::LensMismatch {
            sum,
            payload: h.payload_len,
        });
    }
    Ok(Frame {
        kind: h.kind,
        flags: h.flags,
        sender: h.sender,
        recipient: h.recipient,
        msg_id: h.msg_id,
        request_id: h.request_id,
        cmd: h.cmd,
        priority: h.priority,
        keys,
        lens,
        meta,
        payload,
    })
}

/// A whole message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// What it is.
    pub kind: Kind,
    /// Flags.
    pub flags: Flags,
    /// Sending node.
    pub sender: u32,
    /// Receiving node.
    pub recipient: u32,
    /// Per-sender message id.
    pub msg_id: u64,
    /// Matches a response to its request.
    pub request_id: u64,
    /// Application command.
    pub cmd: i32,
    /// Priority: higher is sent first.
    pub priority: i32,
    /// Keys, strictly ascending.
    pub keys: Vec<u64>,
    /// Bytes of each key's value in the payload.
    pub lens: Vec<u32>,
    /// Metadata.
    pub meta: Bytes,
    /// Payload (values, concatenated in key order).
    pub payload: Bytes,
}

impl Frame {
    /// An empty frame of `kind`.
    pub fn new(kind: Kind) -> Frame {
        Frame {
            kind,
            flags: Flags::default(),
            sender: 0,
            recipient: 0,
            msg_id: 0,
            request_id: 0,
            cmd: 0,
            priority: 0,
            keys: Vec::new(),
            lens: Vec::new(),
            meta: Bytes::new(),
            payload: Bytes::new(),
        }
    }

    /// The header, keys, lengths and meta, ready to be written; the payload
    /// is written after it from its own buffer (a vectored write, no copy).
    pub fn encode_head(&self) -> BytesMut {
        let mut out = BytesMut::with_capacity(self.head_len());
        self.encode_head_into(&mut out);
        out
    }

    /// The header's length on the wire (with the keys, lengths and meta).
    pub fn head_len(&self) -> usize {
        HEADER_LEN + self.keys.len() * 12 + self.meta.len()
    }

    /// Appends the header to `out` (a sender's reused buffer: no
    /// allocation per frame once it is large enough).
    pub fn encode_head_into(&self, out: &mut impl BufMut) {
        out.put_u32_le(MAGIC);
        out.put_u8(VERSION);
        out.put_u8(self.kind as u8);
        out.put_u16_le(self.flags.0);
        out.put_u32_le(self.sender);
        out.put_u32_le(self.recipient);
        out.put_u64_le(self.msg_id);
        out.put_u64_le(self.request_id);
        out.put_i32_le(self.cmd);
        out.put_i32_le(self.priority);
        out.put_u32_le(self.keys.len() as u32);
        out.put_u32_le(self.meta.len() as u32);
        out.put_u64_le(self.payload.len() as u64);
        out.put_u64_le(0);
        for k in &self.keys {
            out.put_u64_le(*k);
        }
        for l in &self.lens {
            out.put_u32_le(*l);
        }
        out.put_slice(&self.meta);
    }

    /// Header, body and payload in one buffer (tests, the fuzzer, small frames).
    pub fn encode(&self) -> Bytes {
        let mut out = self.encode_head();
        out.put_slice(&self.payload);
        out.freeze()
    }

    /// Total bytes on the wire.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.keys.len() * 12 + self.meta.len() + self.payload.len()
    }
}

/// A streaming decoder over a byte buffer: feed bytes, take whole frames.
/// The vans read the header, then the body straight into one buffer; this
/// form serves the fuzzer, the tests and byte-stream vans.
#[derive(Debug)]
pub struct Decoder {
    limits: Limits,
    header: Option<Header>,
}

impl Decoder {
    /// A decoder enforcing `limits`.
    pub fn new(limits: Limits) -> Decoder {
        Decoder {
            limits,
            header: None,
        }
    }

    /// The next frame in `buf` (consumed from it), None if more bytes are
    /// needed. After an error the stream is unusable: close it.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        let h = match self.header {
            Some(h) => h,
            None => {
                if buf.len() < HEADER_LEN {
                    return Ok(None);
                }
                let h = decode_header(&buf[..HEADER_LEN], &self.limits)?;
                buf.advance(HEADER_LEN);
                self.header = Some(h);
                h
            }
        };
        let need = h.body_len();
        if (buf.len() as u64) < need {
            // Never reserve what the header merely claims: the caller grows
            // the buffer as bytes actually arrive.
            return Ok(None);
        }
        self.header = None;
        let body = buf.split_to(need as usize).freeze();
        decode_body(h, body).map(Some)
    }
}

#[cfg(test)]
mod tests;
