//! A node's start: its I/O runtime, its listener (on the interface, the
//! announced loopback address, or every interface), the state machine of
//! its role, its state (`Inner`), then, for a member, joining the cluster.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use parking_lot::{Mutex, RwLock};
use tokio::net::TcpListener;

use super::connect::{interface_ip, local_ip_toward};
use super::{control, host_id, Ctl, Inner, Links, MissedBarrier, Owner, Postoffice, Requests};
use crate::config::Config;
use crate::error::TransportError;
use crate::kv::RequestHandler;
use crate::port_pipe::report_port;
use crate::protocol::member::{Member, MemberConfig};
use crate::protocol::resender::Resender;
use crate::protocol::scheduler::{Scheduler, SchedulerConfig};
use crate::protocol::{Role, SCHEDULER_ID};
use crate::slot::Slot;
use crate::status::{unix_us, ClockSync, Traffic};
use crate::van::tcp::IdlePoll;

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
        let idle = Arc::new(IdlePoll::new(cfg.tcp_idle_poll()));
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if idle.on() {
            // Weak: the runtime's handle, which `idle` keeps, keeps this
            // hook alive.
            let idle = Arc::downgrade(&idle);
            builder.on_thread_park(move || {
                if let Some(idle) = idle.upgrade() {
                    idle.before_park();
                }
            });
        }
        let rt = builder
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
        idle.set_runtime(handle.clone());
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
        if let (Role::Scheduler, Some(fd)) = (cfg.role, cfg.port_fd) {
            report_port(fd, listen.port())?;
        }
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
        let born = Instant::now();
        let inner = Arc::new(Inner {
            token: cfg.token.as_ref().map(|t| t.as_bytes().to_vec()),
            resender: cfg
                .resend
                .then(|| Mutex::new(Resender::new(my_id, cfg.resend_timeout, 20))),
            cfg,
            rt: Mutex::new(Some(rt)),
            handle,
            idle,
            listen,
            announce,
            host_id: host_id(),
            ctl: Mutex::new(ctl),
            links: Mutex::new(Links::default()),
            next_link: AtomicU64::new(1),
            reqs: Mutex::new(Requests::default()),
            dialing: Mutex::new(HashMap::new()),
            pollers: RwLock::new(Arc::new(Vec::new())),
            shm_readers: Default::default(),
            timer: control::Timer::new(),
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
            born,
            retired: Traffic::default(),
            rounds: Arc::default(),
            clock: Mutex::new(ClockSync::new(born, unix_us())),
            missed: MissedBarrier::default(),
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
}
