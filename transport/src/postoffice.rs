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

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tokio::net::{TcpListener, TcpStream};

use crate::config::{Config, VanKind};
use crate::error::TransportError;
use crate::kv::{Callback, RequestHandler, Responder};
use crate::link::{Link, LinkId};
use crate::protocol::member::{Member, MemberConfig, MemberEvent};
use crate::protocol::resender::{Received, Resender};
use crate::protocol::scheduler::{Scheduler, SchedulerConfig, SchedulerEvent};
use crate::protocol::tracker::{Completed, TrackError, Tracker};
use crate::protocol::{describe, role_rank, Group, NodeId, Role, SCHEDULER_ID};
use crate::security;
use crate::slot::Slot;
use crate::van::tcp::{self, FrameReader};
use crate::van::{self, FrameSink};

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

/// Why this node can no longer take part in the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeEnd {
    /// The scheduler declared this node dead while it was alive (it was
    /// stopped or cut off beyond the heartbeat timeout): its rank may be
    /// taken by a restart, so it must stop.
    Fenced(String),
    /// The scheduler is gone (its connection closed, or it was silent
    /// beyond `PSKV_SCHEDULER_TIMEOUT`).
    SchedulerLost(String),
    /// Every worker is gone: the job is over. `failed`: a worker died.
    JobEnded {
        /// Why.
        reason: String,
        /// A worker died.
        failed: bool,
    },
}

impl NodeEnd {
    /// Whether the end is a failure (anything but every worker leaving in
    /// order).
    pub fn is_failure(&self) -> bool {
        !matches!(self, NodeEnd::JobEnded { failed: false, .. })
    }
}

impl std::fmt::Display for NodeEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeEnd::Fenced(r) => write!(f, "this node was fenced: {r}"),
            NodeEnd::SchedulerLost(r) => write!(f, "lost the scheduler: {r}"),
            NodeEnd::JobEnded { reason, .. } => write!(f, "the job ended: {reason}"),
        }
    }
}

/// Sees this node's end, once, on an I/O thread: it must not block.
pub type EndWatcher = Arc<dyn Fn(&NodeEnd) + Send + Sync>;
use crate::van::{rdma, shm};
use crate::wire::{Control, Flags, Frame, Kind, Limits, NodeInfo, Vote};

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
}

pub(crate) struct Inner {
    pub(crate) cfg: Config,
    rt: Mutex<Option<tokio::runtime::Runtime>>,
    pub(crate) handle: tokio::runtime::Handle,
    listen: SocketAddr,
    announce: String,
    pub(crate) host_id: u64,
    token: Option<Vec<u8>>,
    ctl: Mutex<Ctl>,
    resender: Option<Mutex<Resender>>,
    links: Mutex<Links>,
    next_link: AtomicU64,
    reqs: Mutex<Requests>,
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
    rdma_dev: OnceLock<Result<Arc<dyn rdma::verbs::Device>, String>>,
}

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
    /// Starts a node. A server passes its request handler here, so that no
    /// request can arrive before it is in place. A member returns once it
    /// has joined the cluster. Callable from anywhere, an async context
    /// included (the wait then happens on a thread of its own).
    pub fn start(
        cfg: Config,
        handler: Option<Arc<dyn RequestHandler>>,
    ) -> Result<Postoffice, TransportError> {
        // Subtle: tokio refuses to block a thread that is inside a runtime
        // (`block_on` panics there, and so does dropping a runtime, which a
        // failed start does): inside one, the start runs on a scoped thread.
        if tokio::runtime::Handle::try_current().is_ok() {
            return std::thread::scope(|s| {
                std::thread::Builder::new()
                    .name("pskv-start".into())
                    .spawn_scoped(s, || Postoffice::start_here(cfg, handler))
                    .map_err(|e| TransportError::io("starting the node's start thread", e))?
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
            });
        }
        Postoffice::start_here(cfg, handler)
    }

    fn start_here(
        cfg: Config,
        handler: Option<Arc<dyn RequestHandler>>,
    ) -> Result<Postoffice, TransportError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.io_threads)
            .thread_name(match cfg.role {
                Role::Scheduler => "pskv-sched-io",
                Role::Server => "pskv-server-io",
                Role::Worker => "pskv-worker-io",
            })
            .enable_all()
            .build()
            .map_err(|e| TransportError::io("starting the I/O runtime", e))?;
        let handle = rt.handle().clone();
        // A node that announces a loopback address (a job on one host)
        // listens on it alone, not on every interface.
        let announced_ip = if cfg.role == Role::Scheduler {
            Some(&cfg.root_uri)
        } else {
            cfg.node_host.as_ref()
        }
        .and_then(|h| h.parse::<IpAddr>().ok())
        .filter(|ip| ip.is_loopback());
        let bind_ip = match (&cfg.interface, announced_ip) {
            (Some(name), _) => interface_ip(name)?,
            (None, Some(ip)) => ip,
            (None, None) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        let port = if cfg.role == Role::Scheduler {
            cfg.root_port
        } else {
            cfg.port
        };
        let listener = handle
            .block_on(TcpListener::bind(SocketAddr::new(bind_ip, port)))
            .map_err(|e| TransportError::io(format!("listening on {bind_ip}:{port}"), e))?;
        let listen = listener
            .local_addr()
            .map_err(|e| TransportError::io("listener address", e))?;
        let announce = match (&cfg.node_host, &cfg.interface) {
            (Some(h), _) => h.clone(),
            (None, Some(_)) => bind_ip.to_string(),
            (None, None) if cfg.role == Role::Scheduler => cfg.root_uri.clone(),
            (None, None) => local_ip_toward(&cfg.root_uri, cfg.root_port),
        };
        let now = Instant::now();
        let ctl = match cfg.role {
            Role::Scheduler => Ctl::Scheduler(Scheduler::new(SchedulerConfig {
                num_servers: cfg.num_servers,
                num_workers: cfg.num_workers,
                heartbeat_timeout: cfg.heartbeat_timeout,
            })),
            role => Ctl::Member(Member::new(
                MemberConfig {
                    role,
                    host: announce.clone(),
                    port: listen.port(),
                    host_id: host_id(),
                    heartbeat_interval: cfg.heartbeat_interval,
                    heartbeat_timeout: cfg.heartbeat_timeout,
                    scheduler_timeout: cfg.scheduler_timeout,
                    rank: cfg.rank,
                    register_timeout: cfg.connect_timeout,
                },
                now,
            )),
        };
        if cfg.token.is_none() {
            tracing::warn!(
                "no cluster token (PSKV_TOKEN) is set: only peers on loopback addresses will be accepted"
            );
        }
        let my_id = if cfg.role == Role::Scheduler {
            SCHEDULER_ID
        } else {
            0
        };
        let inner = Arc::new(Inner {
            token: cfg.token.as_ref().map(|t| t.as_bytes().to_vec()),
            resender: cfg
                .resend
                .then(|| Mutex::new(Resender::new(my_id, cfg.resend_timeout, 20))),
            cfg,
            rt: Mutex::new(Some(rt)),
            handle,
            listen,
            announce,
            host_id: host_id(),
            ctl: Mutex::new(ctl),
            links: Mutex::new(Links::default()),
            next_link: AtomicU64::new(1),
            reqs: Mutex::new(Requests::default()),
            handler: RwLock::new(handler),
            joined: Slot::new(),
            barriers: Mutex::new(HashMap::new()),
            watchers: RwLock::new(Vec::new()),
            end: Mutex::new(None),
            end_watchers: RwLock::new(Vec::new()),
            all_left: Slot::new(),
            shutting_down: AtomicBool::new(false),
            handshakes: std::sync::atomic::AtomicUsize::new(0),
            my_id: AtomicU32::new(my_id),
            me: OnceLock::new(),
            rdma_dev: OnceLock::new(),
        });
        let _ = inner.me.set(Arc::downgrade(&inner));
        let po = Postoffice {
            owner: Arc::new(Owner {
                inner: inner.clone(),
            }),
        };
        inner.spawn_accept(listener);
        if inner.cfg.role == Role::Scheduler {
            inner.spawn_timer();
            tracing::info!("scheduler listening on {}", inner.listen);
            return Ok(po);
        }
        inner.join()?;
        Ok(po)
    }

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

    /// The van of this node's connection to `node` ("tcp" or "shm"), if
    /// connected.
    pub fn van_to(&self, node: NodeId) -> Option<&'static str> {
        self.inner().link_of(node).map(|l| l.van)
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

    /// Why this node can no longer take part in the cluster, if it cannot
    /// (fenced, the scheduler lost, the job ended).
    pub fn end(&self) -> Option<NodeEnd> {
        self.inner().end.lock().clone()
    }

    /// Adds a watcher of this node's end (called at once if it has ended).
    pub fn watch_end(&self, watcher: EndWatcher) {
        let inner = self.inner();
        let ended = {
            let end = inner.end.lock();
            inner.end_watchers.write().push(watcher.clone());
            end.clone()
        };
        if let Some(e) = ended {
            watcher(&e);
        }
    }

    /// Whether this node knows `id` to be dead (the scheduler declared it,
    /// and no restart took its id since).
    pub fn is_dead(&self, id: NodeId) -> bool {
        match &*self.inner().ctl.lock() {
            Ctl::Member(m) => m.is_dead(id),
            Ctl::Scheduler(s) => !s.alive().contains(&id) && s.nodes().iter().any(|n| n.id == id),
        }
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

    /// Scheduler: waits until every node has left or died (or `timeout`
    /// passes); an error names the nodes that died.
    pub fn wait_all_left(&self, timeout: Duration) -> Result<(), TransportError> {
        match self.inner().all_left.wait(timeout) {
            Some(r) => r.map_err(TransportError::NotRunning),
            None => Err(TransportError::Timeout {
                what: "every node to leave the cluster".into(),
                after: timeout,
            }),
        }
    }

    /// Leaves the cluster in order and stops this node's threads (also done
    /// when the last handle is dropped).
    pub fn shutdown(&self) {
        self.inner().shutdown(Duration::from_secs(2));
    }

    /// Whether this node was shut down (or killed).
    pub fn is_shut_down(&self) -> bool {
        self.inner().shutting_down.load(Ordering::Acquire)
    }

    /// Stops abruptly, as a crash would: connections close without leaving
    /// the cluster (the scheduler declares this node dead). For tests.
    #[doc(hidden)]
    pub fn kill(&self) {
        let inner = self.inner();
        inner.shutting_down.store(true, Ordering::Release);
        let links: Vec<Arc<Link>> = inner.links.lock().by_id.values().cloned().collect();
        for l in links {
            l.close("killed");
        }
        if let Some(rt) = inner.rt.lock().take() {
            rt.shutdown_background();
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

    fn new_link(&self, peer: NodeId, van: &'static str) -> Arc<Link> {
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

    // ---- joining -------------------------------------------------------

    fn join(&self) -> Result<(), TransportError> {
        let deadline = Instant::now() + self.cfg.connect_timeout;
        let root = format!("{}:{}", self.cfg.root_uri, self.cfg.root_port);
        // The scheduler may start after us: keep trying until the deadline.
        let mut last_err;
        let link = loop {
            match self.handle.block_on(self.connect(&root, SCHEDULER_ID)) {
                Ok(link) => break link,
                Err(TransportError::Auth { peer, reason }) => {
                    return Err(TransportError::Auth { peer, reason })
                }
                Err(e) => last_err = e.to_string(),
            }
            if Instant::now() >= deadline {
                return Err(TransportError::Timeout {
                    what: format!("the scheduler at {root} ({last_err})"),
                    after: self.cfg.connect_timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let _ = link;
        // Subtle: the timer starts only now. Before the scheduler link
        // exists, a pump would take the queued Register and find no link
        // to send it on.
        self.spawn_timer();
        self.pump();
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        match self.joined.wait(left) {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(e),
            None => {
                return Err(TransportError::Timeout {
                    what: "the scheduler to admit this node (are all nodes started?)".into(),
                    after: self.cfg.connect_timeout,
                })
            }
        }
        if self.cfg.role == Role::Server && self.cfg.replicas > 1 && self.cfg.num_servers > 1 {
            // Replicas: a link to the backup (the next server), which every
            // completed round is copied to.
            let me = self.my_id();
            let backup = match role_rank(me) {
                Some((_, r)) => Role::Server.id_of((r + 1) % self.cfg.num_servers),
                None => me,
            };
            let info = match &*self.ctl.lock() {
                Ctl::Member(m) => m.nodes().get(&backup).cloned(),
                Ctl::Scheduler(_) => None,
            };
            if let Some(s) = info {
                let addr = format!("{}:{}", s.host, s.port);
                self.handle
                    .block_on(self.connect(&addr, s.id))
                    .map_err(|e| {
                        TransportError::io(
                            format!("connecting to the backup {}", describe(s.id)),
                            e,
                        )
                    })?;
            }
        }
        if self.cfg.role == Role::Worker {
            // Connect to every server now, so the first request is fast.
            let servers: Vec<NodeInfo> = match &*self.ctl.lock() {
                Ctl::Member(m) => m
                    .nodes()
                    .values()
                    .filter(|n| n.role == Role::Server.code())
                    .cloned()
                    .collect(),
                Ctl::Scheduler(_) => Vec::new(),
            };
            for s in servers {
                let addr = format!("{}:{}", s.host, s.port);
                self.handle
                    .block_on(self.connect(&addr, s.id))
                    .map_err(|e| match e {
                        TransportError::Auth { .. } => e,
                        e => TransportError::io(
                            format!("connecting to {} at {addr}", describe(s.id)),
                            e,
                        ),
                    })?;
            }
        }
        Ok(())
    }

    /// Connects, authenticates and starts a link to `peer` at `addr`.
    async fn connect(&self, addr: &str, peer: NodeId) -> Result<Arc<Link>, TransportError> {
        let stream = tcp::connect(addr, Duration::from_secs(5))
            .await
            .map_err(|e| TransportError::io(format!("connecting to {addr}"), e))?;
        let (rd, mut wr) = stream.into_split();
        let mut reader = FrameReader::new(rd, Limits::HANDSHAKE);
        let who = format!("{} at {addr}", describe(peer));
        let auth_err = |reason: String| TransportError::Auth {
            peer: who.clone(),
            reason,
        };
        let frame = tcp::read_frame_timeout(&mut reader, HANDSHAKE_TIMEOUT)
            .await
            .map_err(|e| auth_err(format!("no challenge: {e}")))?;
        let nonce_a = match Control::from_frame(&frame) {
            Ok(Control::Challenge { nonce }) => nonce,
            Ok(Control::AuthRefused { reason }) => return Err(auth_err(reason)),
            other => return Err(auth_err(format!("expected a challenge, got {other:?}"))),
        };
        let nonce_c = security::nonce();
        let me = self.my_id();
        let token = self.token.as_deref().unwrap_or(&[]);
        let mac = security::connector_mac(token, &nonce_a, &nonce_c, me);
        let epoch = match &*self.ctl.lock() {
            Ctl::Member(m) => m.epoch(),
            Ctl::Scheduler(_) => 0,
        };
        tcp::write_frame(
            &mut wr,
            &Control::Auth {
                nonce: nonce_c,
                node_id: me,
                epoch,
                mac,
            }
            .to_frame(me, peer),
        )
        .await
        .map_err(|e| TransportError::io(format!("handshake with {who}"), e))?;
        let frame = tcp::read_frame_timeout(&mut reader, HANDSHAKE_TIMEOUT)
            .await
            .map_err(|e| auth_err(format!("no answer to the proof: {e}")))?;
        match Control::from_frame(&frame) {
            Ok(Control::AuthOk { mac }) => {
                if !security::verify_acceptor(token, &nonce_a, &nonce_c, me, &mac) {
                    return Err(auth_err(
                        "the peer could not prove the cluster token".into(),
                    ));
                }
            }
            Ok(Control::AuthRefused { reason }) => return Err(auth_err(reason)),
            other => return Err(auth_err(format!("expected AuthOk, got {other:?}"))),
        }
        // The van: RDMA if configured, shared memory with a peer on this
        // host if allowed, else TCP. The scheduler's links are always TCP.
        let (offer, pending) = self.choose_offer(peer, &who)?;
        tcp::write_frame(&mut wr, &offer.to_frame(me, peer))
            .await
            .map_err(|e| TransportError::io(format!("van offer to {who}"), e))?;
        let answer = tcp::read_frame_timeout(&mut reader, HANDSHAKE_TIMEOUT).await;
        if let OfferPending::Shm { pa, pc, .. } = &pending {
            // Mapped by both sides now (or refused): the names can go.
            let _ = std::fs::remove_file(pa);
            let _ = std::fs::remove_file(pc);
        }
        let (accepted, endpoint) = match answer.map(|f| Control::from_frame(&f)) {
            Ok(Ok(Control::VanAnswer {
                ok,
                reason,
                endpoint,
            })) => {
                if !ok {
                    match &pending {
                        OfferPending::Rdma(_) => {
                            return Err(TransportError::Unavailable(format!(
                                "{who} refused RDMA: {reason}"
                            )))
                        }
                        OfferPending::Shm { .. } if self.cfg.van == VanKind::Shm => {
                            return Err(TransportError::Unavailable(format!(
                                "{who} refused shared memory: {reason}"
                            )))
                        }
                        OfferPending::Shm { .. } => {
                            tracing::info!("{who} declined shared memory ({reason}); using tcp")
                        }
                        OfferPending::Tcp => {}
                    }
                }
                (ok, endpoint)
            }
            other => {
                return Err(TransportError::io(
                    format!("van answer from {who}"),
                    format!("{other:?}"),
                ))
            }
        };
        match pending {
            OfferPending::Shm { a, c, .. } if accepted => {
                let link = self.new_link(peer, "shm");
                self.verbose(
                    1,
                    &format!("connected to {who} over shared memory (link {})", link.id),
                );
                self.start_shm(shm::Rings { tx: a, rx: c }, reader, wr, link.clone())?;
                Ok(link)
            }
            OfferPending::Rdma(prepared) => {
                prepared.connect(&endpoint).map_err(|e| {
                    TransportError::io(format!("connecting the RDMA queue pair to {who}"), e)
                })?;
                let link = self.new_link(peer, "rdma");
                let dev = self.rdma_device().map(|d| d.name()).unwrap_or_default();
                self.verbose(
                    1,
                    &format!("connected to {who} over RDMA on {dev} (link {})", link.id),
                );
                self.start_rdma(prepared, reader, wr, link.clone())?;
                Ok(link)
            }
            _ => {
                let link = self.new_link(peer, "tcp");
                self.verbose(
                    1,
                    &format!("connected to {who} over tcp (link {})", link.id),
                );
                let reader = reader.with_limits(self.cfg.limits);
                tcp::start(reader, wr, link.clone(), self.sink(), &self.handle);
                Ok(link)
            }
        }
    }

    /// The connector's offer for a link to `peer`, and what it prepared.
    fn choose_offer(
        &self,
        peer: NodeId,
        who: &str,
    ) -> Result<(Control, OfferPending), TransportError> {
        if peer == SCHEDULER_ID {
            return Ok((tcp_offer(), OfferPending::Tcp));
        }
        if self.cfg.van.is_rdma() {
            let prepared = self
                .rdma_device()
                .and_then(|dev| rdma::Prepared::new(dev, self.cfg.limits))
                .map_err(|e| TransportError::Unavailable(format!("RDMA to {who}: {e}")))?;
            let offer = Control::VanOffer {
                van: self.cfg.van.rdma_name().into(),
                to_acceptor: String::new(),
                to_connector: String::new(),
                ring_bytes: 0,
                endpoint: prepared.endpoint(),
            };
            return Ok((offer, OfferPending::Rdma(prepared)));
        }
        let peer_host = match &*self.ctl.lock() {
            Ctl::Member(m) => m.nodes().get(&peer).map(|n| n.host_id),
            Ctl::Scheduler(_) => None,
        };
        let same_host = peer_host == Some(self.host_id);
        if self.cfg.van == VanKind::Shm && !same_host {
            return Err(TransportError::Unavailable(format!(
                "PSKV_VAN=shm, but {who} is not on this host (or not in this network namespace)"
            )));
        }
        if !same_host || self.cfg.van == VanKind::Tcp {
            return Ok((tcp_offer(), OfferPending::Tcp));
        }
        let (pa, pc) = shm::ring_paths();
        match (
            shm::Ring::create(&pa, self.cfg.shm_bytes, self.cfg.shm_heap_bytes),
            shm::Ring::create(&pc, self.cfg.shm_bytes, self.cfg.shm_heap_bytes),
        ) {
            (Ok(a), Ok(c)) => {
                let offer = Control::VanOffer {
                    van: "shm".into(),
                    to_acceptor: pa.display().to_string(),
                    to_connector: pc.display().to_string(),
                    ring_bytes: self.cfg.shm_bytes as u64,
                    endpoint: Vec::new(),
                };
                Ok((offer, OfferPending::Shm { a, c, pa, pc }))
            }
            (a, c) => {
                let _ = std::fs::remove_file(&pa);
                let _ = std::fs::remove_file(&pc);
                let e = a
                    .err()
                    .or(c.err())
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                if self.cfg.van == VanKind::Shm {
                    return Err(TransportError::io(
                        "creating shared-memory rings in /dev/shm",
                        e,
                    ));
                }
                tracing::warn!("shared memory unavailable ({e}); using tcp with {who}");
                Ok((tcp_offer(), OfferPending::Tcp))
            }
        }
    }

    /// The RDMA device, opened once.
    fn rdma_device(&self) -> Result<Arc<dyn rdma::verbs::Device>, String> {
        self.rdma_dev
            .get_or_init(|| rdma::device(self.cfg.van == VanKind::RdmaEmulated))
            .clone()
    }

    fn start_rdma(
        &self,
        prepared: rdma::Prepared,
        reader: FrameReader<tokio::net::tcp::OwnedReadHalf>,
        wr: tokio::net::tcp::OwnedWriteHalf,
        link: Arc<Link>,
    ) -> Result<(), TransportError> {
        let stream = reclaim_stream(reader, wr, "switching to RDMA")?;
        rdma::start(prepared, stream, link, self.sink(), &self.handle)
            .map_err(|e| TransportError::io("starting the RDMA van", e))
    }

    fn start_shm(
        &self,
        rings: shm::Rings,
        reader: FrameReader<tokio::net::tcp::OwnedReadHalf>,
        wr: tokio::net::tcp::OwnedWriteHalf,
        link: Arc<Link>,
    ) -> Result<(), TransportError> {
        let stream = reclaim_stream(reader, wr, "switching to shared memory")?;
        shm::start(
            rings,
            stream,
            link,
            self.sink(),
            self.cfg.limits,
            &self.handle,
        )
        .map_err(|e| TransportError::io("starting the shared-memory van", e))
    }

    fn spawn_accept(&self, listener: TcpListener) {
        let me = self.arc();
        self.handle.spawn(async move {
            loop {
                let (stream, addr) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if me.shutting_down.load(Ordering::Acquire) {
                    return;
                }
                if me.handshakes.fetch_add(1, Ordering::AcqRel) >= MAX_HANDSHAKES {
                    me.handshakes.fetch_sub(1, Ordering::AcqRel);
                    tracing::debug!(
                        "closed a connection from {addr}: {MAX_HANDSHAKES} handshakes are in progress already"
                    );
                    drop(stream);
                    continue;
                }
                let me2 = me.clone();
                tokio::spawn(async move {
                    let r = me2.accept(stream, addr).await;
                    me2.handshakes.fetch_sub(1, Ordering::AcqRel);
                    if let Err(e) = r {
                        tracing::warn!("refused a connection from {addr}: {e}");
                    }
                });
            }
        });
    }

    async fn accept(&self, stream: TcpStream, addr: SocketAddr) -> Result<(), TransportError> {
        let _ = stream.set_nodelay(true);
        let (rd, mut wr) = stream.into_split();
        let me = self.my_id();
        let refuse = |reason: String| Control::AuthRefused { reason }.to_frame(me, 0);
        if self.token.is_none() && !addr.ip().is_loopback() {
            let reason = "no cluster token is set on this node, so only loopback peers are accepted; set PSKV_TOKEN on every node".to_string();
            let _ = tcp::write_frame(&mut wr, &refuse(reason.clone())).await;
            return Err(TransportError::Auth {
                peer: addr.to_string(),
                reason,
            });
        }
        let nonce_a = security::nonce();
        tcp::write_frame(
            &mut wr,
            &Control::Challenge { nonce: nonce_a }.to_frame(me, 0),
        )
        .await
        .map_err(|e| TransportError::io("sending the challenge", e))?;
        let mut reader = FrameReader::new(rd, Limits::HANDSHAKE);
        let frame = tcp::read_frame_timeout(&mut reader, HANDSHAKE_TIMEOUT)
            .await
            .map_err(|e| TransportError::Auth {
                peer: addr.to_string(),
                reason: format!("no proof: {e}"),
            })?;
        let (nonce_c, node_id, epoch, mac) = match Control::from_frame(&frame) {
            Ok(Control::Auth {
                nonce,
                node_id,
                epoch,
                mac,
            }) => (nonce, node_id, epoch, mac),
            other => {
                let reason = format!("expected a proof of the token, got {other:?}");
                let _ = tcp::write_frame(&mut wr, &refuse(reason.clone())).await;
                return Err(TransportError::Auth {
                    peer: addr.to_string(),
                    reason,
                });
            }
        };
        let token = self.token.as_deref().unwrap_or(&[]);
        if !security::verify_connector(token, &nonce_a, &nonce_c, node_id, &mac) {
            let reason = "wrong cluster token".to_string();
            let _ = tcp::write_frame(&mut wr, &refuse(reason.clone())).await;
            return Err(TransportError::Auth {
                peer: addr.to_string(),
                reason,
            });
        }
        // Fencing: an id the scheduler declared dead, or one a restart has
        // taken over (another epoch), is an old process that must stop.
        let admitted = match &*self.ctl.lock() {
            Ctl::Member(m) => m.admits(node_id, epoch),
            Ctl::Scheduler(_) => Ok(()),
        };
        if let Err(reason) = admitted {
            tracing::warn!("refused a connection from {addr}: {reason}");
            let _ = tcp::write_frame(&mut wr, &refuse(reason.clone())).await;
            return Err(TransportError::Auth {
                peer: addr.to_string(),
                reason,
            });
        }
        let ok = Control::AuthOk {
            mac: security::acceptor_mac(token, &nonce_a, &nonce_c, node_id),
        };
        tcp::write_frame(&mut wr, &ok.to_frame(me, node_id))
            .await
            .map_err(|e| TransportError::io("answering the proof", e))?;
        // The van the connector proposes.
        let frame = tcp::read_frame_timeout(&mut reader, HANDSHAKE_TIMEOUT)
            .await
            .map_err(|e| TransportError::io(format!("van offer from {addr}"), e))?;
        let offer = Control::from_frame(&frame)
            .map_err(|e| TransportError::io(format!("van offer from {addr}"), e))?;
        let chosen: Result<Chosen, String> = match offer {
            Control::VanOffer {
                van,
                to_acceptor,
                to_connector,
                ring_bytes,
                endpoint,
            } => match van.as_str() {
                "shm" => self
                    .open_rings(&to_acceptor, &to_connector, ring_bytes)
                    .map(Chosen::Shm),
                "rdma" | "rdma-emulated" => {
                    if !self.cfg.van.is_rdma() || self.cfg.van.rdma_name() != van {
                        Err(format!("this node does not run {van} (PSKV_VAN)"))
                    } else {
                        self.rdma_device()
                            .and_then(|dev| rdma::Prepared::new(dev, self.cfg.limits))
                            .and_then(|p| p.connect(&endpoint).map(|_| p))
                            .map(Chosen::Rdma)
                    }
                }
                _ => Ok(Chosen::Tcp),
            },
            other => {
                return Err(TransportError::io(
                    format!("van offer from {addr}"),
                    format!("expected a van offer, got {other:?}"),
                ))
            }
        };
        let answer = match &chosen {
            Ok(c) => Control::VanAnswer {
                ok: true,
                reason: String::new(),
                endpoint: match c {
                    Chosen::Rdma(p) => p.endpoint(),
                    _ => Vec::new(),
                },
            },
            Err(reason) => Control::VanAnswer {
                ok: false,
                reason: reason.clone(),
                endpoint: Vec::new(),
            },
        };
        tcp::write_frame(&mut wr, &answer.to_frame(me, node_id))
            .await
            .map_err(|e| TransportError::io("answering the van offer", e))?;
        let who = describe(node_id);
        match chosen {
            Ok(Chosen::Shm(rings)) => {
                let link = self.new_link(node_id, "shm");
                self.verbose(
                    1,
                    &format!(
                        "accepted {who} from {addr} over shared memory (link {})",
                        link.id
                    ),
                );
                self.start_shm(rings, reader, wr, link)?;
            }
            Ok(Chosen::Rdma(prepared)) => {
                let link = self.new_link(node_id, "rdma");
                self.verbose(
                    1,
                    &format!("accepted {who} from {addr} over RDMA (link {})", link.id),
                );
                self.start_rdma(prepared, reader, wr, link)?;
            }
            _ => {
                let link = self.new_link(node_id, "tcp");
                self.verbose(
                    1,
                    &format!("accepted {who} from {addr} over tcp (link {})", link.id),
                );
                let reader = reader.with_limits(self.cfg.limits);
                tcp::start(reader, wr, link, self.sink(), &self.handle);
            }
        }
        Ok(())
    }

    /// The acceptor's side of a shared-memory offer: maps the rings, or says
    /// why not (then the link uses TCP).
    fn open_rings(
        &self,
        to_acceptor: &str,
        to_connector: &str,
        ring_bytes: u64,
    ) -> Result<shm::Rings, String> {
        if self.cfg.van == VanKind::Tcp || self.cfg.van.is_rdma() {
            return Err("this node does not use shared memory (PSKV_VAN)".into());
        }
        let cap = ring_bytes as usize;
        let ok_path =
            |p: &str| p.starts_with("/dev/shm/pskv-") && !p.contains("..") && !p[9..].contains('/');
        if !(ok_path(to_acceptor) && ok_path(to_connector) && (1 << 16..=1 << 34).contains(&cap)) {
            return Err("malformed shared-memory offer".into());
        }
        let tx = shm::Ring::open(std::path::Path::new(to_connector), cap)
            .map_err(|e| format!("cannot map {to_connector}: {e}"))?;
        let rx = shm::Ring::open(std::path::Path::new(to_acceptor), cap)
            .map_err(|e| format!("cannot map {to_acceptor}: {e}"))?;
        Ok(shm::Rings { tx, rx })
    }

    // ---- the control plane ---------------------------------------------

    fn spawn_timer(&self) {
        let me = self.arc();
        let mut tick = Duration::from_millis(100);
        if let Some(i) = self.cfg.heartbeat_interval {
            tick = tick.min(i / 4);
        }
        if self.cfg.resend {
            tick = tick.min(self.cfg.resend_timeout / 4);
        }
        let tick = tick.max(Duration::from_millis(5));
        self.handle.spawn(async move {
            let mut iv = tokio::time::interval(tick);
            iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                iv.tick().await;
                if me.shutting_down.load(Ordering::Acquire) {
                    return;
                }
                let now = Instant::now();
                match &mut *me.ctl.lock() {
                    Ctl::Scheduler(s) => s.handle_timeout(now),
                    Ctl::Member(m) => m.handle_timeout(now),
                }
                if let Some(r) = &me.resender {
                    let (again, lost) = r.lock().handle_timeout(now);
                    for (peer, frame) in again {
                        if let Some(link) = me.links.lock().by_id.get(&peer).cloned() {
                            let _ = link.send(frame);
                        }
                    }
                    for peer in lost {
                        let link = me.links.lock().by_id.get(&peer).cloned();
                        if let Some(link) = link {
                            van::end(
                                &link,
                                &me.sink(),
                                "messages were not acknowledged after every resend".into(),
                            );
                        }
                    }
                }
                me.pump();
            }
        });
    }

    /// Sends what the state machine produced and acts on its events.
    fn pump(&self) {
        let mut sends: Vec<(Option<LinkId>, Control)> = Vec::new();
        let mut sched_events = Vec::new();
        let mut member_events = Vec::new();
        {
            let mut ctl = self.ctl.lock();
            match &mut *ctl {
                Ctl::Scheduler(s) => {
                    while let Some((conn, msg)) = s.poll_transmit() {
                        sends.push((Some(conn), msg));
                    }
                    while let Some(e) = s.poll_event() {
                        sched_events.push(e);
                    }
                }
                Ctl::Member(m) => {
                    while let Some(msg) = m.poll_transmit() {
                        sends.push((None, msg));
                    }
                    while let Some(e) = m.poll_event() {
                        member_events.push(e);
                    }
                }
            }
        }
        for (conn, msg) in sends {
            let link = match conn {
                Some(id) => self.links.lock().by_id.get(&id).cloned(),
                None => self.link_of(SCHEDULER_ID),
            };
            let Some(link) = link else { continue };
            if let Control::Welcome { your_id, .. } = &msg {
                link.set_peer(*your_id);
                self.links.lock().by_node.insert(*your_id, link.id);
            }
            let recipient = link.peer();
            self.send_on(&link, msg.to_frame(self.my_id(), recipient));
        }
        for e in sched_events {
            self.on_scheduler_event(e);
        }
        for e in member_events {
            self.on_member_event(e);
        }
    }

    /// Queues a frame on a link, numbering it for resend if that is on.
    pub(crate) fn send_on(&self, link: &Arc<Link>, mut frame: Frame) -> bool {
        if let Some(r) = &self.resender {
            r.lock().stamp(link.id, &mut frame, Instant::now());
        }
        link.send(frame).is_ok()
    }

    fn on_scheduler_event(&self, e: SchedulerEvent) {
        match e {
            SchedulerEvent::Started => tracing::info!("every node registered: the cluster is up"),
            SchedulerEvent::NodeDead { id, reason } => {
                // Subtle: the link stays open. A node declared dead while
                // alive (stopped) speaks again on it and is answered
                // `Fenced`; a node that really died closes it itself.
                tracing::warn!("{} is dead: {reason}", describe(id));
            }
            SchedulerEvent::NodeRecovered { id } => {
                tracing::info!("{} rejoined after a restart", describe(id))
            }
            SchedulerEvent::BarrierDone { group, error } => self.release_barrier(group, error),
            SchedulerEvent::AllLeft { mut dead } => {
                // With replicas, one dead server is survived: its backup
                // served its keys.
                let servers_dead = dead
                    .iter()
                    .filter(|d| matches!(role_rank(**d), Some((Role::Server, _))))
                    .count() as u32;
                if self.cfg.replicas > 1 && servers_dead < self.cfg.replicas {
                    dead.retain(|d| !matches!(role_rank(*d), Some((Role::Server, _))));
                }
                self.all_left.set(if dead.is_empty() {
                    Ok(())
                } else {
                    let names: Vec<String> = dead.iter().map(|d| describe(*d)).collect();
                    Err(format!("the cluster ended with {} dead", names.join(", ")))
                });
            }
        }
    }

    fn on_member_event(&self, e: MemberEvent) {
        match e {
            MemberEvent::Joined { id, recovery } => {
                self.my_id.store(id, Ordering::Release);
                if let Some(r) = &self.resender {
                    // Acks carry the sender id; set it now that it is known.
                    r.lock().set_me(id);
                }
                tracing::info!(
                    "joined as {}{}",
                    describe(id),
                    if recovery { " (recovery)" } else { "" }
                );
                self.joined.set(Ok(()));
            }
            MemberEvent::Rejected(reason) => {
                self.joined.set(Err(TransportError::Rejected(reason)));
            }
            MemberEvent::NodeUpdated(info) => {
                tracing::info!("{} moved to {}:{}", describe(info.id), info.host, info.port);
                // The old connection is stale; a worker reconnects at once.
                self.drop_node(info.id, "it restarted");
                self.tell_watchers(NodeChange::Restarted(info.id));
                if self.cfg.role == Role::Worker && info.role == Role::Server.code() {
                    let me = self.arc();
                    self.handle.spawn(async move {
                        let addr = format!("{}:{}", info.host, info.port);
                        if let Err(e) = me.connect(&addr, info.id).await {
                            tracing::warn!("reconnecting to {}: {e}", describe(info.id));
                        }
                    });
                }
            }
            MemberEvent::NodeDead(id) => {
                tracing::warn!("{} is dead", describe(id));
                self.drop_node(id, "the scheduler declared it dead");
                self.fail_requests_to(id, || TrackError::NodeDead { node: id });
                self.tell_watchers(NodeChange::Dead(id));
            }
            MemberEvent::BarrierDone { group, error } => self.release_barrier(group, error),
            MemberEvent::SchedulerLost(reason) => self.ended(NodeEnd::SchedulerLost(reason)),
            MemberEvent::Fenced(reason) => self.ended(NodeEnd::Fenced(reason)),
            MemberEvent::JobEnded(reason, failed) => {
                self.ended(NodeEnd::JobEnded { reason, failed })
            }
        }
    }

    /// This node can no longer take part: every request in flight fails,
    /// later ones are refused, and the watchers are told.
    fn ended(&self, end: NodeEnd) {
        {
            let mut e = self.end.lock();
            if e.is_some() {
                return;
            }
            *e = Some(end.clone());
        }
        if end.is_failure() {
            tracing::error!("{end}");
        } else {
            tracing::info!("{end}");
        }
        self.joined
            .set(Err(TransportError::NotRunning(end.to_string())));
        let done = self.reqs.lock().tracker.fail_all(&end.to_string());
        self.complete(done);
        let watchers = self.end_watchers.read().clone();
        for w in watchers {
            w(&end);
        }
    }

    fn tell_watchers(&self, change: NodeChange) {
        let watchers = self.watchers.read().clone();
        for w in watchers {
            w(change);
        }
    }

    fn drop_node(&self, id: NodeId, reason: &str) {
        let link = {
            let mut links = self.links.lock();
            links
                .by_node
                .remove(&id)
                .and_then(|lid| links.by_id.get(&lid).cloned())
        };
        if let Some(link) = link {
            link.close(format!("{} {reason}", describe(id)));
        }
        if let Some(r) = &self.resender {
            let ids: Vec<LinkId> = self
                .links
                .lock()
                .by_id
                .values()
                .filter(|l| l.peer() == id)
                .map(|l| l.id)
                .collect();
            for lid in ids {
                r.lock().forget(lid);
            }
        }
    }

    fn release_barrier(&self, group: Group, error: Option<String>) {
        if let Some(slot) = self.barriers.lock().remove(&group.0) {
            slot.set(error.map_or(Ok(()), Err));
        }
    }

    fn barrier(&self, group: Group, vote: Vote, timeout: Duration) -> Result<(), TransportError> {
        let fail = matches!(vote, Vote::Fail { .. });
        let slot = Slot::new();
        if !fail {
            let mut b = self.barriers.lock();
            if b.contains_key(&group.0) {
                return Err(TransportError::Invalid(format!(
                    "a barrier of group {} is already in progress",
                    group.0
                )));
            }
            b.insert(group.0, slot.clone());
        }
        let started = match &mut *self.ctl.lock() {
            Ctl::Member(m) => m
                .barrier(group, vote, Instant::now())
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Ctl::Scheduler(s) => {
                if group.has(Role::Scheduler) {
                    s.barrier(group);
                    Ok(())
                } else {
                    Err(format!("the scheduler is not in group {}", group.0))
                }
            }
        };
        if let Err(e) = started {
            self.barriers.lock().remove(&group.0);
            return Err(TransportError::Barrier(e));
        }
        self.pump();
        if fail {
            return Ok(());
        }
        match slot.wait(timeout) {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(TransportError::Barrier(e)),
            None => {
                self.barriers.lock().remove(&group.0);
                // The round fails for everyone with this cause, and the
                // next barrier of the group starts afresh.
                let reason = format!("it waited {timeout:?} and gave up");
                if let Ctl::Member(m) = &mut *self.ctl.lock() {
                    m.abandon_barrier(group, reason, Instant::now());
                }
                self.pump();
                Err(TransportError::Timeout {
                    what: format!("every node of group {} to reach the barrier", group.0),
                    after: timeout,
                })
            }
        }
    }

    // ---- the data plane --------------------------------------------------

    /// Starts a request to `parts` (one frame per target node); `callback`
    /// runs once with every answer, or with the first failure.
    pub(crate) fn request(
        &self,
        parts: Vec<(NodeId, Frame)>,
        callback: Callback,
    ) -> Result<(), TransportError> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(TransportError::NotRunning(
                "this node is shutting down".into(),
            ));
        }
        if let Some(end) = self.end.lock().clone() {
            return Err(TransportError::NotRunning(end.to_string()));
        }
        let mut links = Vec::with_capacity(parts.len());
        for (node, _) in &parts {
            let dead = match &*self.ctl.lock() {
                Ctl::Member(m) => m.is_dead(*node),
                Ctl::Scheduler(_) => false,
            };
            if dead {
                return Err(TrackError::NodeDead { node: *node }.into());
            }
            let link = match self.link_of(*node) {
                Some(l) => l,
                None => self.reconnect(*node)?,
            };
            links.push(link);
        }
        let id = {
            let mut reqs = self.reqs.lock();
            let id = reqs.tracker.start(parts.iter().map(|(n, _)| *n).collect());
            reqs.callbacks.insert(id, callback);
            id
        };
        let me = self.my_id();
        for ((node, mut frame), link) in parts.into_iter().zip(links) {
            frame.request_id = id;
            frame.sender = me;
            frame.recipient = node;
            if !self.send_on(&link, frame) {
                let reason = link.close_reason().unwrap_or_default();
                self.fail_requests_to(node, || TrackError::ConnectionLost {
                    node,
                    reason: reason.clone(),
                });
            }
        }
        Ok(())
    }

    /// A connection to `node` made on demand (a restarted server, a node
    /// this one never talked to). Not from inside the runtime.
    fn reconnect(&self, node: NodeId) -> Result<Arc<Link>, TransportError> {
        let info = match &*self.ctl.lock() {
            Ctl::Member(m) => m.nodes().get(&node).cloned(),
            Ctl::Scheduler(s) => s.nodes().into_iter().find(|n| n.id == node),
        };
        let info = info.ok_or_else(|| {
            TransportError::Invalid(format!("{} is not in the node table", describe(node)))
        })?;
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(TransportError::NotRunning(format!(
                "no connection to {} (it may be restarting); try again",
                describe(node)
            )));
        }
        let addr = format!("{}:{}", info.host, info.port);
        self.handle
            .block_on(self.connect(&addr, node))
            .map_err(|e| match e {
                e @ TransportError::Auth { .. } => e,
                e => TrackError::ConnectionLost {
                    node,
                    reason: format!("no connection, and reconnecting failed: {e}"),
                }
                .into(),
            })
    }

    fn fail_requests_to(&self, node: NodeId, error: impl Fn() -> TrackError) {
        let done = self.reqs.lock().tracker.on_node_lost(node, error);
        self.complete(done);
    }

    fn complete(&self, done: Vec<Completed<Frame>>) {
        for c in done {
            let cb = self.reqs.lock().callbacks.remove(&c.request_id);
            if let Some(cb) = cb {
                cb(c.result.map_err(TransportError::from));
            }
        }
    }

    fn on_request(&self, link: &Arc<Link>, mut frame: Frame) {
        // A request is from the node its link proved to be in the
        // handshake, whatever the header's sender field says (a member
        // that holds the token must not push as another rank).
        let peer = link.peer();
        let claimed = frame.sender;
        frame.sender = peer;
        let responder = Responder::new(self.arc(), link.clone(), &frame);
        if peer == 0 {
            return responder.error(
                "a request on a link that gave no node id in its handshake (register with the scheduler first)",
            );
        }
        if claimed != peer {
            tracing::warn!(
                "a request from {} claimed to be from {}: taken as {}'s",
                describe(peer),
                describe(claimed),
                describe(peer)
            );
        }
        let handler = self.handler.read().clone();
        match handler {
            Some(h) => h.handle(crate::kv::KvRequest::from_frame(frame), responder),
            None => responder.error(format!("{} has no request handler", describe(self.my_id()))),
        }
    }

    fn on_response(&self, link: &Arc<Link>, frame: Frame) {
        // From the link's node: an answer cannot complete a part that
        // another node owes (the tracker matches node and request id).
        let from = match link.peer() {
            0 => frame.sender,
            peer => peer,
        };
        let request_id = frame.request_id;
        let done = {
            let mut reqs = self.reqs.lock();
            if frame.flags.contains(Flags::ERROR) {
                let msg = String::from_utf8_lossy(&frame.meta).into_owned();
                reqs.tracker.on_error(from, request_id, msg)
            } else {
                reqs.tracker.on_response(from, request_id, frame)
            }
        };
        if let Some(c) = done {
            self.complete(vec![c]);
        }
    }

    fn verbose(&self, level: u8, msg: &str) {
        if self.cfg.verbose >= level {
            tracing::info!("{msg}");
        }
    }

    // ---- shutdown --------------------------------------------------------

    fn shutdown(&self, grace: Duration) {
        if self.shutting_down.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Ctl::Member(m) = &mut *self.ctl.lock() {
            m.leave(Instant::now());
        }
        self.pump();
        // Let the Leave and any answers already queued go out.
        let deadline = Instant::now() + grace;
        loop {
            let busy = self
                .links
                .lock()
                .by_id
                .values()
                .any(|l| !l.is_closed() && !l.is_idle());
            if !busy || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let done = self.reqs.lock().tracker.fail_all("this node shut down");
        self.complete(done);
        let links: Vec<Arc<Link>> = self.links.lock().by_id.values().cloned().collect();
        for l in links {
            l.close("this node shut down");
        }
        for (_, slot) in self.barriers.lock().drain() {
            slot.set(Err("this node shut down".into()));
        }
        self.joined.set(Err(TransportError::NotRunning(
            "this node shut down".into(),
        )));
        if let Some(rt) = self.rt.lock().take() {
            // Legal from any thread, including the runtime's own.
            rt.shutdown_background();
        }
    }
}

impl FrameSink for Inner {
    fn on_frame(&self, link: &Arc<Link>, frame: Frame) {
        if self.cfg.verbose >= 2 {
            tracing::info!(link = link.id, kind = ?frame.kind, keys = frame.keys.len(), bytes = frame.payload.len(), "received");
        }
        if let Some(r) = &self.resender {
            let verdict = r.lock().on_receive(link.id, &frame);
            match verdict {
                Received::Consumed => return,
                Received::Duplicate { ack } => {
                    let _ = link.send(ack);
                    return;
                }
                Received::Deliver { ack } => {
                    if let Some(ack) = ack {
                        let _ = link.send(ack);
                    }
                }
            }
        }
        match frame.kind {
            Kind::Control => {
                let msg = match Control::from_frame(&frame) {
                    Ok(m) => m,
                    Err(e) => {
                        van::end(link, &self.sink(), format!("malformed control frame: {e}"));
                        return;
                    }
                };
                let now = Instant::now();
                match &mut *self.ctl.lock() {
                    Ctl::Scheduler(s) => s.handle(link.id, msg, now),
                    Ctl::Member(m) => {
                        if link.peer() == SCHEDULER_ID {
                            m.handle(msg, now);
                        }
                    }
                }
                self.pump();
            }
            Kind::Request => self.on_request(link, frame),
            Kind::Response => self.on_response(link, frame),
            Kind::Ack => {}
        }
    }

    fn on_closed(&self, link: &Arc<Link>, reason: String) {
        {
            let mut links = self.links.lock();
            links.by_id.remove(&link.id);
            if links.by_node.get(&link.peer()) == Some(&link.id) {
                links.by_node.remove(&link.peer());
            }
        }
        if self.shutting_down.load(Ordering::Acquire) {
            return;
        }
        let peer = link.peer();
        self.verbose(
            1,
            &format!("link {} to {} closed: {reason}", link.id, describe(peer)),
        );
        match &mut *self.ctl.lock() {
            Ctl::Scheduler(s) => s.disconnected(link.id),
            Ctl::Member(m) => {
                if peer == SCHEDULER_ID {
                    m.scheduler_disconnected();
                }
            }
        }
        self.pump();
        if peer != 0 {
            self.fail_requests_to(peer, || TrackError::ConnectionLost {
                node: peer,
                reason: reason.clone(),
            });
        }
    }
}

/// What the connector prepared for its offer.
enum OfferPending {
    Tcp,
    Shm {
        a: shm::Ring,
        c: shm::Ring,
        pa: std::path::PathBuf,
        pc: std::path::PathBuf,
    },
    Rdma(rdma::Prepared),
}

/// What the acceptor chose.
enum Chosen {
    Tcp,
    Shm(shm::Rings),
    Rdma(rdma::Prepared),
}

/// The offer of a plain TCP link.
fn tcp_offer() -> Control {
    Control::VanOffer {
        van: "tcp".into(),
        to_acceptor: String::new(),
        to_connector: String::new(),
        ring_bytes: 0,
        endpoint: Vec::new(),
    }
}

/// The IPv4 address of interface `name`.
fn interface_ip(name: &str) -> Result<IpAddr, TransportError> {
    let ifs = if_addrs::get_if_addrs()
        .map_err(|e| TransportError::io("listing network interfaces", e))?;
    ifs.iter()
        .filter(|i| i.name == name)
        .map(|i| i.ip())
        .find(|ip| ip.is_ipv4())
        .ok_or_else(|| TransportError::Config {
            name: "DMLC_INTERFACE".into(),
            value: name.into(),
            reason: format!(
                "no IPv4 address on that interface (interfaces: {})",
                ifs.iter()
                    .map(|i| i.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
}

/// The local address this machine uses to reach `host:port`.
fn local_ip_toward(host: &str, port: u16) -> String {
    let probe = || -> std::io::Result<IpAddr> {
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        s.connect((host, port))?;
        Ok(s.local_addr()?.ip())
    };
    probe()
        .map(|ip| ip.to_string())
        .unwrap_or_else(|_| "127.0.0.1".into())
}

/// An identifier of this host: same boot, same host name and same network
/// namespace give the same value (peers that can share memory).
pub(crate) fn host_id() -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325; // FNV-1a
    let parts = [
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default(),
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default(),
        std::fs::read_link("/proc/self/ns/net")
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
    ];
    for p in parts {
        for b in p.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The handshake's TCP stream, whole again, for a van that takes it over;
/// an error if the peer sent bytes past the van answer.
fn reclaim_stream(
    reader: FrameReader<tokio::net::tcp::OwnedReadHalf>,
    wr: tokio::net::tcp::OwnedWriteHalf,
    what: &'static str,
) -> Result<TcpStream, TransportError> {
    let (rd, rest) = reader.into_parts();
    if !rest.is_empty() {
        return Err(TransportError::io(
            what,
            "bytes arrived on tcp after the van answer",
        ));
    }
    rd.reunite(wr).map_err(|e| TransportError::io(what, e))
}
