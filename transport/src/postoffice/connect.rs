//! Links: joining the cluster (registration through the scheduler, then a
//! link to every server), the connector's and the acceptor's side of the
//! login handshake (the token's challenge and proof, then the van offer and
//! answer), and starting the chosen van on the link.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

use crate::config::VanKind;
use crate::error::TransportError;
use crate::link::Link;
use crate::protocol::{describe, role_rank, NodeId, Role, SCHEDULER_ID};
use crate::security;
use crate::van::tcp::{self, FrameReader};
use crate::van::{rdma, shm};
use crate::wire::{Control, Limits, NodeInfo};

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
    pub(super) fn choose_offer(
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
    pub(super) fn rdma_device(&self) -> Result<Arc<dyn rdma::verbs::Device>, String> {
        self.rdma_dev
            .get_or_init(|| rdma::device(self.cfg.van == VanKind::RdmaEmulated))
            .clone()
    }

    pub(super) fn start_rdma(
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

    pub(super) fn start_shm(
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
    pub(super) fn open_rings(
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
}

/// What the connector prepared for its offer.
pub(super) enum OfferPending {
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
pub(super) enum Chosen {
    Tcp,
    Shm(shm::Rings),
    Rdma(rdma::Prepared),
}

/// The offer of a plain TCP link.
pub(super) fn tcp_offer() -> Control {
    Control::VanOffer {
        van: "tcp".into(),
        to_acceptor: String::new(),
        to_connector: String::new(),
        ring_bytes: 0,
        endpoint: Vec::new(),
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

/// The handshake's TCP stream, whole again, for a van that takes it over;
/// an error if the peer sent bytes past the van answer.
pub(super) fn reclaim_stream(
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
