//! Keys: integers or strings, as in MXNet, and the numeric id each one has
//! inside pskv (what the servers see).
//!
//! An integer key `k` (0 ≤ k < 2³²) has id `k`. A string key has id
//! `2³² + h` where `h` is a 31-bit FNV-1a hash of its bytes, so integer and
//! string keys never share an id and one store may use both (MXNet refuses
//! to mix them). Two strings with the same hash are caught when the second
//! one is initialized (or when both are, in one call): the store refuses
//! that `init` and names both.

use std::fmt;

use crate::error::{KvError, Result};

/// A key of a kvstore.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Key {
    /// An integer key, as MXNet's `kv.push(3, ...)`.
    Int(u32),
    /// A string key, as MXNet's `kv.push('fc1_weight', ...)`.
    Str(String),
}

/// The bit that marks a string key's id.
pub(crate) const STR_BIT: u64 = 1 << 32;

impl Key {
    /// The key's numeric id (see the module docs).
    pub fn id(&self) -> u64 {
        match self {
            Key::Int(k) => *k as u64,
            Key::Str(s) => STR_BIT | fnv31(s.as_bytes()),
        }
    }

    /// A key from a signed integer, refusing negative and too-large values.
    pub fn int(k: i64) -> Result<Key> {
        u32::try_from(k).map(Key::Int).map_err(|_| {
            KvError::invalid(format!(
                "key {k} is out of range: integer keys are 0 to {}",
                u32::MAX
            ))
        })
    }
}

fn fnv31(bytes: &[u8]) -> u64 {
    let h = crate::hash::fnv1a64(bytes);
    // Fold to 31 bits so that ids stay below 2^33.
    ((h >> 31) ^ h) & 0x7fff_ffff
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Int(k) => write!(f, "{k}"),
            Key::Str(s) => write!(f, "'{s}'"),
        }
    }
}

/// Anything that names a key: integers (0 to 2³²-1; others are an error),
/// strings, and keys.
pub trait IntoKey {
    /// The key, or an error for an integer out of range.
    fn into_key(self) -> Result<Key>;
}

macro_rules! int_keys {
    ($($t:ty),*) => {$(
        impl IntoKey for $t {
            fn into_key(self) -> Result<Key> {
                Key::int(i64::try_from(self).unwrap_or(i64::MAX))
            }
        }
    )*};
}
int_keys!(i32, i64, u32, u64, usize, u16, i16, u8);

impl IntoKey for Key {
    fn into_key(self) -> Result<Key> {
        Ok(self)
    }
}

impl IntoKey for &Key {
    fn into_key(self) -> Result<Key> {
        Ok(self.clone())
    }
}

impl IntoKey for &str {
    fn into_key(self) -> Result<Key> {
        Ok(Key::Str(self.to_string()))
    }
}

impl IntoKey for String {
    fn into_key(self) -> Result<Key> {
        Ok(Key::Str(self))
    }
}

impl From<u32> for Key {
    fn from(k: u32) -> Key {
        Key::Int(k)
    }
}

impl From<u16> for Key {
    fn from(k: u16) -> Key {
        Key::Int(k as u32)
    }
}

impl From<&str> for Key {
    fn from(s: &str) -> Key {
        Key::Str(s.to_string())
    }
}

impl From<String> for Key {
    fn from(s: String) -> Key {
        Key::Str(s)
    }
}

impl From<&Key> for Key {
    fn from(k: &Key) -> Key {
        k.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_of_ints_and_strings_never_meet() {
        assert_eq!(Key::Int(7).id(), 7);
        assert_eq!(Key::Int(u32::MAX).id(), u32::MAX as u64);
        let s = Key::from("fc1_weight");
        assert!(s.id() >= STR_BIT && s.id() < 2 * STR_BIT);
        assert_eq!(s.id(), Key::from("fc1_weight".to_string()).id());
        assert_ne!(s.id(), Key::from("fc1_bias").id());
        assert!(Key::int(-1).is_err());
        assert!(Key::int(1 << 32).is_err());
        assert_eq!(Key::int(5).unwrap(), Key::Int(5));
        assert_eq!(Key::from("a").to_string(), "'a'");
        assert_eq!(3.into_key().unwrap(), Key::Int(3));
        assert!((-3).into_key().is_err());
        assert!(u64::MAX.into_key().is_err());
        assert_eq!("w".into_key().unwrap(), Key::from("w"));
    }
}
