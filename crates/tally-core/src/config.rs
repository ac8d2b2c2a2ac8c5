//! Configuration types: one TOML file, overridable from the environment.
//!
//! Every struct denies unknown fields, so a typo fails at start with the field's name
//! instead of being ignored. Units are in the field names (`_ms`, `_bytes`). Defaults
//! are `const fn`s that say where the number comes from. Loading the file (I/O) is the
//! binary's job; cross-field checks happen once, in [`Config::validate`], and name the
//! field at fault.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::codec::{AggregateSizeLimits, aggregate_encoded_len_bound, shares_encoded_len};
use crate::contracts::Contracts;
use crate::identity::ROW_ID_BYTES;
use crate::validate::ValidationLimits;

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Kafka connection settings shared by every client.
    #[serde(default)]
    pub kafka: KafkaConfig,
    /// Topic names and the settings `tally topics create` gives them.
    #[serde(default)]
    pub topics: TopicsConfig,
    /// Event-time semantics and the aggregator's loop.
    #[serde(default)]
    pub aggregator: AggregatorConfig,
    /// Plausibility bounds applied to every usage event.
    #[serde(default)]
    pub validation: ValidationConfig,
    /// The Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// `tally sink`: its consumer group and batches (its flags override these).
    #[serde(default)]
    pub sink: SinkConfig,
}

/// Kafka client settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list (librdkafka `bootstrap.servers`).
    #[serde(default = "default_bootstrap_servers")]
    pub bootstrap_servers: String,
    /// Raw librdkafka settings passed through to every client, e.g.
    /// `"security.protocol" = "SASL_SSL"`, `"sasl.mechanism" = "SCRAM-SHA-512"`,
    /// `"ssl.ca.location" = "/etc/ssl/ca.pem"`. tally's own settings (idempotence,
    /// isolation level, offsets) are applied after these and cannot be weakened.
    #[serde(default)]
    pub client: BTreeMap<String, String>,
    /// File holding the SASL password (e.g. a mounted Kubernetes Secret); its content,
    /// without the trailing newline, becomes librdkafka's `sasl.password` for every
    /// client. Exists because the dotted key `client."sasl.password"` cannot be set
    /// from a `TALLY_<SECTION>__<FIELD>` environment variable. Setting both is an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_password_file: Option<String>,
}

fn default_bootstrap_servers() -> String {
    "127.0.0.1:9092".to_owned()
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            bootstrap_servers: default_bootstrap_servers(),
            client: BTreeMap::new(),
            sasl_password_file: None,
        }
    }
}

/// Topic names and creation settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsConfig {
    /// Input topic of usage events (and ticks).
    #[serde(default = "default_usage_events")]
    pub usage_events: String,
    /// Output topic of billing aggregates.
    #[serde(default = "default_billing_aggregates")]
    pub billing_aggregates: String,
    /// Records too late to correct, with their original bytes.
    #[serde(default = "default_late")]
    pub late: String,
    /// Rejected records, with their original bytes and the reason.
    #[serde(default = "default_dlq")]
    pub dlq: String,
    /// Checkpoints of the aggregator (low water, counters, state digest, semantics),
    /// one record per input partition and transaction, written with the offsets; a
    /// replay warms up from them. Partitions of the output topics; retention of
    /// usage.events (`retention_ms`).
    #[serde(default = "default_checkpoints")]
    pub checkpoints: String,
    /// Partitions of usage.events. Never changed on an existing topic: routing by
    /// murmur2(tenant) depends on it.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Partitions of the other topics.
    #[serde(default = "default_partitions")]
    pub output_partitions: i32,
    /// Replication factor of every topic (3 in production; 1 on a single broker).
    #[serde(default = "default_replication_factor")]
    pub replication_factor: i32,
    /// `max.message.bytes` of usage.events and billing.aggregates. usage.late and
    /// usage.dlq get 64 KiB more, so a record that fit the input always fits there
    /// with its headers.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: i32,
    /// `retention.ms` of usage.events and billing.aggregates; -1 (unlimited) by default
    /// because replay and reconcile need the input.
    #[serde(default = "default_retention_ms")]
    pub retention_ms: i64,
    /// `retention.ms` of usage.late and usage.dlq.
    #[serde(default = "default_retention_ms")]
    pub side_retention_ms: i64,
    /// `message.timestamp.after.max.ms` of usage.events: how far ahead of the broker's
    /// clock a gateway may stamp a record. `tally topics create` sets it on
    /// usage.events and gives billing.aggregates, usage.late and usage.dlq the larger
    /// bound of [`output_timestamp_after_max_ms`], because tally stamps what it writes
    /// there with times derived from the input.
    #[serde(default = "default_input_timestamp_after_max_ms")]
    pub input_timestamp_after_max_ms: i64,
}

fn default_usage_events() -> String {
    "usage.events".to_owned()
}
fn default_billing_aggregates() -> String {
    "billing.aggregates".to_owned()
}
fn default_late() -> String {
    "usage.late".to_owned()
}
fn default_dlq() -> String {
    "usage.dlq".to_owned()
}
fn default_checkpoints() -> String {
    "tally.checkpoints".to_owned()
}
/// Six partitions: enough for a few aggregator cores without making a hot tenant's
/// partition much hotter than the rest.
const fn default_partitions() -> i32 {
    6
}
/// Production brokers replicate three ways.
const fn default_replication_factor() -> i32 {
    3
}
/// Kafka's own default `message.max.bytes` (1 MiB + record overhead).
const fn default_max_message_bytes() -> i32 {
    1_048_588
}
/// Unlimited: replay needs the input.
const fn default_retention_ms() -> i64 {
    -1
}
/// Kafka 4's own default of `message.timestamp.after.max.ms`: one hour.
const fn default_input_timestamp_after_max_ms() -> i64 {
    KAFKA_DEFAULT_TIMESTAMP_AFTER_MAX_MS
}

/// Kafka 4's default `log.message.timestamp.after.max.ms` (one hour): brokers reject
/// records stamped further ahead of their clock.
pub const KAFKA_DEFAULT_TIMESTAMP_AFTER_MAX_MS: i64 = 3_600_000;

/// The smallest `message.timestamp.after.max.ms` a topic needs when tally writes to
/// it records stamped with times derived from the input: `input_after_max_ms +
/// max_event_time_ahead_ms + window_ms` (saturating).
///
/// Why that sum: a gateway's record may be stamped up to `input_after_max_ms` ahead
/// of the broker's clock (the input topic's own bound); its event time may lie up to
/// `max_event_time_ahead_ms` ahead of that stamp (validation); a billing row is
/// stamped with its window's end, at most one window after any event time in it. So
/// a row's timestamp is at most the sum ahead of the broker's clock when the input
/// record was appended, and the clock only moves on before the row is written. Copies
/// to usage.late and usage.dlq keep the input record's timestamp (at most
/// `input_after_max_ms` ahead). A topic with a smaller bound would reject such a
/// record inside the aggregator's transaction, which aborts, and the same input would
/// abort every retry.
///
/// Used for billing.aggregates, usage.late and usage.dlq; any further topic the
/// aggregator writes with input-derived timestamps (a checkpoints topic) must use it
/// too.
pub const fn output_timestamp_after_max_ms(
    input_after_max_ms: i64,
    max_event_time_ahead_ms: i64,
    window_ms: i64,
) -> i64 {
    input_after_max_ms
        .saturating_add(max_event_time_ahead_ms)
        .saturating_add(window_ms)
}

/// Bytes Kafka adds around one record value in a record batch of its own: the v2
/// batch header (61 bytes) and the record's header at its widest (length 5,
/// attributes 1, timestamp delta 10, offset delta 5, key length 5, value length 5,
/// header count 1), the key excluded.
pub const KAFKA_RECORD_OVERHEAD_BYTES: usize = 61 + 5 + 1 + 10 + 5 + 5 + 5 + 1;

/// The largest billing row the configuration and the contracts allow (see
/// [`Config::check_contracts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowSizeBound {
    /// The largest framed BillingAggregate value.
    pub value_bytes: usize,
    /// The largest Kafka record batch holding one row: value, key (the row id) and
    /// [`KAFKA_RECORD_OVERHEAD_BYTES`].
    pub record_bytes: usize,
}

/// Extra room that usage.late and usage.dlq get over usage.events.
pub const SIDE_TOPIC_EXTRA_BYTES: i32 = 64 * 1024;

impl Default for TopicsConfig {
    fn default() -> Self {
        TopicsConfig {
            usage_events: default_usage_events(),
            billing_aggregates: default_billing_aggregates(),
            late: default_late(),
            dlq: default_dlq(),
            checkpoints: default_checkpoints(),
            partitions: default_partitions(),
            output_partitions: default_partitions(),
            replication_factor: default_replication_factor(),
            max_message_bytes: default_max_message_bytes(),
            retention_ms: default_retention_ms(),
            side_retention_ms: default_retention_ms(),
            input_timestamp_after_max_ms: default_input_timestamp_after_max_ms(),
        }
    }
}

/// Event-time semantics (DESIGN.md, "Semantics") and the aggregator's loop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatorConfig {
    /// Consumer group of the aggregators.
    #[serde(default = "default_group_id")]
    pub group_id: String,
    /// Tumbling window size; must divide 15 minutes.
    #[serde(default = "default_window_ms")]
    pub window_ms: i64,
    /// Allowed out-of-orderness: watermark = largest event time − this.
    #[serde(default = "default_max_out_of_orderness_ms")]
    pub max_out_of_orderness_ms: i64,
    /// A window closes when the watermark passes its end + this.
    #[serde(default = "default_allowed_lateness_ms")]
    pub allowed_lateness_ms: i64,
    /// How long after closing a window still takes corrections.
    #[serde(default = "default_correction_horizon_ms")]
    pub correction_horizon_ms: i64,
    /// How long event ids are remembered, in event time; at least
    /// allowed_lateness_ms + correction_horizon_ms.
    #[serde(default = "default_dedupe_horizon_ms")]
    pub dedupe_horizon_ms: i64,
    /// After a partition has been at its end this long, a tick is written to it.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: i64,
    /// Kafka transaction commit interval.
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: i64,
    /// `transaction.timeout.ms`; must exceed the commit interval with room for the commit.
    #[serde(default = "default_transaction_timeout_ms")]
    pub transaction_timeout_ms: i64,
    /// Path of the contracts file (price book and revenue-share rules).
    #[serde(default = "default_contracts_path")]
    pub contracts_path: String,
    /// Threads that process the owned partitions' records in parallel (a partition is
    /// processed by one thread at a time); 0 = one per available core.
    #[serde(default)]
    pub worker_threads: u32,
}

/// Upper bound of `aggregator.worker_threads`.
pub const MAX_WORKER_THREADS: u32 = 256;

fn default_group_id() -> String {
    "tally-aggregator".to_owned()
}
/// One minute: small enough for hourly marketplace records, large enough to aggregate.
const fn default_window_ms() -> i64 {
    60_000
}
/// Gateways batch for a few seconds.
const fn default_max_out_of_orderness_ms() -> i64 {
    5_000
}
/// Half a minute of grace before the on-time row is emitted.
const fn default_allowed_lateness_ms() -> i64 {
    30_000
}
/// Six hours: AWS Marketplace rejects records more than 6 h late.
const fn default_correction_horizon_ms() -> i64 {
    6 * 3_600_000
}
/// allowed lateness + correction horizon, rounded up to whole hours.
const fn default_dedupe_horizon_ms() -> i64 {
    7 * 3_600_000
}
/// Ten seconds at a partition's end before it is declared idle.
const fn default_idle_timeout_ms() -> i64 {
    10_000
}
/// Kafka Streams uses 100 ms under exactly-once; a second trades latency for throughput.
const fn default_commit_interval_ms() -> i64 {
    1_000
}
/// Well above the commit interval plus a slow commit.
const fn default_transaction_timeout_ms() -> i64 {
    30_000
}
fn default_contracts_path() -> String {
    "deploy/contracts/default.toml".to_owned()
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        AggregatorConfig {
            group_id: default_group_id(),
            window_ms: default_window_ms(),
            max_out_of_orderness_ms: default_max_out_of_orderness_ms(),
            allowed_lateness_ms: default_allowed_lateness_ms(),
            correction_horizon_ms: default_correction_horizon_ms(),
            dedupe_horizon_ms: default_dedupe_horizon_ms(),
            idle_timeout_ms: default_idle_timeout_ms(),
            commit_interval_ms: default_commit_interval_ms(),
            transaction_timeout_ms: default_transaction_timeout_ms(),
            contracts_path: default_contracts_path(),
            worker_threads: 0,
        }
    }
}

/// Plausibility bounds and length limits (see [`ValidationLimits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationConfig {
    /// Largest plausible count of one token kind in one request.
    #[serde(default = "default_max_tokens_per_kind")]
    pub max_tokens_per_kind: u64,
    /// How far event time (and a tick's time) may lie ahead of the record's Kafka
    /// timestamp.
    #[serde(default = "default_max_event_time_ahead_ms")]
    pub max_event_time_ahead_ms: i64,
    /// How far event time (and a tick's time) may lie behind the record's Kafka
    /// timestamp.
    #[serde(default = "default_max_event_time_behind_ms")]
    pub max_event_time_behind_ms: i64,
    /// Longest tenant_id, model, region, channel_partner and service_tier, in UTF-8
    /// bytes; longer → rejected (`field_too_long`). Bounds the size of a billing row.
    #[serde(default = "default_max_dimension_bytes")]
    pub max_dimension_bytes: u32,
    /// Longest request_id, in bytes; longer → rejected (`field_too_long`).
    #[serde(default = "default_max_request_id_bytes")]
    pub max_request_id_bytes: u32,
    /// Most entries in the attributes map; more → rejected (`field_too_long`).
    #[serde(default = "default_max_attribute_entries")]
    pub max_attribute_entries: u32,
    /// Most bytes of attribute keys and values together; more → rejected
    /// (`field_too_long`).
    #[serde(default = "default_max_attributes_bytes")]
    pub max_attributes_bytes: u32,
}

const fn default_max_tokens_per_kind() -> u64 {
    ValidationLimits::DEFAULT_MAX_TOKENS_PER_KIND
}
const fn default_max_event_time_ahead_ms() -> i64 {
    ValidationLimits::DEFAULT_MAX_EVENT_TIME_AHEAD_MS
}
const fn default_max_event_time_behind_ms() -> i64 {
    ValidationLimits::DEFAULT_MAX_EVENT_TIME_BEHIND_MS
}
/// The defaults of [`ValidationLimits`] are small numbers: they fit `u32`.
const fn limit_u32(value: usize) -> u32 {
    assert!(value <= u32::MAX as usize);
    value as u32
}
const fn default_max_dimension_bytes() -> u32 {
    limit_u32(ValidationLimits::DEFAULT_MAX_DIMENSION_BYTES)
}
const fn default_max_request_id_bytes() -> u32 {
    limit_u32(ValidationLimits::DEFAULT_MAX_REQUEST_ID_BYTES)
}
const fn default_max_attribute_entries() -> u32 {
    limit_u32(ValidationLimits::DEFAULT_MAX_ATTRIBUTE_ENTRIES)
}
const fn default_max_attributes_bytes() -> u32 {
    limit_u32(ValidationLimits::DEFAULT_MAX_ATTRIBUTES_BYTES)
}

impl Default for ValidationConfig {
    fn default() -> Self {
        ValidationConfig {
            max_tokens_per_kind: default_max_tokens_per_kind(),
            max_event_time_ahead_ms: default_max_event_time_ahead_ms(),
            max_event_time_behind_ms: default_max_event_time_behind_ms(),
            max_dimension_bytes: default_max_dimension_bytes(),
            max_request_id_bytes: default_max_request_id_bytes(),
            max_attribute_entries: default_max_attribute_entries(),
            max_attributes_bytes: default_max_attributes_bytes(),
        }
    }
}

/// `u32` config limits as `usize` (lossless on every target tally builds for; a
/// 16-bit target would saturate, never wrap).
fn limit_usize(value: u32) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

impl From<ValidationConfig> for ValidationLimits {
    fn from(config: ValidationConfig) -> Self {
        ValidationLimits {
            max_tokens_per_kind: config.max_tokens_per_kind,
            max_event_time_ahead_ms: config.max_event_time_ahead_ms,
            max_event_time_behind_ms: config.max_event_time_behind_ms,
            max_dimension_bytes: limit_usize(config.max_dimension_bytes),
            max_request_id_bytes: limit_usize(config.max_request_id_bytes),
            max_attribute_entries: limit_usize(config.max_attribute_entries),
            max_attributes_bytes: limit_usize(config.max_attributes_bytes),
        }
    }
}

/// The Prometheus endpoint every process serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `host:port` to serve `/metrics` on; empty disables the endpoint.
    #[serde(default = "default_metrics_listen")]
    pub listen: String,
}

fn default_metrics_listen() -> String {
    "127.0.0.1:9464".to_owned()
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: default_metrics_listen(),
        }
    }
}

/// `tally sink`'s settings. Each has a flag of the same name that overrides it
/// (`--batch-max-rows` over `sink.batch_max_rows`, ...). The store itself
/// (`--database` / `TALLY_SINK_DATABASE`) is not here: its URL may hold a password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Consumer group of the sink instances. Kafka only balances the partitions with
    /// it; the offsets live in the store.
    #[serde(default = "default_sink_group_id")]
    pub group_id: String,
    /// A batch is written once it holds this many rows (1 to 1 000 000)...
    #[serde(default = "default_sink_batch_max_rows")]
    pub batch_max_rows: usize,
    /// ...or once its oldest row waited this long, ms (positive). Rows reach the
    /// store within about this plus one transaction at low traffic.
    #[serde(default = "default_sink_batch_max_age_ms")]
    pub batch_max_age_ms: u64,
    /// Bound of every database round trip, ms (at least 100); a slower answer counts
    /// as an outage and the batch is retried.
    #[serde(default = "default_sink_db_timeout_ms")]
    pub db_timeout_ms: u64,
    /// Cap of the doubling back-off between retries of a batch, ms (at least 100).
    #[serde(default = "default_sink_retry_max_backoff_ms")]
    pub retry_max_backoff_ms: u64,
}

fn default_sink_group_id() -> String {
    "tally-sink".to_owned()
}
/// Large enough for throughput (per-statement and roll-up costs are shared by the
/// batch's rows: PostgreSQL at 10 M stored rows wrote 81 k rows/s in batches of 5 000
/// and 105 k in batches of 20 000), small enough that one transaction stays short
/// (about 0.2 s).
const fn default_sink_batch_max_rows() -> usize {
    20_000
}
/// Rows reach the store within about 2 s at low traffic.
const fn default_sink_batch_max_age_ms() -> u64 {
    1_000
}
/// Well above a healthy batch's transaction; below the consumer's poll interval.
const fn default_sink_db_timeout_ms() -> u64 {
    10_000
}
/// A recovering database is retried at least every 5 s.
const fn default_sink_retry_max_backoff_ms() -> u64 {
    5_000
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            group_id: default_sink_group_id(),
            batch_max_rows: default_sink_batch_max_rows(),
            batch_max_age_ms: default_sink_batch_max_age_ms(),
            db_timeout_ms: default_sink_db_timeout_ms(),
            retry_max_backoff_ms: default_sink_retry_max_backoff_ms(),
        }
    }
}

impl SinkConfig {
    /// Checks the fields; `name` turns a field name (`batch_max_rows`) into how the
    /// user set it (`sink.batch_max_rows`, or a flag), so errors name the source.
    pub fn validate_named(
        &self,
        name: impl Fn(&'static str) -> &'static str,
    ) -> Result<(), ConfigError> {
        if self.group_id.trim().is_empty() {
            return Err(invalid(name("group_id"), "must not be empty"));
        }
        if self.batch_max_rows == 0 || self.batch_max_rows > 1_000_000 {
            return Err(invalid(
                name("batch_max_rows"),
                "must be between 1 and 1000000",
            ));
        }
        if self.batch_max_age_ms == 0 {
            return Err(invalid(name("batch_max_age_ms"), "must be positive"));
        }
        if self.db_timeout_ms < 100 {
            return Err(invalid(name("db_timeout_ms"), "must be at least 100"));
        }
        if self.retry_max_backoff_ms < 100 {
            return Err(invalid(
                name("retry_max_backoff_ms"),
                "must be at least 100",
            ));
        }
        Ok(())
    }
}

/// The config file's name of a [`SinkConfig`] field.
fn sink_field(field: &'static str) -> &'static str {
    match field {
        "group_id" => "sink.group_id",
        "batch_max_rows" => "sink.batch_max_rows",
        "batch_max_age_ms" => "sink.batch_max_age_ms",
        "db_timeout_ms" => "sink.db_timeout_ms",
        "retry_max_backoff_ms" => "sink.retry_max_backoff_ms",
        _ => "sink",
    }
}

/// A configuration value that cannot work, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid config field `{field}`: {problem}")]
pub struct ConfigError {
    /// Dotted path of the field, e.g. `aggregator.window_ms`.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

fn invalid(field: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        problem: problem.into(),
    }
}

/// Fifteen minutes: every real time zone's offset is a multiple of it, so windows that
/// divide it roll up exactly into any zone's hours and days.
pub const WINDOW_DIVISOR_MS: i64 = 15 * 60 * 1000;

impl Config {
    /// Checks every field and every relation between fields; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.kafka.bootstrap_servers.trim().is_empty() {
            return Err(invalid("kafka.bootstrap_servers", "must not be empty"));
        }
        let topic_names = [
            ("topics.usage_events", &self.topics.usage_events),
            ("topics.billing_aggregates", &self.topics.billing_aggregates),
            ("topics.late", &self.topics.late),
            ("topics.dlq", &self.topics.dlq),
        ];
        for (index, (field, name)) in topic_names.iter().enumerate() {
            if name.is_empty()
                || name.len() > 249
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            {
                return Err(invalid(
                    field,
                    format!("{name:?} is not a valid Kafka topic name"),
                ));
            }
            if topic_names[..index].iter().any(|(_, other)| other == name) {
                return Err(invalid(field, format!("{name:?} is used by another topic")));
            }
        }
        if self.topics.partitions < 1 {
            return Err(invalid("topics.partitions", "must be at least 1"));
        }
        if self.topics.output_partitions < 1 {
            return Err(invalid("topics.output_partitions", "must be at least 1"));
        }
        if self.topics.replication_factor < 1 {
            return Err(invalid("topics.replication_factor", "must be at least 1"));
        }
        if self.topics.max_message_bytes < 1024 {
            return Err(invalid("topics.max_message_bytes", "must be at least 1024"));
        }
        if self.topics.max_message_bytes > i32::MAX - SIDE_TOPIC_EXTRA_BYTES {
            return Err(invalid(
                "topics.max_message_bytes",
                "leaves no room for usage.late and usage.dlq",
            ));
        }
        for (field, value) in [
            ("topics.retention_ms", self.topics.retention_ms),
            ("topics.side_retention_ms", self.topics.side_retention_ms),
        ] {
            if value < -1 || value == 0 {
                return Err(invalid(field, "must be -1 (unlimited) or positive"));
            }
        }
        let aggregator = &self.aggregator;
        if aggregator.group_id.is_empty() {
            return Err(invalid("aggregator.group_id", "must not be empty"));
        }
        if aggregator.window_ms <= 0 || WINDOW_DIVISOR_MS % aggregator.window_ms != 0 {
            return Err(invalid(
                "aggregator.window_ms",
                format!(
                    "{} must be positive and divide 15 minutes (900000 ms)",
                    aggregator.window_ms
                ),
            ));
        }
        for (field, value) in [
            (
                "aggregator.max_out_of_orderness_ms",
                aggregator.max_out_of_orderness_ms,
            ),
            (
                "aggregator.allowed_lateness_ms",
                aggregator.allowed_lateness_ms,
            ),
            (
                "aggregator.correction_horizon_ms",
                aggregator.correction_horizon_ms,
            ),
            ("aggregator.dedupe_horizon_ms", aggregator.dedupe_horizon_ms),
        ] {
            if value < 0 {
                return Err(invalid(field, "must not be negative"));
            }
        }
        let needed = aggregator
            .allowed_lateness_ms
            .saturating_add(aggregator.correction_horizon_ms);
        if aggregator.dedupe_horizon_ms < needed {
            return Err(invalid(
                "aggregator.dedupe_horizon_ms",
                format!(
                    "{} is shorter than allowed_lateness_ms + correction_horizon_ms = {needed}: duplicates of correctable events would be counted twice",
                    aggregator.dedupe_horizon_ms
                ),
            ));
        }
        if aggregator.worker_threads > MAX_WORKER_THREADS {
            return Err(invalid(
                "aggregator.worker_threads",
                format!("must be at most {MAX_WORKER_THREADS} (0 = one per core)"),
            ));
        }
        if aggregator.idle_timeout_ms <= 0 {
            return Err(invalid("aggregator.idle_timeout_ms", "must be positive"));
        }
        if aggregator.commit_interval_ms <= 0 {
            return Err(invalid("aggregator.commit_interval_ms", "must be positive"));
        }
        if aggregator.transaction_timeout_ms < aggregator.commit_interval_ms.saturating_mul(2) {
            return Err(invalid(
                "aggregator.transaction_timeout_ms",
                "must be at least twice commit_interval_ms, or transactions time out before they commit",
            ));
        }
        if aggregator.contracts_path.is_empty() {
            return Err(invalid("aggregator.contracts_path", "must not be empty"));
        }
        if self.validation.max_tokens_per_kind == 0 {
            return Err(invalid(
                "validation.max_tokens_per_kind",
                "must be positive",
            ));
        }
        if self.validation.max_event_time_ahead_ms < 0 {
            return Err(invalid(
                "validation.max_event_time_ahead_ms",
                "must not be negative",
            ));
        }
        if self.validation.max_event_time_behind_ms < 0 {
            return Err(invalid(
                "validation.max_event_time_behind_ms",
                "must not be negative",
            ));
        }
        if self.validation.max_dimension_bytes == 0 {
            return Err(invalid(
                "validation.max_dimension_bytes",
                "must be positive: tenant_id and model are never empty",
            ));
        }
        if self.topics.input_timestamp_after_max_ms < 0 {
            return Err(invalid(
                "topics.input_timestamp_after_max_ms",
                "must not be negative",
            ));
        }
        self.sink.validate_named(sink_field)?;
        Ok(())
    }

    /// The `message.timestamp.after.max.ms` that billing.aggregates, usage.late and
    /// usage.dlq need: [`output_timestamp_after_max_ms`] of this configuration.
    pub fn output_timestamp_after_max_ms(&self) -> i64 {
        output_timestamp_after_max_ms(
            self.topics.input_timestamp_after_max_ms,
            self.validation.max_event_time_ahead_ms,
            self.aggregator.window_ms,
        )
    }

    /// The largest billing row the limits and `contracts` allow: every dimension at
    /// `validation.max_dimension_bytes`, the longest currency and version labels, the
    /// share rule with the largest encoded beneficiaries, the input topic's name.
    pub fn row_size_bound(&self, contracts: &Contracts) -> RowSizeBound {
        let dimension_bytes = limit_usize(self.validation.max_dimension_bytes);
        let price_books = contracts.price_book();
        let share_rules = contracts.share_rules();
        let limits = AggregateSizeLimits {
            dimension_bytes,
            currency_bytes: price_books
                .iter()
                .map(|version| version.currency().len())
                .max()
                .unwrap_or(0),
            price_book_version_bytes: price_books
                .iter()
                .map(|version| version.version().len())
                .max()
                .unwrap_or(0),
            share_rule_version_bytes: share_rules
                .iter()
                .map(|version| version.version().len())
                .max()
                .unwrap_or(0),
            source_topic_bytes: self.topics.usage_events.len(),
            shares_bytes: share_rules
                .iter()
                .flat_map(|version| version.rules())
                .map(|rule| {
                    shares_encoded_len(
                        rule.beneficiaries
                            .iter()
                            .map(|beneficiary| beneficiary.partner.len()),
                    )
                })
                .max()
                .unwrap_or(0),
        };
        let value_bytes = aggregate_encoded_len_bound(&limits);
        RowSizeBound {
            value_bytes,
            record_bytes: value_bytes
                .saturating_add(2 * ROW_ID_BYTES)
                .saturating_add(KAFKA_RECORD_OVERHEAD_BYTES),
        }
    }

    /// Checks the configuration against the contracts it runs with: no accepted event
    /// can make a billing row larger than `topics.max_message_bytes` (the aggregates
    /// topic's `max.message.bytes`), and every model the price book prices and every
    /// channel partner a share rule names fits `validation.max_dimension_bytes` (else
    /// its events could only be rejected). Returns the row bound.
    pub fn check_contracts(&self, contracts: &Contracts) -> Result<RowSizeBound, ConfigError> {
        let dimension_bytes = limit_usize(self.validation.max_dimension_bytes);
        for version in contracts.price_book() {
            if let Some((model, _)) = version
                .models()
                .find(|(model, _)| model.len() > dimension_bytes)
            {
                return Err(invalid(
                    "validation.max_dimension_bytes",
                    format!(
                        "{dimension_bytes} is shorter than model {model:?} of price-book version {:?} ({} bytes): its events would all be rejected",
                        version.version(),
                        model.len()
                    ),
                ));
            }
        }
        for version in contracts.share_rules() {
            let long_partner = version
                .rules()
                .iter()
                .filter_map(|rule| rule.channel_partner.as_deref())
                .find(|partner| partner.len() > dimension_bytes);
            if let Some(partner) = long_partner {
                return Err(invalid(
                    "validation.max_dimension_bytes",
                    format!(
                        "{dimension_bytes} is shorter than channel partner {partner:?} of share-rule version {:?} ({} bytes): its events would all be rejected",
                        version.version(),
                        partner.len()
                    ),
                ));
            }
        }
        let bound = self.row_size_bound(contracts);
        let max_message_bytes = usize::try_from(self.topics.max_message_bytes).unwrap_or(0);
        if bound.record_bytes > max_message_bytes {
            return Err(invalid(
                "topics.max_message_bytes",
                format!(
                    "{max_message_bytes} is smaller than the largest billing row the limits allow ({} bytes as a Kafka record: every dimension at validation.max_dimension_bytes = {dimension_bytes}, the contracts' longest versions and largest share rule): raise topics.max_message_bytes or lower validation.max_dimension_bytes",
                    bound.record_bytes
                ),
            ));
        }
        Ok(bound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{BillingAggregate, Dims, PartnerShare, RowKind};

    #[test]
    fn sink_section_parses_and_its_impossible_values_name_the_field() {
        let config: Config =
            toml::from_str("[sink]\nbatch_max_rows = 12\ngroup_id = \"s\"\n").expect("parses");
        assert_eq!(config.sink.batch_max_rows, 12);
        assert_eq!(config.sink.group_id, "s");
        assert_eq!(config.sink.db_timeout_ms, 10_000);
        assert!(toml::from_str::<Config>("[sink]\nbatch_rows = 12\n").is_err());
        type Spoil = fn(&mut SinkConfig);
        let cases: [(&str, Spoil); 5] = [
            ("sink.group_id", |sink| sink.group_id = " ".to_owned()),
            ("sink.batch_max_rows", |sink| sink.batch_max_rows = 0),
            ("sink.batch_max_age_ms", |sink| sink.batch_max_age_ms = 0),
            ("sink.db_timeout_ms", |sink| sink.db_timeout_ms = 99),
            ("sink.retry_max_backoff_ms", |sink| {
                sink.retry_max_backoff_ms = 0;
            }),
        ];
        for (field, spoil) in cases {
            let mut config = Config::default();
            spoil(&mut config.sink);
            assert_eq!(config.validate().map_err(|error| error.field), Err(field));
        }
    }
    use crate::codec::{decode_aggregate, encode_aggregate};
    use crate::event::{Cloud, TokenCounts};
    // The fixture's largest share rule (by encoded size) is the aws/"p" rule with
    // three beneficiaries; the fallback rule has one with a longer name.
    use crate::test_fixtures::contracts;

    #[test]
    fn output_timestamp_bound_adds_input_bound_skew_and_one_window() {
        let config = Config::default();
        // 1 h (Kafka 4's default) + 5 min of allowed skew + a 1 min window.
        assert_eq!(config.output_timestamp_after_max_ms(), 3_960_000);
        assert_eq!(output_timestamp_after_max_ms(100, 20, 3), 123);
        assert_eq!(output_timestamp_after_max_ms(i64::MAX, 1, 1), i64::MAX);
    }

    #[test]
    fn a_worst_case_row_encodes_to_exactly_the_bound() {
        let mut config = Config::default();
        config.validation.max_dimension_bytes = 300;
        config.topics.usage_events = "u".repeat(249);
        let contracts = contracts();
        let bound = config.row_size_bound(&contracts);
        let at_limit = |c: char| c.to_string().repeat(300);
        // Every text at its limit, every number at its widest varint, the rule with
        // the most encoded beneficiaries (three: alpha, beta, gamma-partners).
        let row = BillingAggregate {
            id: "f".repeat(32),
            window_start_ms: i64::MIN,
            window_end_ms: i64::MAX,
            dims: Dims {
                tenant_id: at_limit('t'),
                model: at_limit('m'),
                cloud: Cloud::Oracle,
                channel_partner: Some(at_limit('p')),
                region: at_limit('r'),
            },
            row_kind: RowKind::NonBillable,
            correction_seq: u32::MAX,
            event_count: u64::MAX,
            tokens: TokenCounts {
                input: u64::MAX,
                cached_input: u64::MAX,
                output: u64::MAX,
                reasoning: u64::MAX,
            },
            currency: "USD".to_owned(),
            gross_micros: i64::MIN,
            shares: ["alpha", "beta", "gamma-partners"]
                .into_iter()
                .map(|beneficiary| PartnerShare {
                    beneficiary: beneficiary.to_owned(),
                    basis_points: u32::MAX,
                    amount_micros: i64::MIN,
                })
                .collect(),
            net_micros: i64::MIN,
            price_book_version: "2025-02-renegotiated".to_owned(),
            share_rule_version: "2025-01".to_owned(),
            source_topic: config.topics.usage_events.clone(),
            source_partition: i32::MIN,
            first_offset: i64::MIN,
            last_offset: i64::MIN,
            first_event_time_ms: i64::MIN,
            last_event_time_ms: i64::MIN,
        };
        let mut encoded = Vec::new();
        encode_aggregate(&row, &mut encoded);
        assert!(decode_aggregate(&encoded).is_ok(), "a valid row");
        // Counted by hand: frame 5; id 1 + 32; 13 longs × 10; 2 ints × 5; 2 enums;
        // 4 dims × (2 + 300) + 1 union branch; "USD" 1 + 3; versions 1 + 20 and
        // 1 + 7; topic 2 + 249; shares: count 1, names 1 + 5, 1 + 4, 1 + 14, each
        // with an int (5) and a long (10), then the terminating 0.
        let by_hand = 5
            + 33
            + 130
            + 10
            + 2
            + (4 * 302 + 1)
            + 4
            + 21
            + 8
            + 251
            + (1 + (6 + 15) + (5 + 15) + (15 + 15))
            + 1;
        assert_eq!(encoded.len(), by_hand);
        assert_eq!(bound.value_bytes, by_hand, "the bound is attained");
        assert_eq!(bound.record_bytes, by_hand + 32 + 93);
        // A row with fewer shares (the fallback rule's one) is smaller.
        let mut fallback = row.clone();
        fallback.shares = vec![PartnerShare {
            beneficiary: "a-partner-with-a-long-name-0123456789".to_owned(),
            basis_points: u32::MAX,
            amount_micros: i64::MIN,
        }];
        encoded.clear();
        encode_aggregate(&fallback, &mut encoded);
        assert!(encoded.len() < bound.value_bytes);
    }

    proptest::proptest! {
        /// Any row the limits and the contracts allow encodes within the bound.
        #[test]
        fn rows_within_the_limits_encode_within_the_bound(
            dims in proptest::collection::vec("\\PC{0,40}", 4),
            partner in proptest::option::of(0_usize..3),
            rule in 0_usize..2,
            numbers in proptest::collection::vec(proptest::num::i64::ANY, 13),
            small in proptest::collection::vec(proptest::num::u32::ANY, 3),
        ) {
            let mut config = Config::default();
            config.validation.max_dimension_bytes = 40 * 4; // a 40-char text is ≤ 160 bytes
            let contracts = contracts();
            let bound = config.row_size_bound(&contracts);
            let beneficiaries = if rule == 0 {
                vec!["a-partner-with-a-long-name-0123456789"]
            } else {
                vec!["alpha", "beta", "gamma-partners"]
            };
            let unsigned = |value: i64| value.unsigned_abs();
            let row = BillingAggregate {
                id: "0".repeat(32),
                window_start_ms: numbers[0],
                window_end_ms: numbers[1],
                dims: Dims {
                    tenant_id: dims[0].clone(),
                    model: dims[1].clone(),
                    cloud: Cloud::Aws,
                    channel_partner: partner.map(|_| dims[2].clone()),
                    region: dims[3].clone(),
                },
                row_kind: RowKind::Billable,
                correction_seq: small[0],
                event_count: unsigned(numbers[2]),
                tokens: TokenCounts {
                    input: unsigned(numbers[3]),
                    cached_input: unsigned(numbers[4]),
                    output: unsigned(numbers[5]),
                    reasoning: unsigned(numbers[6]),
                },
                currency: "USD".to_owned(),
                gross_micros: numbers[7],
                shares: beneficiaries
                    .into_iter()
                    .map(|beneficiary| PartnerShare {
                        beneficiary: beneficiary.to_owned(),
                        basis_points: small[1],
                        amount_micros: numbers[8],
                    })
                    .collect(),
                net_micros: numbers[9],
                price_book_version: "2025-01".to_owned(),
                share_rule_version: "2025-01".to_owned(),
                source_topic: config.topics.usage_events.clone(),
                source_partition: i32::try_from(small[2] >> 1).unwrap_or(i32::MAX),
                first_offset: numbers[10],
                last_offset: numbers[11],
                first_event_time_ms: numbers[12],
                last_event_time_ms: numbers[0],
            };
            let mut encoded = Vec::new();
            encode_aggregate(&row, &mut encoded);
            proptest::prop_assert!(encoded.len() <= bound.value_bytes);
        }
    }

    #[test]
    fn the_defaults_fit_a_row_in_the_default_message_size() {
        let bound = Config::default()
            .check_contracts(&contracts())
            .expect("defaults fit");
        assert!(bound.record_bytes < 2_000, "{bound:?}");
    }

    #[test]
    fn dimension_limits_that_let_a_row_outgrow_the_topic_name_the_field() {
        let mut config = Config::default();
        // Four dims of 300 000 bytes: 1.2 MB, more than the 1 MiB default.
        config.validation.max_dimension_bytes = 300_000;
        let error = config
            .check_contracts(&contracts())
            .expect_err("rows could exceed the topic's limit");
        assert_eq!(error.field, "topics.max_message_bytes");
        assert!(error.to_string().contains("validation.max_dimension_bytes"));
        // Raising the topic's limit fixes it.
        config.topics.max_message_bytes = 1_300_000;
        assert!(config.check_contracts(&contracts()).is_ok());
    }

    #[test]
    fn a_dimension_limit_shorter_than_a_priced_model_names_the_field() {
        let mut config = Config::default();
        config.validation.max_dimension_bytes = 10; // "atlas-large" is 11 bytes
        let error = config
            .check_contracts(&contracts())
            .expect_err("atlas-large could never be billed");
        assert_eq!(error.field, "validation.max_dimension_bytes");
        assert!(error.problem.contains("atlas-large"), "{error}");
    }

    #[test]
    fn new_limits_are_checked_and_named() {
        let mut config = Config::default();
        config.validation.max_dimension_bytes = 0;
        assert_eq!(
            config.validate().expect_err("zero").field,
            "validation.max_dimension_bytes"
        );
        let mut config = Config::default();
        config.topics.input_timestamp_after_max_ms = -1;
        assert_eq!(
            config.validate().expect_err("negative").field,
            "topics.input_timestamp_after_max_ms"
        );
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(Config::default().validate(), Ok(()));
    }

    #[test]
    fn window_that_does_not_divide_fifteen_minutes_names_the_field() {
        let mut config = Config::default();
        config.aggregator.window_ms = 7 * 60_000;
        let error = config.validate().expect_err("7 minutes does not divide 15");
        assert_eq!(error.field, "aggregator.window_ms");
        assert!(error.to_string().contains("aggregator.window_ms"));
    }

    #[test]
    fn short_dedupe_horizon_names_the_field() {
        let mut config = Config::default();
        config.aggregator.dedupe_horizon_ms = 1;
        assert_eq!(
            config.validate().expect_err("too short").field,
            "aggregator.dedupe_horizon_ms"
        );
    }

    #[test]
    fn duplicate_topic_names_name_the_field() {
        let mut config = Config::default();
        config.topics.dlq = config.topics.late.clone();
        assert_eq!(
            config.validate().expect_err("same name").field,
            "topics.dlq"
        );
    }
}
