//! Fault injection, from `sim.fault` or the per-request `x-sim-fault` header.
//!
//! Syntax: `;`-separated items; a bare status code answers with AOAI's error for that status,
//! and `key=value` items tune it:
//! - `429;retry-after-ms=500` — throttled, with `retry-after-ms` and `Retry-After`;
//! - `500`, `503`, … — server errors;
//! - `reset-after-chunks=3` — send 3 SSE frames (or 3 body chunks) then drop the connection;
//! - `slow-first-byte=2000` — wait 2 s before the response headers;
//! - `content-filter` — AOAI's 400 for a prompt its content filter blocked;
//! - `no-stream-options` — 400 `unknown_parameter` for `stream_options`, as a backend without
//!   it answers;
//! - `completion-filter` — the completion's content filter stops a chat answer part-way
//!   (`finish_reason: content_filter`; billed for what was generated).

use std::time::Duration;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fault {
    pub status: Option<u16>,
    pub retry_after_ms: Option<u64>,
    pub reset_after_chunks: Option<usize>,
    pub slow_first_byte: Option<Duration>,
    pub content_filter: bool,
    /// Answer `stream_options` with 400 `unknown_parameter` whatever the api-version, as a
    /// backend that does not support it does (`no-stream-options`).
    pub no_stream_options: bool,
    /// The completion's content filter stops the answer part-way (`completion-filter`): the
    /// text so far, `finish_reason: content_filter`, and the category it flagged.
    pub completion_filter: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FaultParseError {
    #[error("`{0}` is not a status code or a known key=value item")]
    Unknown(String),
    #[error("`{key}` needs a whole number, got `{value}`")]
    BadNumber { key: String, value: String },
}

impl Fault {
    pub fn parse(spec: &str) -> Result<Fault, FaultParseError> {
        let mut fault = Fault::default();
        for item in spec.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            if item == "content-filter" {
                fault.content_filter = true;
                continue;
            }
            if item == "no-stream-options" {
                fault.no_stream_options = true;
                continue;
            }
            if item == "completion-filter" {
                fault.completion_filter = true;
                continue;
            }
            let Some((key, value)) = item.split_once('=') else {
                match item.parse::<u16>() {
                    Ok(status) if (400..=599).contains(&status) => fault.status = Some(status),
                    _ => return Err(FaultParseError::Unknown(item.to_owned())),
                }
                continue;
            };
            let (key, value) = (key.trim(), value.trim());
            let number = || {
                value
                    .parse::<u64>()
                    .map_err(|_| FaultParseError::BadNumber {
                        key: key.to_owned(),
                        value: value.to_owned(),
                    })
            };
            match key {
                "retry-after-ms" => fault.retry_after_ms = Some(number()?),
                "reset-after-chunks" => fault.reset_after_chunks = Some(number()? as usize),
                "slow-first-byte" => fault.slow_first_byte = Some(Duration::from_millis(number()?)),
                _ => return Err(FaultParseError::Unknown(item.to_owned())),
            }
        }
        Ok(fault)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!(
            Fault::parse("429;retry-after-ms=500").unwrap(),
            Fault {
                status: Some(429),
                retry_after_ms: Some(500),
                ..Default::default()
            }
        );
        assert_eq!(Fault::parse("500").unwrap().status, Some(500));
        assert_eq!(
            Fault::parse("reset-after-chunks=3")
                .unwrap()
                .reset_after_chunks,
            Some(3)
        );
        assert_eq!(
            Fault::parse("slow-first-byte=2000")
                .unwrap()
                .slow_first_byte,
            Some(Duration::from_secs(2))
        );
        assert!(Fault::parse("content-filter").unwrap().content_filter);
        assert!(Fault::parse("no-stream-options").unwrap().no_stream_options);
        assert!(Fault::parse("200").is_err());
        assert!(Fault::parse("explode").is_err());
        assert!(Fault::parse("retry-after-ms=soon").is_err());
    }
}
