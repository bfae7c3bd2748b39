//! Which headers are recorded, forwarded and returned.
//!
//! - Credentials (`api-key`, `Authorization`, cookies, subscription keys) are replaced by
//!   `[redacted]` in records and never forwarded: the backend gets its own credential.
//! - Connection-scoped headers (RFC 9110 §7.6.1) are dropped in both directions: the fixed
//!   list, and every header the `Connection` header names.
//! - Rejected requests keep only a bounded summary of their headers, so a caller without a key
//!   cannot make Tollgate store hundreds of kilobytes per request.

use std::collections::BTreeMap;

use axum::http::{HeaderMap, HeaderName, header};

pub(crate) const REDACTED: &str = "[redacted]";

/// Headers whose values are credentials and never leave the process.
const SECRET: &[&str] = &[
    "api-key",
    "authorization",
    "cookie",
    "set-cookie",
    "ocp-apim-subscription-key",
    "x-api-key",
    "proxy-authorization",
];

/// Connection-scoped headers plus those the HTTP client and server set themselves.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];

/// How much of a rejected request's headers is kept: at most this many headers, each value cut
/// to `SUMMARY_VALUE_BYTES`.
const SUMMARY_HEADERS: usize = 16;
const SUMMARY_VALUE_BYTES: usize = 256;
const SUMMARY_NAME_BYTES: usize = 64;

/// Sets `x-ratelimit-remaining-requests` and `-tokens` to the stricter of AOAI's figure (already
/// copied from the backend's answer) and the consumer's own minute limits.
pub(crate) fn tighten_remaining(headers: &mut HeaderMap, ours: crate::quota::Remaining) {
    for (name, ours) in [
        ("x-ratelimit-remaining-requests", ours.requests),
        ("x-ratelimit-remaining-tokens", ours.tokens),
    ] {
        let Some(ours) = ours else { continue };
        let theirs = headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let value = theirs.map_or(ours, |t| t.min(ours));
        headers.insert(HeaderName::from_static(name), value.into());
    }
}

pub(crate) fn is_secret(name: &str) -> bool {
    SECRET.contains(&name)
}

fn redact(name: &HeaderName, value: &[u8]) -> String {
    if is_secret(name.as_str()) {
        REDACTED.to_owned()
    } else {
        String::from_utf8_lossy(value).into_owned()
    }
}

/// Every header, credentials redacted: what an accepted request's record keeps.
pub(crate) fn redacted(headers: &HeaderMap) -> BTreeMap<String, String> {
    headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), redact(k, v.as_bytes())))
        .collect()
}

/// A bounded, redacted sample of the headers: what a rejected request's record keeps.
pub(crate) fn summary(headers: &HeaderMap) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (k, v) in headers.iter() {
        if out.len() >= SUMMARY_HEADERS {
            out.insert(
                "tollgate-omitted-headers".to_owned(),
                (headers.len() - SUMMARY_HEADERS).to_string(),
            );
            break;
        }
        let value = bounded(&redact(k, v.as_bytes()), SUMMARY_VALUE_BYTES);
        let mut name = k.as_str().to_owned();
        // Names are ASCII (the HTTP parser enforces it), so any byte is a boundary.
        name.truncate(SUMMARY_NAME_BYTES);
        out.insert(name, value);
    }
    out
}

/// `text` cut to at most `max` bytes (at a character boundary), marked with `…` when cut: how
/// a refused request's text is kept.
pub(crate) fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &text[..cut])
}

/// Total size of the header names and values, for the header-size limit.
pub(crate) fn total_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.as_bytes().len())
        .sum()
}

/// The header names listed in `Connection`, lower-cased.
fn connection_named(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Headers to send to the backend: no hop-by-hop, no credentials, no `accept-encoding`
/// (recorded bytes must be parseable, so the backend is asked for an identity encoding), and no
/// `expect` (the whole body is read before it is forwarded).
pub(crate) fn upstream(headers: &HeaderMap) -> HeaderMap {
    let named = connection_named(headers);
    let mut out = HeaderMap::with_capacity(headers.len());
    for (k, v) in headers {
        let name = k.as_str();
        if HOP_BY_HOP.contains(&name)
            || is_secret(name)
            || name == "accept-encoding"
            || name == "expect"
            || named.iter().any(|n| n == name)
        {
            continue;
        }
        out.append(k.clone(), v.clone());
    }
    out
}

/// Headers of the backend's response to pass to the client: hop-by-hop ones dropped, except
/// `content-length`, which the client needs for a sized body.
pub(crate) fn downstream(headers: &HeaderMap, out: &mut HeaderMap) {
    let named = connection_named(headers);
    for (k, v) in headers {
        let name = k.as_str();
        if (HOP_BY_HOP.contains(&name) && k != header::CONTENT_LENGTH)
            || named.iter().any(|n| n == name)
        {
            continue;
        }
        out.append(k.clone(), v.clone());
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn secrets_are_redacted() {
        let mut h = HeaderMap::new();
        h.insert("api-key", HeaderValue::from_static("s3cret"));
        h.insert("authorization", HeaderValue::from_static("Bearer s3cret"));
        h.insert("cookie", HeaderValue::from_static("a=s3cret"));
        h.insert("x-custom", HeaderValue::from_static("fine"));
        let r = redacted(&h);
        assert!(r.values().all(|v| !v.contains("s3cret")));
        assert_eq!(r["x-custom"], "fine");
        assert!(summary(&h).values().all(|v| !v.contains("s3cret")));
        let up = upstream(&h);
        assert!(up.get("api-key").is_none() && up.get("authorization").is_none());
    }

    /// Defect: headers named by `Connection` were forwarded to the backend.
    #[test]
    fn connection_named_headers_are_not_forwarded() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, X-Secret-Hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        let up = upstream(&h);
        assert!(up.get("x-secret-hop").is_none());
        assert!(up.get("connection").is_none());
        assert!(up.get("x-kept").is_some());
        let mut h = HeaderMap::new();
        h.insert("expect", HeaderValue::from_static("100-continue"));
        assert!(upstream(&h).get("expect").is_none());
        let mut down = HeaderMap::new();
        downstream(&h, &mut down);
        assert!(down.get("x-secret-hop").is_none());
    }

    #[test]
    fn summary_is_bounded() {
        let mut h = HeaderMap::new();
        let big = "v".repeat(10_000);
        for i in 0..100 {
            h.insert(
                HeaderName::from_bytes(format!("x-h{i:03}").as_bytes()).unwrap(),
                HeaderValue::from_str(&big).unwrap(),
            );
        }
        let s = summary(&h);
        assert!(s.len() <= SUMMARY_HEADERS + 1);
        let bytes: usize = s.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(
            bytes < SUMMARY_HEADERS * (SUMMARY_VALUE_BYTES + 16) + 64,
            "{bytes}"
        );
        assert_eq!(s["tollgate-omitted-headers"], "84");
    }
}
