//! Backend pools: the backends serving one deployment, tried in order of priority (lowest
//! first; PTU before pay-as-you-go), weighted at random within a priority, leaving out the ones
//! resting after a 429 for as long as they asked (`retry-after-ms`, `x-ms-retry-after-ms`,
//! `Retry-After`), the ones at their `max_concurrent_requests`, and the ones whose circuit
//! breaker is open: `breaker_failures` consecutive 5xx answers, connect errors or timeouts open
//! it for `breaker_cooldown_ms`, then one request is let through as a trial (half-open) and its
//! outcome closes or reopens it.
//!
//! The route phase turns a pool into a plan (the order of attempts); the forward phase walks
//! it, moving to the next backend on a 429, a 5xx, a connect error or a first-byte timeout,
//! only while nothing has gone to the client, and passing over a backend that filled up since
//! the plan was made. Each backend's state ([`BackendState`]) is shared by every request and
//! kept across reloads.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::backend_auth::BackendAuth;

use crate::live::Live;

/// How long a backend rests after a 429 that names no retry-after.
pub(crate) const DEFAULT_REST: Duration = Duration::from_secs(1);

/// How long a backend at its `max_concurrent_requests` is reported as unavailable for, when
/// every backend of a pool is full: about one short request.
const FULL_RETRY: Duration = Duration::from_secs(1);

/// One per-backend gauge of the admin metrics: its value for one backend.
type Gauge<'a> = dyn Fn(&BackendState) -> f64 + 'a;

/// One backend's live state, shared by every request, and kept across reloads while the
/// backend keeps its name and endpoint. Times are milliseconds on the [`Pools`] clock (0: unset).
#[derive(Debug, Default)]
pub(crate) struct BackendState {
    /// When its rest after a 429 ends.
    resting_until: AtomicU64,
    /// Consecutive failures while the breaker is closed.
    failures: AtomicU32,
    /// When an open breaker's cooldown ends.
    open_until: AtomicU64,
    /// When a half-open breaker's trial was handed out.
    trial_at: AtomicU64,
    /// Requests sent to it and not yet ended (streams until their last byte).
    in_flight: AtomicUsize,
    /// Time to response headers, smoothed (exponentially weighted, 1/8 per answer), in
    /// microseconds; 0 before the first answer.
    latency_us: AtomicU64,
}

impl BackendState {
    /// A place among the backend's requests in flight, if it has room under `max`; held until
    /// the request's end.
    pub(crate) fn enter(self: &Arc<Self>, max: Option<usize>) -> Option<Slot> {
        let entered = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                max.is_none_or(|m| n < m).then_some(n + 1)
            })
            .is_ok();
        entered.then(|| Slot(Some(self.clone())))
    }

    /// Whether the backend is at its `max_concurrent_requests`.
    pub(crate) fn full(&self, max: Option<usize>) -> bool {
        max.is_some_and(|m| self.in_flight.load(Ordering::Acquire) >= m)
    }

    /// An answer's time to headers, folded into the smoothed latency.
    pub(crate) fn answered_in(&self, took: Duration) {
        let sample = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let _ = self
            .latency_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == 0 {
                    sample.max(1)
                } else {
                    (old.saturating_mul(7).saturating_add(sample) / 8).max(1)
                })
            });
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub(crate) fn latency(&self) -> Option<Duration> {
        match self.latency_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }
}

/// A request's place on a backend (see [`BackendState::enter`]); leaves on drop.
#[derive(Debug, Default)]
pub(crate) struct Slot(Option<Arc<BackendState>>);

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// The clock and breaker settings every backend's state is read against.
pub(crate) struct Pools {
    breaker_failures: u32,
    cooldown_ms: u64,
    base: Instant,
}

/// Why no backend of a pool can take a request now, and for how long at least.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unavailable {
    pub(crate) retry_after: Duration,
    /// Some backend rests after a 429 or is full (the client gets 429); otherwise all are
    /// tripped (503).
    pub(crate) throttled: bool,
}

/// What the route phase hands the forward phase: the configuration the request started with
/// (a reload in between does not change its backends) and the order to try them in.
pub(crate) struct Plan {
    pub(crate) live: Arc<Live>,
    pub(crate) order: Vec<usize>,
}

impl Pools {
    pub(crate) fn new(breaker_failures: u32, cooldown_ms: u64) -> Pools {
        Pools {
            breaker_failures: breaker_failures.max(1),
            cooldown_ms,
            base: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// The backend answered 429: it gets no request for `rest` (a later, longer rest wins).
    pub(crate) fn rest(&self, s: &BackendState, rest: Duration) {
        let until = self
            .now_ms()
            .saturating_add(u64::try_from(rest.as_millis()).unwrap_or(u64::MAX));
        s.resting_until.fetch_max(until, Ordering::Relaxed);
    }

    /// The backend answered (anything but a 5xx): its breaker closes.
    pub(crate) fn succeeded(&self, s: &BackendState) {
        s.failures.store(0, Ordering::Relaxed);
        s.open_until.store(0, Ordering::Relaxed);
        s.trial_at.store(0, Ordering::Relaxed);
    }

    /// The backend failed (a 5xx, a connect error, a timeout): a failed trial reopens its
    /// breaker; the `breaker_failures`-th failure in a row opens it.
    pub(crate) fn failed(&self, s: &BackendState, name: &str) {
        let reopen = self.now_ms().saturating_add(self.cooldown_ms);
        if s.open_until.load(Ordering::Relaxed) != 0 {
            s.open_until.store(reopen, Ordering::Relaxed);
            s.trial_at.store(0, Ordering::Relaxed);
            return;
        }
        if s.failures.fetch_add(1, Ordering::Relaxed) + 1 >= self.breaker_failures {
            s.failures.store(0, Ordering::Relaxed);
            s.open_until.store(reopen, Ordering::Relaxed);
            tracing::warn!(
                backend = name,
                cooldown_ms = self.cooldown_ms,
                "Backend failed repeatedly; its circuit breaker is open."
            );
        }
    }

    /// Whether the backend could take a request now (resting or tripped: no), without taking
    /// a half-open breaker's trial: for readiness.
    pub(crate) fn eligible(&self, s: &BackendState) -> bool {
        self.waiting(s, self.now_ms()).is_none()
    }

    /// Why the backend must wait at `now`, and how long: resting after a 429 (`true`), or its
    /// breaker cooling down (`false`); `None` when it may be tried (a half-open breaker's trial
    /// aside, see [`Pools::available`]).
    fn waiting(&self, s: &BackendState, now: u64) -> Option<(Duration, bool)> {
        let resting = s.resting_until.load(Ordering::Relaxed);
        if resting > now {
            return Some((Duration::from_millis(resting - now), true));
        }
        let open = s.open_until.load(Ordering::Relaxed);
        (open > now).then(|| (Duration::from_millis(open - now), false))
    }

    /// Each backend's state in the Prometheus text format, for the admin metrics: whether it
    /// can take a request, the rest left after a 429, whether its breaker is open, requests in
    /// flight, smoothed time to headers.
    pub(crate) fn write_metrics(&self, live: &Live, out: &mut String) {
        use std::fmt::Write as _;
        let now = self.now_ms();
        let available = |s: &BackendState| f64::from(u8::from(self.waiting(s, now).is_none()));
        let rest = |s: &BackendState| {
            s.resting_until.load(Ordering::Relaxed).saturating_sub(now) as f64 / 1000.0
        };
        let open =
            |s: &BackendState| f64::from(u8::from(s.open_until.load(Ordering::Relaxed) != 0));
        let in_flight = |s: &BackendState| s.in_flight() as f64;
        let latency = |s: &BackendState| s.latency().map_or(0.0, |d| d.as_secs_f64());
        let rows: [(&str, &str, &Gauge<'_>); 5] = [
            (
                "tollgate_backend_available",
                "1 when the backend can take a request now (not resting, breaker not open).",
                &available,
            ),
            (
                "tollgate_backend_rest_seconds",
                "Rest left after the backend's last 429.",
                &rest,
            ),
            (
                "tollgate_backend_breaker_open",
                "1 while the backend's circuit breaker is open (or half-open).",
                &open,
            ),
            (
                "tollgate_backend_in_flight",
                "Requests sent to the backend and not yet ended.",
                &in_flight,
            ),
            (
                "tollgate_backend_latency_seconds",
                "Time to response headers, smoothed over recent answers (0: none yet).",
                &latency,
            ),
        ];
        for (name, help, value) in rows {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (b, s) in live.config.backends.iter().zip(&live.state) {
                // Backend names are the operator's; quotes and backslashes escaped as the
                // format asks.
                let label = b.name.replace('\\', "\\\\").replace('"', "\\\"");
                let _ = writeln!(out, "{name}{{backend=\"{label}\"}} {}", value(s));
            }
        }
    }

    /// The admin API's view of each backend.
    pub(crate) fn describe(&self, live: &Live) -> Vec<serde_json::Value> {
        let now = self.now_ms();
        live.config
            .backends
            .iter()
            .zip(&live.state)
            .enumerate()
            .map(|(i, (b, s))| {
                let waiting = self.waiting(s, now);
                let state = match waiting {
                    None if s.full(b.max_concurrent_requests) => "full",
                    None => "healthy",
                    Some((_, true)) => "resting",
                    Some((_, false)) => "tripped",
                };
                serde_json::json!({
                    "name": b.name,
                    "endpoint": b.endpoint.as_str(),
                    "priority": b.priority,
                    "weight": b.weight,
                    "state": state,
                    "waitMs": waiting.map(|(d, _)| d.as_millis() as u64),
                    "inFlight": s.in_flight(),
                    "maxConcurrentRequests": b.max_concurrent_requests,
                    "latencyMs": s.latency().map(|d| d.as_secs_f64() * 1000.0),
                    "auth": match &b.auth {
                        BackendAuth::None => "none",
                        BackendAuth::ApiKey(_) => "api-key",
                        BackendAuth::Entra(_) => "entra",
                    },
                    "tokenFetches": match &b.auth {
                        BackendAuth::Entra(t) => Some(t.fetches()),
                        _ => None,
                    },
                    "deployments": live.config.routes.iter()
                        .filter(|(_, pool)| pool.contains(&i))
                        .map(|(d, _)| d.clone())
                        .collect::<std::collections::BTreeSet<_>>(),
                })
            })
            .collect()
    }

    /// Whether the backend may take a request now; if not, for how long at least and whether
    /// because it rests. A breaker past its cooldown lets one trial through at a time (a trial
    /// never answered is given up after another cooldown).
    fn available(&self, s: &BackendState, now: u64) -> Result<(), (Duration, bool)> {
        if let Some(wait) = self.waiting(s, now) {
            return Err(wait);
        }
        if s.open_until.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        let out = s.trial_at.load(Ordering::Relaxed);
        let stale = out != 0 && now.saturating_sub(out) > self.cooldown_ms;
        if (out == 0 || stale)
            && s.trial_at
                .compare_exchange(out, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Ok(());
        }
        Err((Duration::from_millis(self.cooldown_ms.max(1)), false))
    }

    /// The order in which to try `pool` (indices into `live.config.backends`): by priority, weighted
    /// at random within one, resting, tripped and full backends left out; when none is left,
    /// why and the shortest wait, for the client's `Retry-After`.
    pub(crate) fn plan(&self, live: &Live, pool: &[usize]) -> Result<Vec<usize>, Unavailable> {
        let now = self.now_ms();
        let mut awake: Vec<(u32, u32, usize)> = Vec::with_capacity(pool.len());
        let mut shortest: Option<Duration> = None;
        let mut throttled = false;
        for &i in pool {
            let Some((b, s)) = live.backend(i) else {
                continue;
            };
            // A full backend is a local kind of throttling: the client is told to retry soon.
            let state = if s.full(b.max_concurrent_requests) {
                Err((FULL_RETRY, true))
            } else {
                self.available(s, now)
            };
            match state {
                Ok(()) => awake.push((b.priority, b.weight.max(1), i)),
                Err((left, resting)) => {
                    throttled |= resting;
                    shortest = Some(shortest.map_or(left, |s| s.min(left)));
                }
            }
        }
        if awake.is_empty() {
            return Err(Unavailable {
                retry_after: shortest.unwrap_or(DEFAULT_REST),
                throttled,
            });
        }
        awake.sort_by_key(|(priority, _, _)| *priority);
        let mut plan = Vec::with_capacity(awake.len());
        let mut rng = rand::rng();
        for group in awake.chunk_by(|a, b| a.0 == b.0) {
            let mut left: Vec<(u32, usize)> = group.iter().map(|(_, w, i)| (*w, *i)).collect();
            // Weighted order without replacement: each pick in proportion to its weight.
            while !left.is_empty() {
                let total: u64 = left.iter().map(|(w, _)| u64::from(*w)).sum();
                let mut ticket = rng.random_range(0..total);
                let pick = left
                    .iter()
                    .position(|(w, _)| {
                        let hit = ticket < u64::from(*w);
                        ticket = ticket.saturating_sub(u64::from(*w));
                        hit
                    })
                    .unwrap_or(0);
                plan.push(left.remove(pick).1);
            }
        }
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Backend;

    fn backend(name: &str, priority: u32, weight: u32) -> Backend {
        Backend {
            name: name.into(),
            endpoint: reqwest::Url::parse("http://127.0.0.1/").unwrap_or_else(|_| unreachable!()),
            auth: Default::default(),
            priority,
            weight,
            deployment_names: Default::default(),
            max_concurrent_requests: None,
            include_usage: true,
            price_multiplier: None,
        }
    }

    /// A live configuration of `backends`, all in one pool.
    fn live(backends: Vec<Backend>) -> Live {
        let routes = [("d".to_owned(), (0..backends.len()).collect())].into();
        Live::new(
            crate::config::LiveConfig {
                consumers: Default::default(),
                file_consumers: Vec::new(),
                backends,
                routes,
                stream_usage: Default::default(),
                stateful: Some(0),
                quotas: Default::default(),
            },
            None,
        )
    }

    #[test]
    fn lower_priority_first_and_resting_left_out() {
        let l = live(vec![backend("ptu", 0, 1), backend("paygo", 1, 1)]);
        let pools = Pools::new(5, 30_000);
        assert_eq!(pools.plan(&l, &[0, 1]), Ok(vec![0, 1]));
        pools.rest(&l.state[0], Duration::from_secs(60));
        assert_eq!(pools.plan(&l, &[0, 1]), Ok(vec![1]));
        pools.rest(&l.state[1], Duration::from_secs(5));
        let none = pools.plan(&l, &[0, 1]).err();
        assert!(
            none.is_some_and(|u| u.throttled
                && u.retry_after <= Duration::from_secs(5)
                && u.retry_after > Duration::from_secs(4)),
            "{none:?}"
        );
    }

    #[test]
    fn a_breaker_opens_after_consecutive_failures_and_a_trial_closes_it() {
        let l = live(vec![backend("flaky", 0, 1), backend("spare", 1, 1)]);
        // A cooldown of 0: the breaker is half-open as soon as it opens.
        let pools = Pools::new(3, 0);
        pools.failed(&l.state[0], "b");
        pools.failed(&l.state[0], "b");
        pools.succeeded(&l.state[0]);
        pools.failed(&l.state[0], "b");
        pools.failed(&l.state[0], "b");
        assert_eq!(
            pools.plan(&l, &[0, 1]),
            Ok(vec![0, 1]),
            "two in a row: closed"
        );
        pools.failed(&l.state[0], "b");
        // Open, past its cooldown: one request carries the trial, the next does not.
        assert_eq!(pools.plan(&l, &[0, 1]), Ok(vec![0, 1]), "the trial");
        assert_eq!(pools.plan(&l, &[0, 1]), Ok(vec![1]), "one trial at a time");
        pools.failed(&l.state[0], "b");
        assert_eq!(
            pools.plan(&l, &[0, 1]),
            Ok(vec![0, 1]),
            "a new trial after a failed one"
        );
        pools.succeeded(&l.state[0]);
        assert_eq!(pools.plan(&l, &[0, 1]), Ok(vec![0, 1]));
        assert_eq!(pools.plan(&l, &[0, 1]), Ok(vec![0, 1]), "closed again");
    }

    #[test]
    fn weights_share_the_first_place() {
        let l = live(vec![backend("a", 0, 3), backend("b", 0, 1)]);
        let pools = Pools::new(5, 30_000);
        let firsts = (0..4000)
            .filter(|_| {
                pools
                    .plan(&l, &[0, 1])
                    .ok()
                    .and_then(|p| p.first().copied())
                    == Some(0)
            })
            .count();
        // 3:1 is 3,000 of 4,000; the bound is six standard deviations (about 27 each).
        assert!((2840..=3160).contains(&firsts), "{firsts}");
    }

    #[test]
    fn a_full_backend_is_passed_over_until_a_slot_is_left() {
        let mut full = backend("small", 0, 1);
        full.max_concurrent_requests = Some(1);
        let l = live(vec![full, backend("spill", 1, 1)]);
        let pools = Pools::new(5, 30_000);
        let held = l.state[0].enter(Some(1)).unwrap();
        assert!(l.state[0].enter(Some(1)).is_none(), "one at a time");
        assert_eq!(pools.plan(&l, &[0, 1]), Ok(vec![1]));
        assert_eq!(
            pools.plan(&l, &[0]).err().map(|u| u.throttled),
            Some(true),
            "a pool whose backends are all full is throttled, not failing"
        );
        assert_eq!(l.state[0].in_flight(), 1);
        drop(held);
        assert_eq!(l.state[0].in_flight(), 0);
        assert_eq!(pools.plan(&l, &[0, 1]), Ok(vec![0, 1]));
    }

    #[test]
    fn a_reload_keeps_the_state_of_a_backend_kept_by_name_and_endpoint() {
        let old = live(vec![backend("kept", 0, 1), backend("gone", 0, 1)]);
        let pools = Pools::new(5, 30_000);
        pools.rest(&old.state[0], Duration::from_secs(60));
        let _slot = old.state[0].enter(None).unwrap();
        let mut moved = backend("gone", 0, 1);
        moved.endpoint = reqwest::Url::parse("http://127.0.0.2/").unwrap();
        let config = crate::config::LiveConfig {
            consumers: Default::default(),
            file_consumers: Vec::new(),
            backends: vec![moved, backend("kept", 0, 1)],
            routes: [("d".to_owned(), vec![0, 1])].into(),
            stream_usage: Default::default(),
            stateful: Some(0),
            quotas: Default::default(),
        };
        let new = Live::new(config, Some(&old));
        assert!(Arc::ptr_eq(&new.state[1], &old.state[0]));
        assert_eq!(new.state[1].in_flight(), 1);
        assert_eq!(pools.plan(&new, &[0, 1]), Ok(vec![0]), "still resting");
        assert!(
            !Arc::ptr_eq(&new.state[0], &old.state[1]),
            "a backend moved to another endpoint starts fresh"
        );
    }
}
