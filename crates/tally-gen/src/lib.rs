//! tally-gen: deterministic synthetic traffic for `usage.events`, and its ground truth.
//!
//! - [`generator`]: [`Generator`], pure and deterministic synthetic traffic with every
//!   record class the pipeline distinguishes (counted on time or as a correction,
//!   duplicate, too late, rejected), and the [`GroundTruth`] it must reproduce. Its
//!   event-time defaults (window, out-of-orderness, allowed lateness, correction
//!   horizon) are the aggregator's, taken from
//!   [`AggregatorConfig::default`](tally_core::config::AggregatorConfig); a run for a
//!   configured pipeline takes them from the loaded config
//!   ([`GeneratorConfig::for_aggregator`]).
//! - [`run`]: [`produce`] / [`produce_blocking`], streaming a generator into Kafka
//!   through a [`tally_producer::UsageProducer`] — the engine of `tally produce`.
//! - [`args`]: [`GeneratorArgs`], the clap arguments of `tally produce`, and
//!   [`parse_time_ms`] for RFC 3339 / epoch-ms times.
//!
//! # Why a crate of its own, on top of `tally-producer`
//!
//! Gateways link `tally-producer` and nothing else: the producer, its settings and its
//! error type. The generator needs what a gateway does not (a seeded random stream,
//! clap arguments, the ground truth's JSON), and its failures (an invalid generator
//! config, a topic whose partition count is not the one the truth routes for) are not
//! a gateway's. So this crate depends on `tally-producer` to send and
//! `tally-producer` does not depend on it: the gateway library stays small, and its
//! [`ProduceError`](tally_producer::ProduceError) holds only the producer's failures.
//! The pure generator itself ([`generator`]) needs no Kafka client; only [`run`] does,
//! through `tally-producer`.

pub mod args;
pub mod generator;
pub mod run;

pub use args::{GeneratorArgs, GeneratorArgsError, TimeParseError, parse_time_ms};
pub use generator::{
    ClassFractions, GeneratedRecord, Generator, GeneratorConfig, GeneratorConfigError, GroundTruth,
    RecordClass, RejectKind,
};
pub use run::{GenError, ProduceOptions, ProgressReport, produce, produce_blocking};
