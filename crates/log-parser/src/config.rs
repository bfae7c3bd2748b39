//! `ParserConfig` (the `[parser]` section).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParserConfig {
    /// Raw records read from the change feed per page.
    pub batch_size: usize,
    /// Wait between polls when the feed is caught up.
    pub poll_interval_ms: u64,
    /// After failed passes (a sink or the store down) the wait doubles from
    /// `poll_interval_ms` up to this.
    pub max_retry_interval_ms: u64,
    /// A request whose `end` record has not arrived after this long is recorded as incomplete.
    pub incomplete_after_ms: u64,
    /// Name of this group of parser replicas: the replicas of one group share the feed's units
    /// (each unit read by one of them at a time); its leases and checkpoints carry this name.
    pub checkpoint_name: String,
    /// This replica's name on the leases it holds. A replica that restarts under the same name
    /// takes its units back at once instead of waiting for their leases to expire. Default:
    /// the host name and process id, which is stable across a container's restarts.
    pub replica_id: Option<String>,
    /// How long a unit's lease lasts without renewal: how soon the other replicas take over
    /// the units of one that died. Renewed at a third of it; an owner stops writing when less
    /// than a third is left, so replicas' clocks must agree to well within a third.
    pub lease_ttl_ms: u64,
    /// How often a running parser logs its counters and the units it holds (INFO).
    pub progress_log_ms: u64,
    /// Price table file; the bundled table when absent.
    pub price_table_path: Option<PathBuf>,
    /// Deployment → model, for responses that do not name their model (errors, cut streams).
    pub deployment_models: BTreeMap<String, String>,
    /// Deployment → factor on the price table's prices for its requests: Data Zone and
    /// Regional deployments cost more than Global (about 1.1), an agreement may discount.
    /// At most four decimals.
    pub deployment_price_multipliers: BTreeMap<String, f64>,
    /// Keep prompts and completions in consolidated records.
    pub store_content: bool,
}

impl Default for ParserConfig {
    fn default() -> Self {
        ParserConfig {
            batch_size: 1000,
            poll_interval_ms: 200,
            max_retry_interval_ms: 30_000,
            incomplete_after_ms: 15 * 60 * 1000,
            checkpoint_name: "log-parser".into(),
            replica_id: None,
            lease_ttl_ms: 30_000,
            progress_log_ms: 60_000,
            price_table_path: None,
            deployment_models: BTreeMap::new(),
            deployment_price_multipliers: BTreeMap::new(),
            store_content: true,
        }
    }
}

impl ParserConfig {
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if self.batch_size == 0 {
            problems.push("parser.batch_size must be greater than 0".to_owned());
        }
        if self.poll_interval_ms == 0 {
            problems.push("parser.poll_interval_ms must be greater than 0".to_owned());
        }
        if self.lease_ttl_ms < 300 {
            problems.push("parser.lease_ttl_ms must be at least 300".to_owned());
        }
        if self.replica_id.as_deref() == Some("") {
            problems.push("parser.replica_id must not be empty".to_owned());
        }
        if self.checkpoint_name.is_empty() {
            problems.push("parser.checkpoint_name must not be empty".to_owned());
        }
        for (deployment, factor) in &self.deployment_price_multipliers {
            if tollgate_tokens::multiplier_per_10k(*factor).is_none() {
                problems.push(format!(
                    "parser.deployment_price_multipliers.{deployment} = {factor}: a factor above 0 with at most four decimals"
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

impl ParserConfig {
    /// This replica's name on its leases.
    pub fn replica(&self) -> String {
        if let Some(id) = &self.replica_id {
            return id.clone();
        }
        format!("{}/{}", host_name(), std::process::id())
    }
}

/// The host's name, for naming replicas in leases and logs.
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "parser".to_owned())
}
