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
    /// Checks that `key` can be initialized (not known, no id clash).
    pub(crate) fn check_new(&self, key: &Key) -> Result<()> {
        match self.map.read().get(&key.id()) {
            None => Ok(()),
            Some((k, _)) if k == key => Err(KvError::AlreadyInitialized {
                key: key.to_string(),
            }),
            Some((k, _)) => Err(KvError::invalid(format!(
                "keys {k} and {key} have the same id {}: rename one (or use integer keys)",
                key.id()
            ))),
        }
    }

    /// Adds a key (after `check_new`).
    pub(crate) fn insert(&self, key: &Key, entry: E) -> Result<Arc<E>> {
        let mut map = self.map.write();
        if let Some((k, _)) = map.get(&key.id()) {
            return Err(if k == key {
                KvError::AlreadyInitialized {
                    key: key.to_string(),
                }
            } else {
                KvError::invalid(format!(
                    "keys {k} and {key} have the same id {}: rename one",
                    key.id()
                ))
            });
        }
        let e = Arc::new(entry);
        map.insert(key.id(), (key.clone(), e.clone()));
        Ok(e)
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

    /// Forgets a key (its init failed on some worker).
    pub(crate) fn remove(&self, key: &Key) {
        let mut map = self.map.write();
        if map.get(&key.id()).is_some_and(|(k, _)| k == key) {
            map.remove(&key.id());
        }
    }

    /// Every key and entry.
    pub(crate) fn all(&self) -> Vec<(Key, Arc<E>)> {
        let mut v: Vec<_> = self.map.read().values().cloned().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}
