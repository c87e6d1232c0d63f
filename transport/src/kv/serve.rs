//! A server's half of key/value messaging: a request as it arrives
//! ([`KvRequest`]), the handler it goes to, and the [`Responder`] that
//! answers it once (or says it was dropped unanswered).

use std::sync::Arc;

use bytes::Bytes;

use super::check_kv;
use crate::link::Link;
use crate::postoffice::Inner;
use crate::protocol::{role_rank, NodeId, Role};
use crate::wire::{Flags, Frame, Kind};

/// A request as a server receives it.
#[derive(Debug, Clone)]
pub struct KvRequest {
    /// The node that sent it.
    pub sender: NodeId,
    /// Application command id.
    pub cmd: i32,
    /// Its priority.
    pub priority: i32,
    /// It carries values to store.
    pub push: bool,
    /// It wants values back.
    pub pull: bool,
    /// It is a command (`KvWorker::request`): no keys; the body is `body`.
    pub command: bool,
    /// Keys, strictly ascending, all within this server's range.
    pub keys: Vec<u64>,
    /// Bytes of each key's value in `vals` (for a pull: what the worker
    /// expects, or zeros).
    pub lens: Vec<u32>,
    /// The values, concatenated in key order (push).
    pub vals: Bytes,
    /// A command's body.
    pub body: Bytes,
    /// A data request's application number
    /// ([`RequestOptions::tag`](super::RequestOptions::tag)).
    pub tag: u64,
}

impl KvRequest {
    pub(crate) fn from_frame(f: Frame) -> KvRequest {
        KvRequest {
            sender: f.sender,
            cmd: f.cmd,
            priority: f.priority,
            push: f.flags.contains(Flags::PUSH),
            pull: f.flags.contains(Flags::PULL),
            command: f.flags.contains(Flags::COMMAND),
            tag: if f.flags.contains(Flags::COMMAND) {
                0
            } else {
                <[u8; 8]>::try_from(&f.meta[..]).map_or(0, u64::from_le_bytes)
            },
            keys: f.keys,
            lens: f.lens,
            vals: f.payload,
            body: f.meta,
        }
    }

    /// The sender's rank among the workers, if it is a worker.
    pub fn worker_rank(&self) -> Option<u32> {
        match role_rank(self.sender) {
            Some((Role::Worker, r)) => Some(r),
            _ => None,
        }
    }
}

/// Answers one request, now or later, from any thread. Dropping it without
/// answering sends an error answer, so the worker never waits for nothing.
pub struct Responder {
    inner: Arc<Inner>,
    link: Arc<Link>,
    request_id: u64,
    recipient: NodeId,
    cmd: i32,
    priority: i32,
    done: bool,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder")
            .field("request_id", &self.request_id)
            .field("recipient", &self.recipient)
            .finish()
    }
}

impl Responder {
    pub(crate) fn new(inner: Arc<Inner>, link: Arc<Link>, req: &Frame) -> Responder {
        Responder {
            inner,
            link,
            request_id: req.request_id,
            recipient: req.sender,
            cmd: req.cmd,
            priority: req.priority,
            done: false,
        }
    }

    fn frame(&self) -> Frame {
        let mut f = Frame::new(Kind::Response);
        f.request_id = self.request_id;
        f.sender = self.inner.my_id();
        f.recipient = self.recipient;
        f.cmd = self.cmd;
        f.priority = self.priority;
        f
    }

    fn send(mut self, f: Frame) {
        self.done = true;
        crate::trace::record(
            crate::trace::Hop::AnswerOut,
            self.inner.my_id(),
            self.recipient,
            self.request_id,
        );
        // A closed link: the requester is gone or will learn of the failure.
        let _ = self.inner.send_on(&self.link, f);
    }

    /// Answers with values: `keys` ascending, `lens` their byte lengths in
    /// `vals`. Bad arguments turn into an error answer.
    pub fn respond(self, keys: Vec<u64>, lens: Vec<u32>, vals: Bytes) {
        if let Err(e) = check_kv(&keys, &lens, vals.len()) {
            self.error(format!("the server built a bad answer: {e}"));
            return;
        }
        let mut f = self.frame();
        f.keys = keys;
        f.lens = lens;
        f.payload = vals;
        self.send(f);
    }

    /// Answers with no values (a push or a command done).
    pub fn ok(self) {
        let f = self.frame();
        self.send(f);
    }

    /// Answers with an error message: the request fails on the worker with
    /// this message and the server's name.
    pub fn error(self, message: impl Into<String>) {
        let mut f = self.frame();
        f.flags = Flags::ERROR;
        f.meta = Bytes::from(message.into());
        self.send(f);
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if !self.done {
            self.done = true;
            let mut f = self.frame();
            f.flags = Flags::ERROR;
            f.meta = Bytes::from_static(b"the server dropped the request without answering");
            let _ = self.inner.send_on(&self.link, f);
        }
    }
}

/// What a server handles requests with.
pub trait RequestHandler: Send + Sync + 'static {
    /// Handles one request; answer through `responder` (now or later). Runs
    /// on an I/O thread: hand long work to another thread.
    fn handle(&self, request: KvRequest, responder: Responder);
}

impl<F> RequestHandler for F
where
    F: Fn(KvRequest, Responder) + Send + Sync + 'static,
{
    fn handle(&self, request: KvRequest, responder: Responder) {
        self(request, responder)
    }
}

/// Convenience for tests and examples: an answer body from a responder.
impl Responder {
    /// Answers a command with a body.
    pub fn reply_body(self, body: Bytes) {
        let mut f = self.frame();
        f.meta = body;
        self.send(f);
    }
}
