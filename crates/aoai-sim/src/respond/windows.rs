//! Per-deployment rate limits: a one-minute fixed window of requests and estimated tokens, and
//! the `x-ratelimit-remaining-*` headers a granted request carries.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue};
use serde_json::Value;
use tokio::time::Instant;

use crate::config::SimDeployment;

const WINDOW: Duration = Duration::from_secs(60);

/// One window per configured deployment, created up front so state stays fixed in size.
#[derive(Debug, Default)]
pub(crate) struct Windows(HashMap<String, Mutex<Window>>);

#[derive(Debug, Default)]
struct Window {
    start: Option<Instant>,
    requests: u64,
    tokens: u64,
}

/// What is left of a deployment's window after a granted request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Remaining {
    requests: u64,
    /// `None` when the deployment has no token limit (the header is then left out).
    tokens: Option<u64>,
}

/// A refused request: how long until the window resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Throttled {
    pub(crate) retry_after_ms: u64,
}

impl Windows {
    pub(crate) fn new<'a>(deployments: impl IntoIterator<Item = &'a String>) -> Self {
        Windows(
            deployments
                .into_iter()
                .map(|name| (name.clone(), Mutex::new(Window::default())))
                .collect(),
        )
    }

    /// Charges the request to the deployment's window (AOAI estimates tokens as prompt +
    /// max_tokens). `None` when the deployment has no limits.
    pub(crate) fn admit(
        &self,
        deployment: &SimDeployment,
        body: &Value,
        prompt_tokens: u64,
    ) -> Result<Option<Remaining>, Throttled> {
        // AOAI grants 6 requests per minute for every 1,000 tokens per minute of quota.
        let rpm = deployment
            .requests_per_minute
            .or(deployment.tokens_per_minute.map(|t| (t / 1000 * 6).max(1)));
        let token_limit = deployment.tokens_per_minute;
        if rpm.is_none() && token_limit.is_none() {
            return Ok(None);
        }
        let (rpm, tpm) = (rpm.unwrap_or(u64::MAX), token_limit.unwrap_or(u64::MAX));
        let max_tokens = body
            .get("max_completion_tokens")
            .or_else(|| body.get("max_tokens"))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let cost = prompt_tokens + max_tokens;
        let Some(window) = self.0.get(&deployment.name) else {
            return Ok(None);
        };
        // A panic elsewhere while holding the lock leaves plain counters, still usable.
        let mut w = window.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let start = *w.start.get_or_insert(now);
        if now.duration_since(start) >= WINDOW {
            *w = Window {
                start: Some(now),
                requests: 0,
                tokens: 0,
            };
        }
        if w.requests + 1 > rpm || w.tokens.saturating_add(cost) > tpm {
            let elapsed = now.duration_since(w.start.unwrap_or(now));
            let wait = WINDOW.saturating_sub(elapsed).as_millis() as u64;
            return Err(Throttled {
                retry_after_ms: wait.max(1),
            });
        }
        w.requests += 1;
        w.tokens = w.tokens.saturating_add(cost);
        Ok(Some(Remaining {
            requests: rpm - w.requests,
            tokens: token_limit.map(|t| t.saturating_sub(w.tokens)),
        }))
    }
}

impl Remaining {
    pub(crate) fn write_headers(self, h: &mut HeaderMap) {
        if let Ok(v) = HeaderValue::from_str(&self.requests.to_string()) {
            h.insert("x-ratelimit-remaining-requests", v);
        }
        if let Some(tokens) = self.tokens
            && let Ok(v) = HeaderValue::from_str(&tokens.to_string())
        {
            h.insert("x-ratelimit-remaining-tokens", v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::default_deployments;

    /// Defect: with only a requests-per-minute limit, `x-ratelimit-remaining-tokens` said
    /// 18446744073709551597 (the "no limit" marker minus the tokens used).
    #[test]
    fn no_token_header_without_a_token_limit() {
        let mut d = default_deployments().remove(0);
        d.requests_per_minute = Some(10);
        let windows = Windows::new([&d.name]);
        let remaining = windows
            .admit(&d, &serde_json::json!({"max_tokens": 5}), 14)
            .unwrap()
            .unwrap();
        let mut h = HeaderMap::new();
        remaining.write_headers(&mut h);
        assert_eq!(h["x-ratelimit-remaining-requests"], "9");
        assert!(h.get("x-ratelimit-remaining-tokens").is_none());

        d.tokens_per_minute = Some(1000);
        let windows = Windows::new([&d.name]);
        let remaining = windows
            .admit(&d, &serde_json::json!({"max_tokens": 5}), 14)
            .unwrap()
            .unwrap();
        let mut h = HeaderMap::new();
        remaining.write_headers(&mut h);
        assert_eq!(h["x-ratelimit-remaining-tokens"], "981");
    }
}
