//! The records Tollgate writes and reads: the raw records the logging proxy appends for every
//! request (`request`, `chunks`, `end`) and the consolidated record the log parser derives from
//! them. This crate is the contract between the two services and the stores.
//!
//! Must not: do I/O, depend on async runtimes or on any other workspace crate.
//!
//! Invariants:
//! - every raw record of one request shares its `requestId`; `seq` is 0 for the request record,
//!   1..=k for the `part` records of a request body too large for one document (k = 0 mostly),
//!   k+1..=k+n for the n chunk segments and k+n+1 for the end record, whose `segments` and
//!   `firstSegmentSeq` say n and k+1, so a reader knows when it holds the whole request;
//! - a raw record's document id is `"{requestId}:{seq}"`, so a replayed write is idempotent;
//! - a consolidated record's id is the request id.

use std::collections::BTreeMap;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

mod money;
pub use money::Money;

/// Bumped whenever a stored field changes meaning or shape.
pub const SCHEMA_VERSION: u32 = 1;

/// Document id of a raw record.
pub fn raw_record_id(request_id: &str, seq: u32) -> String {
    format!("{request_id}:{seq}")
}

/// One raw record, tagged by `kind` in the stored JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum RawRecord {
    Request(RequestRecord),
    Part(PartRecord),
    Chunks(ChunksRecord),
    End(EndRecord),
}

impl<'de> Deserialize<'de> for RawRecord {
    /// Reads the `kind` first, then the record of that kind from the same text: no buffering
    /// through serde's `Content` (which would rebuild every body as a tree). Records are JSON
    /// only, so this needs serde_json's deserializer.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        #[derive(Deserialize)]
        struct Kind<'a> {
            #[serde(borrow)]
            kind: std::borrow::Cow<'a, str>,
        }
        let raw = Box::<serde_json::value::RawValue>::deserialize(deserializer)?;
        let text = raw.get();
        let kind: Kind<'_> = serde_json::from_str(text).map_err(D::Error::custom)?;
        let record = match kind.kind.as_ref() {
            "request" => serde_json::from_str(text).map(RawRecord::Request),
            "part" => serde_json::from_str(text).map(RawRecord::Part),
            "chunks" => serde_json::from_str(text).map(RawRecord::Chunks),
            "end" => serde_json::from_str(text).map(RawRecord::End),
            other => {
                return Err(D::Error::unknown_variant(
                    other,
                    &["request", "part", "chunks", "end"],
                ));
            }
        };
        record.map_err(D::Error::custom)
    }
}

impl RawRecord {
    pub fn request_id(&self) -> &str {
        match self {
            RawRecord::Request(r) => &r.request_id,
            RawRecord::Part(r) => &r.request_id,
            RawRecord::Chunks(r) => &r.request_id,
            RawRecord::End(r) => &r.request_id,
        }
    }

    pub fn seq(&self) -> u32 {
        match self {
            RawRecord::Request(_) => 0,
            RawRecord::Part(r) => r.seq,
            RawRecord::Chunks(r) => r.seq,
            RawRecord::End(r) => r.seq,
        }
    }

    pub fn id(&self) -> String {
        raw_record_id(self.request_id(), self.seq())
    }

    pub fn kind(&self) -> &'static str {
        match self {
            RawRecord::Request(_) => "request",
            RawRecord::Part(_) => "part",
            RawRecord::Chunks(_) => "chunks",
            RawRecord::End(_) => "end",
        }
    }
}

/// How the caller was authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum AuthKind {
    /// A consumer key from the configuration, sent as `api-key` or `Authorization: Bearer`.
    ApiKey,
    /// An Entra ID access token (`Authorization: Bearer <JWT>`), mapped to a consumer by its
    /// claims.
    EntraId,
    /// No consumer could be identified (the request was rejected).
    #[default]
    None,
}

/// Who made the request. `key_id` is a short, non-reversible prefix of the key's hash so analysts
/// can tell two keys of one consumer apart without the key ever being stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Consumer {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(default)]
    pub auth_kind: AuthKind,
    /// The Entra ID caller's object id (`oid`, else `sub`): usage charged per user or service
    /// principal. Never the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The calling application's client id (`appid` in v1 tokens, `azp` in v2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_id: Option<String>,
}

impl Consumer {
    /// The consumer recorded for requests that failed authentication.
    pub fn anonymous() -> Self {
        Consumer {
            id: "anonymous".to_owned(),
            key_id: None,
            auth_kind: AuthKind::None,
            ..Default::default()
        }
    }
}

/// Deepest nesting (arrays and objects) a JSON body may have to be stored as JSON. Deeper
/// documents are valid JSON but not every reader can take them (serde_json's `Value` stops at
/// 128 levels, stores have their own caps), and one unreadable document must never stop the
/// change feed: a body over the bound is stored verbatim as text instead.
pub const MAX_JSON_DEPTH: usize = 64;

/// Whether the JSON text nests arrays and objects more than `max` deep. A single pass over the
/// bytes that tracks strings and brackets; it does not validate (the caller does that). String
/// contents, most of a chat body, are skipped with `memchr` to the next quote or backslash
/// rather than looked at byte by byte.
pub fn json_depth_exceeds(bytes: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'"' => {
                // To the closing quote: skip to each quote or backslash; a backslash escapes
                // the byte after it.
                i += 1;
                loop {
                    match memchr::memchr2(b'"', b'\\', &bytes[i.min(bytes.len())..]) {
                        None => return false,
                        Some(at) if bytes[i + at] == b'\\' => i += at + 2,
                        Some(at) => {
                            i += at + 1;
                            break;
                        }
                    }
                }
                continue;
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    false
}

/// The one decision, shared by the proxy and the parser, of whether a response body is a
/// server-sent event stream: the media type `text/event-stream`, in any case, with or without
/// parameters.
pub fn is_event_stream(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|c| {
        c.split(';')
            .next()
            .is_some_and(|media| media.trim().eq_ignore_ascii_case("text/event-stream"))
    })
}

/// A JSON document kept as its text. The proxy never builds a `serde_json::Value` tree for
/// bodies it only passes along: it validates the bytes once and writes them out verbatim
/// (as embedded JSON, not as a string), which keeps allocation off the request path. Readers
/// parse it when they need it ([`JsonText::parse`]).
#[derive(Debug, Clone)]
pub struct JsonText(Box<RawValue>);

impl PartialEq for JsonText {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for JsonText {}

impl JsonText {
    /// Validates `bytes` as one JSON value nested at most [`MAX_JSON_DEPTH`] deep.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        Self::from_slice_bounded(bytes, MAX_JSON_DEPTH)
    }

    /// Validates `bytes` as one JSON value nested at most `max_depth` deep.
    pub fn from_slice_bounded(bytes: &[u8], max_depth: usize) -> Option<Self> {
        if json_depth_exceeds(bytes, max_depth) {
            return None;
        }
        serde_json::from_slice(bytes).ok().map(JsonText)
    }

    pub fn from_value(value: &Value) -> Self {
        // Serialising a `Value` cannot fail (its keys are strings).
        serde_json::value::to_raw_value(value).map_or_else(|_| Self::null(), JsonText)
    }

    /// The JSON `null`.
    pub fn null() -> Self {
        JsonText(RawValue::NULL.to_owned())
    }

    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    pub fn parse(&self) -> Option<Value> {
        serde_json::from_str(self.0.get()).ok()
    }
}

impl Serialize for JsonText {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Written verbatim, not parsed again: it was validated once, at construction. (Going
        // through a `&str` here re-parsed every body on every write, journal and store.)
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for JsonText {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Taken as raw text, never through a `Value`: no tree is built and no depth limit of
        // a tree applies, so whatever was stored can be read back. `Body` and `RawRecord`
        // deserialise without serde's buffering for this to work.
        Box::<RawValue>::deserialize(deserializer).map(JsonText)
    }
}

/// A request or response body: JSON stays JSON so stores can query into it; anything else is
/// kept as text, or base64 when it is not UTF-8.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
#[serde(tag = "encoding", rename_all = "camelCase")]
pub enum Body {
    #[default]
    Empty,
    Json {
        json: JsonText,
    },
    Text {
        #[serde(rename = "contentType")]
        content_type: String,
        text: String,
    },
    Base64 {
        #[serde(rename = "contentType")]
        content_type: String,
        data: String,
    },
    /// A body too large for one stored document: its bytes are in `parts` `part` records
    /// (seq 1..=parts), to be joined in order.
    Parts {
        #[serde(rename = "contentType")]
        content_type: String,
        parts: u32,
        bytes: u64,
    },
}

/// The stored shape of [`Body`], read field by field: serde's internally tagged enums buffer
/// their content, which cannot hand out raw JSON and applies a tree's depth limit.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BodyRepr {
    encoding: String,
    #[serde(default)]
    json: Option<JsonText>,
    #[serde(default)]
    content_type: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    parts: Option<u32>,
    #[serde(default)]
    bytes: Option<u64>,
}

impl<'de> Deserialize<'de> for Body {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let r = BodyRepr::deserialize(deserializer)?;
        let content_type = || r.content_type.clone().unwrap_or_default();
        match r.encoding.as_str() {
            "empty" => Ok(Body::Empty),
            // `"json": null` reads back as `None`: the stored body was the JSON `null`.
            "json" => Ok(Body::Json {
                json: r.json.unwrap_or_else(JsonText::null),
            }),
            "text" => Ok(Body::Text {
                content_type: content_type(),
                text: r.text.ok_or_else(|| D::Error::missing_field("text"))?,
            }),
            "base64" => Ok(Body::Base64 {
                content_type: content_type(),
                data: r.data.ok_or_else(|| D::Error::missing_field("data"))?,
            }),
            "parts" => Ok(Body::Parts {
                content_type: content_type(),
                parts: r.parts.ok_or_else(|| D::Error::missing_field("parts"))?,
                bytes: r.bytes.unwrap_or_default(),
            }),
            other => Err(D::Error::unknown_variant(
                other,
                &["empty", "json", "text", "base64", "parts"],
            )),
        }
    }
}

impl Body {
    /// Classifies raw bytes: JSON when the content type says so and it parses within
    /// [`MAX_JSON_DEPTH`], else UTF-8 text, else base64.
    pub fn from_bytes(content_type: Option<&str>, bytes: &[u8]) -> Self {
        Self::from_bytes_bounded(content_type, bytes, MAX_JSON_DEPTH)
    }

    /// As [`Body::from_bytes`], with JSON deeper than `max_json_depth` kept as text.
    pub fn from_bytes_bounded(
        content_type: Option<&str>,
        bytes: &[u8],
        max_json_depth: usize,
    ) -> Self {
        if bytes.is_empty() {
            return Body::Empty;
        }
        let content_type = content_type.unwrap_or("application/octet-stream");
        if content_type.contains("json")
            && let Some(json) = JsonText::from_slice_bounded(bytes, max_json_depth)
        {
            return Body::Json { json };
        }
        match std::str::from_utf8(bytes) {
            Ok(text) => Body::Text {
                content_type: content_type.to_owned(),
                text: text.to_owned(),
            },
            Err(_) => Body::Base64 {
                content_type: content_type.to_owned(),
                data: base64::engine::general_purpose::STANDARD.encode(bytes),
            },
        }
    }

    /// The body parsed as JSON, when it is JSON.
    pub fn parse_json(&self) -> Option<Value> {
        match self {
            Body::Json { json } => json.parse(),
            _ => None,
        }
    }

    pub fn json(value: &Value) -> Self {
        Body::Json {
            json: JsonText::from_value(value),
        }
    }
}

/// `request` record (seq 0): what the client sent, as accepted by the proxy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestRecord {
    pub schema_version: u32,
    pub request_id: String,
    pub time: DateTime<Utc>,
    pub method: String,
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    pub operation: String,
    pub stream: bool,
    pub consumer: Consumer,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    /// Request headers with credentials and cookies replaced by `"[redacted]"`.
    pub headers: BTreeMap<String, String>,
    /// The body as the client sent it.
    pub body: Body,
    /// The proxy added `stream_options.include_usage` to what it sent AOAI, and takes AOAI's
    /// usage frame out of what the client receives.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream_usage_injected: bool,
}

/// Segment bytes, exactly as received: UTF-8 text when the segment is valid UTF-8 (the usual case
/// for SSE), base64 otherwise (a segment cut inside a multi-byte character).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "encoding", content = "data", rename_all = "camelCase")]
pub enum SegmentData {
    Utf8(String),
    Base64(String),
}

impl SegmentData {
    pub fn from_bytes(bytes: &[u8]) -> Self {
        match std::str::from_utf8(bytes) {
            Ok(s) => SegmentData::Utf8(s.to_owned()),
            Err(_) => SegmentData::Base64(base64::engine::general_purpose::STANDARD.encode(bytes)),
        }
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>, base64::DecodeError> {
        match self {
            SegmentData::Utf8(s) => Ok(s.as_bytes().to_vec()),
            SegmentData::Base64(b) => base64::engine::general_purpose::STANDARD.decode(b),
        }
    }
}

/// `part` record (seq 1..=k): one piece of a request body larger than one stored document may
/// hold ([`Body::Parts`]). Always base64, so a piece's stored size is bounded by its length.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PartRecord {
    pub schema_version: u32,
    pub request_id: String,
    pub seq: u32,
    /// Byte offset of this piece within the body.
    pub offset: u64,
    pub data: SegmentData,
}

/// Cuts a request body into `part` records of at most `max_part_bytes` each, numbered from
/// seq 1, and returns the [`Body::Parts`] that stands for it in the `request` record.
pub fn split_body(
    request_id: &str,
    content_type: Option<&str>,
    bytes: &[u8],
    max_part_bytes: usize,
) -> (Body, Vec<RawRecord>) {
    let size = max_part_bytes.max(1);
    let parts: Vec<RawRecord> = bytes
        .chunks(size)
        .enumerate()
        .map(|(i, piece)| {
            RawRecord::Part(PartRecord {
                schema_version: SCHEMA_VERSION,
                request_id: request_id.to_owned(),
                seq: i as u32 + 1,
                offset: (i * size) as u64,
                data: SegmentData::Base64(base64::engine::general_purpose::STANDARD.encode(piece)),
            })
        })
        .collect();
    let body = Body::Parts {
        content_type: content_type
            .unwrap_or("application/octet-stream")
            .to_owned(),
        parts: parts.len() as u32,
        bytes: bytes.len() as u64,
    };
    (body, parts)
}

/// `chunks` record (seq 1..=n): one segment of the response body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChunksRecord {
    pub schema_version: u32,
    pub request_id: String,
    pub seq: u32,
    /// Byte offset of this segment's first byte within the response body.
    pub offset: u64,
    pub data: SegmentData,
    /// Each network chunk in this segment as `[microseconds since the request arrived, length]`.
    pub arrivals: Vec<[u64; 2]>,
}

/// Where an error came from, so metrics and analysts can tell AOAI's failures from the client's
/// and from Tollgate's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ErrorSource {
    Upstream,
    Downstream,
    Internal,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorInfo {
    pub source: ErrorSource,
    pub code: String,
    pub message: String,
}

/// One try at a backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attempt {
    pub backend: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub duration_ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `end` record (last seq): how the request ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndRecord {
    pub schema_version: u32,
    pub request_id: String,
    pub seq: u32,
    pub time: DateTime<Utc>,
    /// Status sent to the client (Tollgate's own when it answered itself).
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(default)]
    pub attempts: Vec<Attempt>,
    /// The serving backend's `price_multiplier` (capacity already paid for, a dearer
    /// deployment type), so the parser prices the request without the proxy's configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_multiplier: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttfb_ms: Option<f64>,
    pub total_ms: f64,
    /// Selected response headers (rate limits, AOAI request ids, region, model session).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// The response body when it was not streamed in segments.
    #[serde(default)]
    pub body: Body,
    pub client_disconnected: bool,
    /// True when the proxy stopped reading the upstream before its end (drain bound reached,
    /// upstream error or timeout).
    #[serde(default)]
    pub truncated: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    /// Number of `chunks` records this request has…
    pub segments: u32,
    /// …numbered from this seq: 1, or just after the request body's `part` records.
    #[serde(default = "one")]
    pub first_segment_seq: u32,
    pub response_bytes: u64,
}

fn one() -> u32 {
    1
}

/// Where a usage figure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum UsageSource {
    /// AOAI's own `usage` (non-stream body or the `include_usage` stream frame).
    Reported,
    /// Counted by Tollgate with the model's tokenizer because AOAI gave none.
    Estimated,
}

/// The error of an attempt whose backend answered the `stream_options` the proxy added with a
/// 400: the proxy sent the request again as the client sent it, so the stream has no usage.
pub const STREAM_OPTIONS_REJECTED: &str =
    "the backend does not know stream_options; sent again as the client sent it";

/// The note on the serving attempt when its backend is configured without `include_usage`:
/// the usage phase had asked, but the backend got the request as the client sent it, so the
/// stream has no usage.
pub const STREAM_OPTIONS_NOT_SENT: &str =
    "the backend is configured without include_usage; sent as the client sent it";

/// How exact a record's usage is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum UsageQuality {
    /// AOAI's own figure, which the client asked for (or a non-stream answer carried).
    Reported,
    /// AOAI's own figure, which the proxy asked for on the client's behalf
    /// (`stream_options.include_usage` added).
    ReportedAfterInjection,
    /// Counted by Tollgate from a complete exchange: AOAI gave no figure.
    Estimated,
    /// Counted from an answer that was cut: the real figure is at least this.
    LowerBound,
    /// AOAI served the request, but no figure was reported and none could be counted.
    Unknown,
}

impl UsageQuality {
    /// The name records and exports use.
    pub fn as_str(self) -> &'static str {
        match self {
            UsageQuality::Reported => "reported",
            UsageQuality::ReportedAfterInjection => "reportedAfterInjection",
            UsageQuality::Estimated => "estimated",
            UsageQuality::LowerBound => "lowerBound",
            UsageQuality::Unknown => "unknown",
        }
    }
}

/// A record's usage quality and, when it is not AOAI's own figure, why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageQualityInfo {
    pub quality: UsageQuality,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub total_tokens: u64,
    #[serde(default)]
    pub cached_input_tokens: u64,
    /// Already included in `output_tokens`, as AOAI reports it.
    #[serde(default)]
    pub reasoning_tokens: u64,
    /// Of `input_tokens`, audio (priced at the model's audio rate).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub audio_input_tokens: u64,
    /// Of `output_tokens`, audio (priced at the model's audio rate).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub audio_output_tokens: u64,
    pub source: UsageSource,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cost {
    /// Input tokens not served from the prompt cache.
    pub input: Money,
    pub cached_input: Money,
    pub output: Money,
    /// The sum of the three, exactly.
    pub total: Money,
    pub currency: String,
    pub price_table_version: String,
    /// The factor on the table's prices, when one applied: the serving backend's
    /// (`price_multiplier` in the proxy's backend: PTU against pay-as-you-go), else the
    /// deployment's (`parser.deployment_price_multipliers`: a Data Zone or Regional premium, a
    /// negotiated discount).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_multiplier: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolCall {
    pub index: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    pub arguments: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

/// One stitched choice of a chat or completions response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Choice {
    pub index: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function_call: Option<FunctionCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_filter_results: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Latency {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttfb_ms: Option<f64>,
    pub total_ms: f64,
}

/// One record per request, derived by the log parser; id = request id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsolidatedRecord {
    pub schema_version: u32,
    pub id: String,
    pub time: DateTime<Utc>,
    pub consumer: Consumer,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    /// The model AOAI reported, else the configured model of the deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub operation: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    pub path: String,
    pub stream: bool,
    /// None when the request never ended (`complete` is then false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(default)]
    pub attempts: Vec<Attempt>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<Latency>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// How exact `usage` is; absent when AOAI bills nothing for the request (a refusal it does
    /// not charge, or a request that never reached it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_quality: Option<UsageQualityInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<Cost>,
    /// Tokens were used but the model has no price (no entry in the price table, or no model
    /// known): `cost` is absent rather than zero, and `tollgate report` lists the model.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unpriced: bool,
    /// The prompt as sent (chat messages, completions prompt or embeddings input).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<Value>,
    #[serde(default)]
    pub choices: Vec<Choice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_filter_results: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
    #[serde(default)]
    pub response_headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    pub client_disconnected: bool,
    /// False when the parser gave up waiting for the `end` record, or segments were missing.
    pub complete: bool,
    /// True when the proxy stopped reading the response before AOAI ended it (drain bound,
    /// upstream failure or timeout): the content and any estimate are a lower bound.
    #[serde(default)]
    pub truncated: bool,
    /// Bytes of the response body the proxy received from AOAI.
    #[serde(default)]
    pub response_bytes: u64,
    /// Orders the consolidations of one request: a record built from more of the request's raw
    /// records has a higher revision, and a complete record outranks every incomplete one.
    /// Exports carry it so a reader keeps the highest (KQL `arg_max(revision, *)`) and a
    /// replayed export of the same revision is recognisably the same record.
    #[serde(default)]
    pub revision: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
}

/// Bit set in [`ConsolidatedRecord::revision`] for a complete record.
pub const COMPLETE_REVISION: u64 = 1 << 32;

/// The revision of a consolidation built from `raw_records` raw records.
pub fn revision(raw_records: usize, complete: bool) -> u64 {
    let base = raw_records as u64 & (COMPLETE_REVISION - 1);
    if complete {
        COMPLETE_REVISION | base
    } else {
        base
    }
}

impl ConsolidatedRecord {
    /// `YYYY-MM-DD` in UTC, the day bucket used by reports.
    pub fn day(&self) -> String {
        self.time.format("%Y-%m-%d").to_string()
    }

    /// Drops the prompt and the answers' text and call arguments, keeping everything billed
    /// and measured: what `store_content = false` keeps, and what a store that cannot hold the
    /// whole record (an item size limit) is given instead.
    pub fn drop_content(&mut self) {
        self.prompt = None;
        for c in &mut self.choices {
            c.content = None;
            c.refusal = None;
            for t in &mut c.tool_calls {
                t.arguments.clear();
            }
            if let Some(f) = &mut c.function_call {
                f.arguments.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_record_round_trips_with_kind_tag_and_camel_case() {
        let rec = RawRecord::Chunks(ChunksRecord {
            schema_version: SCHEMA_VERSION,
            request_id: "r1".into(),
            seq: 2,
            offset: 10,
            data: SegmentData::from_bytes(b"data: {}\n\n"),
            arrivals: vec![[5, 10]],
        });
        let json = serde_json::to_value(&rec).unwrap();
        assert_eq!(json["kind"], "chunks");
        assert_eq!(json["requestId"], "r1");
        assert_eq!(json["data"]["encoding"], "utf8");
        let back: RawRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back, rec);
        assert_eq!(back.id(), "r1:2");
    }

    #[test]
    fn segment_data_keeps_bytes_that_are_not_utf8() {
        let bytes = [0xe2, 0x82];
        let data = SegmentData::from_bytes(&bytes);
        assert!(matches!(data, SegmentData::Base64(_)));
        assert_eq!(data.to_bytes().unwrap(), bytes);
    }

    #[test]
    fn json_bodies_are_stored_as_embedded_json_and_read_back() {
        let rec = request_with_body(Body::from_bytes(
            Some("application/json"),
            br#"{"b": [1, 2], "a": "x"}"#,
        ));
        let text = serde_json::to_string(&rec).unwrap();
        assert!(
            text.contains(r#""json":{"b": [1, 2], "a": "x"}"#),
            "verbatim: {text}"
        );
        let back: RawRecord = serde_json::from_str(&text).unwrap();
        let RawRecord::Request(back) = back else {
            panic!("request")
        };
        assert_eq!(
            back.body.parse_json().unwrap(),
            serde_json::json!({"a": "x", "b": [1, 2]})
        );
    }

    fn request_with_body(body: Body) -> RawRecord {
        RawRecord::Request(RequestRecord {
            schema_version: SCHEMA_VERSION,
            request_id: "deep".into(),
            time: Utc::now(),
            method: "POST".into(),
            path: "/".into(),
            query: None,
            deployment: None,
            api_version: None,
            operation: "chat.completions".into(),
            stream: false,
            consumer: Consumer::anonymous(),
            client_ip: None,
            user_agent: None,
            headers: BTreeMap::new(),
            body,
            stream_usage_injected: false,
        })
    }

    fn nested(depth: usize) -> Vec<u8> {
        format!("{}1{}", "[".repeat(depth), "]".repeat(depth)).into_bytes()
    }

    /// Defect: a body nested ~125+ levels deep was stored as JSON and could not be read back,
    /// which stopped the change feed. Whatever the depth, what is stored reads back.
    #[test]
    fn any_accepted_body_reads_back_whatever_its_depth() {
        for depth in [1, MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1, 127, 130, 5000] {
            let bytes = nested(depth);
            let body = Body::from_bytes(Some("application/json"), &bytes);
            if depth > MAX_JSON_DEPTH {
                assert!(
                    matches!(body, Body::Text { .. }),
                    "depth {depth} kept as text"
                );
            } else {
                assert!(
                    matches!(body, Body::Json { .. }),
                    "depth {depth} kept as JSON"
                );
            }
            let record = request_with_body(body);
            let text = serde_json::to_string(&record).unwrap();
            let back: RawRecord = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("depth {depth} must read back: {e}"));
            assert_eq!(back, record);
            let bytes_back = match back {
                RawRecord::Request(r) => match r.body {
                    Body::Json { json } => json.as_str().as_bytes().to_vec(),
                    Body::Text { text, .. } => text.into_bytes(),
                    other => panic!("unexpected {other:?}"),
                },
                _ => panic!("request"),
            };
            assert_eq!(bytes_back, bytes, "stored verbatim");
        }
    }

    #[test]
    fn depth_scan_ignores_brackets_in_strings() {
        assert!(!json_depth_exceeds(br#"{"a":"[[[[[[[[[[\"[["}"#, 2));
        assert!(json_depth_exceeds(br#"{"a":[{"b":[1]}]}"#, 3));
        assert!(!json_depth_exceeds(br#"{"a":[{"b":[1]}]}"#, 4));
    }

    /// The nesting depth of a JSON text by serde_json's own parser, which we did not write:
    /// parsed into a `Value` (JSON texts here are shallow enough for its recursion limit).
    fn depth_by_serde(value: &Value) -> usize {
        match value {
            Value::Array(items) => 1 + items.iter().map(depth_by_serde).max().unwrap_or(0),
            Value::Object(map) => 1 + map.values().map(depth_by_serde).max().unwrap_or(0),
            _ => 0,
        }
    }

    /// JSON values of any shape, with strings full of brackets, quotes and backslashes.
    fn arbitrary_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            "[\\[\\]{}\"\\\\a-z ]{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(8, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                prop::collection::btree_map("[\\[\\]{}\"\\\\a-z]{0,6}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn depth_scan_agrees_with_serde_on_any_json(value in arbitrary_json(), max in 0usize..10) {
            let text = serde_json::to_vec(&value).unwrap();
            let depth = depth_by_serde(&value);
            proptest::prop_assert_eq!(json_depth_exceeds(&text, max), depth > max);
        }
    }

    #[test]
    fn event_stream_decision() {
        assert!(is_event_stream(Some("text/event-stream")));
        assert!(is_event_stream(Some("Text/Event-Stream; charset=utf-8")));
        assert!(!is_event_stream(Some("application/json")));
        assert!(!is_event_stream(Some("text/event-streamx")));
        assert!(!is_event_stream(None));
    }

    #[test]
    fn json_null_body_round_trips() {
        let record = request_with_body(Body::from_bytes(Some("application/json"), b"null"));
        let text = serde_json::to_string(&record).unwrap();
        assert_eq!(serde_json::from_str::<RawRecord>(&text).unwrap(), record);
    }

    #[test]
    fn body_classification() {
        assert_eq!(Body::from_bytes(Some("application/json"), b""), Body::Empty);
        assert!(matches!(
            Body::from_bytes(Some("application/json"), br#"{"a":1}"#),
            Body::Json { .. }
        ));
        assert!(matches!(
            Body::from_bytes(Some("application/json"), b"{oops"),
            Body::Text { .. }
        ));
        assert!(matches!(
            Body::from_bytes(None, &[0xff, 0xfe]),
            Body::Base64 { .. }
        ));
    }
}
