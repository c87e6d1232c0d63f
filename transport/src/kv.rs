//! Key/value messaging on top of the postoffice: a worker's push, pull,
//! push-pull and command requests, split by server key range and completed
//! once every involved server answered; a server's handler and responder
//! in `serve.rs`.
//!
//! Payloads are `Bytes`: a request's values are sliced per server without a
//! copy; what a server receives is a slice of the one buffer the frame was
//! read into; a response's parts are handed to the caller as received.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use smallvec::SmallVec;

mod serve;

pub use serve::{KvRequest, RequestHandler, Responder};

use crate::error::TransportError;
use crate::landing::Landing;
use crate::postoffice::{Inner, Postoffice};
use crate::protocol::{describe, Group, NodeId, Role};
use crate::slot::{Slot, SlotFuture};
use crate::wire::{Flags, Frame, Kind};

/// What a request completes with inside the transport.
pub(crate) type Callback =
    Box<dyn FnOnce(Result<Vec<(NodeId, Frame)>, TransportError>) + Send + 'static>;

/// Options of a request.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestOptions {
    /// Application command id (the kvstore's data type, compression, ...).
    pub cmd: i32,
    /// Priority: the request's frames leave before those of lower priority
    /// queued on the same connection.
    pub priority: i32,
    /// Send every key to this node, whatever the key ranges say (the
    /// backup of a dead server, or another server); None: by key range.
    pub target: Option<NodeId>,
    /// An application number carried with a data request
    /// ([`KvRequest::tag`]; 0: none), e.g. which round a push belongs to.
    pub tag: u64,
    /// The request fails (`TrackError::TimedOut`, naming the nodes that
    /// did not answer) if not answered within this; None: it waits for
    /// its answers, a death or a broken link (`Pending::wait` takes a
    /// timeout of its own).
    pub timeout: Option<Duration>,
}

/// The answer to a request: keys, their lengths, and the values as the
/// servers sent them (one part per server, in key order).
#[derive(Debug, Clone, Default)]
pub struct KvResponse {
    /// Keys answered, ascending.
    pub keys: Vec<u64>,
    /// Bytes of each key's value.
    pub lens: Vec<u32>,
    /// The values, one part per answering server, in key order.
    pub parts: Vec<Bytes>,
    /// Command answers: each target's id and answer body.
    pub bodies: Vec<(NodeId, Bytes)>,
}

impl KvResponse {
    /// Total bytes of values.
    pub fn len(&self) -> usize {
        self.parts.iter().map(Bytes::len).sum()
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies every value, in key order, into `out` (which must be exactly
    /// `len()` bytes).
    pub fn copy_to(&self, out: &mut [u8]) -> Result<(), TransportError> {
        if out.len() != self.len() {
            return Err(TransportError::Invalid(format!(
                "the answer has {} bytes of values, the buffer {}",
                self.len(),
                out.len()
            )));
        }
        let mut at = 0;
        for p in &self.parts {
            crate::copy::copy(&mut out[at..at + p.len()], p);
            at += p.len();
        }
        Ok(())
    }

    /// All values in one buffer (one copy if several servers answered).
    pub fn to_bytes(&self) -> Bytes {
        match self.parts.len() {
            0 => Bytes::new(),
            1 => self.parts[0].clone(),
            _ => {
                let mut v = BytesMut::with_capacity(self.len());
                for p in &self.parts {
                    crate::copy::extend(&mut v, p);
                }
                v.freeze()
            }
        }
    }
}

/// A request in flight: wait for it (with a timeout) or await it.
#[must_use = "a request's result says whether it worked"]
pub struct Pending {
    slot: Arc<Slot<Result<KvResponse, TransportError>>>,
    what: String,
}

impl Pending {
    /// Blocks until the request completes, or `timeout` passes.
    pub fn wait(self, timeout: Duration) -> Result<KvResponse, TransportError> {
        self.slot.wait(timeout).unwrap_or_else(|| {
            Err(TransportError::Timeout {
                what: self.what.clone(),
                after: timeout,
            })
        })
    }

    /// Whether it completed.
    pub fn is_done(&self) -> bool {
        self.slot.is_set()
    }
}

impl Future for Pending {
    type Output = Result<KvResponse, TransportError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut f = SlotFuture(self.slot.clone());
        match Pin::new(&mut f).poll(cx) {
            Poll::Ready(Some(r)) => Poll::Ready(r),
            Poll::Ready(None) => Poll::Ready(Err(TransportError::NotRunning(
                "the request was already taken".into(),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Checks keys (strictly ascending, below `u64::MAX`), lengths and total.
fn check_kv(keys: &[u64], lens: &[u32], total: usize) -> Result<(), TransportError> {
    if lens.len() != keys.len() {
        return Err(TransportError::Invalid(format!(
            "{} keys but {} lengths",
            keys.len(),
            lens.len()
        )));
    }
    if let Some(i) = keys.windows(2).position(|w| w[0] >= w[1]) {
        return Err(TransportError::Invalid(format!(
            "keys must be strictly ascending: key {} at index {} follows {}",
            keys[i + 1],
            i + 1,
            keys[i]
        )));
    }
    if keys.last() == Some(&u64::MAX) {
        return Err(TransportError::Invalid(
            "key u64::MAX belongs to no server".into(),
        ));
    }
    let sum: u64 = lens.iter().map(|&l| l as u64).sum();
    if sum != total as u64 {
        return Err(TransportError::Invalid(format!(
            "the lengths add up to {sum} bytes but the values are {total} bytes"
        )));
    }
    Ok(())
}

/// One server's part of a request: its node, keys, their lengths and
/// values.
type ServerPart = (NodeId, Vec<u64>, Vec<u32>, Bytes);

/// A worker's side of key/value messaging.
///
/// ```no_run
/// use pskv_transport::{Config, KvWorker, Postoffice, RequestOptions, Role};
/// use std::time::Duration;
/// let po = Postoffice::start(Config::from_env()?, None)?;
/// let kv = KvWorker::new(&po);
/// let vals = bytes::Bytes::from(vec![0u8; 8]);
/// kv.push(&[3, 9], &[4, 4], vals, RequestOptions::default())?.wait(Duration::from_secs(30))?;
/// let got = kv.pull(&[3, 9], RequestOptions::default())?.wait(Duration::from_secs(30))?;
/// assert_eq!(got.len(), 8);
/// # Ok::<(), pskv_transport::TransportError>(())
/// ```
#[derive(Clone)]
pub struct KvWorker {
    po: Postoffice,
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KvWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvWorker")
            .field("id", &self.po.my_id())
            .finish()
    }
}

impl KvWorker {
    /// The key/value side of a node.
    pub fn new(po: &Postoffice) -> KvWorker {
        KvWorker {
            po: po.clone(),
            inner: po.inner_arc(),
        }
    }

    /// The postoffice underneath.
    pub fn postoffice(&self) -> &Postoffice {
        &self.po
    }

    /// Splits keys (ascending) and their values by server key range: one
    /// part per run of keys of one server. Keys of one server (every
    /// request of the kvstore's parts) take the values whole: no slice of
    /// them is taken (a slice of a `Bytes` made from a `Vec` allocates a
    /// shared header), and no list of the ranges is made.
    fn split(&self, keys: &[u64], lens: &[u32], mut vals: Bytes) -> SmallVec<[ServerPart; 1]> {
        let servers = self.po.num_servers();
        let server = |k: u64| crate::protocol::server_of_key(k, servers);
        let mut out = SmallVec::new();
        let mut offset = 0usize;
        let mut lo = 0usize;
        while lo < keys.len() {
            let rank = server(keys[lo]);
            // Ascending keys: a server's keys are one run.
            let hi = lo + keys[lo..].partition_point(|&k| server(k) == rank);
            let part_lens = lens[lo..hi].to_vec();
            let part_vals = if lo == 0 && hi == keys.len() {
                std::mem::take(&mut vals)
            } else if vals.is_empty() {
                Bytes::new()
            } else {
                let bytes: usize = part_lens.iter().map(|&l| l as usize).sum();
                offset += bytes;
                vals.slice(offset - bytes..offset)
            };
            out.push((
                Role::Server.id_of(rank),
                keys[lo..hi].to_vec(),
                part_lens,
                part_vals,
            ));
            lo = hi;
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn kv_request(
        &self,
        keys: &[u64],
        lens: &[u32],
        vals: Bytes,
        flags: Flags,
        opts: RequestOptions,
        landing: Option<Arc<Landing>>,
        callback: impl FnOnce(Result<KvResponse, TransportError>) + Send + 'static,
    ) -> Result<(), TransportError> {
        if keys.is_empty() {
            return Err(TransportError::Invalid(
                "a request needs at least one key".into(),
            ));
        }
        let total = if flags.contains(Flags::PUSH) {
            vals.len()
        } else {
            lens.iter().map(|&l| l as usize).sum()
        };
        check_kv(keys, lens, total)?;
        let limit = self.inner.cfg.limits.max_payload;
        if vals.len() as u64 > limit {
            return Err(TransportError::Invalid(format!(
                "{} bytes of values exceed the message limit of {limit} bytes (PSKV_MAX_MESSAGE_BYTES)",
                vals.len()
            )));
        }
        let parts = match opts.target {
            Some(node) => smallvec::smallvec![(node, keys.to_vec(), lens.to_vec(), vals)],
            None => self.split(keys, lens, vals),
        };
        let pull = flags.contains(Flags::PULL);
        // What a pull's answers must name: each target's keys (a few, for
        // the kvstore's parts: kept inline).
        let expect: SmallVec<[(NodeId, SmallVec<[u64; 4]>); 1]> = parts
            .iter()
            .map(|(n, k, _, _)| {
                let keys = if pull {
                    SmallVec::from_slice(k)
                } else {
                    SmallVec::new()
                };
                (*n, keys)
            })
            .collect();
        let frames = parts
            .into_iter()
            .map(|(node, keys, lens, vals)| {
                let mut f = Frame::new(Kind::Request);
                f.flags = flags;
                f.cmd = opts.cmd;
                f.priority = opts.priority;
                f.keys = keys;
                f.lens = lens;
                f.payload = vals;
                if opts.tag != 0 {
                    f.meta = Bytes::copy_from_slice(&opts.tag.to_le_bytes());
                }
                (node, f)
            })
            .collect();
        self.inner.request(
            frames,
            opts.timeout,
            landing,
            Box::new(move |r| {
                callback(r.and_then(|answers| {
                    let mut resp = KvResponse::default();
                    let one = answers.len() == 1;
                    for ((node, f), (want_node, want_keys)) in answers.into_iter().zip(expect) {
                        debug_assert_eq!(node, want_node);
                        if pull && f.keys[..] != want_keys[..] {
                            return Err(TransportError::Invalid(format!(
                                "{} answered keys {:?} to a pull of {:?}",
                                describe(node),
                                f.keys,
                                want_keys
                            )));
                        }
                        if one {
                            // The answer's own lists: nothing copied.
                            resp.keys = f.keys;
                            resp.lens = f.lens;
                        } else {
                            resp.keys.extend_from_slice(&f.keys);
                            resp.lens.extend_from_slice(&f.lens);
                        }
                        resp.parts.push(f.payload);
                    }
                    Ok(resp)
                }))
            }),
        )
    }

    fn pending(
        what: String,
    ) -> (
        Pending,
        impl FnOnce(Result<KvResponse, TransportError>) + Send + 'static,
    ) {
        let slot = Slot::new();
        let s2 = slot.clone();
        (Pending { slot, what }, move |r| {
            s2.set(r);
        })
    }

    /// Pushes values: `lens[i]` bytes of `vals` for `keys[i]` (ascending).
    pub fn push(
        &self,
        keys: &[u64],
        lens: &[u32],
        vals: Bytes,
        opts: RequestOptions,
    ) -> Result<Pending, TransportError> {
        let (p, cb) = Self::pending(format!("a push of {} keys", keys.len()));
        self.kv_request(keys, lens, vals, Flags::PUSH, opts, None, cb)?;
        Ok(p)
    }

    /// Pulls the values of `keys` (ascending).
    pub fn pull(&self, keys: &[u64], opts: RequestOptions) -> Result<Pending, TransportError> {
        let (p, cb) = Self::pending(format!("a pull of {} keys", keys.len()));
        let lens = vec![0u32; keys.len()];
        self.kv_request(keys, &lens, Bytes::new(), Flags::PULL, opts, None, cb)?;
        Ok(p)
    }

    /// Pushes values and pulls the keys' values back in one round trip.
    pub fn push_pull(
        &self,
        keys: &[u64],
        lens: &[u32],
        vals: Bytes,
        opts: RequestOptions,
    ) -> Result<Pending, TransportError> {
        let (p, cb) = Self::pending(format!("a push-pull of {} keys", keys.len()));
        self.kv_request(keys, lens, vals, Flags::PUSH | Flags::PULL, opts, None, cb)?;
        Ok(p)
    }

    /// As [`KvWorker::push`], calling `done` instead (on an I/O thread).
    pub fn push_with(
        &self,
        keys: &[u64],
        lens: &[u32],
        vals: Bytes,
        opts: RequestOptions,
        done: impl FnOnce(Result<KvResponse, TransportError>) + Send + 'static,
    ) -> Result<(), TransportError> {
        self.kv_request(keys, lens, vals, Flags::PUSH, opts, None, done)
    }

    /// As [`KvWorker::pull`], calling `done` instead (on an I/O thread).
    /// With `landing` (a pull from one server), the answer's values may be
    /// received straight into it: then [`Landing::is_filled`] holds when
    /// `done` runs and the answer carries no values of its own.
    pub fn pull_with(
        &self,
        keys: &[u64],
        opts: RequestOptions,
        landing: Option<Arc<Landing>>,
        done: impl FnOnce(Result<KvResponse, TransportError>) + Send + 'static,
    ) -> Result<(), TransportError> {
        let lens = vec![0u32; keys.len()];
        self.kv_request(keys, &lens, Bytes::new(), Flags::PULL, opts, landing, done)
    }

    /// As [`KvWorker::push_pull`], calling `done` instead (on an I/O
    /// thread); `landing` as in [`KvWorker::pull_with`].
    pub fn push_pull_with(
        &self,
        keys: &[u64],
        lens: &[u32],
        vals: Bytes,
        opts: RequestOptions,
        landing: Option<Arc<Landing>>,
        done: impl FnOnce(Result<KvResponse, TransportError>) + Send + 'static,
    ) -> Result<(), TransportError> {
        self.kv_request(
            keys,
            lens,
            vals,
            Flags::PUSH | Flags::PULL,
            opts,
            landing,
            done,
        )
    }

    /// Sends command `cmd` with `body` to every node of `group` except this
    /// one (servers and/or workers); completes when all answered. The
    /// answers' bodies are in `KvResponse::bodies`.
    pub fn request(&self, cmd: i32, body: Bytes, group: Group) -> Result<Pending, TransportError> {
        if !group.is_valid() || group == Group::SCHEDULER {
            return Err(TransportError::Invalid(format!(
                "group {} holds no servers or workers to send a command to",
                group.0
            )));
        }
        let me = self.po.my_id();
        let mut targets = Vec::new();
        if group.has(Role::Server) {
            targets.extend((0..self.po.num_servers()).map(|r| Role::Server.id_of(r)));
        }
        if group.has(Role::Worker) {
            targets.extend((0..self.po.num_workers()).map(|r| Role::Worker.id_of(r)));
        }
        targets.retain(|&t| t != me);
        self.request_nodes(cmd, body, &targets, &format!("group {}", group.0))
    }

    /// Sends command `cmd` with `body` to each of `nodes` (`what` names
    /// them in errors); completes when all answered, as
    /// [`KvWorker::request`].
    pub fn request_nodes(
        &self,
        cmd: i32,
        body: Bytes,
        nodes: &[NodeId],
        what: &str,
    ) -> Result<Pending, TransportError> {
        let targets = nodes.to_vec();
        let (p, cb) = Self::pending(format!("command {cmd} to {what}"));
        if targets.is_empty() {
            cb(Ok(KvResponse::default()));
            return Ok(p);
        }
        let frames = targets
            .into_iter()
            .map(|node| {
                let mut f = Frame::new(Kind::Request);
                f.flags = Flags::COMMAND;
                f.cmd = cmd;
                f.meta = body.clone();
                (node, f)
            })
            .collect();
        self.inner.request(
            frames,
            None,
            None,
            Box::new(move |r| {
                cb(r.map(|answers| KvResponse {
                    bodies: answers.into_iter().map(|(n, f)| (n, f.meta)).collect(),
                    ..KvResponse::default()
                }))
            }),
        )?;
        Ok(p)
    }
}
