//! The file `save_optimizer_states` writes: the magic `PSKVOPT1`, then a
//! postcard-encoded list of (key, state). Reading checks the magic and
//! refuses trailing bytes, so a truncated or foreign file is an error.

use std::path::Path;

use crate::error::{KvError, Result};
use crate::key::Key;
use crate::optimizer::OptState;

const MAGIC: &[u8; 8] = b"PSKVOPT1";

pub(crate) fn encode(states: &[(Key, OptState)]) -> Result<Vec<u8>> {
    let mut out = MAGIC.to_vec();
    let body = postcard::to_stdvec(states)
        .map_err(|e| KvError::invalid(format!("encoding optimizer states: {e}")))?;
    out.extend_from_slice(&body);
    Ok(out)
}

pub(crate) fn decode(bytes: &[u8], what: &str) -> Result<Vec<(Key, OptState)>> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(KvError::invalid(format!(
            "{what} is not a pskv optimizer-state file (no PSKVOPT1 header)"
        )));
    }
    let (states, rest) = postcard::take_from_bytes::<Vec<(Key, OptState)>>(&bytes[MAGIC.len()..])
        .map_err(|e| KvError::invalid(format!("{what} is damaged: {e}")))?;
    if !rest.is_empty() {
        return Err(KvError::invalid(format!(
            "{what} has {} bytes after the states",
            rest.len()
        )));
    }
    Ok(states)
}

pub(crate) fn save(path: &Path, states: &[(Key, OptState)]) -> Result<()> {
    let bytes = encode(states)?;
    std::fs::write(path, bytes).map_err(|e| KvError::Io {
        what: format!("writing optimizer states to {}", path.display()),
        source: e,
    })
}

pub(crate) fn load(path: &Path) -> Result<Vec<(Key, OptState)>> {
    let bytes = std::fs::read(path).map_err(|e| KvError::Io {
        what: format!("reading optimizer states from {}", path.display()),
        source: e,
    })?;
    decode(&bytes, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optimizer::StateVals;

    #[test]
    fn states_round_trip_and_damage_is_caught() {
        let s = vec![(
            Key::from("w"),
            OptState {
                count: 3,
                bufs: vec![StateVals::F32(vec![1.0, 2.0])],
                master: None,
            },
        )];
        let b = encode(&s).unwrap();
        assert_eq!(decode(&b, "x").unwrap(), s);
        assert!(decode(&b[..b.len() - 1], "x").is_err());
        assert!(decode(b"PSKVOPT2", "x").is_err());
        let mut long = b.clone();
        long.push(0);
        assert!(decode(&long, "x").is_err());
    }
}
