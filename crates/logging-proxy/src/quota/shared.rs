//! Limit counters shared by every proxy replica, in Redis: one key per counter and window
//! (`{prefix}{consumer}…:{window}`), checked and taken by one Lua script, so a burst spread
//! over replicas admits exactly the limit. Keys expire a minute after their window ends. One
//! Redis endpoint: a single node, or a cluster behind a proxy that presents one endpoint; the
//! client is not a cluster client. The consumer is the keys' hash tag, so a cluster keeps a
//! request's keys in one slot.
//!
//! A reservation Redis made after the timeout had given up on it stays counted for its window
//! (charged high, never free).
//!
//! Redis unreachable (or slower than `timeout_ms`): `on_unavailable = "local"` counts in this
//! process instead (fail open on local limits), `"deny"` refuses with 503 (fail closed). Either
//! way the failure is counted, logged once per outage, and shown by `/readyz` under `deny`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::ConnectionManager;
use serde::Deserialize;

use super::{Check, Refusal, Remaining, Taken};

/// Checks every key (KEYS) against its limit (ARGV: limit, amount, expire-at ms, per key);
/// refuses with the 1-based index of the first that has no room and its count, else takes
/// every amount and answers 0 then each key's new count.
const RESERVE: &str = r"
for i, key in ipairs(KEYS) do
  local used = math.max(0, tonumber(redis.call('GET', key) or '0'))
  if used > 0 and used + tonumber(ARGV[3 * i - 1]) > tonumber(ARGV[3 * i - 2]) then
    return {i, used}
  end
end
local out = {0}
for i, key in ipairs(KEYS) do
  out[i + 1] = redis.call('INCRBY', key, ARGV[3 * i - 1])
  redis.call('PEXPIREAT', key, ARGV[3 * i])
end
return out
";

/// Adds ARGV[1] to each key that still exists (its window not over), never below zero
/// (INCRBY keeps a key's expiry; a second INCRBY brings a negative count back to zero).
const ADJUST: &str = r"
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    local v = redis.call('INCRBY', key, ARGV[1])
    if v < 0 then
      redis.call('INCRBY', key, -v)
    end
  end
end
return 0
";

/// After a failed call, how long requests skip Redis before one tries again.
const RETRY_AFTER_MS: u64 = 1_000;

/// What to do when the shared store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUnavailable {
    /// Count in this process's memory meanwhile: every replica enforces the limits alone.
    #[default]
    Local,
    /// Refuse requests of consumers with limits (503) until the store answers again.
    Deny,
}

/// `[proxy.limits_store]`: where limit counters live. Without a Redis URL, in each proxy's
/// memory.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsStoreConfig {
    /// The environment variable holding the Redis URL (`redis://[:password@]host:port/db`,
    /// `rediss://` for TLS): a password stays out of the file.
    pub redis_url_env: Option<String>,
    /// The Redis URL itself, for a Redis without a password.
    pub redis_url: Option<String>,
    pub on_unavailable: OnUnavailable,
    /// Longest a limits check may wait on Redis before it counts as unavailable.
    pub timeout_ms: u64,
    pub key_prefix: String,
}

impl Default for LimitsStoreConfig {
    fn default() -> Self {
        LimitsStoreConfig {
            redis_url_env: None,
            redis_url: None,
            on_unavailable: OnUnavailable::Local,
            // A limits check is on every request's path: a Redis slower than this is treated
            // as down rather than slowing every request.
            timeout_ms: 250,
            key_prefix: "tollgate:".into(),
        }
    }
}

impl LimitsStoreConfig {
    /// The Redis URL the configuration names, if any; what is wrong goes to `problems`.
    pub(crate) fn url(&self, problems: &mut Vec<String>) -> Option<String> {
        match (&self.redis_url_env, &self.redis_url) {
            (Some(_), Some(_)) => {
                problems
                    .push("proxy.limits_store: name one of redis_url_env and redis_url".to_owned());
                None
            }
            (Some(var), None) => {
                crate::config::secret_from_env("proxy.limits_store.redis_url_env", var)
                    .map_err(|why| problems.push(why))
                    .ok()
            }
            (None, url) => url.clone(),
        }
    }
}

/// The Redis-backed counters.
pub(crate) struct Shared {
    client: redis::Client,
    conn: tokio::sync::OnceCell<ConnectionManager>,
    prefix: String,
    timeout: Duration,
    pub(crate) on_unavailable: OnUnavailable,
    reserve: redis::Script,
    adjust: redis::Script,
    /// The last call failed; cleared by the next that succeeds.
    down: AtomicBool,
    /// While down, no call is tried before this (ms since the epoch): requests do not each
    /// wait the whole timeout on a Redis that is gone.
    retry_at: AtomicU64,
    pub(crate) errors: AtomicU64,
}

impl Shared {
    /// A client for `url` (checked, not connected: the first request connects).
    pub(crate) fn new(url: &str, config: &LimitsStoreConfig) -> Result<Shared, String> {
        let client = redis::Client::open(url).map_err(|e| {
            // The URL may carry a password: the error names only what is wrong with it.
            format!(
                "proxy.limits_store: the Redis URL is invalid ({:?})",
                e.kind()
            )
        })?;
        Ok(Shared {
            client,
            conn: tokio::sync::OnceCell::new(),
            prefix: config.key_prefix.clone(),
            timeout: Duration::from_millis(config.timeout_ms),
            on_unavailable: config.on_unavailable,
            reserve: redis::Script::new(RESERVE),
            adjust: redis::Script::new(ADJUST),
            down: AtomicBool::new(false),
            retry_at: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        })
    }

    /// Whether the last call to Redis failed.
    pub(crate) fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    fn key(&self, consumer: &str, key: &str, window: i64) -> String {
        format!("{}{{{consumer}}}{key}:{window}", self.prefix)
    }

    /// Runs `call` on the shared connection within the timeout; a failure marks the store down.
    async fn run<T, F>(&self, call: impl FnOnce(ConnectionManager) -> F) -> Result<T, String>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        let now_ms = || {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        };
        if self.is_down() && now_ms() < self.retry_at.load(Ordering::Relaxed) {
            return Err("backing off after a failure".to_owned());
        }
        let outcome = tokio::time::timeout(self.timeout, async {
            let conn = self
                .conn
                .get_or_try_init(|| ConnectionManager::new(self.client.clone()))
                .await?
                .clone();
            call(conn).await
        })
        .await;
        let outcome = match outcome {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(format!("{:?}: {}", e.kind(), e.detail().unwrap_or(""))),
            Err(_) => Err(format!("no answer within {} ms", self.timeout.as_millis())),
        };
        match &outcome {
            Ok(_) => {
                if self.down.swap(false, Ordering::Relaxed) {
                    tracing::info!("The limits store answers again.");
                }
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                self.retry_at
                    .store(now_ms().saturating_add(RETRY_AFTER_MS), Ordering::Relaxed);
                if !self.down.swap(true, Ordering::Relaxed) {
                    tracing::error!(error = %e, on_unavailable = ?self.on_unavailable, "The limits store (Redis) is unavailable.");
                }
            }
        }
        outcome
    }

    /// Whether Redis answers a PING (past the backoff).
    pub(crate) async fn ping(&self) -> bool {
        self.run(
            |mut conn| async move { redis::cmd("PING").query_async::<String>(&mut conn).await },
        )
        .await
        .is_ok()
    }

    /// As [`super::memory::Memory::reserve`], in Redis; `Err` when Redis could not be asked.
    pub(crate) async fn reserve(
        &self,
        checks: &[Check],
        tokens: u64,
        now: SystemTime,
    ) -> Result<Result<(Vec<Taken>, Remaining), Refusal>, String> {
        let mut invocation = self.reserve.prepare_invoke();
        let mut windows = Vec::with_capacity(checks.len());
        for c in checks {
            let (window, ends) = c.span.window(now);
            let expire_at =
                ends.duration_since(UNIX_EPOCH).unwrap_or_default() + Duration::from_secs(60);
            invocation
                .key(self.key(&c.consumer, &c.key, window))
                .arg(c.limit.min(1 << 53))
                .arg(c.amount(tokens))
                .arg(u64::try_from(expire_at.as_millis()).unwrap_or(u64::MAX));
            windows.push((window, ends));
        }
        let answer: Vec<i64> = self
            .run(|mut conn| async move { invocation.invoke_async(&mut conn).await })
            .await?;
        let first = answer.first().copied().unwrap_or(0);
        if first > 0 {
            let i = usize::try_from(first - 1).unwrap_or(0);
            let (Some(c), Some((_, ends))) = (checks.get(i), windows.get(i)) else {
                return Err("the limits script answered out of range".to_owned());
            };
            return Ok(Err(
                c.refusal(ends.duration_since(now).unwrap_or(Duration::ZERO))
            ));
        }
        let mut remaining = Remaining::default();
        let mut taken = Vec::new();
        for (i, (c, (window, _))) in checks.iter().zip(&windows).enumerate() {
            let count = answer
                .get(i + 1)
                .and_then(|v| u64::try_from(*v).ok())
                .unwrap_or(c.limit);
            remaining.note(c, c.limit.saturating_sub(count));
            taken.extend(c.taken(*window));
        }
        Ok(Ok((taken, remaining)))
    }

    /// Adds `delta` to the counters taken, where their windows are not over.
    pub(crate) async fn adjust(&self, taken: &[Taken], delta: i64) -> Result<(), String> {
        let mut invocation = self.adjust.prepare_invoke();
        for t in taken {
            invocation.key(self.key(&t.consumer, &t.key, t.window));
        }
        invocation.arg(delta);
        self.run(|mut conn| async move { invocation.invoke_async::<i64>(&mut conn).await })
            .await
            .map(|_| ())
    }
}
