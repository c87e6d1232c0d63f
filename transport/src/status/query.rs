//! The observer: one question to a running job's scheduler.

use std::time::{Duration, Instant};

use super::JobStatus;
use crate::error::TransportError;
use crate::postoffice::{drive_handshake, handshake_error};
use crate::protocol::handshake::{Action, Connector, ConnectorConfig};
use crate::protocol::SCHEDULER_ID;
use crate::security;
use crate::van::tcp;
use crate::van::Handshaken;
use crate::wire::{Control, Limits, VanId};

/// Asks the scheduler at `addr` (`host:port`) for the job's status, proving
/// `token` (None: the job runs without one, and only loopback peers are
/// let in). The whole exchange, connection included, takes at most
/// `timeout`; the job is not disturbed (see the module docs).
pub fn query(
    addr: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<JobStatus, TransportError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| TransportError::io("starting a runtime for the status query", e))?;
    let what = format!("the scheduler at {addr} to answer a status query");
    rt.block_on(async {
        tokio::time::timeout(timeout, ask(addr, token, timeout))
            .await
            .unwrap_or(Err(TransportError::Timeout {
                what,
                after: timeout,
            }))
    })
}

async fn ask(
    addr: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<JobStatus, TransportError> {
    // A status query: a few small frames, the kernel sizes its buffer.
    let stream = tcp::connect(addr, timeout, 0)
        .await
        .map_err(|e| TransportError::io(format!("connecting to the scheduler at {addr}"), e))?;
    let mut conn = Handshaken::new(stream);
    // An observer dials as a node that has not registered (id 0), and
    // offers the plain stream.
    let mut hs = Connector::new(
        ConnectorConfig {
            me: 0,
            peer: SCHEDULER_ID,
            epoch: 0,
            token: token.map(|t| t.as_bytes().to_vec()).unwrap_or_default(),
            nonce: security::nonce(),
            timeout,
        },
        Instant::now(),
    );
    let done = drive_handshake(&mut hs, &mut conn, 0, SCHEDULER_ID, |hs, ask| {
        if ask == Action::Offer {
            hs.offer(VanId::Tcp, Vec::new(), Instant::now());
        }
    })
    .await
    .map_err(|e| handshake_error(e, &format!("the scheduler at {addr}")))?;
    if let Err(reason) = done.answer {
        return Err(TransportError::Unavailable(format!(
            "the scheduler at {addr} refused a plain connection: {reason}"
        )));
    }
    tcp::write_frame(
        &mut conn.wr,
        &Control::StatusQuery.to_frame(0, SCHEDULER_ID),
    )
    .await
    .map_err(|e| TransportError::io("sending the status query", e))?;
    let mut reader = conn.reader.with_limits(Limits::default());
    loop {
        let frame = reader.read().await.map_err(|e| {
            TransportError::io(
                format!("reading the status from the scheduler at {addr}"),
                format!(
                    "{e} (a scheduler older than `pskv status`, or one shutting down, closes the connection)"
                ),
            )
        })?;
        match Control::from_frame(&frame) {
            Ok(Control::Status(status)) => return Ok(*status),
            Ok(_) => continue,
            Err(e) => {
                return Err(TransportError::io(
                    format!("the status from the scheduler at {addr}"),
                    e,
                ))
            }
        }
    }
}
