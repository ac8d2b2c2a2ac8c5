//! tally-producer: writing `usage.events`.
//!
//! - [`producer`]: [`UsageProducer`], the typed, idempotent producer gateways embed
//!   (murmur2 routing by tenant, bounded local queue with backpressure, delivery
//!   failures surfaced at flush).
//! - [`generator`]: [`Generator`], pure and deterministic synthetic traffic with every
//!   record class the pipeline distinguishes (counted on time or as a correction,
//!   duplicate, too late, rejected), and the [`GroundTruth`] it must reproduce.
//! - [`run`]: [`produce`] / [`produce_blocking`], streaming a generator into Kafka —
//!   the engine of `tally produce`.
//! - [`args`]: [`GeneratorArgs`], the clap arguments of `tally produce`, and
//!   [`parse_time_ms`] for RFC 3339 / epoch-ms times.

pub mod args;
pub mod generator;
pub mod producer;
pub mod run;

pub use args::{GeneratorArgs, GeneratorArgsError, TimeParseError, parse_time_ms};
pub use generator::{
    ClassFractions, GeneratedRecord, Generator, GeneratorConfig, GeneratorConfigError, GroundTruth,
    RecordClass, RejectKind,
};
pub use producer::{DeliveryStats, ProduceError, ProducerOptions, UsageProducer};
pub use run::{ProduceOptions, ProgressReport, produce, produce_blocking};
