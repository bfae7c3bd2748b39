//! Monthly cost budgets (`limits.cost_per_month`): a consumer whose month-to-date cost has
//! reached its budget is refused with 403 `QuotaExceeded` until the next calendar month (UTC).
//!
//! The cost is the parser's own: the sum of the consumer's consolidated records this month,
//! priced exactly as `tollgate report` shows them (model prices, deployment and backend
//! multipliers). The proxy does not price on the request path: a token's price depends on the
//! model AOAI answered with, which only the response names, and a second price table in the
//! proxy would drift from the report's. The figure is read from the store every
//! `quotas.budget_refresh_ms`, so a consumer may pass its budget by what it spends between the
//! parser's consolidation and the next read: a budget is a charge-back cap, not a hard stop at
//! the cent (token quotas are exact, see `mod.rs`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use chrono::{Datelike, TimeZone, Utc};
use tollgate_records::Money;
use tollgate_store::{RecordQuery, RequestStore, StoreError};

use super::Span;

/// Each budgeted consumer's month-to-date cost, as last read, and the month it counts.
#[derive(Default)]
pub(crate) struct Spend {
    read: Mutex<(i64, HashMap<String, Money>)>,
}

impl Spend {
    /// Refused when `consumer` has spent `budget` this month: how long until the next month.
    pub(crate) fn over(&self, consumer: &str, budget: Money) -> Option<Duration> {
        let now = SystemTime::now();
        let (month, ends) = Span::Month.window(now);
        let read = self
            .read
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let spent = (read.0 == month).then(|| read.1.get(consumer)).flatten()?;
        (*spent >= budget).then(|| ends.duration_since(now).unwrap_or_default())
    }

    /// Reads the month-to-date cost of each of `consumers` from `store`, in one query
    /// grouped by consumer.
    pub(crate) async fn refresh(
        &self,
        store: &dyn RequestStore,
        consumers: &[String],
    ) -> Result<(), StoreError> {
        // One reading of the clock: the month counted and its first instant must agree at the
        // month's turn.
        let now = SystemTime::now();
        let (month, _) = Span::Month.window(now);
        let today: chrono::DateTime<Utc> = now.into();
        let start = Utc
            .with_ymd_and_hms(today.year(), today.month(), 1, 0, 0, 0)
            .single()
            .unwrap_or(today);
        let rows = store
            .usage(&RecordQuery {
                from: Some(start),
                ..RecordQuery::default()
            })
            .await?;
        let mut spent: HashMap<String, Money> =
            consumers.iter().map(|c| (c.clone(), Money::ZERO)).collect();
        for r in rows {
            if let Some(total) = spent.get_mut(&r.consumer) {
                *total += r.cost;
            }
        }
        *self
            .read
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = (month, spent);
        Ok(())
    }
}
