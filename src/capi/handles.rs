//! Handles as checked tokens: a table per kind of handle maps a number
//! never used again to the object, so that a stale, doubled or made-up
//! handle is an argument error instead of a wild pointer.
//!
//! Tokens are multiples of 16 from 16 up, drawn from one counter for every
//! table (never 0, never reused, not mistaken for a small integer cast to a
//! pointer, and a store's handle is never a live request's).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{arg, Failure};
use crate::kvstore::IdHash;

static NEXT_TOKEN: AtomicUsize = AtomicUsize::new(1);

/// The live objects of one kind, by token.
pub(crate) struct Table<T> {
    map: Mutex<HashMap<usize, Arc<T>, IdHash>>,
    /// What a handle of this table is called in messages.
    what: &'static str,
    /// The function that makes them, for messages.
    maker: &'static str,
}

impl<T> Table<T> {
    pub(crate) fn new(what: &'static str, maker: &'static str) -> Table<T> {
        Table {
            map: Mutex::new(HashMap::default()),
            what,
            maker,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<usize, Arc<T>, IdHash>> {
        // A panic under this lock leaves the map whole: go on with it.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `v`; its token, as the handle's pointer.
    pub(crate) fn insert<P>(&self, v: T) -> *mut P {
        let token = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed) * 16;
        self.lock().insert(token, Arc::new(v));
        token as *mut P
    }

    /// The object behind `h` (kept alive for the call).
    pub(crate) fn get<P>(&self, h: *const P) -> Result<Arc<T>, Failure> {
        if h.is_null() {
            return Err(arg(format!("the {} handle is a null pointer", self.what)));
        }
        self.lock()
            .get(&(h as usize))
            .cloned()
            .ok_or_else(|| self.stale(h))
    }

    /// Removes `h`; the object, if it was live.
    pub(crate) fn remove<P>(&self, h: *const P) -> Result<Arc<T>, Failure> {
        self.lock()
            .remove(&(h as usize))
            .ok_or_else(|| self.stale(h))
    }

    fn stale<P>(&self, h: *const P) -> Failure {
        arg(format!(
            "{h:p} is not a live {} handle (freed already, or never made by {})",
            self.what, self.maker
        ))
    }
}
