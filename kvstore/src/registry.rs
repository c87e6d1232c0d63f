//! The keys a store knows: each one's shape, dtype and storage, fixed at
//! `init`, and the checks every later call makes against them.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::dtype::DType;
use crate::error::{KvError, Result};
use crate::hash::IdHash;
use crate::key::Key;
use crate::tensor::{Storage, Tensor};

/// What `init` fixed for a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Meta {
    pub(crate) shape: Vec<usize>,
    pub(crate) dtype: DType,
    pub(crate) storage: Storage,
}

impl Meta {
    pub(crate) fn of(t: &Tensor) -> Meta {
        Meta {
            shape: t.shape().to_vec(),
            dtype: t.dtype(),
            storage: t.storage(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub(crate) fn row_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    pub(crate) fn bytes(&self) -> usize {
        self.len() * self.dtype.size()
    }

    fn describe(&self) -> String {
        format!(
            "{} {:?} ({} elements{})",
            self.dtype,
            self.shape,
            self.len(),
            if self.storage == Storage::RowSparse {
                ", row-sparse"
            } else {
                ""
            }
        )
    }

    /// Checks a value given for the key (`what`: "push", "pull", ...).
    pub(crate) fn check(&self, key: &Key, t: &Tensor, what: &str) -> Result<()> {
        if t.is_spent() {
            return Err(KvError::invalid(format!(
                "{what} of key {key}: a kept ticket let go of this tensor's memory (Ticket::spent); make the tensor again with Tensor::remade"
            )));
        }
        if t.dtype() != self.dtype || t.shape() != self.shape.as_slice() {
            return Err(KvError::mismatch(
                key,
                format!(
                    "{what} of {} {:?} ({} elements), but the key was initialized as {}",
                    t.dtype(),
                    t.shape(),
                    t.len(),
                    self.describe()
                ),
            ));
        }
        Ok(())
    }
}

/// Keys and their entries.
pub(crate) struct Registry<E> {
    map: RwLock<HashMap<u64, (Key, Arc<E>), IdHash>>,
}

impl<E> Default for Registry<E> {
    fn default() -> Self {
        Registry {
            map: RwLock::new(HashMap::default()),
        }
    }
}

impl<E> Registry<E> {
    /// Checks that the keys of an `init` call can be added: none known
    /// already, none twice, no two of one id (here or already added).
    pub(crate) fn check_new<'a>(&self, keys: impl Iterator<Item = &'a Key>) -> Result<()> {
        check_new_in(&self.map.read(), keys)
    }

    /// Adds the keys of one `init` call, all or none (refusing them as
    /// `check_new` does), under one write lock: no other call sees some of
    /// them before the rest. (A distributed store takes them out again,
    /// with `remove_all`, if a step the workers take together fails.)
    pub(crate) fn insert_all(&self, items: Vec<(Key, E)>) -> Result<Vec<Arc<E>>> {
        let mut map = self.map.write();
        check_new_in(&map, items.iter().map(|(k, _)| k))?;
        let mut added = Vec::with_capacity(items.len());
        for (key, entry) in items {
            let e = Arc::new(entry);
            map.insert(key.id(), (key, e.clone()));
            added.push(e);
        }
        Ok(added)
    }

    /// The entry of a key.
    pub(crate) fn get(&self, key: &Key) -> Result<Arc<E>> {
        match self.map.read().get(&key.id()) {
            Some((k, e)) if k == key => Ok(e.clone()),
            _ => Err(KvError::NotInitialized {
                key: key.to_string(),
            }),
        }
    }

    /// Forgets the keys of an `init` call (it failed on some worker),
    /// under one write lock; keys of another call are left alone.
    pub(crate) fn remove_all<'a>(&self, keys: impl Iterator<Item = &'a Key>) {
        let mut map = self.map.write();
        for key in keys {
            if map.get(&key.id()).is_some_and(|(k, _)| k == key) {
                map.remove(&key.id());
            }
        }
    }

    /// Every key and entry.
    pub(crate) fn all(&self) -> Vec<(Key, Arc<E>)> {
        let mut v: Vec<_> = self.map.read().values().cloned().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// `check_new` over `map`: each key is new, and its id is neither taken
/// nor that of a key earlier in `keys` (each id computed once: a string
/// key's id hashes its name).
fn check_new_in<'a, E>(
    map: &HashMap<u64, (Key, Arc<E>), IdHash>,
    keys: impl Iterator<Item = &'a Key>,
) -> Result<()> {
    let mut seen: HashMap<u64, &Key, IdHash> = HashMap::default();
    for key in keys {
        let id = key.id();
        // A key registered before, or one earlier in this call.
        let clash = map.get(&id).map(|(k, _)| k).or(seen.get(&id).copied());
        if let Some(k) = clash {
            return Err(if k == key {
                KvError::AlreadyInitialized {
                    key: key.to_string(),
                }
            } else {
                KvError::invalid(format!(
                    "keys {k} and {key} have the same id {id}: rename one (or use integer keys)"
                ))
            });
        }
        seen.insert(id, key);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Registry;
    use crate::error::KvError;
    use crate::key::Key;

    /// The ids of the registered keys, in key order.
    fn ids(r: &Registry<u32>) -> Vec<u64> {
        r.all().iter().map(|(k, _)| k.id()).collect()
    }

    /// A call whose keys are all new adds all of them; a second call with
    /// one key known already, or with one key twice, adds none.
    #[test]
    fn insert_all_adds_every_key_or_none() {
        let r = Registry::<u32>::default();
        let added = r
            .insert_all(vec![(Key::from(1u32), 10), (Key::from(2u32), 20)])
            .unwrap();
        assert_eq!(added.iter().map(|e| **e).collect::<Vec<_>>(), [10, 20]);
        let again = r.insert_all(vec![(Key::from(3u32), 30), (Key::from(2u32), 21)]);
        assert!(matches!(again, Err(KvError::AlreadyInitialized { .. })));
        let twice = r.insert_all(vec![(Key::from(4u32), 40), (Key::from(4u32), 41)]);
        assert!(matches!(twice, Err(KvError::AlreadyInitialized { .. })));
        assert_eq!(ids(&r), [1, 2], "the failed calls added nothing");
        assert_eq!(*r.get(&Key::from(2u32)).unwrap(), 20);
    }

    /// Two string keys of one id (ids are 31-bit hashes of the names;
    /// this pair was found by search).
    fn clashing_names() -> (Key, Key) {
        let (a, b) = (Key::from("w10160"), Key::from("w69673"));
        assert_eq!(a.id(), b.id());
        (a, b)
    }

    /// Two keys of one id in one call: refused, naming both, and neither
    /// is added.
    #[test]
    fn insert_all_refuses_two_keys_of_one_id() {
        let (a, b) = clashing_names();
        let r = Registry::<u32>::default();
        let e = r
            .insert_all(vec![(a.clone(), 1), (b.clone(), 2)])
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&a.to_string()) && msg.contains(&b.to_string()),
            "{msg}"
        );
        assert!(ids(&r).is_empty());
    }
}
