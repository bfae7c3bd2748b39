//! Consumer keys: generated here, given to the consumer once, and configured only as hashes.

/// A new random key: `tg-` (recognisable in a leaked file or a secret scanner's rule) and 64
/// hex characters (256 bits); the registry issues the same.
pub(crate) use tollgate_logging_proxy::consumers::registry::new_key;

pub(crate) fn hash(key: &str) -> String {
    tollgate_logging_proxy::consumers::registry::hash_key(key)
}

/// The key on the first line of `input`, without its line ending or surrounding blanks.
pub(crate) fn read_key(mut input: impl std::io::BufRead) -> anyhow::Result<String> {
    let mut line = String::new();
    input.read_line(&mut line)?;
    let key = line.trim();
    anyhow::ensure!(!key.is_empty(), "no key on standard input");
    Ok(key.to_owned())
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    use super::*;

    #[test]
    fn keys_are_256_random_bits_behind_a_prefix() {
        let (a, b) = (new_key(), new_key());
        assert_ne!(a, b);
        let hex_part = a.strip_prefix("tg-").expect("prefix");
        assert_eq!(hex::decode(hex_part).expect("hex").len(), 32);
    }

    #[test]
    fn key_is_read_from_the_first_line() {
        let key = read_key(&b"  tg-abc\r\nrest\n"[..]).unwrap();
        assert_eq!(key, "tg-abc");
        assert_eq!(hash(&key), hex::encode(Sha256::digest(b"tg-abc")));
        assert!(read_key(&b"\n"[..]).is_err());
    }
}
