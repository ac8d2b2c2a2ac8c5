//! Money: exact integer arithmetic for prices, gross, shares and net.
//!
//! No floating point is used here, or anywhere on the billing path: the lints at the top
//! of this module turn any `f32`/`f64` arithmetic, comparison or lossy cast into a build
//! error.
//!
//! Units, all integers:
//! - A price is in nano-units of the currency per million tokens ([`NanosPerMillion`]),
//!   so $0.0375 per million tokens is exactly `37_500_000`.
//! - `tokens × price` is then in units of 10⁻⁹ / 10⁶ = 10⁻¹⁵ currency ("10⁻⁶ nano"):
//!   an [`ExactAmount`], held in `i128`. A row's exact gross is the sum over its token
//!   kinds; nothing is rounded before the row.
//! - Amounts on a row are micro-units (10⁻⁶ currency) in `i64`. One micro-unit is
//!   [`EXACT_PER_MICRO`] = 10⁹ exact units.
//!
//! Rounding, once per row, half-even (banker's rounding, unbiased over many rows):
//! - gross_micros = half_even(exact / 10⁹)
//! - each share = half_even(exact × basis_points / (10⁹ × 10 000))
//! - net_micros = gross_micros − Σ shares (so line items add up exactly to the row).
//!
//! Because each share is rounded on its own, Σ shares may differ from
//! `round(exact × Σ bps / 10⁴)` by up to half a micro-unit per beneficiary, and in a
//! degenerate row (a gross of about one micro-unit split among several beneficiaries)
//! net can be a micro-unit below zero. Net is defined as the difference above so that
//! gross, shares and net always add up exactly; it is never re-rounded.
//!
//! Every operation is checked: an overflow is an error, never a wrap or a saturation.
#![deny(
    clippy::float_arithmetic,
    clippy::float_cmp,
    clippy::cast_precision_loss
)]

use std::fmt;

/// Exact units (10⁻¹⁵ currency) in one micro-unit (10⁻⁶ currency).
pub const EXACT_PER_MICRO: i128 = 1_000_000_000;

/// Basis points in a whole (100 %).
pub const BASIS_POINTS_PER_WHOLE: i128 = 10_000;

/// Why a money computation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    /// An intermediate or final value does not fit its integer type.
    #[error("amount overflow while computing {what}")]
    Overflow {
        /// Which quantity overflowed.
        what: &'static str,
    },
    /// Division by zero or by a negative number was requested.
    #[error("denominator must be positive")]
    NonPositiveDenominator,
}

/// A price: nano-units of the currency per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct NanosPerMillion(pub u64);

impl fmt::Display for NanosPerMillion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} nanos per million tokens", self.0)
    }
}

/// An exact amount in units of 10⁻¹⁵ currency (tokens × [`NanosPerMillion`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ExactAmount(pub i128);

impl ExactAmount {
    /// Zero.
    pub const ZERO: ExactAmount = ExactAmount(0);

    /// `tokens × price`, exactly.
    pub fn of_tokens(tokens: u64, price: NanosPerMillion) -> Result<ExactAmount, MoneyError> {
        i128::from(tokens)
            .checked_mul(i128::from(price.0))
            .map(ExactAmount)
            .ok_or(MoneyError::Overflow {
                what: "tokens × price",
            })
    }

    /// `self + other`, checked.
    pub fn checked_add(self, other: ExactAmount) -> Result<ExactAmount, MoneyError> {
        self.0
            .checked_add(other.0)
            .map(ExactAmount)
            .ok_or(MoneyError::Overflow {
                what: "exact gross sum",
            })
    }

    /// Σ tokens × price over `lines`, exactly.
    pub fn sum_of_lines(
        lines: impl IntoIterator<Item = (u64, NanosPerMillion)>,
    ) -> Result<ExactAmount, MoneyError> {
        let mut total = ExactAmount::ZERO;
        for (tokens, price) in lines {
            total = total.checked_add(ExactAmount::of_tokens(tokens, price)?)?;
        }
        Ok(total)
    }
}

/// `numerator / denominator` rounded to the nearest integer, ties to the even integer.
/// The denominator must be positive; the numerator may have either sign.
pub fn round_half_even(numerator: i128, denominator: i128) -> Result<i128, MoneyError> {
    if denominator <= 0 {
        return Err(MoneyError::NonPositiveDenominator);
    }
    // Floor division: quotient ≤ exact value < quotient + 1, remainder in [0, denominator).
    let quotient = numerator.div_euclid(denominator);
    let remainder = numerator.rem_euclid(denominator);
    // Compare remainder with denominator − remainder instead of 2 × remainder with the
    // denominator, so nothing can overflow.
    let above_half = remainder.cmp(&(denominator - remainder));
    let round_up = match above_half {
        std::cmp::Ordering::Less => false,
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Equal => quotient.rem_euclid(2) == 1,
    };
    if round_up {
        // remainder > 0 here, so quotient < numerator / denominator ≤ i128::MAX.
        quotient
            .checked_add(1)
            .ok_or(MoneyError::Overflow { what: "rounding" })
    } else {
        Ok(quotient)
    }
}

/// The amounts of one row: gross, one share per beneficiary (in the order the basis
/// points were given), and net.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowAmounts {
    /// half_even(exact gross / 10⁹), micro-units.
    pub gross_micros: i64,
    /// One share per basis-point entry, micro-units, same order.
    pub share_micros: Vec<i64>,
    /// gross − Σ shares, micro-units.
    pub net_micros: i64,
}

impl RowAmounts {
    /// Rounds a row's exact gross and splits it by `basis_points` (each share computed
    /// from the exact gross, not from the rounded gross).
    pub fn from_exact(exact: ExactAmount, basis_points: &[u32]) -> Result<RowAmounts, MoneyError> {
        let gross_micros = to_i64(round_half_even(exact.0, EXACT_PER_MICRO)?, "gross micros")?;
        let share_denominator = EXACT_PER_MICRO * BASIS_POINTS_PER_WHOLE;
        let mut share_micros = Vec::with_capacity(basis_points.len());
        let mut shares_total: i64 = 0;
        for &bps in basis_points {
            let scaled = exact
                .0
                .checked_mul(i128::from(bps))
                .ok_or(MoneyError::Overflow {
                    what: "exact gross × basis points",
                })?;
            let share = to_i64(round_half_even(scaled, share_denominator)?, "share micros")?;
            shares_total = shares_total
                .checked_add(share)
                .ok_or(MoneyError::Overflow {
                    what: "sum of shares",
                })?;
            share_micros.push(share);
        }
        let net_micros = gross_micros
            .checked_sub(shares_total)
            .ok_or(MoneyError::Overflow { what: "net micros" })?;
        Ok(RowAmounts {
            gross_micros,
            share_micros,
            net_micros,
        })
    }
}

fn to_i64(value: i128, what: &'static str) -> Result<i64, MoneyError> {
    i64::try_from(value).map_err(|_| MoneyError::Overflow { what })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_even_rounds_ties_to_even_both_signs() {
        assert_eq!(round_half_even(5, 10), Ok(0));
        assert_eq!(round_half_even(15, 10), Ok(2));
        assert_eq!(round_half_even(25, 10), Ok(2));
        assert_eq!(round_half_even(26, 10), Ok(3));
        assert_eq!(round_half_even(24, 10), Ok(2));
        assert_eq!(round_half_even(-5, 10), Ok(0));
        assert_eq!(round_half_even(-15, 10), Ok(-2));
        assert_eq!(round_half_even(-25, 10), Ok(-2));
        assert_eq!(round_half_even(-26, 10), Ok(-3));
        assert_eq!(round_half_even(7, 1), Ok(7));
    }

    #[test]
    fn half_even_refuses_non_positive_denominators() {
        assert_eq!(
            round_half_even(1, 0),
            Err(MoneyError::NonPositiveDenominator)
        );
        assert_eq!(
            round_half_even(1, -3),
            Err(MoneyError::NonPositiveDenominator)
        );
    }

    #[test]
    fn half_even_is_total_at_the_extremes() {
        assert_eq!(round_half_even(i128::MAX, 1), Ok(i128::MAX));
        assert_eq!(round_half_even(i128::MIN, 1), Ok(i128::MIN));
        assert_eq!(round_half_even(i128::MAX, i128::MAX), Ok(1));
        assert_eq!(round_half_even(i128::MIN, i128::MAX), Ok(-1));
    }

    #[test]
    fn token_price_overflow_is_an_error() {
        let exact = ExactAmount::sum_of_lines([
            (u64::MAX, NanosPerMillion(u64::MAX)),
            (u64::MAX, NanosPerMillion(u64::MAX)),
        ]);
        assert!(matches!(exact, Err(MoneyError::Overflow { .. })));
    }

    #[test]
    fn gross_beyond_i64_micros_is_an_error() {
        let exact = ExactAmount(i128::from(i64::MAX) * EXACT_PER_MICRO + EXACT_PER_MICRO);
        assert!(matches!(
            RowAmounts::from_exact(exact, &[]),
            Err(MoneyError::Overflow {
                what: "gross micros"
            })
        ));
    }
}
