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
    /// Name of this consumer's checkpoint in the store.
    pub checkpoint_name: String,
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
