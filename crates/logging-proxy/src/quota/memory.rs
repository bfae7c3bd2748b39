//! Limit counters in this process's memory: exact for one replica, and what the shared store
//! falls back to when it is unreachable and `on_unavailable = "local"`.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use super::{Check, Refusal, Remaining, Taken};

#[derive(Debug, Clone, Copy)]
struct Counter {
    window: i64,
    used: u64,
}

/// Every consumer's counters, by check key.
#[derive(Default)]
pub(crate) struct Memory {
    map: Mutex<HashMap<String, Counter>>,
}

impl Memory {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Counter>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Checks every counter and, if all have room, takes one request or `tokens` from each, all
    /// under one lock: a burst admits exactly the limit.
    pub(crate) fn reserve(
        &self,
        checks: &[Check],
        tokens: u64,
        now: SystemTime,
    ) -> Result<(Vec<Taken>, Remaining), Refusal> {
        let mut map = self.lock();
        let mut remaining = Remaining::default();
        for c in checks {
            let (window, ends) = c.span.window(now);
            let used = map
                .get(&c.key)
                .filter(|k| k.window == window)
                .map_or(0, |k| k.used);
            let amount = c.amount(tokens);
            if used > 0 && used.saturating_add(amount) > c.limit {
                return Err(c.refusal(ends.duration_since(now).unwrap_or(Duration::ZERO)));
            }
            remaining.note(c, c.limit.saturating_sub(used + amount));
        }
        let mut taken = Vec::new();
        for c in checks {
            let (window, _) = c.span.window(now);
            let k = map
                .entry(c.key.clone())
                .or_insert(Counter { window, used: 0 });
            if k.window != window {
                *k = Counter { window, used: 0 };
            }
            k.used += c.amount(tokens);
            taken.extend(c.taken(window));
        }
        Ok((taken, remaining))
    }

    /// Adds `delta` (negative: gives back) to each counter still in the window it was taken
    /// in; never below zero.
    pub(crate) fn adjust(&self, taken: &[Taken], delta: i64) {
        let mut map = self.lock();
        for t in taken {
            if let Some(c) = map.get_mut(&t.key)
                && c.window == t.window
            {
                c.used = c.used.saturating_add_signed(delta);
            }
        }
    }
}
