//! `ProxyConfig` (the `[proxy]` section), validated into the runtime form before any traffic.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

pub use crate::consumers::{ConsumerConfig, KeyConfig};

/// An AOAI resource (or the simulator) and the deployments it serves.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub name: String,
    /// Base URL, e.g. `https://myresource.openai.azure.com`.
    pub endpoint: String,
    /// Sent to the backend as `api-key`. Better kept out of the file: `api_key_env` names an
    /// environment variable holding it, `api_key_file` a file (as Container Apps mounts a Key
    /// Vault secret); at most one of the three.
    #[serde(default)]
    pub api_key: Option<SecretString>,
    #[serde(default)]
    pub api_key_env: Option<String>,
    #[serde(default)]
    pub api_key_file: Option<std::path::PathBuf>,
    /// A deployment's name on this backend where it differs from the name clients call
    /// (`"gpt-4o" = "gpt-4o-ptu-eastus"`).
    #[serde(default)]
    pub deployment_names: std::collections::BTreeMap<String, String>,
    /// Deployment names this backend serves. Backends serving the same deployment form its
    /// pool.
    #[serde(default)]
    pub deployments: Vec<String>,
    /// Within a pool, lower priorities are tried first (PTU at 0, pay-as-you-go as spill-over
    /// at 1); the next priority only when every backend of the lower one rests or fails.
    #[serde(default)]
    pub priority: u32,
    /// Share of the requests among the backends of one priority (1 to 1,000).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Reach the backend with an Entra ID token instead of a key (at most one of this and the
    /// `api_key` fields): no AOAI key stored anywhere.
    #[serde(default)]
    pub entra: Option<crate::backend_auth::EntraConfig>,
    /// Requests this backend is sent at once (streams until their end); a full backend is
    /// passed over as a resting one is. Unlimited when absent.
    #[serde(default)]
    pub max_concurrent_requests: Option<usize>,
    /// Whether this backend accepts `stream_options.include_usage` (AOAI api-versions from
    /// 2024-09-01-preview do; an older gateway in front of it may not). When false, streams sent
    /// to it are left as the client sent them.
    #[serde(default = "yes")]
    pub include_usage: bool,
    /// Multiplies the price of the requests this backend serves: an internal rate for
    /// capacity already paid for (PTU, e.g. 0.4), 1.1 for a Data Zone deployment priced 10%
    /// over Global. Recorded with each request, so the parser prices it without this file;
    /// it wins over the parser's `deployment_price_multipliers`.
    #[serde(default)]
    pub price_multiplier: Option<f64>,
    /// The backend for calls that keep state on it (files, batches, fine-tuning, assistants,
    /// threads, vector stores, stored responses): they are never balanced, so a later call on
    /// an id reaches the backend that made it. At most one; the first backend when none is.
    #[serde(default)]
    pub stateful: bool,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            name: String::new(),
            endpoint: String::new(),
            api_key: None,
            api_key_env: None,
            api_key_file: None,
            deployment_names: Default::default(),
            deployments: Vec::new(),
            priority: 0,
            weight: default_weight(),
            entra: None,
            max_concurrent_requests: None,
            include_usage: true,
            price_multiplier: None,
            stateful: false,
        }
    }
}

fn default_weight() -> u32 {
    1
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest request body accepted; larger gets 413.
    pub max_request_body_bytes: usize,
    /// Largest total size of the request headers (names + values) accepted; larger gets 431.
    /// The HTTP server's own parser cap (about 400 KB) applies before this one.
    pub max_header_bytes: usize,
    /// TCP connect timeout to a backend.
    pub connect_timeout_ms: u64,
    /// Backends one request may be sent to: after a 429, a 5xx, a connect error or a
    /// first-byte timeout the next backend of the deployment's pool is tried, while nothing
    /// has gone to the client.
    pub max_attempts: u32,
    /// No attempt after the first starts once this long has passed since the request
    /// arrived: the client gets the last backend's answer (or error) instead of waiting on.
    pub retry_deadline_ms: u64,
    /// Consecutive 5xx answers, connect errors or timeouts that open a backend's circuit
    /// breaker: it gets no requests for `breaker_cooldown_ms`, then one trial.
    pub breaker_failures: u32,
    pub breaker_cooldown_ms: u64,
    /// Time allowed from sending the request to receiving the response headers.
    pub first_byte_timeout_ms: u64,
    /// Longest silence allowed between two body chunks of a response.
    pub idle_timeout_ms: u64,
    /// Longest a whole exchange may take, streams included.
    pub total_timeout_ms: u64,
    /// After the client disconnects, how many more response bytes are read so AOAI's usage is
    /// still recorded.
    pub max_drain_bytes: u64,
    /// After the client disconnects, how long the response is read for at most.
    pub max_drain_ms: u64,
    /// Time a client has to send a request's headers once it starts (and between requests on
    /// a kept-alive connection): a slow-headers client cannot hold a connection open.
    pub header_read_timeout_ms: u64,
    /// Time a client has to send the whole request body; slower gets 408.
    pub body_read_timeout_ms: u64,
    /// Longest a write to a client may stay blocked (the client not reading its response);
    /// then the connection is closed and the rest of the answer drained and recorded.
    pub client_write_timeout_ms: u64,
    /// Requests handled at once (from the headers to the `end` record, streams included);
    /// beyond it new requests are shed with a 503 and `retry-after`.
    pub max_concurrent_requests: usize,
    /// Open client connections at once; beyond it new connections are closed on accept.
    pub max_connections: usize,
    /// Open client connections from one IP address at once.
    pub max_connections_per_ip: usize,
    /// Deepest JSON nesting recorded as JSON; deeper request bodies are forwarded unchanged
    /// and recorded verbatim as text.
    pub max_json_depth: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_request_body_bytes: 32 * 1024 * 1024,
            max_header_bytes: 64 * 1024,
            connect_timeout_ms: 5_000,
            max_attempts: 3,
            // Past half a minute of failing backends a client is better told than kept.
            retry_deadline_ms: 30_000,
            breaker_failures: 5,
            breaker_cooldown_ms: 30_000,
            // AOAI sends a non-stream answer's headers only when the whole answer is generated,
            // which for reasoning models takes minutes; the openai SDK waits 600 s. Answering
            // 504 sooner makes the SDK retry a request AOAI bills anyway.
            first_byte_timeout_ms: 600_000,
            idle_timeout_ms: 60_000,
            total_timeout_ms: 600_000,
            max_drain_bytes: 16 * 1024 * 1024,
            max_drain_ms: 120_000,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 60_000,
            // A client that takes nothing for this long is gone in all but name; the openai
            // SDKs read as fast as bytes arrive.
            client_write_timeout_ms: 30_000,
            max_concurrent_requests: 4_096,
            max_connections: 10_000,
            max_connections_per_ip: 1_024,
            max_json_depth: tollgate_records::MAX_JSON_DEPTH,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecorderConfig {
    /// Records held in memory between request tasks and the batch writer; beyond it records
    /// go to the spool.
    pub queue_capacity: usize,
    /// A request body larger than this is recorded in `part` records of this size, so no
    /// stored document outgrows what a store takes (Cosmos DB items: 2 MB; parts are base64,
    /// 4/3 of this).
    pub max_body_part_bytes: usize,
    /// Estimated bytes (bodies and segments) those records may take, the writer's batch and
    /// replay reads included; a record that would go over it goes to the spool instead.
    pub queue_max_bytes: u64,
    /// Most records written to the store in one batch.
    pub max_batch_records: usize,
    /// Longest a record waits for its batch to fill before it is written (0: write at once).
    pub flush_interval_ms: u64,
    /// A stream segment is cut when it reaches this size…
    pub segment_max_bytes: usize,
    /// …or this age, so a long stream is a handful of documents.
    pub segment_max_age_ms: u64,
    /// Non-stream response bodies up to this size go inline in the `end` record; larger ones
    /// are recorded as segments.
    pub max_inline_body_bytes: usize,
    /// Where records go when the queue is full or the store fails; default `<data_dir>/spool`.
    pub spool_dir: Option<PathBuf>,
    /// Spool size cap; when reached, new requests are refused with 503 rather than accepted
    /// and not recorded.
    pub spool_max_bytes: u64,
    /// Spool files are rotated at this size.
    pub spool_file_max_bytes: u64,
    /// Records handed to the spool thread and not yet on disk (or kept in memory while the
    /// disk refuses writes) may take this many bytes; beyond it request tasks wait.
    pub spool_buffer_max_bytes: u64,
    /// `never` (default): spooled records survive a process crash, not a power loss; `always`:
    /// every spool append is synced to disk. See the recorder's spool module doc.
    pub spool_fsync: crate::recorder::SpoolFsync,
    /// Cap of `<spool_dir>/dead-letter.jsonl`, where records the store rejects for good go;
    /// when full, they stay in the spool and are retried instead.
    pub dead_letter_max_bytes: u64,
    /// Wait between attempts to replay the spool into a failing store (and before a failing
    /// journal is tried again).
    pub retry_interval_ms: u64,
    /// The write-ahead journal: every record is also appended here, and a response's last byte
    /// waits until its `end` record is written, so what a client received in full survives the
    /// proxy being killed. Default `<data_dir>/journal`. Files an earlier run left are replayed
    /// through the spool at start.
    pub journal_dir: Option<PathBuf>,
    /// Journal files are rotated at this size; a file is deleted once all its records are in
    /// the store or the spool.
    pub journal_file_max_bytes: u64,
    /// Journal size cap; new requests are refused (503) before it is reached, and records over
    /// it are not journaled (counted) rather than held.
    pub journal_max_bytes: u64,
    /// Records serialised and waiting for the journal's writer thread may take this many bytes;
    /// new requests are refused before it is reached, and records over it are not journaled.
    pub journal_buffer_max_bytes: u64,
    /// `never` (default): journaled records survive the process being killed, not a power loss;
    /// `always`: every journal write is synced to disk before the response completes.
    pub journal_fsync: crate::recorder::SpoolFsync,
}

impl Default for RecorderConfig {
    fn default() -> Self {
        RecorderConfig {
            queue_capacity: 16_384,
            max_body_part_bytes: 1024 * 1024,
            // Two maximal request bodies and plenty of ordinary records; beyond it records
            // overflow to disk rather than memory.
            queue_max_bytes: 64 * 1024 * 1024,
            max_batch_records: 512,
            flush_interval_ms: 10,
            segment_max_bytes: 64 * 1024,
            segment_max_age_ms: 1_000,
            max_inline_body_bytes: 1024 * 1024,
            spool_dir: None,
            spool_max_bytes: 1024 * 1024 * 1024,
            spool_file_max_bytes: 16 * 1024 * 1024,
            spool_buffer_max_bytes: 64 * 1024 * 1024,
            spool_fsync: crate::recorder::SpoolFsync::Never,
            dead_letter_max_bytes: 256 * 1024 * 1024,
            retry_interval_ms: 1_000,
            journal_dir: None,
            journal_file_max_bytes: 16 * 1024 * 1024,
            // As the spool: its files hold only records not yet stored or spooled, so it nears
            // the cap only when the writer is stuck for long.
            journal_max_bytes: 1024 * 1024 * 1024,
            journal_buffer_max_bytes: 64 * 1024 * 1024,
            journal_fsync: crate::recorder::SpoolFsync::Never,
        }
    }
}

/// Asking AOAI for a stream's usage on the client's behalf (`stream_usage.rs`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamUsageConfig {
    /// Add `stream_options.include_usage` to chat and completions streams that do not ask,
    /// on api-versions that accept it, so their usage is AOAI's own figure.
    pub inject: bool,
    /// Deployments whose backend rejects `stream_options`: left as the client sent them.
    pub skip_deployments: Vec<String>,
}

impl Default for StreamUsageConfig {
    fn default() -> Self {
        StreamUsageConfig {
            inject: true,
            skip_deployments: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    pub consumers: Vec<ConsumerConfig>,
    pub backends: Vec<BackendConfig>,
    pub limits: LimitsConfig,
    pub recorder: RecorderConfig,
    /// SHA-256 of the key that may call the admin endpoints (`/tollgate/admin/…`); the admin
    /// endpoints are off when absent.
    pub admin_key_sha256: Option<String>,
    /// Use `HTTP(S)_PROXY` from the environment for backend connections.
    pub use_env_proxy: bool,
    pub stream_usage: StreamUsageConfig,
    pub quotas: crate::quota::QuotasConfig,
    /// Where limit counters live: this process, or a Redis every replica shares.
    pub limits_store: crate::quota::LimitsStoreConfig,
    /// Entra ID access tokens accepted from callers, mapped to consumers.
    pub entra_callers: crate::entra_callers::EntraCallersConfig,
    /// The admin listener: the consumer API and the admin endpoints, off unless it listens.
    pub admin: AdminConfig,
    /// How the consumers registered in the store reach this replica.
    pub registry: RegistryConfig,
}

/// `[proxy.admin]`: the admin API's own listener (keep it on a private address or port: it
/// creates consumers and issues keys). Callers present the admin key (`admin_key_sha256`) or
/// an Entra ID token valid for `[proxy.entra_callers]` that carries `entra_role`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: Option<std::net::SocketAddr>,
    /// The app role (`roles` claim) that makes an Entra ID caller an administrator.
    pub entra_role: Option<String>,
    /// The tenants whose role assignments count (the home tenant): of a multi-tenant app,
    /// every tenant's administrators assign its app roles in their own tenant, so a role from
    /// another tenant `[proxy.entra_callers]` accepts must not make an administrator here.
    pub tenants: Vec<String>,
}

/// `[proxy.registry]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// How often the registered consumers are read: the bound on how long a revoked key or
    /// a new consumer takes to reach this replica.
    pub poll_ms: u64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig { poll_ms: 2_000 }
    }
}

/// A validated backend.
#[derive(Debug, Clone)]
pub(crate) struct Backend {
    pub name: String,
    pub endpoint: reqwest::Url,
    pub auth: crate::backend_auth::BackendAuth,
    pub priority: u32,
    pub weight: u32,
    /// Public deployment name → its name on this backend.
    pub deployment_names: HashMap<String, String>,
    pub max_concurrent_requests: Option<usize>,
    pub include_usage: bool,
    pub price_multiplier: Option<f64>,
}

/// The configuration in runtime form: what is built at start, and what reloads.
#[derive(Debug, Clone)]
pub(crate) struct Validated {
    pub fixed: Fixed,
    pub live: LiveConfig,
}

/// What sizes the proxy at start; a reload may not change it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Fixed {
    pub entra_callers: crate::entra_callers::EntraCallersConfig,
    pub limits_store: crate::quota::LimitsStoreConfig,
    pub limits: LimitsConfig,
    pub recorder: RecorderConfig,
    pub admin_key: Option<[u8; 32]>,
    pub admin: AdminConfig,
    pub registry: RegistryConfig,
    pub use_env_proxy: bool,
}

/// What a reload replaces (see `live.rs`).
#[derive(Debug, Clone)]
pub(crate) struct LiveConfig {
    /// The consumers the file declares (the registry's join them in `AppState::directory`).
    pub consumers: crate::consumers::Directory,
    /// The same, as declared: the registry refuses their ids and lists them.
    pub file_consumers: Vec<ConsumerConfig>,
    pub backends: Vec<Backend>,
    /// Deployment → its pool: indices into `backends`.
    pub routes: HashMap<String, Vec<usize>>,
    pub stream_usage: StreamUsageConfig,
    /// Index of the backend for calls that keep state.
    pub stateful: Option<usize>,
    pub quotas: crate::quota::QuotasConfig,
}

/// The backend's key from the one place the configuration names (the file, an environment
/// variable, a secret file), read once at start; what is wrong goes to `problems`.
fn backend_key(b: &BackendConfig, problems: &mut Vec<String>) -> Option<SecretString> {
    let named = [
        b.api_key.is_some(),
        b.api_key_env.is_some(),
        b.api_key_file.is_some(),
        b.entra.is_some(),
    ];
    if named.iter().filter(|n| **n).count() > 1 {
        problems.push(format!(
            "proxy.backends `{}`: name at most one of api_key, api_key_env, api_key_file, entra",
            b.name
        ));
        return None;
    }
    let read = match (&b.api_key_env, &b.api_key_file) {
        (Some(var), _) => secret_from_env("api_key_env", var),
        (None, Some(path)) => secret_from_file("api_key_file", path),
        (None, None) => return b.api_key.clone(),
    };
    read.map(SecretString::from)
        .map_err(|why| problems.push(format!("proxy.backends `{}`: {why}", b.name)))
        .ok()
}

/// A secret kept out of the configuration file: the value of environment variable `var`,
/// trimmed; what is wrong names the setting `field`.
pub(crate) fn secret_from_env(field: &str, var: &str) -> Result<String, String> {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Ok(v.trim().to_owned()),
        _ => Err(format!("{field} names {var}, which is not set")),
    }
}

/// A secret kept out of the configuration file: the content of the file at `path` (as
/// Container Apps mounts a Key Vault secret), trimmed; what is wrong names the setting `field`.
pub(crate) fn secret_from_file(field: &str, path: &std::path::Path) -> Result<String, String> {
    match std::fs::read_to_string(path) {
        Ok(v) if !v.trim().is_empty() => Ok(v.trim().to_owned()),
        Ok(_) => Err(format!("{field} {} is empty", path.display())),
        Err(e) => Err(format!("{field} {}: {e}", path.display())),
    }
}

/// Longest duration any limit may name.
const MAX_DURATION_MS: u64 = 7 * 24 * 3600 * 1000;

pub(crate) fn parse_digest(hex_digest: &str) -> Option<[u8; 32]> {
    let bytes = hex::decode(hex_digest.trim()).ok()?;
    bytes.try_into().ok()
}

impl Fixed {
    /// How every connection to a backend is made (the proxy's, the probe's): the connect
    /// timeout, no redirects, and the environment's proxy only when configured.
    pub(crate) fn backend_client(&self) -> reqwest::ClientBuilder {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(self.limits.connect_timeout_ms))
            // A gateway passes a backend's redirect to the client: following it would replay
            // the request, backend key included, to wherever it points.
            .redirect(reqwest::redirect::Policy::none());
        if self.use_env_proxy {
            client
        } else {
            client.no_proxy()
        }
    }
}

impl ProxyConfig {
    /// Validates the configuration without building a proxy: no spool, no journal, no
    /// directory touched (`tollgate check` while another process owns the data directory).
    pub fn check(&self) -> Result<(), crate::ProxyBuildError> {
        self.validate()
            .map(|_| ())
            .map_err(crate::ProxyBuildError::Config)
    }

    /// Checks everything and returns every problem at once.
    pub(crate) fn validate(&self) -> Result<Validated, Vec<String>> {
        let mut problems = Vec::new();
        let mut consumers = crate::consumers::Directory::default();
        let now = chrono::Utc::now();
        for c in &self.consumers {
            if let Err(mut p) = consumers.add(c, now) {
                problems.append(&mut p);
            }
        }
        let mut routes = HashMap::new();
        let mut backends = Vec::new();
        let mut identities = crate::backend_auth::Identities::default();
        let mut names = std::collections::HashSet::new();
        for (i, b) in self.backends.iter().enumerate() {
            // Backends are known by name across reloads (their state carries over) and in
            // records and reports.
            if !names.insert(b.name.as_str()) {
                problems.push(format!(
                    "proxy.backends: the name `{}` is used twice",
                    b.name
                ));
            }
            let endpoint = match reqwest::Url::parse(&b.endpoint) {
                Ok(u)
                    if matches!(u.scheme(), "http" | "https")
                        && u.query().is_none()
                        && !u.cannot_be_a_base() =>
                {
                    Some(u)
                }
                _ => {
                    problems.push(format!(
                        "proxy.backends `{}`: endpoint `{}` is not an http(s) base URL",
                        b.name, b.endpoint
                    ));
                    None
                }
            };
            for d in &b.deployments {
                let pool: &mut Vec<usize> = routes.entry(d.clone()).or_default();
                if pool.contains(&i) {
                    problems.push(format!(
                        "proxy.backends `{}`: deployment `{d}` is listed twice",
                        b.name
                    ));
                } else {
                    pool.push(i);
                }
            }
            if !(1..=1000).contains(&b.weight) {
                problems.push(format!(
                    "proxy.backends `{}`: weight {} is not between 1 and 1000",
                    b.name, b.weight
                ));
            }
            let api_key = backend_key(b, &mut problems);
            if b.max_concurrent_requests == Some(0) {
                problems.push(format!(
                    "proxy.backends `{}`: max_concurrent_requests must be greater than 0",
                    b.name
                ));
            }
            // The parser prices in exact ten-thousandths, as for its deployment multipliers.
            if let Some(m) = b.price_multiplier
                && !(m.is_finite()
                    && m > 0.0
                    && m <= 100.0
                    && ((m * 10_000.0).round() - m * 10_000.0).abs() < 1e-6)
            {
                problems.push(format!(
                    "proxy.backends `{}`: price_multiplier {m} is not a factor above 0 and at most 100 with at most four decimals",
                    b.name
                ));
            }
            for public in b.deployment_names.keys() {
                if !b.deployments.contains(public) {
                    problems.push(format!(
                        "proxy.backends `{}`: deployment_names names `{public}`, which is not in its deployments",
                        b.name
                    ));
                }
            }
            let mut auth = crate::backend_auth::BackendAuth::None;
            if let Some(key) = &api_key {
                match crate::backend_auth::BackendAuth::api_key(key) {
                    Some(a) => auth = a,
                    None => problems.push(format!(
                        "proxy.backends `{}`: api_key is not a valid header value",
                        b.name
                    )),
                }
            } else if let Some(entra) = &b.entra {
                match identities.get(entra) {
                    Ok(token) => auth = crate::backend_auth::BackendAuth::Entra(token),
                    Err(e) => problems.push(format!("proxy.backends `{}`: entra: {e}", b.name)),
                }
            }
            if let Some(endpoint) = endpoint {
                backends.push(Backend {
                    name: b.name.clone(),
                    endpoint,
                    auth,
                    priority: b.priority,
                    weight: b.weight,
                    deployment_names: b.deployment_names.clone().into_iter().collect(),
                    max_concurrent_requests: b.max_concurrent_requests,
                    include_usage: b.include_usage,
                    price_multiplier: b.price_multiplier,
                });
            }
        }
        let l = &self.limits;
        for (name, v) in [
            ("max_request_body_bytes", l.max_request_body_bytes as u64),
            ("max_header_bytes", l.max_header_bytes as u64),
            ("connect_timeout_ms", l.connect_timeout_ms),
            ("max_attempts", u64::from(l.max_attempts)),
            ("retry_deadline_ms", l.retry_deadline_ms),
            ("breaker_failures", u64::from(l.breaker_failures)),
            ("first_byte_timeout_ms", l.first_byte_timeout_ms),
            ("idle_timeout_ms", l.idle_timeout_ms),
            ("total_timeout_ms", l.total_timeout_ms),
            ("header_read_timeout_ms", l.header_read_timeout_ms),
            ("body_read_timeout_ms", l.body_read_timeout_ms),
            ("client_write_timeout_ms", l.client_write_timeout_ms),
            ("max_concurrent_requests", l.max_concurrent_requests as u64),
            ("max_connections", l.max_connections as u64),
            ("max_connections_per_ip", l.max_connections_per_ip as u64),
            ("max_json_depth", l.max_json_depth as u64),
        ] {
            if v == 0 {
                problems.push(format!("proxy.limits.{name} must be greater than 0"));
            }
        }
        // Durations are added to instants; an unbounded one would overflow (and "no limit" is
        // not a limit). A week is past any AOAI call.
        for (name, v) in [
            ("connect_timeout_ms", l.connect_timeout_ms),
            ("retry_deadline_ms", l.retry_deadline_ms),
            ("first_byte_timeout_ms", l.first_byte_timeout_ms),
            ("idle_timeout_ms", l.idle_timeout_ms),
            ("total_timeout_ms", l.total_timeout_ms),
            ("header_read_timeout_ms", l.header_read_timeout_ms),
            ("body_read_timeout_ms", l.body_read_timeout_ms),
            ("client_write_timeout_ms", l.client_write_timeout_ms),
            ("max_drain_ms", l.max_drain_ms),
        ] {
            if v > MAX_DURATION_MS {
                problems.push(format!(
                    "proxy.limits.{name} must be at most {MAX_DURATION_MS} (a week)"
                ));
            }
        }
        let r = &self.recorder;
        for (name, v) in [
            ("queue_capacity", r.queue_capacity as u64),
            ("max_batch_records", r.max_batch_records as u64),
            ("max_body_part_bytes", r.max_body_part_bytes as u64),
            ("segment_max_bytes", r.segment_max_bytes as u64),
            ("spool_file_max_bytes", r.spool_file_max_bytes),
            ("queue_max_bytes", r.queue_max_bytes),
            ("spool_buffer_max_bytes", r.spool_buffer_max_bytes),
            ("dead_letter_max_bytes", r.dead_letter_max_bytes),
            ("journal_file_max_bytes", r.journal_file_max_bytes),
            ("journal_buffer_max_bytes", r.journal_buffer_max_bytes),
        ] {
            if v == 0 {
                problems.push(format!("proxy.recorder.{name} must be greater than 0"));
            }
        }
        if r.spool_max_bytes < r.spool_file_max_bytes {
            problems.push(
                "proxy.recorder.spool_max_bytes must be at least spool_file_max_bytes".to_owned(),
            );
        }
        if r.journal_max_bytes < r.journal_file_max_bytes {
            problems.push(
                "proxy.recorder.journal_max_bytes must be at least journal_file_max_bytes"
                    .to_owned(),
            );
        }
        let admin_key = match &self.admin_key_sha256 {
            Some(k) => match parse_digest(k) {
                Some(d) => Some(d),
                None => {
                    problems.push("proxy.admin_key_sha256 is not 64 hex characters".to_owned());
                    None
                }
            },
            None => None,
        };
        let _ = self.limits_store.url(&mut problems);
        let ids: Vec<&str> = self.consumers.iter().map(|c| c.id.as_str()).collect();
        problems.extend(self.entra_callers.problems(&ids));
        if self.limits_store.timeout_ms == 0 || self.limits_store.timeout_ms > MAX_DURATION_MS {
            problems.push(
                "proxy.limits_store.timeout_ms must be greater than 0 and at most a week"
                    .to_owned(),
            );
        }
        if self.quotas.budget_refresh_ms == 0 || self.quotas.budget_refresh_ms > MAX_DURATION_MS {
            problems.push(
                "proxy.quotas.budget_refresh_ms must be greater than 0 and at most a week"
                    .to_owned(),
            );
        }
        if self.registry.poll_ms == 0 || self.registry.poll_ms > MAX_DURATION_MS {
            problems.push(
                "proxy.registry.poll_ms must be greater than 0 and at most a week".to_owned(),
            );
        }
        if self.admin.entra_role.is_some() && self.admin.tenants.is_empty() {
            problems.push(
                "proxy.admin.entra_role needs proxy.admin.tenants (the tenants whose role assignments count)".to_owned(),
            );
        }
        for t in &self.admin.tenants {
            if !self.entra_callers.tenants.contains(t) {
                problems.push(format!(
                    "proxy.admin.tenants: `{t}` is not in proxy.entra_callers.tenants (its tokens are not validated)"
                ));
            }
        }
        if self.admin.entra_role.is_some() && !self.entra_callers.enabled() {
            problems.push(
                "proxy.admin.entra_role needs [proxy.entra_callers] (the tenants whose tokens are validated)".to_owned(),
            );
        }
        if self.admin.listen.is_some()
            && self.admin_key_sha256.is_none()
            && self.admin.entra_role.is_none()
        {
            problems.push(
                "proxy.admin.listen needs admin_key_sha256 or admin.entra_role: nobody could use it".to_owned(),
            );
        }
        if self.backends.iter().filter(|b| b.stateful).count() > 1 {
            problems.push(
                "proxy.backends: at most one backend may be `stateful` (files, batches and stored responses live on one)".to_owned(),
            );
        }
        for d in &self.stream_usage.skip_deployments {
            // A misspelt name would leave the switch silently off for the real one.
            if !routes.contains_key(d) {
                problems.push(format!(
                    "proxy.stream_usage.skip_deployments: `{d}` is not a deployment of any backend"
                ));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Validated {
            fixed: Fixed {
                entra_callers: self.entra_callers.clone(),
                limits_store: self.limits_store.clone(),
                limits: self.limits.clone(),
                recorder: self.recorder.clone(),
                admin_key,
                admin: self.admin.clone(),
                registry: self.registry.clone(),
                use_env_proxy: self.use_env_proxy,
            },
            live: LiveConfig {
                consumers,
                file_consumers: self.consumers.clone(),
                stateful: self
                    .backends
                    .iter()
                    .position(|b| b.stateful)
                    .or((!backends.is_empty()).then_some(0)),
                backends,
                routes,
                stream_usage: self.stream_usage.clone(),
                quotas: self.quotas.clone(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_lists_every_problem() {
        let config = ProxyConfig {
            consumers: vec![ConsumerConfig {
                id: "a".into(),
                key_sha256: vec!["zz".into()],
                ..Default::default()
            }],
            backends: vec![
                BackendConfig {
                    name: "b".into(),
                    endpoint: "ftp://x".into(),
                    deployments: vec!["d".into()],
                    ..Default::default()
                },
                // Two backends serving `d` are its pool, not a problem; a weight of 0 is.
                BackendConfig {
                    name: "c".into(),
                    weight: 0,
                    endpoint: "http://y".into(),
                    deployments: vec!["d".into()],
                    ..Default::default()
                },
            ],
            limits: LimitsConfig {
                idle_timeout_ms: 0,
                ..Default::default()
            },
            ..Default::default()
        };
        let problems = config.validate().unwrap_err();
        assert_eq!(problems.len(), 4, "{problems:?}");
    }

    #[test]
    fn a_backend_key_comes_from_one_named_place() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let backend = |name: &str| BackendConfig {
            name: name.into(),
            endpoint: "http://y".into(),
            deployments: vec![format!("d-{name}")],
            ..Default::default()
        };
        let mut two = backend("two");
        two.api_key = Some("k".to_owned().into());
        two.api_key_env = Some("X".into());
        let mut unset = backend("unset");
        unset.api_key_env = Some("TOLLGATE_TEST_SURELY_UNSET_VARIABLE".into());
        let mut blank = backend("blank");
        blank.api_key_file = Some(empty);
        let mut renamed = backend("renamed");
        renamed.deployment_names = [("other".to_owned(), "x".to_owned())].into();
        let config = ProxyConfig {
            backends: vec![two, unset, blank, renamed],
            ..Default::default()
        };
        let problems = config.validate().unwrap_err();
        for expected in [
            "at most one",
            "is not set",
            "is empty",
            "not in its deployments",
        ] {
            assert!(
                problems.iter().any(|p| p.contains(expected)),
                "{expected}: {problems:?}"
            );
        }
    }

    /// Defect: two consumers with the same key digest were accepted, and whichever matched
    /// last was charged for the other's requests.
    #[test]
    fn a_key_digest_names_one_consumer() {
        let digest = "ab".repeat(32);
        let config = ProxyConfig {
            consumers: vec![
                ConsumerConfig {
                    id: "a".into(),
                    key_sha256: vec![digest.clone()],
                    ..Default::default()
                },
                ConsumerConfig {
                    id: "b".into(),
                    key_sha256: vec![digest],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let problems = config.validate().unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("already used"));
    }
}
