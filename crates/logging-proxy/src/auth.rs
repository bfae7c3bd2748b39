//! Consumer authentication: the presented key (`api-key`, or `Authorization: Bearer` as the v1
//! surface and the plain OpenAI client send it) is hashed with SHA-256 and compared in constant
//! time with every configured digest, so neither timing nor early exit reveals which consumer
//! or how many bytes matched.

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

/// Matches `key` against `(id, digest)` entries without short-circuiting.
pub(crate) fn find<'a>(
    entries: &'a [(String, [u8; 32])],
    key: &str,
) -> Option<(&'a str, [u8; 32])> {
    let d = digest(key);
    let mut found = None;
    for (id, expected) in entries {
        if bool::from(expected.ct_eq(&d)) {
            found = Some((id.as_str(), d));
        }
    }
    found
}

pub(crate) fn authenticate(
    entries: &[(String, [u8; 32])],
    headers: &HeaderMap,
) -> Option<Consumer> {
    let key = presented_key(headers)?;
    let (id, digest) = find(entries, key)?;
    Some(Consumer {
        id: id.to_owned(),
        key_id: Some(hex::encode(&digest[..4])),
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
        let entries = vec![
            ("alice".to_owned(), digest("k1")),
            ("bob".to_owned(), digest("k2")),
        ];
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
        assert!(authenticate(&entries, &h).is_none());
        assert!(authenticate(&entries, &HeaderMap::new()).is_none());
    }
}
