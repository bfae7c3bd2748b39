//! Consumer authentication: the presented key (`api-key`, or `Authorization: Bearer` as the v1
//! surface and the plain OpenAI client send it) is hashed with SHA-256 and looked up by its
//! digest in a map whose digests compare in constant time ([`Digest32`]). Nothing of a key
//! leaks through the lookup's timing: the map's hashing takes the same time for every digest,
//! which bucket is probed depends only on the digest of the guess (which says nothing about
//! the stored keys, 256 random bits each), and no comparison stops at the first differing
//! byte. Earlier versions compared the digest with every configured one: a comparison per
//! consumer on every request, which with thousands of registered consumers would pass the
//! cost of the rest of the request path.

use axum::http::{HeaderMap, header};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tollgate_records::{AuthKind, Consumer};

pub(crate) fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(k) = headers.get("api-key").and_then(|v| v.to_str().ok()) {
        return Some(k);
    }
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
}

pub(crate) fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A configured key: whose, its digest, and when it stops working.
#[derive(Debug, Clone)]
pub(crate) struct KeyEntry {
    pub consumer: String,
    pub digest: [u8; 32],
    pub expires: Option<chrono::DateTime<chrono::Utc>>,
}

/// Matches `key` against every entry without short-circuiting.
pub(crate) fn find<'a>(entries: &'a [KeyEntry], key: &str) -> Option<&'a KeyEntry> {
    let d = digest(key);
    let mut found = None;
    for e in entries {
        if bool::from(e.digest.ct_eq(&d)) {
            found = Some(e);
        }
    }
    found
}

/// Why a presented key was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyRefused {
    Unknown,
    Expired,
}

/// A key's SHA-256, compared in constant time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Digest32(pub [u8; 32]);

impl std::hash::Hash for Digest32 {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // Equal digests have equal bytes: hashing the bytes agrees with the equality below.
        self.0.hash(state);
    }
}

impl PartialEq for Digest32 {
    fn eq(&self, other: &Self) -> bool {
        bool::from(self.0.ct_eq(&other.0))
    }
}

impl Eq for Digest32 {}

/// Every configured key by its digest.
pub(crate) type Keys = std::collections::HashMap<Digest32, KeyEntry>;

pub(crate) fn authenticate(entries: &Keys, headers: &HeaderMap) -> Result<Consumer, KeyRefused> {
    let key = presented_key(headers).ok_or(KeyRefused::Unknown)?;
    let entry = entries
        .get(&Digest32(digest(key)))
        .ok_or(KeyRefused::Unknown)?;
    if entry.expires.is_some_and(|e| e <= chrono::Utc::now()) {
        return Err(KeyRefused::Expired);
    }
    Ok(Consumer {
        id: entry.consumer.clone(),
        key_id: Some(hex::encode(&entry.digest[..4])),
        auth_kind: AuthKind::ApiKey,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn accepts_api_key_or_bearer_and_rejects_others() {
        let entry = |consumer: &str, key: &str, expires| KeyEntry {
            consumer: consumer.to_owned(),
            digest: digest(key),
            expires,
        };
        let past = chrono::Utc::now() - chrono::Duration::seconds(1);
        let entries: Keys = [
            entry("alice", "k1", None),
            entry("bob", "k2", None),
            entry("bob", "old", Some(past)),
        ]
        .into_iter()
        .map(|e| (Digest32(e.digest), e))
        .collect();
        let mut h = HeaderMap::new();
        h.insert("api-key", HeaderValue::from_static("k2"));
        let c = authenticate(&entries, &h).unwrap();
        assert_eq!(c.id, "bob");
        assert_eq!(c.key_id.unwrap(), hex::encode(&digest("k2")[..4]));
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer k1"));
        assert_eq!(authenticate(&entries, &h).unwrap().id, "alice");
        let mut h = HeaderMap::new();
        h.insert("api-key", HeaderValue::from_static("k3"));
        assert_eq!(authenticate(&entries, &h), Err(KeyRefused::Unknown));
        assert_eq!(
            authenticate(&entries, &HeaderMap::new()),
            Err(KeyRefused::Unknown)
        );
        let mut h = HeaderMap::new();
        h.insert("api-key", HeaderValue::from_static("old"));
        assert_eq!(authenticate(&entries, &h), Err(KeyRefused::Expired));
    }
}
