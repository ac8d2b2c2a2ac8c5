//! Configuration types: one TOML file, overridable from the environment.
//!
//! Every struct denies unknown fields, so a typo fails at start with the field's name
//! instead of being ignored. Units are in the field names (`_ms`, `_bytes`). Defaults
//! are `const fn`s that say where the number comes from. Loading the file (I/O) is the
//! binary's job; cross-field checks happen once, in [`Config::validate`], and name the
//! field at fault.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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
    /// replay warms up from them. Same partition count and retention as usage.events.
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

/// Plausibility bounds (see [`ValidationLimits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationConfig {
    /// Largest plausible count of one token kind in one request.
    #[serde(default = "default_max_tokens_per_kind")]
    pub max_tokens_per_kind: u64,
    /// How far event time may lie ahead of the record's Kafka timestamp.
    #[serde(default = "default_max_event_time_ahead_ms")]
    pub max_event_time_ahead_ms: i64,
    /// How far event time may lie behind the record's Kafka timestamp.
    #[serde(default = "default_max_event_time_behind_ms")]
    pub max_event_time_behind_ms: i64,
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

impl Default for ValidationConfig {
    fn default() -> Self {
        ValidationConfig {
            max_tokens_per_kind: default_max_tokens_per_kind(),
            max_event_time_ahead_ms: default_max_event_time_ahead_ms(),
            max_event_time_behind_ms: default_max_event_time_behind_ms(),
        }
    }
}

impl From<ValidationConfig> for ValidationLimits {
    fn from(config: ValidationConfig) -> Self {
        ValidationLimits {
            max_tokens_per_kind: config.max_tokens_per_kind,
            max_event_time_ahead_ms: config.max_event_time_ahead_ms,
            max_event_time_behind_ms: config.max_event_time_behind_ms,
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
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
