//! Who may call: an `api-key` header or a Bearer token, checked against `sim.api_key`.

use axum::http::{HeaderMap, header};

/// Whether the request carries an acceptable credential. A Bearer token shaped like a JWT is
/// always accepted, as an Entra ID token would be; otherwise the `api-key` (or the Bearer
/// token) must equal `expected`, or be any non-empty key when no key is configured.
pub(crate) fn authorized(expected: Option<&str>, headers: &HeaderMap) -> bool {
    let key = headers.get("api-key").and_then(|v| v.to_str().ok());
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if let Some(token) = bearer
        && token.split('.').count() == 3
    {
        return true;
    }
    match (expected, key.or(bearer)) {
        (_, None) => false,
        (None, Some(k)) => !k.is_empty(),
        (Some(expected), Some(k)) => expected == k,
    }
}
