//! What the metrics already hold for each recently exported request, so that a batch the parser
//! delivers again, or a record that supersedes an earlier revision of its request, adds only
//! what was not counted yet.
//!
//! Policy (per request id):
//! - `tollgate.requests` counts the request once, at its first acknowledged export;
//! - `tollgate.cost` and `gen_ai.client.token.usage` add the increase over what was counted
//!   (a complete record that supersedes an incomplete one adds the difference; the metrics
//!   are monotonic, so a decrease is not subtracted and the higher figure stays);
//! - `gen_ai.client.operation.duration` is recorded once, from the first revision that has a
//!   latency (a histogram sample cannot be replaced);
//! - a revision at or below the counted one adds nothing and is not exported again.
//!
//! A difference is recorded with the newer record's metric attributes (an incomplete record may
//! lack the response model or carry `error.type`), so totals are exact while a per-attribute
//! split can show the request's first part under the incomplete record's attributes.
//!
//! Memory is bounded by two FIFO tiers: requests last counted from a complete record (needed
//! only until a re-delivered batch has gone by) and requests last counted from an incomplete
//! record (needed until their complete record arrives, which can be much later, so they are
//! not pushed out by the steady flow of complete ones). A request pushed out of its tier, or
//! forgotten by a restart of the process, is counted again if it is exported again.

use std::collections::{HashMap, VecDeque};

use tollgate_records::{ConsolidatedRecord, Money};

/// How many requests the ledger remembers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerLimits {
    /// Requests last counted from a complete record. Must exceed the requests of one parser
    /// pass, so a pass delivered again after a failure is recognised.
    pub complete_requests: usize,
    /// Requests last counted from an incomplete record, kept until their complete record
    /// supersedes them.
    pub incomplete_requests: usize,
}

impl Default for LedgerLimits {
    fn default() -> Self {
        LedgerLimits {
            complete_requests: 16_384,
            incomplete_requests: 16_384,
        }
    }
}

/// What the metrics hold for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Counted {
    revision: u64,
    input_tokens: u64,
    output_tokens: u64,
    cost: Money,
    duration: bool,
}

/// What to add to the metrics for one acknowledged record.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Delta {
    pub(crate) request: bool,
    pub(crate) input_tokens: Option<u64>,
    pub(crate) output_tokens: Option<u64>,
    pub(crate) cost: Option<Money>,
    pub(crate) duration_s: Option<f64>,
}

struct Tier {
    map: HashMap<String, Counted>,
    order: VecDeque<String>,
    capacity: usize,
}

impl Tier {
    fn new(capacity: usize) -> Self {
        Tier {
            map: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    fn get(&self, id: &str) -> Option<Counted> {
        self.map.get(id).copied()
    }

    fn insert(&mut self, id: &str, counted: Counted) {
        if let Some(slot) = self.map.get_mut(id) {
            *slot = counted;
            return;
        }
        while self.map.len() >= self.capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.map.remove(&old);
                }
                None => break,
            }
        }
        self.map.insert(id.to_owned(), counted);
        self.order.push_back(id.to_owned());
    }

    /// Linear in the tier's size; only a superseded revision takes this path, which is rare.
    fn remove(&mut self, id: &str) {
        if self.map.remove(id).is_some() {
            self.order.retain(|x| x != id);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

pub(crate) struct Ledger {
    complete: Tier,
    incomplete: Tier,
}

impl Ledger {
    pub(crate) fn new(limits: LedgerLimits) -> Self {
        Ledger {
            complete: Tier::new(limits.complete_requests),
            incomplete: Tier::new(limits.incomplete_requests),
        }
    }

    fn counted(&self, id: &str) -> Option<Counted> {
        self.complete.get(id).or_else(|| self.incomplete.get(id))
    }

    /// False when this revision of the request (or a later one) was already acknowledged.
    pub(crate) fn needs_export(&self, r: &ConsolidatedRecord) -> bool {
        self.counted(&r.id).is_none_or(|c| c.revision < r.revision)
    }

    /// Notes that the collector acknowledged `r` and returns what the metrics still lack.
    pub(crate) fn acknowledge(&mut self, r: &ConsolidatedRecord) -> Option<Delta> {
        let prev = self.counted(&r.id);
        if prev.is_some_and(|c| c.revision >= r.revision) {
            return None;
        }
        let before = prev.unwrap_or_default();
        let (input, output) = r
            .usage
            .as_ref()
            .map_or((0, 0), |u| (u.input_tokens, u.output_tokens));
        let cost = r.cost.as_ref().map_or(Money::ZERO, |c| c.total);
        let positive = |d: u64| (d > 0).then_some(d);
        let delta = Delta {
            request: prev.is_none(),
            // The first count records a sample even when it is zero: a zero-token request is
            // still a point of the per-request distribution.
            input_tokens: match (prev, &r.usage) {
                (_, None) => None,
                (None, Some(_)) => Some(input),
                (Some(_), Some(_)) => positive(input.saturating_sub(before.input_tokens)),
            },
            output_tokens: match (prev, &r.usage) {
                (_, None) => None,
                (None, Some(_)) => Some(output),
                (Some(_), Some(_)) => positive(output.saturating_sub(before.output_tokens)),
            },
            cost: match (prev, &r.cost) {
                (_, None) => None,
                (None, Some(_)) => Some(cost),
                (Some(_), Some(_)) => Some(cost - before.cost).filter(|d| *d > Money::ZERO),
            },
            duration_s: match (&r.latency, before.duration) {
                (Some(l), false) => Some(l.total_ms / 1000.0),
                _ => None,
            },
        };
        let counted = Counted {
            revision: r.revision,
            input_tokens: before.input_tokens.max(input),
            output_tokens: before.output_tokens.max(output),
            cost: before.cost.max(cost),
            duration: before.duration || r.latency.is_some(),
        };
        if prev.is_some() {
            self.complete.remove(&r.id);
            self.incomplete.remove(&r.id);
        }
        if r.complete {
            self.complete.insert(&r.id, counted);
        } else {
            self.incomplete.insert(&r.id, counted);
        }
        Some(delta)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.complete.len() + self.incomplete.len()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Built from JSON so the test does not depend on every field of the record.
    pub(crate) fn record(
        id: &str,
        complete: bool,
        raw: usize,
        tokens: (u64, u64),
    ) -> ConsolidatedRecord {
        let mut r: ConsolidatedRecord = serde_json::from_value(serde_json::json!({
            "schemaVersion": 1,
            "id": id,
            "time": "2026-01-02T03:04:05Z",
            "consumer": {"id": "c"},
            "deployment": "d",
            "operation": "chat.completions",
            "path": "/",
            "stream": true,
            "status": if complete { Some(200) } else { None },
            "latency": {"totalMs": 1500.0},
            "usage": {
                "inputTokens": tokens.0,
                "outputTokens": tokens.1,
                "totalTokens": tokens.0 + tokens.1,
                "source": "estimated"
            },
            "cost": {
                "input": 0.0, "cachedInput": 0.0, "output": 0.0,
                "total": (tokens.0 + tokens.1) as f64 / 1000.0,
                "currency": "USD", "priceTableVersion": "t"
            },
            "clientDisconnected": false,
            "complete": complete
        }))
        .unwrap();
        r.revision = tollgate_records::revision(raw, complete);
        r
    }

    #[test]
    fn a_redelivered_revision_adds_nothing() {
        let mut l = Ledger::new(LedgerLimits::default());
        let r = record("a", true, 3, (10, 20));
        assert!(l.needs_export(&r));
        let d = l.acknowledge(&r).unwrap();
        assert!(d.request);
        assert_eq!((d.input_tokens, d.output_tokens), (Some(10), Some(20)));
        assert_eq!(d.duration_s, Some(1.5));
        assert!(!l.needs_export(&r));
        assert_eq!(l.acknowledge(&r), None);
    }

    #[test]
    fn a_complete_record_adds_only_what_the_incomplete_one_lacked() {
        let mut l = Ledger::new(LedgerLimits::default());
        let partial = record("a", false, 2, (10, 5));
        let full = record("a", true, 4, (10, 20));
        let d = l.acknowledge(&partial).unwrap();
        assert!(d.request);
        assert!(l.needs_export(&full));
        let d = l.acknowledge(&full).unwrap();
        assert!(!d.request, "the request was counted already");
        assert_eq!(d.input_tokens, None, "input unchanged");
        assert_eq!(d.output_tokens, Some(15));
        assert_eq!(d.duration_s, None, "duration recorded once");
        assert_eq!(d.cost, Some(Money::from_nanos(15_000_000)));
        // The older revision arriving late changes nothing and is not exported.
        assert!(!l.needs_export(&partial));
        assert_eq!(l.acknowledge(&partial), None);
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn tiers_are_bounded_and_incomplete_requests_outlive_the_flow_of_complete_ones() {
        let mut l = Ledger::new(LedgerLimits {
            complete_requests: 4,
            incomplete_requests: 2,
        });
        l.acknowledge(&record("waiting", false, 1, (1, 1)));
        for i in 0..10 {
            l.acknowledge(&record(&format!("r{i}"), true, 3, (1, 1)));
        }
        assert_eq!(l.len(), 5);
        assert!(!l.needs_export(&record("r9", true, 3, (1, 1))));
        assert!(l.needs_export(&record("r0", true, 3, (1, 1))), "pushed out");
        let d = l
            .acknowledge(&record("waiting", true, 3, (1, 4)))
            .expect("supersedes");
        assert!(!d.request);
        assert_eq!(d.output_tokens, Some(3));
        for i in 0..3 {
            l.acknowledge(&record(&format!("i{i}"), false, 1, (1, 1)));
        }
        assert_eq!(l.incomplete.len(), 2);
        assert_eq!(l.incomplete.order.len(), 2);
    }
}
