//! The wire format: a fixed, versioned 64-byte header, then the keys, the
//! per-key lengths, a metadata blob and the payload.
//!
//! ```text
//!  0  magic "PSKV" (u32 LE 0x564B5350)    32  cmd (i32)
//!  4  version (u8) = 1                    36  priority (i32)
//!  5  kind (u8)                           40  nkeys (u32)
//!  6  flags (u16)                         44  meta_len (u32)
//!  8  sender (u32)                        48  payload_len (u64)
//! 12  recipient (u32)                     56  reserved (u64) = 0
//! 16  msg_id (u64)
//! 24  request_id (u64)
//! 64  keys: nkeys × u64 LE, strictly ascending
//!     lens: nkeys × u32 LE, bytes of each key's value in the payload
//!     meta: meta_len bytes (control body, command body, error text)
//!     payload: payload_len bytes
//! ```
//!
//! The decoder checks every length against [`Limits`] before it allocates
//! anything, never panics, and turns any malformed frame into a
//! [`WireError`]; the connection that sent it is then closed (by the van).

mod control;
mod frame;

pub use control::{Control, NodeInfo, VanId, Vote};
pub(crate) use frame::decode_body_landed;
pub use frame::{
    decode_body, decode_frame, decode_header, Decoder, Flags, Frame, Header, Kind, Limits,
    WireError, HEADER_LEN, MAGIC, VERSION,
};
