//! Verbs over libibverbs (rdma-core) for machines with an RDMA device
//! (feature `rdma`), through the raw `ibverbs-sys` bindings. The `ibverbs`
//! crate on top of them (0.9) has no RDMA write and no way to reach the raw
//! queue pair, so this backend speaks to the C library itself: every verb
//! the van uses, RDMA write with immediate included.
//!
//! Ownership: the device context and protection domain are opened once per
//! process and kept for its life. A region owns its buffer and its memory
//! registration; a queue pair owns its QP and completion queue; both undo
//! them on drop (the QP before its CQ).
//!
//! Thread safety: libibverbs allows posting and polling on one QP and CQ
//! from several threads; the van still posts sends from one thread and
//! polls from another. A region's bytes are handed between the van and the
//! device by the van's protocol (a range is never read and written at once).
//!
//! Addressing: InfiniBand ports route by LID; RoCE ports (Ethernet link
//! layer) need a GID: `PSKV_RDMA_GID_INDEX` picks the entry of port 1's GID
//! table (default 0; RoCE v2 over IPv4 usually wants the index `show_gids`
//! lists for it).

use std::ffi::CStr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ibverbs_sys as ffi;
use parking_lot::Mutex;

use super::verbs::{
    Completion, Device, QueuePair, Region, RemoteRegion, RemoteWrite, Span, VerbsError, VerbsResult,
};
use crate::van::VanError;

/// The port the van uses.
const PORT: u8 = 1;

/// Send and receive queue depths (the van keeps at most 32 of each posted).
const QUEUE_DEPTH: u32 = 128;

fn os_error(what: &str, errno: i32) -> VerbsError {
    VerbsError(format!(
        "{what}: {}",
        std::io::Error::from_raw_os_error(errno)
    ))
}

fn last_os_error(what: &str) -> VerbsError {
    VerbsError(format!("{what}: {}", std::io::Error::last_os_error()))
}

/// The first RDMA device of this machine, opened once.
/// A failure is not kept: a port that was down may be up at the next link.
pub(crate) fn open_first() -> Result<Arc<IbvDevice>, VanError> {
    static OPENED: OnceLock<Arc<IbvDevice>> = OnceLock::new();
    static OPENING: parking_lot::Mutex<()> = parking_lot::Mutex::new(());
    if let Some(d) = OPENED.get() {
        return Ok(d.clone());
    }
    let _one = OPENING.lock();
    if let Some(d) = OPENED.get() {
        return Ok(d.clone());
    }
    let d = Arc::new(open()?);
    Ok(OPENED.get_or_init(|| d).clone())
}

fn open() -> Result<IbvDevice, VanError> {
    let mut n = 0;
    // SAFETY: a plain call; the list is freed below.
    let list = unsafe { ffi::ibv_get_device_list(&mut n) };
    if list.is_null() {
        // ENOSYS (no kernel support) means: no devices.
        return Err(VanError::Unavailable(format!(
            "no RDMA devices ({})",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: the list holds `n` devices; it is freed once, after the
    // device is opened (an opened context does not need the list).
    let result = unsafe {
        if n <= 0 {
            Err(VanError::Unavailable(
                "no RDMA devices on this machine".into(),
            ))
        } else {
            open_device(*list)
        }
    };
    // SAFETY: the list from ibv_get_device_list, freed once.
    unsafe { ffi::ibv_free_device_list(list) };
    result
}

/// # Safety
/// `dev` is a device of a live device list.
unsafe fn open_device(dev: *mut ffi::ibv_device) -> Result<IbvDevice, VanError> {
    // SAFETY: the caller's contract; the name is a C string of the device.
    let name = unsafe {
        let p = ffi::ibv_get_device_name(dev);
        if p.is_null() {
            "rdma0".to_string()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    // SAFETY: the caller's contract.
    let ctx = unsafe { ffi::ibv_open_device(dev) };
    if ctx.is_null() {
        return Err(VanError::Unavailable(format!(
            "opening {name}: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: a live context (kept for the process's life once all of
    // this succeeds; closed below if it does not).
    let pd = unsafe { ffi::ibv_alloc_pd(ctx) };
    if pd.is_null() {
        let e = std::io::Error::last_os_error();
        // SAFETY: the context opened above, unused elsewhere.
        unsafe { ffi::ibv_close_device(ctx) };
        return Err(VanError::Unavailable(format!(
            "allocating a protection domain on {name}: {e}"
        )));
    }
    // SAFETY: the caller's device; `ctx` and `pd` were made above.
    match unsafe { describe_port(ctx, &name) } {
        Ok(port) => Ok(IbvDevice {
            name,
            ctx,
            pd,
            lid: port.0,
            mtu: port.1,
            gid: port.2,
            gid_index: port.3,
        }),
        Err(e) => {
            // SAFETY: ours, unused elsewhere; the domain before the context.
            unsafe {
                ffi::ibv_dealloc_pd(pd);
                ffi::ibv_close_device(ctx);
            }
            Err(e)
        }
    }
}

/// Port 1's LID, active MTU, and GID with its index (for RoCE or when
/// `PSKV_RDMA_GID_INDEX` is set).
///
/// # Safety
/// `ctx` is a live context.
#[allow(clippy::type_complexity)]
unsafe fn describe_port(
    ctx: *mut ffi::ibv_context,
    name: &str,
) -> Result<(u16, ffi::ibv_mtu, Option<[u8; 16]>, u8), VanError> {
    let mut port = ffi::ibv_port_attr::default();
    // SAFETY: a live context. The exported ibv_query_port fills the older,
    // shorter layout, a prefix of `ibv_port_attr` (lid and link layer
    // included); the rest stays zero.
    let rc =
        unsafe { ffi::ibv_query_port(ctx, PORT, (&mut port as *mut ffi::ibv_port_attr).cast()) };
    if rc != 0 {
        return Err(VanError::Unavailable(format!(
            "querying port {PORT} of {name}: {}",
            std::io::Error::from_raw_os_error(rc)
        )));
    }
    if port.state != ffi::ibv_port_state::IBV_PORT_ACTIVE {
        return Err(VanError::Unavailable(format!(
            "port {PORT} of {name} is not active"
        )));
    }
    let asked =
        crate::config::rdma_gid_index().map_err(|e| VanError::Unavailable(e.to_string()))?;
    let gid_index: u8 = asked.unwrap_or(0);
    let ethernet = port.link_layer == ffi::IBV_LINK_LAYER_ETHERNET as u8;
    let gid = if ethernet || asked.is_some() {
        // SAFETY: a plain-data union; all zeroes is a valid value.
        let mut gid: ffi::ibv_gid = unsafe { std::mem::zeroed() };
        // SAFETY: a live context and an out-parameter of the right type.
        let rc = unsafe { ffi::ibv_query_gid(ctx, PORT, gid_index as i32, &mut gid) };
        if rc != 0 {
            return Err(VanError::Unavailable(format!(
                "reading GID {gid_index} of {name}: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: every bit pattern is a valid `raw`.
        Some(unsafe { gid.raw })
    } else {
        None
    };
    Ok((port.lid, port.active_mtu, gid, gid_index))
}

/// An opened device (kept for the process's life).
pub(crate) struct IbvDevice {
    name: String,
    ctx: *mut ffi::ibv_context,
    pd: *mut ffi::ibv_pd,
    lid: u16,
    mtu: ffi::ibv_mtu,
    gid: Option<[u8; 16]>,
    gid_index: u8,
}

// SAFETY: libibverbs objects may be used from any thread; the context and
// protection domain are never freed.
unsafe impl Send for IbvDevice {}
unsafe impl Sync for IbvDevice {}

/// Registered memory: a buffer of ours and its registration.
struct IbvRegion {
    buf: *mut u8,
    len: usize,
    mr: *mut ffi::ibv_mr,
    lkey: u32,
    rkey: u32,
}

// SAFETY: the buffer is reached only through raw pointers, by ranges the
// van's protocol gives to one side at a time; the registration is freed
// once, on drop.
unsafe impl Send for IbvRegion {}
unsafe impl Sync for IbvRegion {}

impl IbvRegion {
    fn check(&self, offset: usize, len: usize) -> VerbsResult {
        if offset.checked_add(len).is_none_or(|end| end > self.len) || len > u32::MAX as usize {
            return Err(VerbsError(format!(
                "{len} bytes at {offset} are outside a {}-byte region",
                self.len
            )));
        }
        Ok(())
    }

    fn sge(&self, offset: usize, len: usize) -> ffi::ibv_sge {
        ffi::ibv_sge {
            addr: self.buf as u64 + offset as u64,
            length: len as u32,
            lkey: self.lkey,
        }
    }
}

impl Drop for IbvRegion {
    fn drop(&mut self) {
        // SAFETY: our registration, undone once; no operation uses it any
        // more (the van drops regions after its queue pair).
        let rc = unsafe { ffi::ibv_dereg_mr(self.mr) };
        if rc != 0 {
            // The device may still write there: keep the buffer (a leak).
            tracing::warn!("ibv_dereg_mr failed ({rc}): keeping its {} bytes", self.len);
            return;
        }
        // SAFETY: our buffer, no longer registered, freed once.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.buf, self.len)) });
    }
}

impl Region for IbvRegion {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn len(&self) -> usize {
        self.len
    }

    fn remote(&self) -> RemoteRegion {
        RemoteRegion {
            addr: self.buf as u64,
            rkey: self.rkey,
            len: self.len as u64,
        }
    }

    fn write(&self, offset: usize, bytes: &[u8]) {
        assert!(
            offset
                .checked_add(bytes.len())
                .is_some_and(|end| end <= self.len),
            "region write out of bounds"
        );
        // SAFETY: inside the buffer (checked); the range is ours (protocol).
        unsafe { crate::copy::copy_to(self.buf.add(offset), bytes) }
    }

    fn read(&self, offset: usize, out: &mut [u8]) {
        assert!(
            offset
                .checked_add(out.len())
                .is_some_and(|end| end <= self.len),
            "region read out of bounds"
        );
        // SAFETY: as in `write`; `out` is a distinct buffer of ours.
        let src = unsafe { std::slice::from_raw_parts(self.buf.add(offset), out.len()) };
        crate::copy::copy(out, src);
    }
}

/// What a peer needs to connect to one of our queue pairs.
#[derive(serde::Serialize, serde::Deserialize)]
struct Endpoint {
    qpn: u32,
    psn: u32,
    lid: u16,
    gid: Option<[u8; 16]>,
    /// The port's active MTU: the path uses the smaller of the two.
    mtu: ffi::ibv_mtu,
}

/// A reliable-connected queue pair and its completion queue.
struct IbvQp {
    dev: Arc<IbvDevice>,
    qp: *mut ffi::ibv_qp,
    cq: *mut ffi::ibv_cq,
    psn: u32,
    connected: Mutex<bool>,
}

// SAFETY: libibverbs allows posts and polls from any thread; the QP and CQ
// are destroyed once, on drop.
unsafe impl Send for IbvQp {}
unsafe impl Sync for IbvQp {}

impl Drop for IbvQp {
    fn drop(&mut self) {
        // SAFETY: ours, destroyed once, the QP before the CQ it uses.
        let (q, c) = unsafe { (ffi::ibv_destroy_qp(self.qp), ffi::ibv_destroy_cq(self.cq)) };
        if q != 0 || c != 0 {
            tracing::warn!("destroying a queue pair ({q}) or its completion queue ({c}) failed");
        }
    }
}

impl Device for IbvDevice {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn register(&self, len: usize) -> Result<Arc<dyn Region>, VerbsError> {
        let len = len.max(1);
        let buf = Box::into_raw(vec![0u8; len].into_boxed_slice()) as *mut u8;
        let access = ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
            | ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE;
        // SAFETY: a live protection domain and a buffer of `len` bytes that
        // outlives the registration (both freed together in Drop).
        let mr = unsafe { ffi::ibv_reg_mr(self.pd, buf.cast(), len, access.0 as i32) };
        if mr.is_null() {
            let e = last_os_error(&format!("registering {len} bytes"));
            // SAFETY: the buffer made above, not registered.
            drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(buf, len)) });
            return Err(e);
        }
        // SAFETY: a registration ibv_reg_mr returned.
        let (lkey, rkey) = unsafe { ((*mr).lkey, (*mr).rkey) };
        Ok(Arc::new(IbvRegion {
            buf,
            len,
            mr,
            lkey,
            rkey,
        }))
    }

    fn queue_pair(&self) -> Result<Arc<dyn QueuePair>, VerbsError> {
        let dev = open_first().map_err(|e| VerbsError(e.to_string()))?;
        // SAFETY: a live context; no completion channel (we poll).
        let cq = unsafe {
            ffi::ibv_create_cq(
                self.ctx,
                2 * QUEUE_DEPTH as i32,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        if cq.is_null() {
            return Err(last_os_error("creating a completion queue"));
        }
        let mut attr = ffi::ibv_qp_init_attr {
            qp_context: std::ptr::null_mut(),
            send_cq: cq,
            recv_cq: cq,
            srq: std::ptr::null_mut(),
            cap: ffi::ibv_qp_cap {
                max_send_wr: QUEUE_DEPTH,
                max_recv_wr: QUEUE_DEPTH,
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
            qp_type: ffi::ibv_qp_type::IBV_QPT_RC,
            sq_sig_all: 0,
        };
        // SAFETY: a live protection domain and a filled attribute block.
        let qp = unsafe { ffi::ibv_create_qp(self.pd, &mut attr) };
        if qp.is_null() {
            let e = last_os_error("creating a queue pair");
            // SAFETY: the CQ made above, unused.
            unsafe { ffi::ibv_destroy_cq(cq) };
            return Err(e);
        }
        let psn = u32::from_le_bytes(crate::security::nonce()[..4].try_into().expect("4 bytes"))
            & 0xff_ffff;
        let qp = IbvQp {
            dev,
            qp,
            cq,
            psn,
            connected: Mutex::new(false),
        };
        // INIT needs nothing from the peer, and receives may be posted from
        // INIT on: the van posts its receives before it connects.
        use ffi::ibv_qp_attr_mask as m;
        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_INIT,
            pkey_index: 0,
            port_num: PORT,
            qp_access_flags: (ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
                | ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE)
                .0,
            ..Default::default()
        };
        qp.modify(
            &mut attr,
            m::IBV_QP_STATE | m::IBV_QP_PKEY_INDEX | m::IBV_QP_PORT | m::IBV_QP_ACCESS_FLAGS,
            "INIT",
        )?;
        Ok(Arc::new(qp))
    }
}

fn region_of(r: &Arc<dyn Region>) -> Result<&IbvRegion, VerbsError> {
    r.as_any()
        .downcast_ref::<IbvRegion>()
        .ok_or_else(|| VerbsError("a region registered with another backend".into()))
}

/// The scatter/gather element of a span of one of our regions, checked.
fn sge_of(s: Span<'_>) -> Result<ffi::ibv_sge, VerbsError> {
    let r = region_of(s.region)?;
    r.check(s.offset, s.len)?;
    Ok(r.sge(s.offset, s.len))
}

impl IbvQp {
    fn modify(
        &self,
        attr: &mut ffi::ibv_qp_attr,
        mask: ffi::ibv_qp_attr_mask,
        what: &str,
    ) -> VerbsResult {
        // SAFETY: our live QP and a filled attribute block.
        let rc = unsafe { ffi::ibv_modify_qp(self.qp, attr, mask.0 as i32) };
        if rc != 0 {
            return Err(os_error(&format!("moving the queue pair to {what}"), rc));
        }
        Ok(())
    }

    fn ready(&self) -> VerbsResult {
        if *self.connected.lock() {
            Ok(())
        } else {
            Err(VerbsError("the queue pair is not connected".into()))
        }
    }

    fn post_send_wr(&self, wr: &mut ffi::ibv_send_wr, what: &str) -> VerbsResult {
        self.ready()?;
        let mut bad: *mut ffi::ibv_send_wr = std::ptr::null_mut();
        // SAFETY: our live QP; the work request and its scatter list live
        // through the call (the device copies them); the memory it names
        // is registered and stays untouched until the completion.
        let rc = unsafe {
            let post = (*(*self.qp).context)
                .ops
                .post_send
                .ok_or_else(|| VerbsError("the driver has no post_send".into()))?;
            post(self.qp, wr, &mut bad)
        };
        if rc != 0 {
            return Err(os_error(what, rc));
        }
        Ok(())
    }
}

/// A send work request of one scatter entry, signaled.
fn send_wr(
    wr_id: u64,
    sge: &mut ffi::ibv_sge,
    opcode: ffi::ibv_wr_opcode::Type,
) -> ffi::ibv_send_wr {
    // SAFETY: a plain-data C struct of integers, pointers and unions; all
    // zeroes is its "empty" value.
    let mut wr: ffi::ibv_send_wr = unsafe { std::mem::zeroed() };
    wr.wr_id = wr_id;
    wr.sg_list = sge;
    wr.num_sge = 1;
    wr.opcode = opcode;
    wr.send_flags = ffi::ibv_send_flags::IBV_SEND_SIGNALED.0;
    wr
}

impl QueuePair for IbvQp {
    fn endpoint(&self) -> Vec<u8> {
        // SAFETY: our live QP.
        let qpn = unsafe { (*self.qp).qp_num };
        postcard::to_allocvec(&Endpoint {
            qpn,
            psn: self.psn,
            lid: self.dev.lid,
            gid: self.dev.gid,
            mtu: self.dev.mtu,
        })
        .expect("a small struct encodes")
    }

    fn connect(&self, remote: &[u8]) -> VerbsResult {
        let remote: Endpoint = postcard::from_bytes(remote)
            .map_err(|e| VerbsError(format!("a malformed endpoint: {e}")))?;
        let mut connected = self.connected.lock();
        if *connected {
            return Err(VerbsError("the queue pair is already connected".into()));
        }
        use ffi::ibv_qp_attr_mask as m;
        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTR,
            path_mtu: self.dev.mtu.min(remote.mtu),
            dest_qp_num: remote.qpn,
            rq_psn: remote.psn & 0xff_ffff,
            max_dest_rd_atomic: 1,
            min_rnr_timer: 12,
            ah_attr: ffi::ibv_ah_attr {
                dlid: remote.lid,
                sl: 0,
                src_path_bits: 0,
                port_num: PORT,
                ..Default::default()
            },
            ..Default::default()
        };
        match (remote.gid, self.dev.gid) {
            (Some(gid), Some(_)) => {
                attr.ah_attr.is_global = 1;
                attr.ah_attr.grh.dgid.raw = gid;
                attr.ah_attr.grh.hop_limit = 0xff;
                attr.ah_attr.grh.sgid_index = self.dev.gid_index;
            }
            (None, None) => {}
            _ => {
                return Err(VerbsError(
                    "one side addresses by GID and the other by LID (PSKV_RDMA_GID_INDEX must be set on both or neither)".into(),
                ))
            }
        }
        self.modify(
            &mut attr,
            m::IBV_QP_STATE
                | m::IBV_QP_AV
                | m::IBV_QP_PATH_MTU
                | m::IBV_QP_DEST_QPN
                | m::IBV_QP_RQ_PSN
                | m::IBV_QP_MAX_DEST_RD_ATOMIC
                | m::IBV_QP_MIN_RNR_TIMER,
            "RTR",
        )?;
        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTS,
            sq_psn: self.psn,
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: 7,
            max_rd_atomic: 1,
            ..Default::default()
        };
        self.modify(
            &mut attr,
            m::IBV_QP_STATE
                | m::IBV_QP_SQ_PSN
                | m::IBV_QP_TIMEOUT
                | m::IBV_QP_RETRY_CNT
                | m::IBV_QP_RNR_RETRY
                | m::IBV_QP_MAX_QP_RD_ATOMIC,
            "RTS",
        )?;
        *connected = true;
        Ok(())
    }

    fn post_recv(&self, into: Span<'_>, wr_id: u64) -> VerbsResult {
        // No connection needed: the queue pair is in INIT from its creation.
        let mut sge = sge_of(into)?;
        let mut wr = ffi::ibv_recv_wr {
            wr_id,
            next: std::ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        let mut bad: *mut ffi::ibv_recv_wr = std::ptr::null_mut();
        // SAFETY: as in `post_send_wr`; the van does not touch the range
        // until its receive completes.
        let rc = unsafe {
            let post = (*(*self.qp).context)
                .ops
                .post_recv
                .ok_or_else(|| VerbsError("the driver has no post_recv".into()))?;
            post(self.qp, &mut wr, &mut bad)
        };
        if rc != 0 {
            return Err(os_error("post receive", rc));
        }
        Ok(())
    }

    fn post_send(&self, from: Span<'_>, wr_id: u64) -> VerbsResult {
        let mut sge = sge_of(from)?;
        let mut wr = send_wr(wr_id, &mut sge, ffi::ibv_wr_opcode::IBV_WR_SEND);
        self.post_send_wr(&mut wr, "post send")
    }

    fn post_write_imm(&self, from: Span<'_>, to: RemoteWrite, wr_id: u64) -> VerbsResult {
        let (len, remote, remote_offset, imm) = (from.len, to.to, to.offset, to.imm);
        let mut sge = sge_of(from)?;
        if remote_offset
            .checked_add(len as u64)
            .is_none_or(|end| end > remote.len)
        {
            return Err(VerbsError(format!(
                "a write of {len} bytes at {remote_offset} overruns the peer's {}-byte region",
                remote.len
            )));
        }
        let mut wr = send_wr(
            wr_id,
            &mut sge,
            ffi::ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM,
        );
        wr.__bindgen_anon_1.imm_data = imm.to_be();
        let remote_addr = remote.addr.checked_add(remote_offset).ok_or_else(|| {
            VerbsError(format!(
                "the peer's region at {:#x} + {remote_offset} overflows",
                remote.addr
            ))
        })?;
        wr.wr.rdma = ffi::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 {
            remote_addr,
            rkey: remote.rkey,
        };
        self.post_send_wr(&mut wr, "post RDMA write")
    }

    fn poll(&self, out: &mut Vec<Completion>, timeout: Duration) -> VerbsResult {
        let deadline = Instant::now() + timeout;
        // SAFETY: an array of plain-data C structs; zeroes are valid.
        let mut wcs: [ffi::ibv_wc; 32] = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: our live CQ and room for `wcs.len()` completions.
            let n = unsafe {
                let poll = (*(*self.cq).context)
                    .ops
                    .poll_cq
                    .ok_or_else(|| VerbsError("the driver has no poll_cq".into()))?;
                poll(self.cq, wcs.len() as i32, wcs.as_mut_ptr())
            };
            if n < 0 {
                return Err(VerbsError(format!("polling completions failed ({n})")));
            }
            for wc in &wcs[..n as usize] {
                out.push(completion(wc));
            }
            if !out.is_empty() || Instant::now() >= deadline {
                return Ok(());
            }
            // Busy polling with a short yield: completions arrive in
            // microseconds on a device.
            std::thread::sleep(Duration::from_micros(20));
        }
    }

    fn supports_write_imm(&self) -> bool {
        true
    }
}

/// The van's view of a work completion.
fn completion(wc: &ffi::ibv_wc) -> Completion {
    let wr_id = wc.wr_id();
    if let Some((status, vendor)) = wc.error() {
        // SAFETY: returns a static C string for any status.
        let why = unsafe { CStr::from_ptr(ffi::ibv_wc_status_str(status)) };
        return Completion::Error {
            wr_id,
            message: format!(
                "work completion: {} (vendor syndrome {vendor})",
                why.to_string_lossy()
            ),
        };
    }
    let len = wc.len();
    match wc.opcode() {
        ffi::ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM => Completion::RecvImm {
            wr_id,
            imm: u32::from_be(wc.imm_data),
            len,
        },
        ffi::ibv_wc_opcode::IBV_WC_RECV => Completion::Recv { wr_id, len },
        ffi::ibv_wc_opcode::IBV_WC_RDMA_WRITE => Completion::Write { wr_id },
        ffi::ibv_wc_opcode::IBV_WC_SEND => Completion::Send { wr_id },
        other => Completion::Error {
            wr_id,
            message: format!("an unexpected work completion (opcode {other})"),
        },
    }
}
