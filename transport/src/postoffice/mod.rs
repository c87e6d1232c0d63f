//! The driver: a node's runtime, sockets, links and state machines.
//!
//! `Postoffice` owns a tokio runtime. The protocol state machine (scheduler
//! or member) sits behind one lock; every entry into it (a control frame, a
//! tick of the timer, a barrier call) is followed by `pump`, which takes the
//! messages and events it produced, releases the lock, then sends the
//! messages and acts on the events. Data frames bypass that lock: requests
//! go straight to a link's send queue and responses straight to the request
//! tracker, so the control plane never delays the data plane.
//!
//! Which thread runs what: van reader tasks (runtime threads) call
//! `on_frame`, and so run request handlers and completion callbacks; a
//! blocking API call (`start`, `barrier`, `Pending::wait`) waits on a slot
//! with a timeout. Nothing holds a lock while calling out.
//!
//! Rooms: this file is the node's API and its state (`Inner`); `end.rs`
//! how it ends (in order, killed, or told by the cluster); `start.rs` its
//! start (runtime, listener, state machine, joining); `connect.rs` joining, and both sides of the login handshake and the van
//! negotiation; `control.rs` the timer, the pump, membership and barriers;
//! `data.rs` requests and answers, and the van's frames.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use crate::config::Config;
use crate::error::TransportError;
use crate::kv::{Callback, RequestHandler};
use crate::link::{Link, LinkId};
use crate::protocol::member::Member;
use crate::protocol::resender::Resender;
use crate::protocol::scheduler::Scheduler;
use crate::protocol::tracker::Tracker;
use crate::protocol::{Group, NodeId, Role};
use crate::slot::Slot;
use crate::status::{ClockSync, RoundLog, Traffic};
use crate::van::shm::region::Region;
use crate::van::{rdma, FrameSink};
use crate::wire::{Frame, NodeInfo, VanId, Vote};

mod connect;
mod control;
mod data;
mod end;
mod observe;
mod start;

pub(crate) use connect::host_id;
pub(crate) use connect::{drive as drive_handshake, handshake_error};
pub use control::MissedBarrier;
pub use end::{EndWatcher, NodeEnd};
pub(crate) use observe::hostname;

/// A change in the cluster's membership, as this node learns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeChange {
    /// The scheduler declared the node dead (its connection broke, or it was
    /// silent past the heartbeat timeout).
    Dead(NodeId),
    /// The node restarted and registered again, with the same id.
    Restarted(NodeId),
}

/// Sees every `NodeChange`, on an I/O thread: it must not block.
pub type NodeWatcher = Arc<dyn Fn(NodeChange) + Send + Sync>;

/// Where a barrier wait learns its outcome.
type BarrierSlot = Arc<Slot<Result<(), String>>>;

/// How long the authentication handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections whose handshake may be in progress at once; more are closed
/// at once. A flood of idle connections then costs bounded memory (each
/// waiting handshake holds a task and a read buffer until its timeout),
/// and real peers, which finish their handshake in milliseconds, get
/// through once the flood's connections time out.
const MAX_HANDSHAKES: usize = 256;

enum Ctl {
    Scheduler(Scheduler),
    Member(Member),
}

#[derive(Default)]
struct Links {
    by_id: HashMap<LinkId, Arc<Link>>,
    by_node: HashMap<NodeId, LinkId>,
}

#[derive(Default)]
struct Requests {
    tracker: Tracker<Frame>,
    callbacks: HashMap<u64, Callback>,
    /// Where the answer of a one-node request may land (`Landing`): the
    /// node, and the landing; removed when the request completes.
    landings: HashMap<u64, (NodeId, Arc<crate::landing::Landing>)>,
}

impl Requests {
    /// Forgets a completed request's landing and takes its callback.
    fn take_callback(&mut self, request_id: u64) -> Option<Callback> {
        self.landings.remove(&request_id);
        self.callbacks.remove(&request_id)
    }
}

pub(crate) struct Inner {
    pub(crate) cfg: Config,
    rt: Mutex<Option<tokio::runtime::Runtime>>,
    pub(crate) handle: tokio::runtime::Handle,
    /// The runtime threads' watch of the TCP links before they sleep.
    pub(crate) idle: Arc<crate::van::tcp::IdlePoll>,
    listen: SocketAddr,
    announce: String,
    pub(crate) host_id: u64,
    token: Option<Vec<u8>>,
    ctl: Mutex<Ctl>,
    resender: Option<Mutex<Resender>>,
    links: Mutex<Links>,
    next_link: AtomicU64,
    reqs: Mutex<Requests>,
    /// Frames for nodes a connection is being made to (`data.rs`).
    dialing: Mutex<HashMap<NodeId, Vec<Frame>>>,
    /// The links a waiting thread may read (`progress`), while they last;
    /// replaced whole on a change, so a poll iterates a snapshot without
    /// the lock (a frame it delivers may end a link, which changes this).
    pollers: RwLock<Arc<Pollers>>,
    /// The thread that reads this node's shared-memory links
    /// (`van/shm/group.rs`).
    pub(crate) shm_readers: Arc<crate::van::shm::Readers>,
    /// Wakes the timer task for an earlier timeout (`control.rs`).
    timer: control::Timer,
    handler: RwLock<Option<Arc<dyn RequestHandler>>>,
    joined: Arc<Slot<Result<(), TransportError>>>,
    barriers: Mutex<HashMap<u8, BarrierSlot>>,
    watchers: RwLock<Vec<NodeWatcher>>,
    /// Why this node can no longer take part, once it cannot.
    end: Mutex<Option<NodeEnd>>,
    end_watchers: RwLock<Vec<EndWatcher>>,
    /// The scheduler: every node left or died (`Err` names the dead).
    all_left: Arc<Slot<Result<(), String>>>,
    shutting_down: AtomicBool,
    /// Handshakes in progress (at most `MAX_HANDSHAKES`).
    handshakes: std::sync::atomic::AtomicUsize,
    my_id: AtomicU32,
    me: OnceLock<std::sync::Weak<Inner>>,
    rdma_dev: OnceLock<Result<Arc<dyn rdma::verbs::Device>, crate::van::VanError>>,
    /// When this node started (its snapshots' clock, `status`).
    born: Instant,
    /// What closed links carried (`status`).
    retired: Traffic,
    /// The rounds the layer above reports (`status`).
    rounds: Arc<RoundLog>,
    /// This node's clock against the scheduler's (`status::clock`).
    clock: Mutex<ClockSync>,
    /// The latest failed barrier round this node had not reached.
    missed: MissedBarrier,
}

/// The links a waiting thread may read, by link.
type Pollers = Vec<(LinkId, Arc<dyn crate::van::shm::Poll>)>;

/// A node of the cluster: scheduler, server or worker.
///
/// `start` joins the cluster (the scheduler: starts listening) and returns
/// once this node has its id, the node table and, for a worker, connections
/// to every server. Cloning gives another handle; dropping the last one
/// leaves the cluster in order and stops the node's threads.
#[derive(Clone)]
pub struct Postoffice {
    owner: Arc<Owner>,
}

struct Owner {
    inner: Arc<Inner>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.inner.shutdown(Duration::from_secs(2));
    }
}

impl std::fmt::Debug for Postoffice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postoffice")
            .field("role", &self.role())
            .field("id", &self.my_id())
            .finish()
    }
}

impl Postoffice {
    fn inner(&self) -> &Arc<Inner> {
        &self.owner.inner
    }

    pub(crate) fn inner_arc(&self) -> Arc<Inner> {
        self.owner.inner.clone()
    }

    /// This node's role.
    pub fn role(&self) -> Role {
        self.inner().cfg.role
    }

    /// This node's id.
    pub fn my_id(&self) -> NodeId {
        self.inner().my_id.load(Ordering::Acquire)
    }

    /// This node's rank within its role.
    pub fn my_rank(&self) -> u32 {
        crate::protocol::role_rank(self.my_id()).map_or(0, |(_, r)| r)
    }

    /// Servers in the cluster.
    pub fn num_servers(&self) -> u32 {
        self.inner().cfg.num_servers
    }

    /// Workers in the cluster.
    pub fn num_workers(&self) -> u32 {
        self.inner().cfg.num_workers
    }

    /// Each server's key range `[begin, end)`, by server rank.
    pub fn server_key_ranges(&self) -> Vec<(u64, u64)> {
        crate::protocol::key_ranges(self.num_servers())
    }

    /// Whether this node replaced a dead one (restarted, same rank).
    pub fn is_recovery(&self) -> bool {
        match &*self.inner().ctl.lock() {
            Ctl::Member(m) => m.is_recovery(),
            Ctl::Scheduler(_) => false,
        }
    }

    /// The address this node listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner().listen
    }

    /// Reads what this node's shared-memory links hold now, on the
    /// calling thread, if no other thread is reading them; whether it
    /// handled a frame. For a thread that waits for an answer and spins
    /// meanwhile: the answer is then handled where it is awaited, and the
    /// links' reader threads nap while someone polls (`van/shm/reader.rs`).
    /// Never blocks; answers' callbacks may run inside it.
    pub fn progress(&self) -> bool {
        self.inner().progress()
    }

    /// The calling thread, which polled with [`Postoffice::progress`],
    /// stops (its wait goes to sleep): the links' reader threads read at
    /// once again.
    pub fn progress_leave(&self) {
        self.inner().progress_leave()
    }

    /// [`Postoffice::progress`] (`leave` false) and
    /// [`Postoffice::progress_leave`] (true) as a function that does not
    /// keep the node alive (after the last handle is dropped it does
    /// nothing): for a progress hook (`pskv_engine::progress`).
    pub fn progress_fn(&self) -> impl Fn(bool) -> bool + Send + Sync + 'static {
        let inner = Arc::downgrade(self.inner());
        move |leave| match inner.upgrade() {
            Some(i) if leave => {
                i.progress_leave();
                false
            }
            Some(i) => i.progress(),
            None => false,
        }
    }

    /// The van of this node's connection to `node` (as `PSKV_VAN` names
    /// it: "tcp", "shm", "rdma" or "rdma-emulated"), if connected.
    pub fn van_to(&self, node: NodeId) -> Option<&'static str> {
        self.inner().link_of(node).map(|l| l.van.name())
    }

    /// Whether this node's link to `node` shares memory: then a [`Region`]
    /// either creates, the other can map ([`Postoffice::open_region`]).
    /// Today the shared-memory van does; tcp and rdma do not.
    pub fn shares_memory_with(&self, node: NodeId) -> bool {
        self.inner()
            .link_of(node)
            .is_some_and(|l| l.van.shares_memory())
    }

    /// Maps the region that `node` created ([`Region::create`]) and
    /// described ([`Region::descriptor`]). Fails, with the reason, when the
    /// link to `node` does not share memory or the descriptor does not match
    /// the region's file (it is checked, not trusted).
    pub fn open_region(&self, node: NodeId, descriptor: &[u8]) -> Result<Region, TransportError> {
        if !self.shares_memory_with(node) {
            return Err(TransportError::Unavailable(format!(
                "a shared region of node {node}: the link to it ({}) does not share memory",
                self.van_to(node).unwrap_or("none")
            )));
        }
        Region::open(descriptor)
    }

    /// The host this node announced to the others.
    pub fn announced_host(&self) -> &str {
        &self.inner().announce
    }

    /// The node table as this node knows it.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        match &*self.inner().ctl.lock() {
            Ctl::Member(m) => m.nodes().values().cloned().collect(),
            Ctl::Scheduler(s) => s.nodes(),
        }
    }

    /// Waits until every node of `group` (1 scheduler, 2 servers, 4 workers,
    /// or a union) has called `barrier` with the same group. Fails, rather
    /// than waiting, when a member is dead or the scheduler is gone; waits at
    /// most `timeout`.
    pub fn barrier(&self, group: Group, timeout: Duration) -> Result<(), TransportError> {
        self.inner().barrier(group, Vote::Ready, timeout)
    }

    /// A barrier at which every node that brings a digest must bring the
    /// same one (a setting all must share: an optimizer, a key's shape);
    /// otherwise it fails on every node, naming what each brought
    /// (`summary`).
    pub fn barrier_agree(
        &self,
        group: Group,
        digest: u64,
        summary: &str,
        timeout: Duration,
    ) -> Result<(), TransportError> {
        self.inner().barrier(
            group,
            Vote::Agree {
                digest,
                summary: summary.to_string(),
            },
            timeout,
        )
    }

    /// This node's part of a collective failed: the barrier of `group`
    /// that the others are (or will be) at fails on each of them with
    /// `reason`, so nobody waits for this node. Returns at once.
    pub fn barrier_fail(&self, group: Group, reason: &str) -> Result<(), TransportError> {
        self.inner()
            .barrier(
                group,
                Vote::Fail {
                    reason: reason.to_string(),
                },
                Duration::ZERO,
            )
            .map(|_| ())
    }

    /// Whether this node knows `id` to be dead (the scheduler declared it,
    /// and no restart took its id since).
    pub fn is_dead(&self, id: NodeId) -> bool {
        match &*self.inner().ctl.lock() {
            Ctl::Member(m) => m.is_dead(id),
            Ctl::Scheduler(s) => !s.alive().contains(&id) && s.nodes().iter().any(|n| n.id == id),
        }
    }

    /// The failed barrier rounds this node had not reached (other members
    /// made a collective call this node had not come to), as the scheduler
    /// tells them: a handle that a request's error can consult.
    pub fn missed_barriers(&self) -> MissedBarrier {
        self.owner.inner.missed.clone()
    }

    /// Nodes known dead, or silent for longer than `timeout` (ps-lite's
    /// `GetDeadNodes`: on the scheduler from heartbeats; on other nodes the
    /// ones the scheduler declared dead, and the scheduler itself if silent).
    pub fn dead_nodes(&self, timeout: Duration) -> Vec<NodeId> {
        let now = Instant::now();
        match &*self.inner().ctl.lock() {
            Ctl::Member(m) => m.dead_nodes(now, timeout),
            Ctl::Scheduler(s) => s.dead_nodes(now, timeout),
        }
    }

    /// Adds a watcher of membership changes (deaths, restarts), called on
    /// an I/O thread after the transport has failed the requests to a dead
    /// node.
    pub fn watch_nodes(&self, watcher: NodeWatcher) {
        self.inner().watchers.write().push(watcher);
    }

    /// Sets (or replaces) the request handler.
    pub fn set_handler(&self, handler: Arc<dyn RequestHandler>) {
        *self.inner().handler.write() = Some(handler);
    }
}

impl Inner {
    fn arc(&self) -> Arc<Inner> {
        self.me
            .get()
            .and_then(|w| w.upgrade())
            .expect("inner alive while in use")
    }

    fn sink(&self) -> Arc<dyn FrameSink> {
        self.arc()
    }

    pub(crate) fn my_id(&self) -> NodeId {
        self.my_id.load(Ordering::Acquire)
    }

    fn new_link(&self, peer: NodeId, van: VanId) -> Arc<Link> {
        let id = self.next_link.fetch_add(1, Ordering::Relaxed);
        let link = Arc::new(Link::new(id, peer, van));
        let mut links = self.links.lock();
        links.by_id.insert(id, link.clone());
        if peer != 0 {
            links.by_node.insert(peer, id);
        }
        link
    }

    pub(crate) fn link_of(&self, node: NodeId) -> Option<Arc<Link>> {
        let links = self.links.lock();
        let id = links.by_node.get(&node)?;
        links.by_id.get(id).filter(|l| !l.is_closed()).cloned()
    }

    fn verbose(&self, level: u8, msg: &str) {
        if self.cfg.verbose >= level {
            tracing::info!("{msg}");
        }
    }
}
