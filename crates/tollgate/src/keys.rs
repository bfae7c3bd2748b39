//! Consumer keys: generated here, given to the consumer once, and configured only as hashes.

use rand::RngCore;
use sha2::{Digest, Sha256};

/// A new random key: `tg-` and 48 hex characters (192 bits).
pub(crate) fn new_key() -> String {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    format!("tg-{}", hex::encode(bytes))
}

pub(crate) fn hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}
