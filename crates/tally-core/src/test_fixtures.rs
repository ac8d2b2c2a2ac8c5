//! Fixtures shared by the workspace's unit tests: a contracts file with more than one
//! version of each section, so tests of version lookups, size bounds and contract
//! comparisons start from the same text.
//!
//! Not part of the API: compiled for this crate's tests and, through the
//! `test-fixtures` feature, for the tests of the crates that enable it in their
//! dev-dependencies; hidden from the docs. Panics on a fixture that does not load, as a
//! test helper does.

use crate::contracts::Contracts;
use crate::window::WindowSize;

/// Contracts for tests:
/// - price book `2025-01`, in force from 2025-01-01: `atlas-large` at 1 and
///   `atlas-mini` at 3 micro-units per token of each kind;
/// - price book `2025-02-renegotiated` (the longest version label), from 2025-02-01:
///   `atlas-large` at 2 and `atlas-mini` at 6; both bill `succeeded` requests only;
/// - share rules `2025-01`, from 2025-01-01: aws pays 20 % to a partner with a long
///   name; aws through channel partner `p` pays alpha 10 %, beta 10 % and
///   gamma-partners 5 % (the largest rule by encoded size: three beneficiaries).
pub const CONTRACTS: &str = r#"
[[price_book]]
version = "2025-01"
effective_from = "2025-01-01T00:00:00Z"
currency = "USD"
billable_statuses = ["succeeded"]

[price_book.models.atlas-large]
input = 1
cached_input = 1
output = 1
reasoning = 1

[price_book.models.atlas-mini]
input = 3
cached_input = 3
output = 3
reasoning = 3

[[price_book]]
version = "2025-02-renegotiated"
effective_from = "2025-02-01T00:00:00Z"
currency = "USD"
billable_statuses = ["succeeded"]

[price_book.models.atlas-large]
input = 2
cached_input = 2
output = 2
reasoning = 2

[price_book.models.atlas-mini]
input = 6
cached_input = 6
output = 6
reasoning = 6

[[share_rules]]
version = "2025-01"
effective_from = "2025-01-01T00:00:00Z"

[[share_rules.rules]]
cloud = "aws"
beneficiaries = [{ partner = "a-partner-with-a-long-name-0123456789", basis_points = 2000 }]

[[share_rules.rules]]
cloud = "aws"
channel_partner = "p"
beneficiaries = [
  { partner = "alpha", basis_points = 1000 },
  { partner = "beta", basis_points = 1000 },
  { partner = "gamma-partners", basis_points = 500 },
]
"#;

/// The `atlas-mini` price lines of [`CONTRACTS`]' first price book, for tests that
/// take the model out of it (a later version may add a model, never drop one).
pub const ATLAS_MINI_PRICES: &str =
    "[price_book.models.atlas-mini]\ninput = 3\ncached_input = 3\noutput = 3\nreasoning = 3\n";

/// `text` loaded for one-minute windows.
pub fn load(text: &str) -> Contracts {
    Contracts::load(text, WindowSize::ONE_MINUTE).expect("test contracts load")
}

/// [`CONTRACTS`] loaded for one-minute windows.
pub fn contracts() -> Contracts {
    load(CONTRACTS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fixture_loads_and_the_mini_prices_are_part_of_it() {
        let contracts = contracts();
        assert_eq!(contracts.price_book().len(), 2);
        assert_eq!(contracts.share_rules().len(), 1);
        assert_eq!(CONTRACTS.matches(ATLAS_MINI_PRICES).count(), 1);
        let without_mini = load(&CONTRACTS.replace(ATLAS_MINI_PRICES, ""));
        let models: Vec<&str> = without_mini.price_book()[0]
            .models()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(models, ["atlas-large"]);
    }
}
