//! Backend pools: the backends serving one deployment, tried in order of priority (lowest
//! first; PTU before pay-as-you-go), weighted at random within a priority, leaving out the ones
//! resting after a 429 for as long as they asked (`retry-after-ms`, `x-ms-retry-after-ms`,
//! `Retry-After`) and the ones whose circuit breaker is open: `breaker_failures` consecutive
//! 5xx answers, connect errors or timeouts open it for `breaker_cooldown_ms`, then one request
//! is let through as a trial (half-open) and its outcome closes or reopens it.
//!
//! The route phase turns a pool into a plan (the order of attempts); the forward phase walks
//! it, moving to the next backend on a 429, a 5xx, a connect error or a first-byte timeout,
//! only while nothing has gone to the client.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::config::Backend;

/// How long a backend rests after a 429 that names no retry-after.
pub(crate) const DEFAULT_REST: Duration = Duration::from_secs(1);

/// One per-backend gauge of the admin metrics: its value for backend `i`.
type Gauge<'a> = dyn Fn(usize) -> f64 + 'a;

/// Per-backend state shared by every request.
pub(crate) struct Pools {
    /// When each backend's rest ends, in milliseconds since `base` (0: not resting).
    resting_until: Vec<AtomicU64>,
    /// Consecutive failures while the breaker is closed.
    failures: Vec<AtomicU32>,
    /// When each open breaker's cooldown ends (0: closed).
    open_until: Vec<AtomicU64>,
    /// When a half-open breaker's trial was handed out (0: none out).
    trial_at: Vec<AtomicU64>,
    breaker_failures: u32,
    cooldown_ms: u64,
    base: Instant,
}

/// Why no backend of a pool can take a request now, and for how long at least.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unavailable {
    pub(crate) retry_after: Duration,
    /// Some backend rests after a 429 (the client gets 429); otherwise all are tripped (503).
    pub(crate) throttled: bool,
}

impl Pools {
    pub(crate) fn new(backends: usize, breaker_failures: u32, cooldown_ms: u64) -> Pools {
        let zeros = || (0..backends).map(|_| AtomicU64::new(0)).collect();
        Pools {
            resting_until: zeros(),
            failures: (0..backends).map(|_| AtomicU32::new(0)).collect(),
            open_until: zeros(),
            trial_at: zeros(),
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

    /// Backend `i` answered 429: it gets no request for `rest` (a later, longer rest wins).
    pub(crate) fn rest(&self, i: usize, rest: Duration) {
        let until = self
            .now_ms()
            .saturating_add(u64::try_from(rest.as_millis()).unwrap_or(u64::MAX));
        if let Some(r) = self.resting_until.get(i) {
            r.fetch_max(until, Ordering::Relaxed);
        }
    }

    /// Backend `i` answered (anything but a 5xx): its breaker closes.
    pub(crate) fn succeeded(&self, i: usize) {
        if let (Some(f), Some(o), Some(t)) = (
            self.failures.get(i),
            self.open_until.get(i),
            self.trial_at.get(i),
        ) {
            f.store(0, Ordering::Relaxed);
            o.store(0, Ordering::Relaxed);
            t.store(0, Ordering::Relaxed);
        }
    }

    /// Backend `i` failed (a 5xx, a connect error, a timeout): a failed trial reopens its
    /// breaker; the `breaker_failures`-th failure in a row opens it.
    pub(crate) fn failed(&self, i: usize) {
        let (Some(f), Some(o), Some(t)) = (
            self.failures.get(i),
            self.open_until.get(i),
            self.trial_at.get(i),
        ) else {
            return;
        };
        let reopen = self.now_ms().saturating_add(self.cooldown_ms);
        if o.load(Ordering::Relaxed) != 0 {
            o.store(reopen, Ordering::Relaxed);
            t.store(0, Ordering::Relaxed);
            return;
        }
        if f.fetch_add(1, Ordering::Relaxed) + 1 >= self.breaker_failures {
            f.store(0, Ordering::Relaxed);
            o.store(reopen, Ordering::Relaxed);
            tracing::warn!(
                backend = i,
                cooldown_ms = self.cooldown_ms,
                "Backend failed repeatedly; its circuit breaker is open."
            );
        }
    }

    /// Whether backend `i` could take a request now (resting or tripped: no), without taking
    /// a half-open breaker's trial: for readiness.
    pub(crate) fn eligible(&self, i: usize) -> bool {
        self.waiting(i, self.now_ms()).is_none()
    }

    /// Backend `i`'s entry of one of the per-backend clocks (0 when unset).
    fn at(clock: &[AtomicU64], i: usize) -> u64 {
        clock.get(i).map_or(0, |a| a.load(Ordering::Relaxed))
    }

    /// Why backend `i` must wait at `now`, and how long: resting after a 429 (`true`), or its
    /// breaker cooling down (`false`); `None` when it may be tried (a half-open breaker's trial
    /// aside, see [`Pools::available`]).
    fn waiting(&self, i: usize, now: u64) -> Option<(Duration, bool)> {
        let resting = Self::at(&self.resting_until, i);
        if resting > now {
            return Some((Duration::from_millis(resting - now), true));
        }
        let open = Self::at(&self.open_until, i);
        (open > now).then(|| (Duration::from_millis(open - now), false))
    }

    /// Each backend's state in the Prometheus text format, for the admin metrics: whether it
    /// can take a request, the rest left after a 429, whether its breaker is open.
    pub(crate) fn write_metrics(&self, backends: &[Backend], out: &mut String) {
        use std::fmt::Write as _;
        let now = self.now_ms();
        let available = |i| f64::from(u8::from(self.waiting(i, now).is_none()));
        let rest = |i| Self::at(&self.resting_until, i).saturating_sub(now) as f64 / 1000.0;
        let open = |i| f64::from(u8::from(Self::at(&self.open_until, i) != 0));
        let rows: [(&str, &str, &Gauge<'_>); 3] = [
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
        ];
        for (name, help, value) in rows {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (i, b) in backends.iter().enumerate() {
                // Backend names are the operator's; quotes and backslashes escaped as the
                // format asks.
                let label = b.name.replace('\\', "\\\\").replace('"', "\\\"");
                let _ = writeln!(out, "{name}{{backend=\"{label}\"}} {}", value(i));
            }
        }
    }

    /// Whether backend `i` may take a request now; if not, for how long at least and whether
    /// because it rests. A breaker past its cooldown lets one trial through at a time (a trial
    /// never answered is given up after another cooldown).
    fn available(&self, i: usize, now: u64) -> Result<(), (Duration, bool)> {
        if let Some(wait) = self.waiting(i, now) {
            return Err(wait);
        }
        if Self::at(&self.open_until, i) == 0 {
            return Ok(());
        }
        let Some(trial) = self.trial_at.get(i) else {
            return Ok(());
        };
        let out = trial.load(Ordering::Relaxed);
        let stale = out != 0 && now.saturating_sub(out) > self.cooldown_ms;
        if (out == 0 || stale)
            && trial
                .compare_exchange(out, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Ok(());
        }
        Err((Duration::from_millis(self.cooldown_ms.max(1)), false))
    }

    /// The order in which to try `pool` (indices into `backends`): by priority, weighted at
    /// random within one, resting and tripped backends left out; when none is left, why and
    /// the shortest wait, for the client's `Retry-After`.
    pub(crate) fn plan(
        &self,
        pool: &[usize],
        backends: &[Backend],
    ) -> Result<Vec<usize>, Unavailable> {
        let now = self.now_ms();
        let mut awake: Vec<(u32, u32, usize)> = Vec::with_capacity(pool.len());
        let mut shortest: Option<Duration> = None;
        let mut throttled = false;
        for &i in pool {
            let Some(b) = backends.get(i) else { continue };
            match self.available(i, now) {
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

    fn backend(name: &str, priority: u32, weight: u32) -> Backend {
        Backend {
            name: name.into(),
            endpoint: reqwest::Url::parse("http://127.0.0.1/").unwrap_or_else(|_| unreachable!()),
            api_key: None,
            priority,
            weight,
            deployment_names: Default::default(),
        }
    }

    #[test]
    fn lower_priority_first_and_resting_left_out() {
        let backends = [backend("ptu", 0, 1), backend("paygo", 1, 1)];
        let pools = Pools::new(2, 5, 30_000);
        assert_eq!(pools.plan(&[0, 1], &backends), Ok(vec![0, 1]));
        pools.rest(0, Duration::from_secs(60));
        assert_eq!(pools.plan(&[0, 1], &backends), Ok(vec![1]));
        pools.rest(1, Duration::from_secs(5));
        let none = pools.plan(&[0, 1], &backends).err();
        assert!(
            none.is_some_and(|u| u.throttled
                && u.retry_after <= Duration::from_secs(5)
                && u.retry_after > Duration::from_secs(4)),
            "{none:?}"
        );
    }

    #[test]
    fn a_breaker_opens_after_consecutive_failures_and_a_trial_closes_it() {
        let backends = [backend("flaky", 0, 1), backend("spare", 1, 1)];
        // A cooldown of 0: the breaker is half-open as soon as it opens.
        let pools = Pools::new(2, 3, 0);
        pools.failed(0);
        pools.failed(0);
        pools.succeeded(0);
        pools.failed(0);
        pools.failed(0);
        assert_eq!(
            pools.plan(&[0, 1], &backends),
            Ok(vec![0, 1]),
            "two in a row: closed"
        );
        pools.failed(0);
        // Open, past its cooldown: one request carries the trial, the next does not.
        assert_eq!(pools.plan(&[0, 1], &backends), Ok(vec![0, 1]), "the trial");
        assert_eq!(
            pools.plan(&[0, 1], &backends),
            Ok(vec![1]),
            "one trial at a time"
        );
        pools.failed(0);
        assert_eq!(
            pools.plan(&[0, 1], &backends),
            Ok(vec![0, 1]),
            "a new trial after a failed one"
        );
        pools.succeeded(0);
        assert_eq!(pools.plan(&[0, 1], &backends), Ok(vec![0, 1]));
        assert_eq!(
            pools.plan(&[0, 1], &backends),
            Ok(vec![0, 1]),
            "closed again"
        );
    }

    #[test]
    fn weights_share_the_first_place() {
        let backends = [backend("a", 0, 3), backend("b", 0, 1)];
        let pools = Pools::new(2, 5, 30_000);
        let firsts = (0..4000)
            .filter(|_| {
                pools
                    .plan(&[0, 1], &backends)
                    .ok()
                    .and_then(|p| p.first().copied())
                    == Some(0)
            })
            .count();
        // 3:1 is 3,000 of 4,000; the bound is six standard deviations (about 27 each).
        assert!((2840..=3160).contains(&firsts), "{firsts}");
    }
}
