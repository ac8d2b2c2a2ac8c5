//! tally-producer: writing `usage.events`.
//!
//! - [`producer`]: [`UsageProducer`], the typed, idempotent producer gateways embed
//!   (murmur2 routing by tenant, bounded local queue with backpressure, delivery
//!   failures surfaced at flush).
//!
//! This is the library a gateway links: it holds the producer only. The deterministic
//! synthetic traffic generator, its ground truth and `tally produce`'s arguments live
//! in `tally-gen`, which depends on this crate to send; this crate does not depend on
//! it.

pub mod producer;
#[cfg(feature = "test-support")]
#[doc(hidden)]
pub mod test_support;

pub use producer::{DeliveryStats, ProduceError, ProducerOptions, UsageProducer};
