//! The price table: per-model prices per million input, cached-input and output tokens, read
//! from a TOML file (`prices.toml` in this crate is the bundled default).

use std::collections::BTreeMap;

use serde::Deserialize;

/// The table bundled with Tollgate.
pub const DEFAULT_PRICE_TABLE: &str = include_str!("../prices.toml");

#[derive(Debug, thiserror::Error)]
pub enum PriceTableError {
    #[error("price table is not valid TOML: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("price table entry `{model}` has a negative price")]
    NegativePrice { model: String },
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input_per_1m: f64,
    /// Defaults to the input price for models without prompt caching discounts.
    #[serde(default)]
    pub cached_input_per_1m: Option<f64>,
    #[serde(default)]
    pub output_per_1m: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceTable {
    pub version: String,
    pub currency: String,
    #[serde(default)]
    pub models: BTreeMap<String, Price>,
}

/// The cost of one request, split as analysts charge it back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenCost {
    pub input: f64,
    pub cached_input: f64,
    pub output: f64,
    pub total: f64,
}

impl PriceTable {
    pub fn parse(text: &str) -> Result<Self, PriceTableError> {
        let table: PriceTable = toml::from_str(text)?;
        for (model, p) in &table.models {
            let cached = p.cached_input_per_1m.unwrap_or(0.0);
            if p.input_per_1m < 0.0 || p.output_per_1m < 0.0 || cached < 0.0 {
                return Err(PriceTableError::NegativePrice {
                    model: model.clone(),
                });
            }
        }
        Ok(table)
    }

    pub fn bundled() -> Result<Self, PriceTableError> {
        Self::parse(DEFAULT_PRICE_TABLE)
    }

    /// The entry for a model: an exact match, else the longest entry that prefixes the name
    /// (`gpt-4o-2024-08-06` → `gpt-4o`, `gpt-4o-mini-2024-07-18` → `gpt-4o-mini`).
    pub fn lookup(&self, model: &str) -> Option<&Price> {
        if let Some(p) = self.models.get(model) {
            return Some(p);
        }
        self.models
            .iter()
            .filter(|(name, _)| model.starts_with(name.as_str()))
            .max_by_key(|(name, _)| name.len())
            .map(|(_, p)| p)
    }

    /// Cost of `input` prompt tokens of which `cached` were served from the prompt cache, and
    /// `output` completion tokens. `None` when the model has no price.
    pub fn cost(&self, model: &str, input: u64, cached: u64, output: u64) -> Option<TokenCost> {
        let p = self.lookup(model)?;
        let cached = cached.min(input);
        let per = |tokens: u64, price: f64| tokens as f64 * price / 1_000_000.0;
        let input_cost = per(input - cached, p.input_per_1m);
        let cached_cost = per(cached, p.cached_input_per_1m.unwrap_or(p.input_per_1m));
        let output_cost = per(output, p.output_per_1m);
        Some(TokenCost {
            input: input_cost,
            cached_input: cached_cost,
            output: output_cost,
            total: input_cost + cached_cost + output_cost,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_table_parses_and_prefix_lookup_prefers_longest() {
        let t = PriceTable::bundled().unwrap();
        assert_eq!(t.currency, "USD");
        let mini = t.lookup("gpt-4o-mini-2024-07-18").unwrap();
        assert_eq!(mini, t.models.get("gpt-4o-mini").unwrap());
        let big = t.lookup("gpt-4o-2024-08-06").unwrap();
        assert_eq!(big, t.models.get("gpt-4o").unwrap());
        assert!(t.lookup("whisper").is_none());
    }

    #[test]
    fn cost_splits_cached_input() {
        let t = PriceTable::parse(
            r#"version = "t"
currency = "USD"
[models.m]
input_per_1m = 2.0
cached_input_per_1m = 1.0
output_per_1m = 10.0
"#,
        )
        .unwrap();
        let c = t.cost("m", 1_000_000, 400_000, 500_000).unwrap();
        assert!((c.input - 1.2).abs() < 1e-9);
        assert!((c.cached_input - 0.4).abs() < 1e-9);
        assert!((c.output - 5.0).abs() < 1e-9);
        assert!((c.total - 6.6).abs() < 1e-9);
    }

    #[test]
    fn negative_prices_are_rejected() {
        let err = PriceTable::parse(
            "version = \"t\"\ncurrency = \"USD\"\n[models.m]\ninput_per_1m = -1.0\n",
        )
        .unwrap_err();
        assert!(matches!(err, PriceTableError::NegativePrice { .. }));
    }
}
