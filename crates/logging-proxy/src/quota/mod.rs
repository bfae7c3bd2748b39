//! The limits phase: each consumer's (and each consumer × deployment's) requests per minute,
//! tokens per minute, and token quotas per UTC day and calendar month, so one team's runaway
//! loop never takes the others' capacity.
//!
//! - **Windows** are fixed and aligned to UTC: the minute, the day, the month. A counter holds
//!   the window it counts and starts again at zero in the next one. (AOAI's own TPM is a
//!   sliding estimate; a fixed window admits at most the limit per window, which is what a
//!   charge-back budget states.)
//! - **Tokens are reserved before forwarding** from an estimate: the prompt counted with the
//!   tokens crate plus the completion the request allows (`max_tokens`,
//!   `max_completion_tokens`, `max_output_tokens`, else `quotas.default_max_tokens`), times
//!   `n`. Only consumers with a token limit pay for the count.
//! - **Reconciled at the end** ([`Hold::settle`]) with the `total_tokens` AOAI reported (the
//!   usage frame the usage phase asks for is in every stream): unused reserved tokens go back to
//!   the windows still current; an error answer, or no answer, gives back everything; a success
//!   without usage keeps its reservation.
//! - **Refused**: a minute limit answers 429 with `Retry-After` / `retry-after-ms` until the
//!   window ends; a day or month quota answers 403 (as APIM's `quota-by-key`), its retry time
//!   the start of the next day or month. Either is recorded, naming the limit.
//! - All counters a request touches are checked and taken at once (one lock in memory, one
//!   script in Redis): a burst admits exactly the limit. Counters live in this process
//!   (`memory.rs`) or, with `[proxy.limits_store]` naming a Redis, shared by every replica
//!   (`shared.rs`).
//! - A request whose estimate alone exceeds a limit (a long prompt with no `max_tokens`) is
//!   admitted when that window is still empty, rather than refused for ever.

pub(crate) mod budget;
mod memory;
mod scan;
mod shared;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::task::TaskTracker;

use self::scan::UsageScan;
pub use self::shared::{LimitsStoreConfig, OnUnavailable};

use chrono::{Datelike, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A consumer's limits (`[proxy.consumers.limits]`, and per deployment in
/// `[proxy.consumers.deployment_limits.NAME]`); an absent field is no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerLimits {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_day: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_month: Option<u64>,
    /// Cost per calendar month (UTC), in the prices' currency, as the parser prices the
    /// consumer's records (`budget.rs`); the consumer's limit only, not per deployment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_per_month: Option<tollgate_records::Money>,
}

impl ConsumerLimits {
    pub fn is_empty(&self) -> bool {
        *self == ConsumerLimits::default()
    }

    fn counts_tokens(&self) -> bool {
        self.tokens_per_minute.is_some()
            || self.tokens_per_day.is_some()
            || self.tokens_per_month.is_some()
    }

    /// The zero limits, by name, for validation.
    pub(crate) fn zeros(&self) -> Vec<&'static str> {
        [
            ("requests_per_minute", self.requests_per_minute),
            ("tokens_per_minute", self.tokens_per_minute),
            ("tokens_per_day", self.tokens_per_day),
            ("tokens_per_month", self.tokens_per_month),
            (
                "cost_per_month",
                self.cost_per_month
                    .map(|m| u64::try_from(m.nanos()).unwrap_or(0)),
            ),
        ]
        .into_iter()
        .filter(|(_, v)| *v == Some(0))
        .map(|(n, _)| n)
        .collect()
    }
}

/// `[proxy.quotas]`: how limits are counted.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotasConfig {
    /// Completion tokens reserved for a request that sets no maximum.
    pub default_max_tokens: u64,
    /// How often budgeted consumers' month-to-date cost is read from the store (`budget.rs`).
    pub budget_refresh_ms: u64,
}

impl Default for QuotasConfig {
    fn default() -> Self {
        QuotasConfig {
            default_max_tokens: 4_096,
            budget_refresh_ms: 30_000,
        }
    }
}

/// A consumer's limits, and its per-deployment ones.
#[derive(Debug, Clone, Default)]
pub(crate) struct Limits {
    pub all: ConsumerLimits,
    pub per_deployment: BTreeMap<String, ConsumerLimits>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Span {
    Minute,
    Day,
    Month,
}

impl Span {
    /// The window `now` falls in, and when it ends.
    fn window(self, now: SystemTime) -> (i64, SystemTime) {
        let secs = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let at = |s: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(s).unwrap_or(0));
        match self {
            Span::Minute => (secs / 60, at((secs / 60 + 1) * 60)),
            Span::Day => (secs / 86_400, at((secs / 86_400 + 1) * 86_400)),
            Span::Month => {
                let t = Utc.timestamp_opt(secs, 0).single().unwrap_or_default();
                let (y, m) = (t.year(), t.month());
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                let next = Utc
                    .with_ymd_and_hms(ny, nm, 1, 0, 0, 0)
                    .single()
                    .map_or(secs, |n| n.timestamp());
                (i64::from(y) * 12 + i64::from(m), at(next))
            }
        }
    }
}

/// One counter a request is checked against.
#[derive(Debug, Clone)]
pub(crate) struct Check {
    consumer: String,
    /// The consumer, the deployment if scoped, and what is counted.
    key: String,
    span: Span,
    tokens: bool,
    limit: u64,
    /// For the refusal: "tokens per minute", scoped to a deployment when it is.
    name: String,
}

impl Check {
    /// What a request takes from this counter.
    fn amount(&self, tokens: u64) -> u64 {
        if self.tokens { tokens } else { 1 }
    }

    fn refusal(&self, retry_after: Duration) -> Refusal {
        Refusal {
            limit: self.name.clone(),
            // A day or month quota refuses with 403, a minute limit with 429.
            quota: self.span != Span::Minute,
            retry_after,
        }
    }

    /// What a reservation took from this counter in `window`, to settle later: only a token
    /// counter is settled (a request counts once, whatever it used).
    fn taken(&self, window: i64) -> Option<Taken> {
        self.tokens.then(|| Taken {
            key: self.key.clone(),
            consumer: self.consumer.clone(),
            window,
        })
    }
}

/// Why a request was refused, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub limit: String,
    pub quota: bool,
    pub retry_after: Duration,
}

/// A token counter a reservation took from, in the window it took from.
#[derive(Debug, Clone)]
pub(crate) struct Taken {
    key: String,
    consumer: String,
    window: i64,
}

/// What a request took, and where; given back in part when it ends.
#[derive(Debug)]
pub(crate) struct Reservation {
    tokens: u64,
    taken: Vec<Taken>,
    /// Taken in the shared store (else in this process's memory).
    shared: bool,
}

/// Why the limits phase refused.
#[derive(Debug)]
pub(crate) enum Refused {
    Limit(Refusal),
    /// The shared store cannot be asked and `on_unavailable = "deny"`.
    Unavailable,
}

/// Every consumer's counters: this process's, and the shared store's when one is configured.
#[derive(Default)]
pub(crate) struct Counters {
    memory: memory::Memory,
    shared: Option<shared::Shared>,
}

impl Counters {
    pub(crate) fn new(config: &LimitsStoreConfig, url: Option<&str>) -> Result<Counters, String> {
        Ok(Counters {
            memory: memory::Memory::default(),
            shared: url.map(|u| shared::Shared::new(u, config)).transpose()?,
        })
    }

    /// Checks every counter `limits` names for `consumer` on `deployment` and, if all have
    /// room, takes one request and `tokens` from each at once.
    pub(crate) async fn reserve(
        &self,
        consumer: &str,
        deployment: Option<&str>,
        limits: &Limits,
        tokens: u64,
    ) -> Result<(Reservation, Remaining), Refused> {
        // A request that bills no tokens (a file, a stored response read back) is not checked
        // against token limits: a quota spent to the last token refuses only what would use
        // more.
        let checks: Vec<Check> = checks(consumer, deployment, limits)
            .into_iter()
            .filter(|c| !c.tokens || tokens > 0)
            .collect();
        let now = SystemTime::now();
        if checks.is_empty() {
            // Nothing to count (only another deployment's limits apply): no store is asked.
            return Ok((
                Reservation {
                    tokens,
                    taken: Vec::new(),
                    shared: false,
                },
                Remaining::default(),
            ));
        }
        let (outcome, shared) = match &self.shared {
            Some(s) => match s.reserve(&checks, tokens, now).await {
                Ok(outcome) => (outcome, true),
                Err(_) if s.on_unavailable == OnUnavailable::Deny => {
                    return Err(Refused::Unavailable);
                }
                Err(_) => (self.memory.reserve(&checks, tokens, now), false),
            },
            None => (self.memory.reserve(&checks, tokens, now), false),
        };
        let (taken, remaining) = outcome.map_err(Refused::Limit)?;
        Ok((
            Reservation {
                tokens,
                taken,
                shared,
            },
            remaining,
        ))
    }

    /// The request used `used` tokens of its reservation (`None`: unknown, the reservation
    /// stands): the difference goes back to the windows still current.
    async fn settle(&self, reservation: Reservation, used: Option<u64>) {
        let Some(used) = used else { return };
        if reservation.taken.is_empty() || used == reservation.tokens {
            return;
        }
        let delta = i64::try_from(used)
            .unwrap_or(i64::MAX)
            .saturating_sub(i64::try_from(reservation.tokens).unwrap_or(i64::MAX));
        match (&self.shared, reservation.shared) {
            (Some(s), true) => {
                // A give-back lost to an outage leaves the estimate counted: high, not free.
                if let Err(e) = s.adjust(&reservation.taken, delta).await {
                    tracing::warn!(error = %e, delta, "A reservation could not be settled in the limits store.");
                }
            }
            _ => self.memory.adjust(&reservation.taken, delta),
        }
    }

    /// Asks the shared store whether it answers (readiness: a replica that stopped taking
    /// traffic because the store was down must still see it come back).
    pub(crate) async fn probe(&self) -> bool {
        match &self.shared {
            Some(s) => s.ping().await,
            None => true,
        }
    }

    /// The shared store's state for readiness and metrics: whether one is configured, whether
    /// its last call failed, whether that refuses requests, and its failed calls so far.
    pub(crate) fn store_state(&self) -> Option<(bool, bool, u64)> {
        self.shared.as_ref().map(|s| {
            (
                s.is_down(),
                s.on_unavailable == OnUnavailable::Deny,
                s.errors.load(std::sync::atomic::Ordering::Relaxed),
            )
        })
    }
}

/// Remaining requests and tokens of the consumer's tightest minute limits after a request,
/// for `x-ratelimit-remaining-*`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Remaining {
    pub requests: Option<u64>,
    pub tokens: Option<u64>,
}

impl Remaining {
    /// `left` of counter `c` after the request, if it is a minute limit.
    fn note(&mut self, c: &Check, left: u64) {
        if c.span != Span::Minute {
            return;
        }
        let slot = if c.tokens {
            &mut self.tokens
        } else {
            &mut self.requests
        };
        *slot = Some(slot.map_or(left, |s| s.min(left)));
    }
}

/// The counters a request on `deployment` is checked against: the consumer's, then the
/// consumer × deployment ones.
fn checks(consumer: &str, deployment: Option<&str>, limits: &Limits) -> Vec<Check> {
    let mut out = Vec::new();
    let mut add = |scope: String, label: &str, l: &ConsumerLimits| {
        for (field, span, tokens, what) in [
            (
                l.requests_per_minute,
                Span::Minute,
                false,
                "requests per minute",
            ),
            (l.tokens_per_minute, Span::Minute, true, "tokens per minute"),
            (l.tokens_per_day, Span::Day, true, "tokens per day"),
            (l.tokens_per_month, Span::Month, true, "tokens per month"),
        ] {
            if let Some(limit) = field {
                out.push(Check {
                    consumer: consumer.to_owned(),
                    key: format!("{scope}|{what}"),
                    span,
                    tokens,
                    limit,
                    name: format!("{limit} {what}{label}"),
                });
            }
        }
    };
    add(consumer.to_owned(), "", &limits.all);
    if let Some(d) = deployment
        && let Some(l) = limits.per_deployment.get(d)
    {
        add(format!("{consumer}|{d}"), &format!(" on {d}"), l);
    }
    out
}

/// Whether any limit of `limits` for `deployment` counts tokens (then the request's tokens are
/// estimated; otherwise nothing is counted).
pub(crate) fn counts_tokens(limits: &Limits, deployment: Option<&str>) -> bool {
    limits.all.counts_tokens()
        || deployment
            .and_then(|d| limits.per_deployment.get(d))
            .is_some_and(ConsumerLimits::counts_tokens)
}

/// The tokens a request may use at most, as far as can be told before it runs: the prompt
/// (chat messages, a completions prompt, embeddings input, a Responses input) counted with
/// `model`'s encoding, plus the completion it allows times `n`.
pub(crate) fn estimate(model: &str, operation: &str, body: &Value, default_max: u64) -> u64 {
    let prompt = match operation {
        "chat.completions" => tollgate_tokens::count_chat_prompt(model, body),
        "completions" => body
            .get("prompt")
            .map_or(0, |p| tollgate_tokens::count_completions_prompt(model, p)),
        "embeddings" => body
            .get("input")
            .map_or(0, |i| tollgate_tokens::count_embeddings_input(model, i)),
        _ => body.get("input").map_or(0, |i| {
            tollgate_tokens::Encoding::for_model(model).count(&i.to_string())
        }),
    };
    if operation == "embeddings" {
        return prompt;
    }
    let completion = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
        .iter()
        .find_map(|k| body.get(*k).and_then(Value::as_u64))
        .unwrap_or(default_max);
    let n = body.get("n").and_then(Value::as_u64).unwrap_or(1).max(1);
    prompt.saturating_add(completion.saturating_mul(n))
}

/// A request's reservation, held from the limits phase to the request's end, where the usage
/// seen in the response settles it.
pub(crate) struct Hold {
    /// Taken by the settle; still here on drop means the request ended on a path that did
    /// not settle (a panic): its reservation is given back as unused then.
    reservation: Option<Reservation>,
    counters: Arc<Counters>,
    scan: UsageScan,
    /// Where a settle that waits on the shared store runs.
    tracker: TaskTracker,
    pub remaining: Remaining,
}

impl Hold {
    pub(crate) fn new(
        reservation: Reservation,
        remaining: Remaining,
        counters: Arc<Counters>,
        tracker: TaskTracker,
    ) -> Hold {
        Hold {
            reservation: Some(reservation),
            counters,
            scan: UsageScan::default(),
            tracker,
            remaining,
        }
    }

    /// Settles with `used`: at once in memory, in a tracked task when it waits on Redis.
    fn settle_with(&mut self, used: Option<u64>) {
        let Some(reservation) = self.reservation.take() else {
            return;
        };
        let (counters, tracker) = (self.counters.clone(), self.tracker.clone());
        if reservation.shared {
            // A tee dropped after its runtime is gone (shutdown) cannot reach Redis: the
            // reservation stays counted, high rather than free.
            if tokio::runtime::Handle::try_current().is_ok() {
                tracker.spawn(async move { counters.settle(reservation, used).await });
            }
        } else {
            // In memory nothing is awaited: the future completes on its first poll.
            futures_util::FutureExt::now_or_never(counters.settle(reservation, used));
        }
    }

    /// A response chunk passing to the client.
    pub(crate) fn push(&mut self, chunk: &[u8]) {
        if self
            .reservation
            .as_ref()
            .is_some_and(|r| !r.taken.is_empty())
        {
            self.scan.push(chunk);
        }
    }

    /// The request ended with `status`: its usage, when AOAI reported one, replaces the
    /// estimate. Without one, an error answer used nothing (AOAI bills no error but a prompt
    /// its content filter refused, which the estimate would overstate anyway), and a success
    /// keeps the estimate: charged high rather than free.
    pub(crate) fn settle(mut self, status: u16) {
        let used = match self.scan.total {
            Some(total) => Some(total),
            None if status >= 400 => Some(0),
            None => None,
        };
        self.settle_with(used);
    }

    /// The request ended without an answer from a backend that bills (every attempt failed,
    /// or refused): none of its reserved tokens were used.
    pub(crate) fn release(mut self) {
        self.settle_with(Some(0));
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.settle_with(Some(0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The memory counters, as the facade calls them.
    struct C(memory::Memory);

    impl C {
        fn new() -> C {
            C(memory::Memory::default())
        }

        fn reserve(
            &self,
            consumer: &str,
            deployment: Option<&str>,
            l: &Limits,
            tokens: u64,
        ) -> Result<(Vec<Taken>, Remaining), Refusal> {
            self.0
                .reserve(&checks(consumer, deployment, l), tokens, SystemTime::now())
        }
    }

    fn limits(rpm: Option<u64>, tpm: Option<u64>) -> Limits {
        Limits {
            all: ConsumerLimits {
                requests_per_minute: rpm,
                tokens_per_minute: tpm,
                ..ConsumerLimits::default()
            },
            per_deployment: BTreeMap::new(),
        }
    }

    #[test]
    fn a_minute_limit_admits_exactly_its_count_and_names_itself() {
        let c = C::new();
        let l = limits(Some(3), None);
        for left in [2, 1, 0] {
            let (_, remaining) = c.reserve("a", None, &l, 0).unwrap();
            assert_eq!(remaining.requests, Some(left));
        }
        let refused = c.reserve("a", None, &l, 0).unwrap_err();
        assert_eq!(refused.limit, "3 requests per minute");
        assert!(!refused.quota);
        assert!(refused.retry_after <= Duration::from_secs(60));
        assert!(
            c.reserve("b", None, &l, 0).is_ok(),
            "another consumer is apart"
        );
    }

    #[test]
    fn tokens_are_reserved_then_the_unused_part_given_back() {
        let c = C::new();
        let l = limits(None, Some(1000));
        let (taken, remaining) = c.reserve("a", None, &l, 800).unwrap();
        assert_eq!(remaining.tokens, Some(200));
        assert!(c.reserve("a", None, &l, 300).is_err(), "800 + 300 > 1000");
        // Used 100 of the 800.
        c.0.adjust(&taken, -700);
        assert!(c.reserve("a", None, &l, 900).is_ok(), "100 + 900 fits");
        assert!(c.reserve("a", None, &l, 1).is_err());
    }

    #[test]
    fn a_refused_request_takes_nothing_from_the_other_counters() {
        let c = C::new();
        let mut l = limits(Some(10), Some(100));
        l.per_deployment.insert(
            "d".into(),
            ConsumerLimits {
                tokens_per_day: Some(50),
                ..ConsumerLimits::default()
            },
        );
        assert!(c.reserve("a", Some("d"), &l, 10).is_ok());
        let refused = c.reserve("a", Some("d"), &l, 60).unwrap_err();
        assert_eq!(refused.limit, "50 tokens per day on d");
        assert!(refused.quota);
        // Nothing was taken by the refused one: 90 of the minute's 100 are still there.
        assert!(c.reserve("a", Some("e"), &l, 90).is_ok());
    }

    /// Found in review: an estimate above a limit (a long prompt with no `max_tokens`) could
    /// never fit and was refused for ever; it is admitted into an empty window.
    #[test]
    fn an_estimate_over_the_limit_fits_an_empty_window_only() {
        let c = C::new();
        let l = limits(None, Some(1000));
        assert!(c.reserve("a", None, &l, 5000).is_ok());
        assert!(c.reserve("a", None, &l, 1).is_err(), "the window is spent");
    }

    #[test]
    fn windows_end_at_the_next_minute_day_and_month() {
        // 2026-12-31T23:59:30Z
        let t = UNIX_EPOCH + Duration::from_secs(1_798_761_570);
        let left = |s: Span| s.window(t).1.duration_since(t).unwrap().as_secs();
        assert_eq!(left(Span::Minute), 30);
        assert_eq!(left(Span::Day), 30);
        assert_eq!(left(Span::Month), 30, "December rolls into the next year");
    }

    #[test]
    fn the_estimate_is_the_prompt_plus_the_allowed_completion() {
        let body = serde_json::json!({"messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 100, "n": 2});
        let prompt = tollgate_tokens::count_chat_prompt("gpt-4o", &body);
        assert_eq!(
            estimate("gpt-4o", "chat.completions", &body, 4096),
            prompt + 200
        );
        let open = serde_json::json!({"messages": [{"role": "user", "content": "hello"}]});
        assert_eq!(
            estimate("gpt-4o", "chat.completions", &open, 4096),
            prompt + 4096
        );
    }
}
