//! tally-core: the domain of tally, as pure logic.
//!
//! Domain types, the Avro codec, routing, validation, windows, pricing and contracts.
//! Nothing here does I/O: no Kafka client, no network, no database. Every decision the
//! pipeline takes (is this record valid, which window, is it late, what does it cost)
//! is a function here that returns a plain value, so it can be unit- and
//! property-tested without a broker.

pub mod aggregate;
pub mod codec;
pub mod config;
pub mod contracts;
pub mod dedupe;
pub mod event;
pub mod health;
pub mod identity;
pub mod money;
pub mod partition;
mod prefetch;
pub mod routing;
pub mod semantics;
#[cfg(any(test, feature = "test-fixtures"))]
#[doc(hidden)]
pub mod test_fixtures;
pub mod timefmt;
pub mod validate;
pub mod window;
