//! Backend pools: the backends serving one deployment, tried in order of priority (lowest
//! first; PTU before pay-as-you-go), weighted at random within a priority, leaving out the ones
//! resting after a 429 for as long as they asked (`retry-after-ms`, `x-ms-retry-after-ms`,
//! `Retry-After`).
//!
//! The route phase turns a pool into a plan (the order of attempts); the forward phase walks
//! it, moving to the next backend on a 429, a 5xx, a connect error or a first-byte timeout,
//! only while nothing has gone to the client.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::config::Backend;

/// How long a backend rests after a 429 that names no retry-after.
pub(crate) const DEFAULT_REST: Duration = Duration::from_secs(1);

/// Per-backend state shared by every request.
pub(crate) struct Pools {
    /// When each backend's rest ends, in milliseconds since `base` (0: not resting).
    resting_until: Vec<AtomicU64>,
    base: Instant,
}

impl Pools {
    pub(crate) fn new(backends: usize) -> Pools {
        Pools {
            resting_until: (0..backends).map(|_| AtomicU64::new(0)).collect(),
            base: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Backend `i` answered 429: it gets no request for `rest` (a later, longer rest wins).
    pub(crate) fn rest(&self, i: usize, rest: Duration) {
        let until = self
            .now_ms()
            .saturating_add(u64::try_from(rest.as_millis()).unwrap_or(u64::MAX))
            .max(1);
        if let Some(r) = self.resting_until.get(i) {
            r.fetch_max(until, Ordering::Relaxed);
        }
    }

    fn rest_left(&self, i: usize, now: u64) -> Option<Duration> {
        let until = self.resting_until.get(i)?.load(Ordering::Relaxed);
        (until > now).then(|| Duration::from_millis(until - now))
    }

    /// The order in which to try `pool` (indices into `backends`): by priority, weighted at
    /// random within one, resting backends left out. When every backend rests, the shortest
    /// rest left, for the client's `Retry-After`.
    pub(crate) fn plan(
        &self,
        pool: &[usize],
        backends: &[Backend],
    ) -> Result<Vec<usize>, Duration> {
        let now = self.now_ms();
        let mut awake: Vec<(u32, u32, usize)> = Vec::with_capacity(pool.len());
        let mut shortest: Option<Duration> = None;
        for &i in pool {
            let Some(b) = backends.get(i) else { continue };
            match self.rest_left(i, now) {
                Some(left) => shortest = Some(shortest.map_or(left, |s| s.min(left))),
                None => awake.push((b.priority, b.weight.max(1), i)),
            }
        }
        if awake.is_empty() {
            return Err(shortest.unwrap_or(DEFAULT_REST));
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
        }
    }

    #[test]
    fn lower_priority_first_and_resting_left_out() {
        let backends = [backend("ptu", 0, 1), backend("paygo", 1, 1)];
        let pools = Pools::new(2);
        assert_eq!(pools.plan(&[0, 1], &backends), Ok(vec![0, 1]));
        pools.rest(0, Duration::from_secs(60));
        assert_eq!(pools.plan(&[0, 1], &backends), Ok(vec![1]));
        pools.rest(1, Duration::from_secs(5));
        let shortest = pools.plan(&[0, 1], &backends).err();
        assert!(
            shortest.is_some_and(|d| d <= Duration::from_secs(5) && d > Duration::from_secs(4)),
            "{shortest:?}"
        );
    }

    #[test]
    fn weights_share_the_first_place() {
        let backends = [backend("a", 0, 3), backend("b", 0, 1)];
        let pools = Pools::new(2);
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
