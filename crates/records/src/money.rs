//! Money as an exact amount: a whole number of nano-units (10⁻⁹) of the record's currency.
//!
//! Costs were binary floats: a request's parts summed to `0.0043950000000000005`, and sums over
//! millions of records drifted. Prices are given to at most six decimals per million tokens, so
//! a token costs a whole number of pico-units and a request a whole number of nano-units after
//! one rounding; every sum after that is integer arithmetic.

use std::fmt;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Sub};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const NANOS_PER_UNIT: i64 = 1_000_000_000;

/// An exact amount of money in nano-units of a currency.
///
/// Serialised as a JSON number whose text is the exact decimal: an amount under 10⁶ units has
/// at most 15 significant digits, which a double holds exactly, and the shortest text of that
/// double is the decimal itself. Shown with a fixed nine decimals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Money {
    nanos: i64,
}

impl Money {
    pub const ZERO: Money = Money { nanos: 0 };

    pub const fn from_nanos(nanos: i64) -> Money {
        Money { nanos }
    }

    pub const fn nanos(self) -> i64 {
        self.nanos
    }

    /// The amount as a double: exact in text for amounts under 10⁶ units (see the type).
    pub fn as_f64(self) -> f64 {
        self.nanos as f64 / NANOS_PER_UNIT as f64
    }

    /// The nearest amount to a decimal number held as a double (records written before
    /// amounts were exact); `None` for NaN, infinities and amounts out of range.
    pub fn from_f64(units: f64) -> Option<Money> {
        let nanos = (units * NANOS_PER_UNIT as f64).round();
        // i64::MAX as f64 rounds up to 2^63, which is itself out of range.
        (nanos.is_finite() && nanos.abs() < i64::MAX as f64).then_some(Money {
            nanos: nanos as i64,
        })
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.nanos < 0 { "-" } else { "" };
        let abs = self.nanos.unsigned_abs();
        let per = NANOS_PER_UNIT.unsigned_abs();
        write!(f, "{sign}{}.{:09}", abs / per, abs % per)
    }
}

impl Add for Money {
    type Output = Money;

    /// Saturates rather than wrapping: 9.2 × 10⁹ units is beyond any bill.
    fn add(self, other: Money) -> Money {
        Money {
            nanos: self.nanos.saturating_add(other.nanos),
        }
    }
}

impl AddAssign for Money {
    fn add_assign(&mut self, other: Money) {
        *self = *self + other;
    }
}

impl Sub for Money {
    type Output = Money;

    fn sub(self, other: Money) -> Money {
        Money {
            nanos: self.nanos.saturating_sub(other.nanos),
        }
    }
}

impl Sum for Money {
    fn sum<I: Iterator<Item = Money>>(iter: I) -> Money {
        iter.fold(Money::ZERO, Add::add)
    }
}

impl Serialize for Money {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(self.as_f64())
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Money, D::Error> {
        let units = f64::deserialize(deserializer)?;
        Money::from_f64(units)
            .ok_or_else(|| serde::de::Error::custom(format!("{units} is not an amount of money")))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn the_float_sum_that_drifted_is_exact() {
        // 0.004395 of the CSV report: 0.0016 input + 0.002795 output, summed as floats.
        let parts = [Money::from_nanos(1_600_000), Money::from_nanos(2_795_000)];
        let total: Money = parts.into_iter().sum();
        assert_eq!(total.to_string(), "0.004395000");
        assert_eq!(serde_json::to_string(&total).unwrap(), "0.004395");
        assert_ne!(format!("{}", 0.0016_f64 + 0.002795_f64), "0.004395");
    }

    #[test]
    fn display_is_fixed_precision_with_sign() {
        assert_eq!(Money::ZERO.to_string(), "0.000000000");
        assert_eq!(Money::from_nanos(5).to_string(), "0.000000005");
        assert_eq!(
            Money::from_nanos(-1_500_000_000).to_string(),
            "-1.500000000"
        );
        assert_eq!(
            Money::from_nanos(i64::MIN).to_string(),
            "-9223372036.854775808"
        );
    }

    #[test]
    fn older_records_with_float_sums_read_to_the_nearest_nano() {
        let m: Money = serde_json::from_str("0.0043950000000000005").unwrap();
        assert_eq!(m, Money::from_nanos(4_395_000));
        assert!(serde_json::from_str::<Money>("1e300").is_err());
    }

    proptest! {
        /// serde_json's float printing (ryu, not ours) gives exactly the decimal our integer
        /// formatting gives, for every amount under a million units.
        #[test]
        fn json_text_is_the_exact_decimal(nanos in -999_999_999_999_999i64..=999_999_999_999_999) {
            let m = Money::from_nanos(nanos);
            let json = serde_json::to_string(&m).unwrap();
            let shown = m.to_string();
            let trimmed = shown.trim_end_matches('0');
            let expected = if trimmed.ends_with('.') { format!("{trimmed}0") } else { trimmed.to_owned() };
            // serde_json prints 1e-7 and the like in exponent form; compare as decimals then.
            if json.contains('e') {
                let back: f64 = json.parse().unwrap();
                prop_assert_eq!(Money::from_f64(back), Some(m));
            } else {
                prop_assert_eq!(&json, &expected);
            }
            prop_assert_eq!(serde_json::from_str::<Money>(&json).unwrap(), m);
        }
    }
}
