//! Who may call: an `api-key` header or a Bearer token, checked against `sim.api_key`, as an
//! AOAI resource does (with `sim.local_auth_disabled`, as one with `disableLocalAuth`).

use axum::http::{HeaderMap, header};
use base64::Engine as _;

use crate::error::AoaiError;

/// Whether the request carries an acceptable credential. A Bearer token shaped like a JWT is
/// accepted as an Entra ID token would be, unless its `exp` has passed (the simulator cannot
/// check signatures); otherwise the `api-key` (or the Bearer token) must equal `expected`, or
/// be any non-empty key when no key is configured. With `local_auth_disabled` an `api-key` is
/// refused whatever else is sent: AOAI answers 403 `AuthenticationTypeDisabled` (seen in
/// Azure-Samples/azure-search-openai-demo#1617 and microsoft/sample-app-aoai-chatGPT#1000).
pub(crate) fn check(
    expected: Option<&str>,
    local_auth_disabled: bool,
    headers: &HeaderMap,
) -> Result<(), AoaiError> {
    let key = headers.get("api-key").and_then(|v| v.to_str().ok());
    if local_auth_disabled && key.is_some() {
        return Err(AoaiError::key_auth_disabled());
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if let Some(token) = bearer
        && token.split('.').count() == 3
    {
        return match expired(token) {
            true => Err(AoaiError::token_invalid()),
            false => Ok(()),
        };
    }
    if local_auth_disabled {
        return Err(AoaiError::token_invalid());
    }
    let ok = match (expected, key.or(bearer)) {
        (_, None) => false,
        (None, Some(k)) => !k.is_empty(),
        (Some(expected), Some(k)) => expected == k,
    };
    ok.then_some(()).ok_or_else(AoaiError::unauthorized)
}

/// Whether a JWT's payload names an `exp` (seconds since the epoch) that has passed.
fn expired(token: &str) -> bool {
    let Some(payload) = token.split('.').nth(1) else {
        return false;
    };
    let exp = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("exp").and_then(serde_json::Value::as_i64));
    exp.is_some_and(|exp| exp <= now_secs())
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(exp: i64) -> String {
        let enc = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        format!(
            "{}.{}.sig",
            enc(serde_json::json!({"alg": "RS256"})),
            enc(serde_json::json!({"exp": exp}))
        )
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn keys_tokens_and_disabled_local_auth() {
        let now = now_secs();
        let good = format!("Bearer {}", jwt(now + 3600));
        let old = format!("Bearer {}", jwt(now - 1));
        assert!(check(Some("k"), false, &headers(&[("api-key", "k")])).is_ok());
        assert_eq!(
            check(Some("k"), false, &headers(&[("api-key", "x")])).map_err(|e| e.status),
            Err(axum::http::StatusCode::UNAUTHORIZED)
        );
        assert!(check(Some("k"), false, &headers(&[("authorization", &good)])).is_ok());
        assert!(check(Some("k"), true, &headers(&[("authorization", &good)])).is_ok());
        let expired = check(None, true, &headers(&[("authorization", &old)])).unwrap_err();
        assert_eq!(expired.status, axum::http::StatusCode::UNAUTHORIZED);
        let key = check(
            Some("k"),
            true,
            &headers(&[("api-key", "k"), ("authorization", &good)]),
        )
        .unwrap_err();
        assert_eq!(key.status, axum::http::StatusCode::FORBIDDEN);
        assert_eq!(key.body["error"]["code"], "AuthenticationTypeDisabled");
        assert!(check(None, true, &headers(&[])).is_err());
    }
}
