//! Links: joining the cluster (registration through the scheduler, then a
//! link to every server), and the I/O of the login handshake: this file
//! runs `protocol::handshake`'s machines over the new TCP connection,
//! answers their questions (admission, which van to offer, what to answer
//! to an offer) and starts the chosen van on the link.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

use crate::config::VanKind;
use crate::error::TransportError;
use crate::link::Link;
use crate::protocol::handshake::{
    Acceptor, AcceptorConfig, Action, Connector, ConnectorConfig, Done, Handshake, HandshakeError,
};
use crate::protocol::{describe, role_rank, NodeId, Role, SCHEDULER_ID};
use crate::security;
use crate::van::tcp;
use crate::van::{rdma, shm, Half, Handshaken, Start, Van, VanError};
use crate::wire::{Control, NodeInfo, VanId};

use super::{Ctl, Inner, HANDSHAKE_TIMEOUT, MAX_HANDSHAKES};

impl Inner {
    pub(super) fn join(&self) -> Result<(), TransportError> {
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
    pub(super) async fn connect(
        &self,
        addr: &str,
        peer: NodeId,
    ) -> Result<Arc<Link>, TransportError> {
        let stream = tcp::connect(addr, Duration::from_secs(5), self.cfg.tcp_send_buffer)
            .await
            .map_err(|e| TransportError::io(format!("connecting to {addr}"), e))?;
        let mut conn = Handshaken::new(stream);
        let who = format!("{} at {addr}", describe(peer));
        let me = self.my_id();
        let epoch = match &*self.ctl.lock() {
            Ctl::Member(m) => m.epoch(),
            Ctl::Scheduler(_) => 0,
        };
        let mut hs = Connector::new(
            ConnectorConfig {
                me,
                peer,
                epoch,
                token: self.token.clone().unwrap_or_default(),
                nonce: security::nonce(),
                timeout: HANDSHAKE_TIMEOUT,
            },
            Instant::now(),
        );
        // What the offer prepared, whether this side insists on its van,
        // and why no offer could be made.
        let (mut half, mut strict, mut unavailable) = (None, false, None);
        let outcome = drive(&mut hs, &mut conn, me, peer, |hs, ask| {
            if ask != Action::Offer {
                return;
            }
            match self.make_offer(peer, &who) {
                Ok((van, bytes, h, s)) => {
                    (half, strict) = (Some(h), s);
                    hs.offer(van, bytes, Instant::now());
                }
                Err(e) => {
                    hs.abandon(e.to_string());
                    unavailable = Some(e);
                }
            }
        })
        .await;
        let done = match (outcome, unavailable) {
            (_, Some(e)) => return Err(e),
            (Ok(d), None) => d,
            (Err(e), None) => return Err(handshake_error(e, &who)),
        };
        let mut half =
            half.ok_or_else(|| TransportError::io(format!("van offer to {who}"), "none made"))?;
        let van = match &done.answer {
            Ok(answer) => {
                half.finish(answer).map_err(|e| {
                    TransportError::io(
                        format!("starting the {} van with {who}", done.van.name()),
                        e,
                    )
                })?;
                done.van
            }
            Err(reason) if strict || done.van != VanId::Shm => {
                return Err(TransportError::Unavailable(format!(
                    "{who} refused {}: {reason}",
                    done.van.name()
                )))
            }
            Err(reason) => {
                tracing::info!("{who} declined shared memory ({reason}); using tcp");
                half = self.tcp().half();
                VanId::Tcp
            }
        };
        let link = self.new_link(peer, van);
        self.verbose(
            1,
            &format!("connected to {who} over {} (link {})", van.name(), link.id),
        );
        if let Err(e) = half.start(self.start_on(conn, link.clone())) {
            // Nothing will read or write it: end it, failing whatever a
            // request routed onto it meanwhile.
            let e = TransportError::io(format!("starting the {} van", van.name()), e);
            crate::van::end(&link, &self.sink(), e.to_string());
            return Err(e);
        }
        Ok(link)
    }

    /// The connector's offer for a link to `peer`: the van, its offer
    /// bytes, what it prepared, and whether a refusal fails the link
    /// (`PSKV_VAN=shm` or RDMA) rather than falling back to TCP.
    #[allow(clippy::type_complexity)]
    fn make_offer(
        &self,
        peer: NodeId,
        who: &str,
    ) -> Result<(VanId, Vec<u8>, Box<dyn Half>, bool), TransportError> {
        let offer = |v: Box<dyn Van>| v.offer().map(|(bytes, h)| (v.id(), bytes, h));
        let plain = || Ok((VanId::Tcp, Vec::new(), self.tcp().half(), false));
        // The scheduler's links are always TCP, and not watched before
        // the I/O threads sleep (`van/tcp/idle.rs`).
        if peer == SCHEDULER_ID {
            let tcp = tcp::TcpVan {
                idle: None,
                ..self.tcp()
            };
            return Ok((VanId::Tcp, Vec::new(), tcp.half(), false));
        }
        if let Some(id) = self.cfg.van.rdma() {
            let (id, bytes, h) = self
                .van_of(id)
                .and_then(offer)
                .map_err(|e| TransportError::Unavailable(format!("RDMA to {who}: {e}")))?;
            return Ok((id, bytes, h, true));
        }
        let peer_host = match &*self.ctl.lock() {
            Ctl::Member(m) => m.nodes().get(&peer).map(|n| n.host_id),
            Ctl::Scheduler(_) => None,
        };
        let same_host = peer_host == Some(self.host_id);
        let strict = self.cfg.van == VanKind::Shm;
        if strict && !same_host {
            return Err(TransportError::Unavailable(format!(
                "PSKV_VAN=shm, but {who} is not on this host (or not in this network namespace)"
            )));
        }
        if !same_host || self.cfg.van == VanKind::Tcp {
            return plain();
        }
        match self.van_of(VanId::Shm).and_then(offer) {
            Ok((id, bytes, h)) => Ok((id, bytes, h, strict)),
            Err(e) if strict => Err(TransportError::io(
                "creating shared-memory rings in /dev/shm",
                e,
            )),
            Err(e) => {
                tracing::warn!("shared memory unavailable ({e}); using tcp with {who}");
                plain()
            }
        }
    }

    /// Van `id`, if this node runs it (`PSKV_VAN`), with this node's
    /// settings.
    fn van_of(&self, id: VanId) -> Result<Box<dyn Van>, VanError> {
        if !self.cfg.van.accepts(id) {
            return Err(VanError::Unavailable(format!(
                "this node does not run {} (PSKV_VAN)",
                id.name()
            )));
        }
        let limits = self.cfg.limits;
        Ok(match id {
            VanId::Tcp => Box::new(self.tcp()),
            VanId::Shm => Box::new(shm::ShmVan {
                ring_bytes: self.cfg.shm_bytes,
                heap_bytes: self.cfg.shm_heap_bytes,
                limits,
                readers: (!self.cfg.shm_reader_per_link).then(|| self.shm_readers.clone()),
            }),
            VanId::Rdma | VanId::RdmaEmulated => Box::new(rdma::RdmaVan {
                id,
                dev: self.rdma_device()?,
                limits,
            }),
        })
    }

    /// The TCP van with this node's limits.
    fn tcp(&self) -> tcp::TcpVan {
        tcp::TcpVan {
            limits: self.cfg.limits,
            idle: self.idle.on().then(|| self.idle.clone()),
        }
    }

    /// What a van starts on: `conn`, for `link`, into this node.
    fn start_on(&self, conn: Handshaken, link: Arc<Link>) -> Start<'_> {
        Start {
            conn,
            link,
            sink: self.sink(),
            rt: &self.handle,
        }
    }

    /// The RDMA device, opened once.
    pub(super) fn rdma_device(&self) -> Result<Arc<dyn rdma::verbs::Device>, VanError> {
        self.rdma_dev
            .get_or_init(|| rdma::device(self.cfg.van == VanKind::RdmaEmulated))
            .clone()
    }

    pub(super) fn spawn_accept(&self, listener: TcpListener) {
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

    pub(super) async fn accept(
        &self,
        stream: TcpStream,
        addr: SocketAddr,
    ) -> Result<(), TransportError> {
        if let Err(e) = tcp::tune(&stream, addr.ip(), self.cfg.tcp_send_buffer) {
            tracing::warn!("setting up the connection from {addr}: {e}");
        }
        let mut conn = Handshaken::new(stream);
        let mut hs = Acceptor::new(
            AcceptorConfig {
                token: self.token.clone(),
                loopback: addr.ip().is_loopback(),
                nonce: security::nonce(),
                timeout: HANDSHAKE_TIMEOUT,
            },
            Instant::now(),
        );
        let mut half = None;
        let outcome = drive(&mut hs, &mut conn, self.my_id(), 0, |hs, ask| match ask {
            Action::Admit { node_id, epoch } => {
                // Fencing: an id the scheduler declared dead, or one a
                // restart has taken over (another epoch), is an old process
                // that must stop.
                let admitted = match &*self.ctl.lock() {
                    Ctl::Member(m) => m.admits(node_id, epoch),
                    Ctl::Scheduler(_) => Ok(()),
                };
                if let Err(reason) = &admitted {
                    tracing::warn!("refused a connection from {addr}: {reason}");
                }
                hs.admit(admitted, Instant::now());
            }
            Action::Answer { van, offer } => {
                match self.van_of(van).and_then(|v| v.accept(&offer)) {
                    Ok((answer, h)) => {
                        half = Some(h);
                        hs.answer(Ok(answer));
                    }
                    Err(reason) => hs.answer(Err(reason.to_string())),
                }
            }
            _ => {}
        })
        .await;
        let done = outcome.map_err(|e| handshake_error(e, &addr.to_string()))?;
        let (van, half) = match (half, done.answer.is_ok()) {
            (Some(h), true) => (done.van, h),
            _ => (VanId::Tcp, self.tcp().half()),
        };
        let link = self.new_link(done.peer, van);
        self.verbose(
            1,
            &format!(
                "accepted {} from {addr} over {} (link {})",
                describe(done.peer),
                van.name(),
                link.id
            ),
        );
        half.start(self.start_on(conn, link))
            .map_err(|e| TransportError::io(format!("starting the {} van", van.name()), e))
    }
}

/// Runs handshake `hs` over `conn` until it ends, answering its questions
/// with `ask`; the frames it writes name `me` and `peer`. Every wait is
/// bounded by the machine's deadline.
pub(crate) async fn drive<H: Handshake>(
    hs: &mut H,
    conn: &mut Handshaken,
    me: NodeId,
    peer: NodeId,
    mut ask: impl FnMut(&mut H, Action),
) -> Result<Done, HandshakeError> {
    loop {
        while let Some(action) = hs.poll() {
            match action {
                Action::Send(msg) => {
                    if let Err(e) = tcp::write_frame(&mut conn.wr, &msg.to_frame(me, peer)).await {
                        let reason = format!("write failed: {e}");
                        hs.handle_closed(&reason);
                        while let Some(a) = hs.poll() {
                            if let Action::Failed(e) = a {
                                return Err(e);
                            }
                        }
                        return Err(HandshakeError::Van(reason));
                    }
                }
                Action::Done(d) => return Ok(d),
                Action::Failed(e) => return Err(e),
                other => ask(hs, other),
            }
        }
        let deadline = hs
            .next_timeout()
            .unwrap_or_else(|| Instant::now() + HANDSHAKE_TIMEOUT);
        let read = tokio::time::timeout_at(deadline.into(), conn.reader.read()).await;
        match read {
            Err(_) => hs.handle_timeout(Instant::now()),
            Ok(Ok(frame)) => match Control::from_frame(&frame) {
                Ok(msg) => hs.handle(msg, Instant::now()),
                Err(e) => hs.handle_closed(&e.to_string()),
            },
            Ok(Err(e)) => hs.handle_closed(&e.to_string()),
        }
    }
}

/// A failed handshake with `who`, as the caller sees it.
pub(crate) fn handshake_error(e: HandshakeError, who: &str) -> TransportError {
    match e {
        HandshakeError::Auth(reason) => TransportError::Auth {
            peer: who.to_string(),
            reason,
        },
        HandshakeError::Van(reason) => {
            TransportError::io(format!("negotiating the van with {who}"), reason)
        }
    }
}

/// The IPv4 address of interface `name`.
pub(super) fn interface_ip(name: &str) -> Result<IpAddr, TransportError> {
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
pub(super) fn local_ip_toward(host: &str, port: u16) -> String {
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
