//! Configuration: a builder, or the environment of MXNet's launcher.
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `DMLC_ROLE` | `scheduler`, `server` or `worker` | required |
//! | `DMLC_PS_ROOT_URI` | the scheduler's host | required |
//! | `DMLC_PS_ROOT_PORT` | the scheduler's port (a scheduler: 0 takes any free one) | required |
//! | `DMLC_NUM_SERVER` | servers in the cluster | required |
//! | `DMLC_NUM_WORKER` | workers in the cluster | required |
//! | `DMLC_INTERFACE` | network interface to listen on and announce (its IPv4 address) | all interfaces; the host's name is announced |
//! | `DMLC_NODE_HOST` | host name or address to announce | from the interface, else the machine's address toward the scheduler |
//! | `DMLC_PORT` | this node's listening port | any free port |
//! | `PS_HEARTBEAT_INTERVAL` | seconds between heartbeats; 0 disables | 1 |
//! | `PS_HEARTBEAT_TIMEOUT` | seconds of silence before a node is dead; 0 disables | 10 |
//! | `PSKV_SCHEDULER_TIMEOUT` | seconds of the scheduler's silence before a node gives it up (a stalled scheduler is waited for until then); 0: only its closed connection | 60 |
//! | `PSKV_REPLICAS` | 1, or 2: every server's keys are also held by the next server, which takes them over when it dies (the kvstore replicates; the transport links the servers and lets the job end well with one server dead) | 1 |
//! | `DMLC_SERVER_ID`, `DMLC_WORKER_ID` | the rank this server or worker asks for (as MXNet's launcher sets them) | any free rank, in registration order |
//! | `PS_RESEND` | 1: acknowledge and resend every message | 0 |
//! | `PS_RESEND_TIMEOUT` | milliseconds before a resend | 1000 |
//! | `PS_VERBOSE` | 0, 1 (connections) or 2 (every message) | 0 |
//! | `PSKV_TOKEN` | the cluster token (HMAC challenge on every connection) | none: loopback peers only |
//! | `PSKV_VAN` | `tcp`, `shm`, `auto` (shared memory with peers on the same host), `rdma` (verbs; feature `rdma`), `rdma-emulated` (in-process verbs, for tests) | `auto` |
//! | `PSKV_RDMA_GID_INDEX` | GID table entry of port 1 for RoCE (read by the verbs backend when the link layer is Ethernet, or when set) | 0 |
//! | `PSKV_SHM_BYTES` | bytes of each shared-memory ring (one per direction and peer) | 16 MiB |
//! | `PSKV_SHM_READERS` | who reads a node's shared-memory links: `node` (one thread for up to 127 of them; needs Linux 5.16's `futex_waitv`: where the kernel lacks or refuses it, as `link`) or `link` (a thread each; the kvstore's nodes under the naive engine take it) | `node` |
//! | `PSKV_SHM_HEAP_BYTES` | bytes of each shared-memory heap, where frames of 64 KiB and more cross in one copy; sparse, reserved as used (0: off) | 256 MiB |
//! | `PSKV_MAX_MESSAGE_BYTES` | largest payload accepted in one message | 2 GiB |
//! | `PSKV_CONNECT_TIMEOUT` | seconds to keep trying to reach the scheduler and to register | 60 |
//! | `PSKV_IO_THREADS` | I/O threads of the node's runtime | 2 |
//! | `PSKV_TCP_SNDBUF` | the send buffer of each TCP link to a peer on a loopback address, in bytes (`SO_SNDBUF`: the kernel takes the smaller of it and `net.core.wmem_max`, and doubles that for its bookkeeping); 0, and every link to another address: the kernel sizes it (`net.ipv4.tcp_wmem`) | 262144 |
//! | `PSKV_PORT_FD` | a scheduler only: an inherited pipe it writes the port it listens on to (then a newline), once, and closes | unset |
//! | `PSKV_PROFILE` | also write the transport's profile at shutdown: every request and answer with flow ids (`trace.rs`), to `<role>-<pid>-transport.json` beside the engine's file | off |

use std::time::Duration;

use crate::protocol::Role;
use crate::wire::{Limits, VanId};

mod env;

#[cfg(feature = "rdma")]
pub(crate) use env::rdma_gid_index;
pub(crate) use env::{profile_spec, spin_base_us};

/// The default send buffer of a TCP link over loopback (`SO_SNDBUF`; the
/// kernel takes the smaller of it and `net.core.wmem_max`, doubled: 512
/// KiB where `wmem_max` is 256 KiB or more, 416 KiB with the stock 208
/// KiB). With the kernel's autotuning a socket holds up to `tcp_wmem`'s
/// maximum (4 MiB by default) of sent bytes that the receiver has not
/// read, which it then copies from memory rather than cache (BENCHMARKS.md:
/// "Smaller send buffers over loopback").
pub const TCP_SEND_BUFFER: usize = 256 << 10;

/// Which van carries data between two nodes.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum VanKind {
    /// TCP for every peer.
    Tcp,
    /// Shared memory for peers on the same host; refuse to run otherwise.
    Shm,
    /// Shared memory for peers on the same host, TCP for the others.
    Auto,
    /// RDMA verbs for every peer but the scheduler (feature `rdma`, and a
    /// device).
    Rdma,
    /// The in-memory emulation of verbs: every node in one process (tests).
    RdmaEmulated,
}

impl VanKind {
    /// The RDMA van this setting runs, if any.
    pub(crate) fn rdma(self) -> Option<VanId> {
        match self {
            VanKind::Rdma => Some(VanId::Rdma),
            VanKind::RdmaEmulated => Some(VanId::RdmaEmulated),
            _ => None,
        }
    }

    /// The vans a node with this setting takes when a peer offers them
    /// (TCP always).
    pub(crate) fn accepts(self, van: VanId) -> bool {
        match van {
            VanId::Tcp => true,
            VanId::Shm => matches!(self, VanKind::Shm | VanKind::Auto),
            VanId::Rdma | VanId::RdmaEmulated => self.rdma() == Some(van),
        }
    }
}

/// A node's configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's role.
    pub role: Role,
    /// The scheduler's host.
    pub root_uri: String,
    /// The scheduler's port.
    pub root_port: u16,
    /// Servers in the cluster.
    pub num_servers: u32,
    /// Workers in the cluster.
    pub num_workers: u32,
    /// Interface to listen on and announce.
    pub interface: Option<String>,
    /// Host to announce.
    pub node_host: Option<String>,
    /// Port to listen on (0: any).
    pub port: u16,
    /// Heartbeat period (None: off).
    pub heartbeat_interval: Option<Duration>,
    /// Silence before a node is dead (None: off; a closed connection still
    /// counts).
    pub heartbeat_timeout: Option<Duration>,
    /// The scheduler's silence before a node gives it up (None: only its
    /// closed connection).
    pub scheduler_timeout: Option<Duration>,
    /// The rank this node asks for (None: any).
    pub rank: Option<u32>,
    /// Copies of each server's keys (1: none; 2: the next server holds
    /// them too).
    pub replicas: u32,
    /// Acknowledge and resend every message.
    pub resend: bool,
    /// Time before a resend.
    pub resend_timeout: Duration,
    /// Logging detail (0, 1, 2).
    pub verbose: u8,
    /// The cluster token.
    pub token: Option<String>,
    /// Van choice.
    pub van: VanKind,
    /// Shared-memory ring size.
    pub shm_bytes: usize,
    /// Shared-memory heap size (0: large frames go through the ring).
    pub shm_heap_bytes: usize,
    /// A reader thread for each shared-memory link, rather than one for
    /// all the node's links (which needs `futex_waitv`: without it, this
    /// holds anyway).
    pub shm_reader_per_link: bool,
    /// Frame limits.
    pub limits: Limits,
    /// Time to reach the scheduler and register.
    pub connect_timeout: Duration,
    /// Runtime threads.
    pub io_threads: usize,
    /// The send buffer (`SO_SNDBUF`), in bytes, of each TCP link to a peer
    /// on a loopback address; 0 leaves it to the kernel's autotuning, as
    /// for links to other addresses.
    pub tcp_send_buffer: usize,
    /// How long a runtime thread of this node, about to sleep, first
    /// watches the node's TCP data links for a frame (`van/tcp/idle.rs`);
    /// zero: never (and never on the scheduler). None (the default): by
    /// role, see [`Config::tcp_idle_poll`].
    pub tcp_idle_poll: Option<Duration>,
    /// A scheduler only: an inherited pipe to which it writes the port it
    /// listens on (then a newline) and which it then closes, once per
    /// process (anything but a pipe, or a second start, is an error); how a
    /// launcher learns the port of a scheduler it started on port 0.
    pub port_fd: Option<i32>,
}

impl Config {
    /// A configuration with the defaults, for a cluster whose scheduler
    /// listens at `root_uri:root_port`.
    ///
    /// ```
    /// use pskv_transport::{Config, Role};
    /// let cfg = Config::new(Role::Worker, "127.0.0.1", 9100, 2, 4).token("secret");
    /// assert_eq!(cfg.num_workers, 4);
    /// ```
    pub fn new(
        role: Role,
        root_uri: impl Into<String>,
        root_port: u16,
        num_servers: u32,
        num_workers: u32,
    ) -> Config {
        Config {
            role,
            root_uri: root_uri.into(),
            root_port,
            num_servers,
            num_workers,
            interface: None,
            node_host: None,
            port: 0,
            heartbeat_interval: Some(Duration::from_secs(1)),
            heartbeat_timeout: Some(Duration::from_secs(10)),
            scheduler_timeout: Some(Duration::from_secs(60)),
            rank: None,
            replicas: 1,
            resend: false,
            resend_timeout: Duration::from_millis(1000),
            verbose: 0,
            token: None,
            van: VanKind::Auto,
            shm_bytes: 16 << 20,
            shm_heap_bytes: 256 << 20,
            shm_reader_per_link: false,
            limits: Limits::default(),
            connect_timeout: Duration::from_secs(60),
            io_threads: 2,
            tcp_send_buffer: TCP_SEND_BUFFER,
            tcp_idle_poll: None,
            port_fd: None,
        }
    }

    /// How long a runtime thread, about to sleep, watches the TCP data
    /// links: never on the scheduler (its links are heartbeats);
    /// otherwise `tcp_idle_poll` if set, else by role: the spin base
    /// (`PSKV_SPIN_US`, 50 µs) on a server, zero on a worker (its waiting
    /// callers spin already).
    pub fn tcp_idle_poll(&self) -> Duration {
        match self.role {
            Role::Scheduler => Duration::ZERO,
            Role::Server => self
                .tcp_idle_poll
                .unwrap_or(Duration::from_micros(env::spin_base_us().into())),
            Role::Worker => self.tcp_idle_poll.unwrap_or(Duration::ZERO),
        }
    }

    /// How many nodes of `role` the cluster has.
    pub fn count_of(&self, role: Role) -> u32 {
        match role {
            Role::Scheduler => 1,
            Role::Server => self.num_servers,
            Role::Worker => self.num_workers,
        }
    }

    /// Asks for this rank (None: any).
    pub fn rank(mut self, rank: Option<u32>) -> Config {
        self.rank = rank;
        self
    }

    /// Sets the cluster token.
    pub fn token(mut self, token: impl Into<String>) -> Config {
        self.token = Some(token.into());
        self
    }

    /// Sets the van choice.
    pub fn van(mut self, van: VanKind) -> Config {
        self.van = van;
        self
    }

    /// Sets the heartbeat period and timeout (None: off).
    pub fn heartbeat(mut self, interval: Option<Duration>, timeout: Option<Duration>) -> Config {
        self.heartbeat_interval = interval;
        self.heartbeat_timeout = timeout;
        self
    }

    /// Sets the time allowed to reach the scheduler and register.
    pub fn connect_timeout(mut self, t: Duration) -> Config {
        self.connect_timeout = t;
        self
    }
}
