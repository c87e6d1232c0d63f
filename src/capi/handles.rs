//! Handles as checked tokens: a table per kind of handle maps a number
//! never used again to the object, so that a stale, doubled or made-up
//! handle is an argument error instead of a wild pointer.
//!
//! Tokens are multiples of 16 from 16 up, drawn from one counter for every
//! table (never 0, never reused, not mistaken for a small integer cast to a
//! pointer, and a store's handle is never a live request's).
//!
//! # The lookup cache
//!
//! A loop that uses the same handle call after call (a persistent
//! request's starts and waits, a store's calls) finds it in a one-entry
//! cache per thread and table, without the table's lock: the entry holds
//! the token, a `Weak` to the object and the table's count of removals
//! when it was filled (read under the table's lock, so consistent with
//! the map). A lookup uses it only while that count is unchanged: no
//! handle of the table was removed since, so the token is still live;
//! then upgrading the `Weak` is the only atomic write of the lookup.
//!
//! Subtle: a removal racing with a lookup that already read the old count
//! lets the lookup go on with the object (kept alive by the `Arc` it
//! upgraded to, or refused if the upgrade finds it gone): as if the call
//! had come just before the removal, which the caller's two threads
//! cannot tell apart. Removals bump the count under the lock, after the
//! map forgets the token.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::LocalKey;

use super::{arg, Failure};
use crate::kvstore::IdHash;

static NEXT_TOKEN: AtomicUsize = AtomicUsize::new(1);

/// A thread's last lookup in one table (see "The lookup cache").
pub(crate) struct Cached<T> {
    token: usize,
    removals: u64,
    obj: Weak<T>,
}

/// A thread's cache of one table.
pub(crate) type Cache<T> = RefCell<Option<Cached<T>>>;

/// The live objects of one kind, by token.
pub(crate) struct Table<T: 'static> {
    map: Mutex<HashMap<usize, Arc<T>, IdHash>>,
    /// Removals so far (bumped under `map`'s lock).
    removals: AtomicU64,
    /// This table's cache on each thread.
    cache: &'static LocalKey<Cache<T>>,
    /// What a handle of this table is called in messages.
    what: &'static str,
    /// The function that makes them, for messages.
    maker: &'static str,
}

impl<T> Table<T> {
    pub(crate) fn new(
        what: &'static str,
        maker: &'static str,
        cache: &'static LocalKey<Cache<T>>,
    ) -> Table<T> {
        Table {
            map: Mutex::new(HashMap::default()),
            removals: AtomicU64::new(0),
            cache,
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
        self.get_with(h, |_| true)
    }

    /// As `get`; an object found in the map goes into the thread's cache
    /// only if `cache` says so (one looked up once would only push out
    /// one looked up often).
    pub(crate) fn get_with<P>(
        &self,
        h: *const P,
        cache: fn(&T) -> bool,
    ) -> Result<Arc<T>, Failure> {
        if h.is_null() {
            return Err(arg(format!("the {} handle is a null pointer", self.what)));
        }
        let token = h as usize;
        // `try_with`: a thread being torn down has no cache; the map serves.
        let hit = self.cache.try_with(|c| match &*c.borrow() {
            Some(e) if e.token == token && e.removals == self.removals.load(Ordering::Acquire) => {
                e.obj.upgrade()
            }
            _ => None,
        });
        if let Ok(Some(obj)) = hit {
            return Ok(obj);
        }
        let (obj, removals) = {
            let map = self.lock();
            let obj = map.get(&token).cloned().ok_or_else(|| self.stale(h))?;
            (obj, self.removals.load(Ordering::Relaxed))
        };
        if !cache(&obj) {
            return Ok(obj);
        }
        let entry = Cached {
            token,
            removals,
            obj: Arc::downgrade(&obj),
        };
        let _ = self.cache.try_with(|c| *c.borrow_mut() = Some(entry));
        Ok(obj)
    }

    /// Removes `h`; the object, if it was live.
    pub(crate) fn remove<P>(&self, h: *const P) -> Result<Arc<T>, Failure> {
        let mut map = self.lock();
        let obj = map.remove(&(h as usize)).ok_or_else(|| self.stale(h))?;
        self.removals.fetch_add(1, Ordering::Release);
        Ok(obj)
    }

    fn stale<P>(&self, h: *const P) -> Failure {
        arg(format!(
            "{h:p} is not a live {} handle (freed already, or never made by {})",
            self.what, self.maker
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        static CACHE: Cache<u32> = const { RefCell::new(None) };
    }

    fn table() -> Table<u32> {
        Table::new("thing", "make_thing", &CACHE)
    }

    /// A handle found in the thread's cache is refused once freed, on this
    /// thread and another; a removal of another handle sends lookups back
    /// to the map, which still finds the live one.
    #[test]
    fn the_lookup_cache_never_serves_a_freed_handle() {
        let t = Arc::new(table());
        let a: *mut u8 = t.insert(1);
        let b: *mut u8 = t.insert(2);
        assert_eq!(*t.get(a).unwrap(), 1);
        assert_eq!(*t.get(a).unwrap(), 1); // from the cache
                                           // Another handle removed: `a` is looked up in the map again.
        t.remove(b).unwrap();
        assert_eq!(*t.get(a).unwrap(), 1);
        assert!(t.get(b).unwrap_err().1.contains("not a live thing handle"));
        // Freed on another thread while cached here, and while a call of
        // this thread still holds the object (so the cached `Weak` would
        // still upgrade: the removal count is what refuses it).
        let held = t.get(a).unwrap();
        let t2 = t.clone();
        let a_token = a as usize;
        std::thread::spawn(move || t2.remove(a_token as *const u8).unwrap())
            .join()
            .unwrap();
        assert!(t.get(a).unwrap_err().1.contains("not a live thing handle"));
        drop(held);
        // Uncached lookups leave the cache as it was.
        let c: *mut u8 = t.insert(3);
        let d: *mut u8 = t.insert(4);
        assert_eq!(*t.get(c).unwrap(), 3);
        assert_eq!(*t.get_with(d, |_| false).unwrap(), 4);
        CACHE.with(|k| assert_eq!(k.borrow().as_ref().unwrap().token, c as usize));
        assert!(t
            .get(std::ptr::null::<u8>())
            .unwrap_err()
            .1
            .contains("null"));
    }
}
