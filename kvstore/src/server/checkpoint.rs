//! Server checkpoints: each key's value and optimizer state, written
//! atomically to `PSKV_CHECKPOINT_DIR/server-<rank>.ckpt`, and loaded by a
//! server that restarts into its old rank.
//!
//! When a key's state is recorded: at its init (round 0), after every N-th
//! completed round of that key (`PSKV_CHECKPOINT_ROUNDS`, default 10), and
//! for every key at each workers' `barrier()` (rank 0 asks once all workers
//! reached it; no worker leaves the barrier before the file is written). Records go to an
//! in-memory table; a writer thread writes the whole table whenever it
//! changed: to `server-<rank>.ckpt.tmp`, fsync, rename over the old file,
//! fsync the directory. A crash mid-write leaves the previous file.
//!
//! What a crash of a server can lose, per key it holds: the rounds that
//! completed after the key's last record that reached the disk (fewer
//! than N, or than 2N if the crash falls between a record and its write;
//! none completed before a `barrier()` returned), and the round in progress (whose pushes fail, naming the dead
//! server, so the workers know to push again). Every other update is in
//! the file. Each key is consistent on its own (value and optimizer state
//! of the same round); different keys may come back at different rounds.
//!
//! File: `PSKVCKP3`, a postcard body (`File`), then the CRC-32C of the
//! body, little-endian. (Version 3 changed only the checksum, from FNV-1a
//! 64: a version 2 file is still read. Version 2 added the optimizer's
//! scheduler and `begin_num_update`; a version 1 file is refused as not a
//! checkpoint.) A file that fails the magic, the hash, the rank
//! or the worker count is refused with an error naming it, never half
//! loaded.
//!
//! States of the writer: *idle* (table clean) → *dirty* (a record came) →
//! *writing* (the table's Arc'd values are being serialized; new records
//! make it dirty again) → idle. `flush()` waits until the table it sees is
//! on disk.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use crate::dtype::DType;

/// Why a checkpoint could not be written or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// The file system refused.
    #[error("{what} {}: {message}", path.display())]
    Io {
        /// What was being done ("creating", "writing", "renaming", ...).
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// What the system said.
        message: String,
    },
    /// The file is there but cannot be used: corrupt, another format, or
    /// written by another server or for another cluster size.
    #[error("the checkpoint {} is unusable: {why}", path.display())]
    Unusable {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// What was recorded did not reach the disk in time.
    #[error("the checkpoint {} was not written within {after:?}", path.display())]
    Timeout {
        /// The file.
        path: PathBuf,
        /// How long `flush` waited.
        after: Duration,
    },
}

fn io_error(what: &'static str, path: &Path, e: impl std::fmt::Display) -> CheckpointError {
    CheckpointError::Io {
        what,
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}
use crate::optimizer::{OptState, Optimizer};

const MAGIC: &[u8; 8] = b"PSKVCKP3";
/// Version 2: the same body, then its FNV-1a 64 (read, never written).
const MAGIC_V2: &[u8; 8] = b"PSKVCKP2";

/// The body of a checkpoint file's bytes, its magic and checksum checked.
fn checked_body(data: &[u8]) -> Result<&[u8], &'static str> {
    let (magic, rest) = data.split_at_checked(MAGIC.len()).ok_or(WRONG_MAGIC)?;
    let ok = if magic == MAGIC {
        let (body, sum) = rest
            .split_at_checked(rest.len().wrapping_sub(4))
            .ok_or(BAD_SUM)?;
        let body_ok = sum.try_into().map(u32::from_le_bytes).ok() == Some(crc32c::crc32c(body));
        body_ok.then_some(body)
    } else if magic == MAGIC_V2 {
        let (body, sum) = rest
            .split_at_checked(rest.len().wrapping_sub(8))
            .ok_or(BAD_SUM)?;
        let body_ok =
            sum.try_into().map(u64::from_le_bytes).ok() == Some(crate::hash::fnv1a64(body));
        body_ok.then_some(body)
    } else {
        return Err(WRONG_MAGIC);
    };
    ok.ok_or(BAD_SUM)
}

const WRONG_MAGIC: &str = "not a pskv checkpoint (wrong magic)";
const BAD_SUM: &str = "its checksum does not match (truncated or corrupted)";

/// One key's recorded state.
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct KeyRecord {
    pub key_id: u64,
    pub part: u64,
    pub dtype: DType,
    pub rounds: u64,
    #[serde(with = "bytes_as_vec")]
    pub value: Bytes,
    pub opt: Option<OptState>,
    pub master: Option<Vec<f32>>,
}

mod bytes_as_vec {
    use bytes::Bytes;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(b)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        let v: Vec<u8> = serde_bytes_vec(d)?;
        Ok(Bytes::from(v))
    }

    fn serde_bytes_vec<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

/// The server-wide settings a restarted server needs back.
#[derive(Clone, Default, Serialize, Deserialize)]
pub(crate) struct Globals {
    pub optimizer: Option<Optimizer>,
    pub generation: u64,
    pub sync: bool,
    pub multi_precision: bool,
    pub compression: Option<String>,
}

/// The file's body.
#[derive(Serialize, Deserialize)]
pub(crate) struct File {
    pub rank: u32,
    pub workers: u32,
    pub globals: Globals,
    /// Ps key → its record.
    pub keys: Vec<(u64, KeyRecord)>,
}

struct Table {
    keys: BTreeMap<u64, KeyRecord>,
    globals: Globals,
    /// Bumped by every change; `written` is the version on disk.
    version: u64,
    written: u64,
    error: Option<CheckpointError>,
}

/// The checkpoints of one server.
pub(crate) struct Checkpointer {
    dir: PathBuf,
    rank: u32,
    workers: u32,
    /// Record a key after every `every`-th round.
    pub every: u64,
    table: Mutex<Table>,
    cv: Condvar,
    stop: std::sync::atomic::AtomicBool,
}

impl Checkpointer {
    /// Checkpoints of server `rank` in `dir` (created if missing); starts
    /// the writer thread.
    pub fn start(
        dir: &Path,
        rank: u32,
        workers: u32,
        every: u64,
    ) -> Result<Arc<Checkpointer>, CheckpointError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| io_error("creating the checkpoint directory", dir, e))?;
        let c = Arc::new(Checkpointer {
            dir: dir.to_path_buf(),
            rank,
            workers,
            every: every.max(1),
            table: Mutex::new(Table {
                keys: BTreeMap::new(),
                globals: Globals::default(),
                version: 0,
                written: 0,
                error: None,
            }),
            cv: Condvar::new(),
            stop: std::sync::atomic::AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&c);
        std::thread::Builder::new()
            .name(format!("pskv-checkpoint-{rank}"))
            .spawn(move || loop {
                let Some(c) = weak.upgrade() else { return };
                if !c.write_pending(Duration::from_millis(200)) {
                    return;
                }
            })
            .map_err(|e| io_error("starting the checkpoint writer for", dir, e))?;
        Ok(c)
    }

    /// The file of this server.
    pub fn path(&self) -> PathBuf {
        self.dir.join(format!("server-{}.ckpt", self.rank))
    }

    /// Records a key's state (cheap: the value is shared, not copied).
    pub fn record(&self, ps_key: u64, rec: KeyRecord) {
        let mut t = self.table.lock();
        t.keys.insert(ps_key, rec);
        t.version += 1;
        self.cv.notify_all();
    }

    /// Records the server-wide settings.
    pub fn set_globals(&self, g: Globals) {
        let mut t = self.table.lock();
        t.globals = g;
        t.version += 1;
        self.cv.notify_all();
    }

    /// Waits (at most `timeout`) until everything recorded so far is on
    /// disk; the last write error if there was one.
    pub fn flush(&self, timeout: Duration) -> Result<(), CheckpointError> {
        let deadline = std::time::Instant::now() + timeout;
        let mut t = self.table.lock();
        let want = t.version;
        self.cv.notify_all();
        while t.written < want {
            if let Some(e) = &t.error {
                return Err(e.clone());
            }
            if self.cv.wait_until(&mut t, deadline).timed_out() {
                return Err(CheckpointError::Timeout {
                    path: self.path(),
                    after: timeout,
                });
            }
        }
        Ok(())
    }

    /// Stops the writer without writing what is pending: this process was
    /// fenced (declared dead), and its replacement owns the file now.
    pub fn abandon(&self) {
        let mut t = self.table.lock();
        t.written = t.version;
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.cv.notify_all();
    }

    /// Stops the writer after a last write.
    pub fn stop(&self) {
        let _ = self.flush(Duration::from_secs(30));
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.cv.notify_all();
    }

    /// The writer's step: waits for a change (at most `idle`), writes the
    /// table. False once stopped.
    fn write_pending(&self, idle: Duration) -> bool {
        let (file, version) = {
            let mut t = self.table.lock();
            if t.version == t.written {
                if self.stop.load(std::sync::atomic::Ordering::Acquire) {
                    return false;
                }
                self.cv.wait_for(&mut t, idle);
                if t.version == t.written {
                    return true;
                }
            }
            let file = File {
                rank: self.rank,
                workers: self.workers,
                globals: t.globals.clone(),
                keys: t.keys.iter().map(|(k, r)| (*k, r.clone())).collect(),
            };
            (file, t.version)
        };
        let result = self.write_file(&file);
        let mut t = self.table.lock();
        match result {
            Ok(()) => {
                t.written = t.written.max(version);
                t.error = None;
            }
            Err(e) => {
                tracing::error!("{e}");
                t.error = Some(e);
            }
        }
        self.cv.notify_all();
        true
    }

    fn write_file(&self, file: &File) -> Result<(), CheckpointError> {
        let path = self.path();
        let tmp = self.dir.join(format!("server-{}.ckpt.tmp", self.rank));
        let err = |what: &'static str, e: std::io::Error| io_error(what, &tmp, e);
        let body = postcard::to_stdvec(file).map_err(|e| io_error("encoding", &tmp, e))?;
        let mut f = std::fs::File::create(&tmp).map_err(|e| err("creating", e))?;
        f.write_all(MAGIC).map_err(|e| err("writing", e))?;
        f.write_all(&body).map_err(|e| err("writing", e))?;
        f.write_all(&crc32c::crc32c(&body).to_le_bytes())
            .map_err(|e| err("writing", e))?;
        f.sync_all().map_err(|e| err("syncing", e))?;
        drop(f);
        std::fs::rename(&tmp, &path)
            .map_err(|e| io_error("renaming", &tmp, format!("to {}: {e}", path.display())))?;
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Reads this server's file; `Ok(None)` when there is none.
    pub fn load(&self) -> Result<Option<File>, CheckpointError> {
        let path = self.path();
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error("reading the checkpoint", &path, e)),
        };
        let bad = |why: &str| CheckpointError::Unusable {
            path: path.clone(),
            why: why.to_string(),
        };
        let body = checked_body(&data).map_err(bad)?;
        let file: File = postcard::from_bytes(body).map_err(|e| bad(&e.to_string()))?;
        if file.rank != self.rank {
            return Err(bad(&format!("it belongs to server rank {}", file.rank)));
        }
        if file.workers != self.workers {
            return Err(bad(&format!(
                "it was written for {} workers, this cluster has {}",
                file.workers, self.workers
            )));
        }
        // What is loaded is on disk already: the table starts from it.
        let mut t = self.table.lock();
        t.globals = file.globals.clone();
        t.keys = file.keys.iter().cloned().collect();
        Ok(Some(file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(v: &[u8], rounds: u64) -> KeyRecord {
        KeyRecord {
            key_id: 1,
            part: 0,
            dtype: DType::F32,
            rounds,
            value: Bytes::copy_from_slice(v),
            opt: None,
            master: Some(vec![1.5, 2.5]),
        }
    }

    #[test]
    fn written_atomically_and_read_back() {
        let dir = std::env::temp_dir().join(format!("pskv-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let c = Checkpointer::start(&dir, 1, 3, 5).unwrap();
        assert!(c.load().unwrap().is_none());
        c.record(7 << 16, rec(&[1, 2, 3, 4], 10));
        c.set_globals(Globals {
            sync: true,
            generation: 2,
            ..Globals::default()
        });
        c.flush(Duration::from_secs(10)).unwrap();
        let f = c.load().unwrap().unwrap();
        assert_eq!(f.keys.len(), 1);
        assert_eq!(&f.keys[0].1.value[..], &[1, 2, 3, 4]);
        assert_eq!(f.keys[0].1.rounds, 10);
        assert_eq!(f.keys[0].1.master.as_deref(), Some(&[1.5f32, 2.5][..]));
        assert!(f.globals.sync);
        assert!(!dir.join("server-1.ckpt.tmp").exists());

        // Version 3: the CRC-32C of the body; a version 2 file of the same
        // body (FNV-1a 64) still reads.
        let v3 = std::fs::read(c.path()).unwrap();
        assert_eq!(&v3[..8], b"PSKVCKP3");
        let body = &v3[8..v3.len() - 4];
        assert_eq!(v3[v3.len() - 4..], crc32c::crc32c(body).to_le_bytes());
        let mut v2 = b"PSKVCKP2".to_vec();
        v2.extend_from_slice(body);
        v2.extend_from_slice(&crate::hash::fnv1a64(body).to_le_bytes());
        std::fs::write(c.path(), &v2).unwrap();
        assert_eq!(
            &c.load().unwrap().unwrap().keys[0].1.value[..],
            &[1, 2, 3, 4]
        );
        let mut bad = v2.clone();
        bad[10] ^= 1;
        std::fs::write(c.path(), &bad).unwrap();
        assert!(c.load().err().unwrap().to_string().contains("checksum"));
        std::fs::write(c.path(), b"PSKVCKP3ab").unwrap();
        assert!(c.load().err().unwrap().to_string().contains("checksum"));
        std::fs::write(c.path(), &v3).unwrap();

        // A corrupted file, another rank's, another cluster size: refused.
        let mut data = std::fs::read(c.path()).unwrap();
        let n = data.len();
        data[n / 2] ^= 0xff;
        std::fs::write(c.path(), &data).unwrap();
        assert!(c.load().err().unwrap().to_string().contains("checksum"));
        std::fs::write(c.path(), b"garbage").unwrap();
        assert!(c.load().err().unwrap().to_string().contains("magic"));
        let other = Checkpointer::start(&dir, 1, 4, 5).unwrap();
        c.record(1 << 16, rec(&[9], 1));
        c.flush(Duration::from_secs(10)).unwrap();
        assert!(other
            .load()
            .err()
            .unwrap()
            .to_string()
            .contains("3 workers"));
        c.stop();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
