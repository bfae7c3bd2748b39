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
    #[error(
        "price table entry `{model}` has a price with more than six decimals per 1M tokens, which is not a whole number of pico-units per token"
    )]
    TooPrecise { model: String },
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
    /// Audio input tokens; audio is priced as text where the table has no audio price.
    #[serde(default)]
    pub audio_input_per_1m: Option<f64>,
    #[serde(default)]
    pub audio_output_per_1m: Option<f64>,
}

/// A request's tokens as its usage splits them: `cached` and `audio_input` are parts of
/// `input`, `audio_output` part of `output`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub input: u64,
    pub cached: u64,
    pub output: u64,
    pub audio_input: u64,
    pub audio_output: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceTable {
    pub version: String,
    pub currency: String,
    #[serde(default)]
    pub models: BTreeMap<String, Price>,
}

/// The cost of one request in nano-units (10⁻⁹) of the table's currency, split as analysts
/// charge it back. Each part is rounded once (half to even) from an exact pico-unit product;
/// `total` is the exact sum of the parts, so the parts always add up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenCost {
    pub input_nanos: i64,
    pub cached_input_nanos: i64,
    pub output_nanos: i64,
    pub total_nanos: i64,
}

impl TokenCost {
    /// The parts, and their exact sum as the total.
    fn from_parts(input_nanos: i64, cached_input_nanos: i64, output_nanos: i64) -> TokenCost {
        TokenCost {
            input_nanos,
            cached_input_nanos,
            output_nanos,
            total_nanos: input_nanos
                .saturating_add(cached_input_nanos)
                .saturating_add(output_nanos),
        }
    }

    /// The cost with each part multiplied by `per_10k / 10_000` (rounded half to even), and
    /// the total their exact sum: a deployment's premium or discount on the table's prices.
    pub fn scaled(self, per_10k: u64) -> TokenCost {
        let scale = |nanos: i64| {
            let exact = i128::from(nanos) * i128::from(per_10k);
            let (whole, rest) = (exact.div_euclid(10_000), exact.rem_euclid(10_000));
            let rounded = if rest > 5_000 || (rest == 5_000 && whole % 2 != 0) {
                whole + 1
            } else {
                whole
            };
            i64::try_from(rounded).unwrap_or(i64::MAX)
        };
        let (input_nanos, cached_input_nanos, output_nanos) = (
            scale(self.input_nanos),
            scale(self.cached_input_nanos),
            scale(self.output_nanos),
        );
        TokenCost::from_parts(input_nanos, cached_input_nanos, output_nanos)
    }
}

/// A price multiplier as ten-thousandths, exact for factors given to at most four decimals;
/// `None` for finer, non-positive or non-finite factors.
pub fn multiplier_per_10k(factor: f64) -> Option<u64> {
    if !factor.is_finite() || factor <= 0.0 {
        return None;
    }
    let scaled = factor * 10_000.0;
    let whole = scaled.round();
    ((scaled - whole).abs() <= 1e-6 * whole.max(1.0) && (1.0..1e12).contains(&whole))
        .then_some(whole as u64)
}

/// A price per 1M tokens as pico-units per token, exact for prices given to at most six
/// decimals (every published price); `None` for finer, negative or non-finite prices.
fn pico_per_token(per_1m: f64) -> Option<u64> {
    if !per_1m.is_finite() || per_1m < 0.0 {
        return None;
    }
    // A decimal read from TOML is the double nearest to it; scaled, it is within a few ulps
    // of a whole number exactly when the decimal has at most six places.
    let scaled = per_1m * 1e6;
    let whole = scaled.round();
    ((scaled - whole).abs() <= 1e-6 * whole.max(1.0) && whole < u64::MAX as f64)
        .then_some(whole as u64)
}

/// `tokens` at `pico` pico-units each, in nano-units rounded half to even.
fn nanos(tokens: u64, pico: u64) -> i64 {
    nanos_of(&[(tokens, pico)])
}

/// The sum of `tokens × pico` over the kinds, in nano-units rounded once, half to even.
fn nanos_of(kinds: &[(u64, u64)]) -> i64 {
    let exact: u128 = kinds
        .iter()
        .map(|&(tokens, pico)| u128::from(tokens) * u128::from(pico))
        .sum();
    let (whole, rest) = (exact / 1000, exact % 1000);
    let rounded = if rest > 500 || (rest == 500 && whole % 2 == 1) {
        whole + 1
    } else {
        whole
    };
    i64::try_from(rounded).unwrap_or(i64::MAX)
}

impl PriceTable {
    pub fn parse(text: &str) -> Result<Self, PriceTableError> {
        let table: PriceTable = toml::from_str(text)?;
        for (model, p) in &table.models {
            let optional = |x: Option<f64>| x.unwrap_or(0.0);
            let prices = [
                p.input_per_1m,
                p.output_per_1m,
                optional(p.cached_input_per_1m),
                optional(p.audio_input_per_1m),
                optional(p.audio_output_per_1m),
            ];
            if prices.iter().any(|&x| x < 0.0) {
                return Err(PriceTableError::NegativePrice {
                    model: model.clone(),
                });
            }
            if prices.iter().any(|&x| pico_per_token(x).is_none()) {
                return Err(PriceTableError::TooPrecise {
                    model: model.clone(),
                });
            }
        }
        Ok(table)
    }

    pub fn bundled() -> Result<Self, PriceTableError> {
        Self::parse(DEFAULT_PRICE_TABLE)
    }

    /// The entry for a model: an exact match, else the longest entry the name extends by a
    /// version suffix only (`gpt-4o-2024-08-06` → `gpt-4o`, `gpt-35-turbo-0125` →
    /// `gpt-35-turbo`). Any other tail names a different model with a different price
    /// (`gpt-4-32k` is not `gpt-4`, `o3-mini` is not `o3`), so it gets `None`: unpriced, never
    /// the price of a neighbour.
    pub fn lookup(&self, model: &str) -> Option<&Price> {
        if let Some(p) = self.models.get(model) {
            return Some(p);
        }
        self.models
            .iter()
            .filter(|(name, _)| {
                model
                    .strip_prefix(name.as_str())
                    .is_some_and(is_version_suffix)
            })
            .max_by_key(|(name, _)| name.len())
            .map(|(_, p)| p)
    }

    /// Cost of `input` prompt tokens of which `cached` were served from the prompt cache, and
    /// `output` completion tokens. `None` when the model has no price.
    pub fn cost(&self, model: &str, input: u64, cached: u64, output: u64) -> Option<TokenCost> {
        self.cost_of(
            model,
            &Tokens {
                input,
                cached,
                output,
                ..Tokens::default()
            },
        )
    }

    /// Cost of a request's tokens, audio at the audio rates (part of the input and output
    /// parts). `None` when the model has no price.
    pub fn cost_of(&self, model: &str, t: &Tokens) -> Option<TokenCost> {
        let p = self.lookup(model)?;
        let price = |x: Option<f64>, otherwise: u64| match x {
            Some(x) => pico_per_token(x),
            None => Some(otherwise),
        };
        let input_pico = pico_per_token(p.input_per_1m)?;
        let output_pico = pico_per_token(p.output_per_1m)?;
        let cached_pico = price(p.cached_input_per_1m, input_pico)?;
        let audio_in_pico = price(p.audio_input_per_1m, input_pico)?;
        let audio_out_pico = price(p.audio_output_per_1m, output_pico)?;
        let cached = t.cached.min(t.input);
        let audio_in = t.audio_input.min(t.input - cached);
        let audio_out = t.audio_output.min(t.output);
        // Each part rounded once, from the exact pico-unit products of its token kinds.
        let input_nanos = nanos_of(&[
            (t.input - cached - audio_in, input_pico),
            (audio_in, audio_in_pico),
        ]);
        let cached_input_nanos = nanos(cached, cached_pico);
        let output_nanos = nanos_of(&[
            (t.output - audio_out, output_pico),
            (audio_out, audio_out_pico),
        ]);
        Some(TokenCost::from_parts(
            input_nanos,
            cached_input_nanos,
            output_nanos,
        ))
    }
}

/// A snapshot suffix: `-` then digits in dash-separated groups (`-2024-08-06`, `-0613`).
fn is_version_suffix(tail: &str) -> bool {
    tail.strip_prefix('-').is_some_and(|v| {
        v.split('-')
            .all(|group| !group.is_empty() && group.bytes().all(|b| b.is_ascii_digit()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry<'a>(t: &'a PriceTable, name: &str) -> &'a Price {
        t.models.get(name).unwrap()
    }

    #[test]
    fn dated_snapshots_take_their_family_price() {
        let t = PriceTable::bundled().unwrap();
        assert_eq!(t.currency, "USD");
        for (model, family) in [
            ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
            ("gpt-4o-2024-08-06", "gpt-4o"),
            ("gpt-4o-2024-11-20", "gpt-4o"),
            ("gpt-4-0613", "gpt-4"),
            ("gpt-4-32k-0613", "gpt-4-32k"),
            ("gpt-4-turbo-2024-04-09", "gpt-4-turbo"),
            ("gpt-35-turbo-0125", "gpt-35-turbo"),
            ("gpt-35-turbo-16k-0613", "gpt-35-turbo-16k"),
            ("o3-mini-2025-01-31", "o3-mini"),
            ("o1-2024-12-17", "o1"),
        ] {
            assert_eq!(t.lookup(model), Some(entry(&t, family)), "{model}");
        }
    }

    /// Defect: the longest prefix priced gpt-4-32k and gpt-4-turbo as gpt-4, o3-mini and
    /// o3-pro as o3, and gpt-4o-2024-05-13 as gpt-4o.
    #[test]
    fn a_model_that_only_starts_like_another_is_not_priced_as_it() {
        let t = PriceTable::bundled().unwrap();
        // Each has its own published price.
        assert_eq!(t.lookup("gpt-4-32k").unwrap().input_per_1m, 60.0);
        assert_eq!(t.lookup("gpt-4-turbo").unwrap().input_per_1m, 10.0);
        assert_eq!(t.lookup("o3-mini").unwrap().input_per_1m, 1.10);
        assert_eq!(t.lookup("o3-pro").unwrap().input_per_1m, 20.0);
        assert_eq!(t.lookup("gpt-4o-2024-05-13").unwrap().input_per_1m, 5.0);
        assert_eq!(
            t.lookup("gpt-35-turbo-instruct").unwrap().output_per_1m,
            2.0
        );
        assert_eq!(t.lookup("gpt-35-turbo-16k").unwrap().input_per_1m, 3.0);
        // No entry and no version suffix: unpriced, never a neighbour's price.
        for model in [
            "gpt-4-1106-preview",
            "gpt-4o-transcribe",
            "gpt-4o-realtime",
            "o3-deep-research",
            "gpt-4.5-preview",
            "whisper",
            "gpt-4o-",
            "gpt-4o--",
            "gpt-4oo",
        ] {
            assert!(t.lookup(model).is_none(), "{model}");
            assert!(t.cost(model, 1000, 0, 1000).is_none(), "{model}");
        }
    }

    #[test]
    fn every_bundled_entry_is_pinned() {
        // Each row of the bundled table as published (see the sources in prices.toml):
        // input, cached input, output per 1M tokens.
        let expected: &[(&str, f64, Option<f64>, f64)] = &[
            ("gpt-4o", 2.50, Some(1.25), 10.00),
            ("gpt-4o-2024-05-13", 5.00, None, 15.00),
            ("gpt-4o-mini", 0.15, Some(0.075), 0.60),
            ("gpt-4o-audio-preview", 2.50, None, 10.00),
            ("gpt-4o-mini-audio-preview", 0.15, None, 0.60),
            ("gpt-4.1", 2.00, Some(0.50), 8.00),
            ("gpt-4.1-mini", 0.40, Some(0.10), 1.60),
            ("gpt-4.1-nano", 0.10, Some(0.025), 0.40),
            ("gpt-5", 1.25, Some(0.125), 10.00),
            ("gpt-5-mini", 0.25, Some(0.025), 2.00),
            ("gpt-5-nano", 0.05, Some(0.005), 0.40),
            ("o1", 15.00, Some(7.50), 60.00),
            ("o1-mini", 1.10, None, 4.40),
            ("o3", 2.00, None, 8.00),
            ("o3-mini", 1.10, Some(0.55), 4.40),
            ("o3-pro", 20.00, None, 80.00),
            ("o4-mini", 1.10, Some(0.275), 4.40),
            ("gpt-35-turbo", 0.50, None, 1.50),
            ("gpt-35-turbo-16k", 3.00, None, 4.00),
            ("gpt-35-turbo-instruct", 1.50, None, 2.00),
            ("gpt-4", 30.00, None, 60.00),
            ("gpt-4-32k", 60.00, None, 120.00),
            ("gpt-4-turbo", 10.00, None, 30.00),
            ("text-embedding-3-small", 0.02, None, 0.0),
            ("text-embedding-3-large", 0.13, None, 0.0),
            ("text-embedding-ada-002", 0.10, None, 0.0),
        ];
        let t = PriceTable::bundled().unwrap();
        assert_eq!(t.models.len(), expected.len(), "every entry is pinned here");
        for &(model, input, cached, output) in expected {
            let p = entry(&t, model);
            assert_eq!(
                (p.input_per_1m, p.cached_input_per_1m, p.output_per_1m),
                (input, cached, output),
                "{model}"
            );
        }
    }

    #[test]
    fn version_suffixes() {
        for tail in ["-2024-08-06", "-0613", "-1", "-2025-01-31"] {
            assert!(is_version_suffix(tail), "{tail}");
        }
        for tail in [
            "",
            "-",
            "--",
            "-32k",
            "-mini",
            "-0613-preview",
            "2024",
            "-2024--08",
            "-16k-0613",
        ] {
            assert!(!is_version_suffix(tail), "{tail}");
        }
    }

    #[test]
    fn cost_splits_cached_input_exactly() {
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
        assert_eq!(
            (
                c.input_nanos,
                c.cached_input_nanos,
                c.output_nanos,
                c.total_nanos
            ),
            (1_200_000_000, 400_000_000, 5_000_000_000, 6_600_000_000)
        );
    }

    /// Defect: costs were floats, so parts summed to 0.0043950000000000005 and totals drifted.
    #[test]
    fn published_prices_give_whole_nano_costs_that_add_up() {
        let t = PriceTable::bundled().unwrap();
        // gpt-4o-mini: $0.15 per 1M input tokens is 150 nano-dollars a token. Every published
        // price has at most three decimals per 1M, so a token costs whole nano-units and
        // nothing is rounded.
        let c = t.cost("gpt-4o-mini-2024-07-18", 7, 3, 0).unwrap();
        assert_eq!((c.input_nanos, c.cached_input_nanos), (600, 225));
        // A price with four decimals (0.0375 per 1M: 37.5 nano-units a token) rounds each part
        // once, half to even.
        let odd = PriceTable::parse(
            "version = \"t\"\ncurrency = \"USD\"\n[models.m]\ninput_per_1m = 0.0375\n",
        )
        .unwrap();
        assert_eq!(odd.cost("m", 1, 0, 0).unwrap().input_nanos, 38);
        assert_eq!(odd.cost("m", 3, 0, 0).unwrap().input_nanos, 112);
        let c = t.cost("gpt-4o-2024-08-06", 1000, 200, 500).unwrap();
        // 800 × 2.50/1M + 200 × 1.25/1M + 500 × 10/1M = 0.002 + 0.00025 + 0.005
        assert_eq!(
            (
                c.input_nanos,
                c.cached_input_nanos,
                c.output_nanos,
                c.total_nanos
            ),
            (2_000_000, 250_000, 5_000_000, 7_250_000)
        );
        // Rounding half to even at the half nano.
        assert_eq!(nanos(1, 500), 0);
        assert_eq!(nanos(3, 500), 2);
        assert_eq!(nanos(1, 1500), 2);
        assert_eq!(
            nanos(u64::MAX, u64::MAX),
            i64::MAX,
            "saturates, never wraps"
        );
    }

    /// Defect: audio tokens were priced as text (16x too low on gpt-4o-audio-preview's input).
    #[test]
    fn audio_tokens_are_priced_at_the_audio_rates() {
        let t = PriceTable::bundled().unwrap();
        let p = entry(&t, "gpt-4o-audio-preview");
        assert_eq!(
            (p.audio_input_per_1m, p.audio_output_per_1m),
            (Some(40.0), Some(80.0))
        );
        let c = t
            .cost_of(
                "gpt-4o-audio-preview-2024-12-17",
                &Tokens {
                    input: 1000,
                    audio_input: 400,
                    output: 200,
                    audio_output: 100,
                    ..Tokens::default()
                },
            )
            .unwrap();
        // 600 × 2,500 + 400 × 40,000 nano-dollars in; 100 × 10,000 + 100 × 80,000 out.
        assert_eq!(c.input_nanos, 17_500_000);
        assert_eq!(c.output_nanos, 9_000_000);
        assert_eq!(c.total_nanos, 26_500_000);
        // A model without audio prices prices audio as text.
        let plain = t
            .cost_of(
                "gpt-4o-2024-08-06",
                &Tokens {
                    input: 1000,
                    audio_input: 400,
                    ..Tokens::default()
                },
            )
            .unwrap();
        assert_eq!(plain.input_nanos, 2_500_000);
    }

    #[test]
    fn multipliers_are_exact_ten_thousandths() {
        assert_eq!(multiplier_per_10k(1.1), Some(11_000));
        assert_eq!(multiplier_per_10k(0.85), Some(8_500));
        assert_eq!(multiplier_per_10k(1.0001), Some(10_001));
        for bad in [0.0, -1.0, 1.00001, f64::NAN, f64::INFINITY] {
            assert_eq!(multiplier_per_10k(bad), None, "{bad}");
        }
        let c = TokenCost {
            input_nanos: 5,
            cached_input_nanos: 15,
            output_nanos: 1_000,
            total_nanos: 1_020,
        };
        // 5 × 1.1 = 5.5 → 6 (half to even), 15 × 1.1 = 16.5 → 16, 1,100; the total adds them.
        assert_eq!(
            c.scaled(11_000),
            TokenCost {
                input_nanos: 6,
                cached_input_nanos: 16,
                output_nanos: 1_100,
                total_nanos: 1_122,
            }
        );
    }

    #[test]
    fn prices_finer_than_six_decimals_are_rejected() {
        let err = PriceTable::parse(
            "version = \"t\"\ncurrency = \"USD\"\n[models.m]\ninput_per_1m = 0.0000001\n",
        )
        .unwrap_err();
        assert!(matches!(err, PriceTableError::TooPrecise { .. }), "{err}");
        for ok in [0.005, 0.025, 0.075, 0.275, 1.1, 2.5, 120.0, 0.000001] {
            assert!(pico_per_token(ok).is_some(), "{ok}");
        }
        assert_eq!(pico_per_token(0.075), Some(75_000));
        assert_eq!(pico_per_token(1.1), Some(1_100_000));
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
