//! The typed, idempotent producer gateways use to write `usage.events`.
//!
//! [`UsageProducer`] wraps librdkafka's producer (rdkafka's `ThreadedProducer`: a
//! dedicated thread polls delivery reports) with the settings the pipeline's contract
//! depends on, and encodes [`UsageEvent`]s with tally-core's codec.
//!
//! # Settings
//!
//! The caller passes an `rdkafka::ClientConfig` with the bootstrap servers and any
//! pass-through settings (TLS, SASL, client id, ...). On top of it the producer
//! **forces** `enable.idempotence=true`, `acks=all` and `partitioner=murmur2_random`
//! (the Java client's partitioner, so every gateway language sends a tenant to the same
//! partition); a caller value that contradicts them is an error, not silently replaced.
//! It **defaults**, unless the caller set them, `linger.ms=5`, `batch.size=1000000` and
//! `compression.type=lz4`. The local queue bound `queue.buffering.max.messages` comes
//! from [`ProducerOptions::max_queued_messages`].
//!
//! # Backpressure
//!
//! `send*` enqueue into librdkafka's local queue and return without waiting for the
//! broker. When the queue is full they wait (sleeping 1 ms, doubling up to 50 ms, while
//! the polling thread serves delivery reports) and retry, for at most
//! [`ProducerOptions::queue_full_timeout`]; then they return
//! [`ProduceError::QueueFull`]. So `send` blocks only while the queue is full, and never
//! longer than that timeout. In async code, either accept that bound on a worker thread
//! or call `send` from `spawn_blocking` when sustained overload is expected.
//!
//! # Delivery results
//!
//! The producer's context counts delivered and failed records and keeps the
//! first failure. [`UsageProducer::flush_blocking`] waits for every enqueued record and
//! returns [`ProduceError::Delivery`] if any record failed since the producer was
//! created: failures are sticky, a later successful flush does not hide an earlier
//! loss. A fatal librdkafka error (the idempotent producer's sequence guarantees are
//! broken) is kept too; every later `send` fails with it.
//!
//! # Ordering and idempotence
//!
//! Idempotence gives each partition's records a producer id and sequence numbers: the
//! broker drops retried duplicates and keeps the records of one producer in one
//! partition in send order, even with retries and up to five in-flight requests. It
//! does not make a gateway's re-send of the same event (after a crash, say) a no-op:
//! that is what `event_id` and the aggregator's dedupe are for.
//!
//! # Shutdown
//!
//! Call [`UsageProducer::flush_blocking`] (or [`UsageProducer::flush`] from async code,
//! which runs it on the blocking pool) before dropping the producer. Dropping it without
//! a flush **purges** records still queued or in flight (librdkafka's purge, then a
//! 500 ms drain of delivery reports): they are lost, and counted as failed.
//!
//! # Metrics
//!
//! Recorded through the `metrics` facade, so a gateway that installs an exporter gets
//! them; names in [`metric_names`], HELP text from [`describe_metrics`]:
//! records enqueued (sent), delivered, delivery failures by `reason` (one of
//! [`FAILURE_REASONS`]), queue-full waits, the queue depth (enqueued, neither delivered
//! nor failed yet) and the delivery latency histogram (enqueue to the broker's
//! acknowledgement or the failure; give the exporter
//! [`DELIVERY_LATENCY_SECONDS_BUCKETS`], or it renders a summary). Every series exists
//! at 0 from the moment a producer is created, so dashboards and alerts see them before
//! the first record. The hot path uses handles registered at creation: no labelled
//! macro per record.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use metrics::{Counter, Gauge, Histogram};
use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use tally_core::codec::{SchemaId, encode_tick, encode_usage_event};
use tally_core::event::{UsageEvent, UsageTick};

/// The input topic of the pipeline.
pub const DEFAULT_TOPIC: &str = "usage.events";

/// Metric names of the producer.
pub mod metric_names {
    /// Records accepted into the local queue.
    pub const RECORDS_ENQUEUED: &str = "tally_producer_records_enqueued_total";
    /// Records the broker acknowledged.
    pub const RECORDS_DELIVERED: &str = "tally_producer_records_delivered_total";
    /// Records that failed delivery (after librdkafka's retries, or purged), by
    /// `reason`.
    pub const DELIVERY_FAILURES: &str = "tally_producer_delivery_failures_total";
    /// Times `send` found the local queue full and waited.
    pub const QUEUE_FULL_WAITS: &str = "tally_producer_queue_full_waits_total";
    /// Records enqueued and neither delivered nor failed yet.
    pub const QUEUE_DEPTH: &str = "tally_producer_queue_records";
    /// Seconds from enqueueing a record to its delivery report.
    pub const DELIVERY_LATENCY: &str = "tally_producer_delivery_latency_seconds";
}

/// Buckets of [`metric_names::DELIVERY_LATENCY`], seconds: from a record acknowledged
/// within a linger (5 ms) to librdkafka's default message timeout (300 s).
pub const DELIVERY_LATENCY_SECONDS_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 300.0,
];

/// The `reason` label values of [`metric_names::DELIVERY_FAILURES`].
pub const FAILURE_REASONS: [&str; 7] = [
    "timed_out",
    "purged",
    "too_large",
    "unknown_topic",
    "not_authorized",
    "fatal",
    "other",
];

/// The `reason` of a failed delivery, from librdkafka's error code (never its text).
pub fn failure_reason(error: &KafkaError) -> &'static str {
    match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageTimedOut) => "timed_out",
        Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight) => "purged",
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize) => {
            "too_large"
        }
        Some(
            RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::UnknownPartition,
        ) => "unknown_topic",
        Some(
            RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed,
        ) => "not_authorized",
        Some(RDKafkaErrorCode::Fatal) => "fatal",
        _ => "other",
    }
}

/// Registers HELP text for the producer's metrics with the installed recorder.
pub fn describe_metrics() {
    metrics::describe_counter!(
        metric_names::RECORDS_ENQUEUED,
        "Records accepted into the producer's local queue."
    );
    metrics::describe_counter!(
        metric_names::RECORDS_DELIVERED,
        "Records acknowledged by the broker."
    );
    metrics::describe_counter!(
        metric_names::DELIVERY_FAILURES,
        "Records that failed delivery, by reason."
    );
    metrics::describe_counter!(
        metric_names::QUEUE_FULL_WAITS,
        "Times a send waited because the local queue was full."
    );
    metrics::describe_gauge!(
        metric_names::QUEUE_DEPTH,
        "Records enqueued and neither delivered nor failed yet."
    );
    metrics::describe_histogram!(
        metric_names::DELIVERY_LATENCY,
        metrics::Unit::Seconds,
        "Seconds from enqueueing a record to its delivery report."
    );
}

/// Settings of a [`UsageProducer`] besides the librdkafka client config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerOptions {
    /// Topic to write.
    pub topic: String,
    /// UsageEvent writer schema for [`UsageProducer::send`].
    pub schema: SchemaId,
    /// Bound of librdkafka's local queue (`queue.buffering.max.messages`).
    pub max_queued_messages: u32,
    /// Longest a send waits for room in a full local queue.
    pub queue_full_timeout: Duration,
}

impl ProducerOptions {
    /// librdkafka's own default queue bound.
    pub const DEFAULT_MAX_QUEUED_MESSAGES: u32 = 100_000;
    /// Default wait for room in a full queue: long enough to ride out a leader election.
    pub const DEFAULT_QUEUE_FULL_TIMEOUT: Duration = Duration::from_secs(30);

    /// Defaults for `topic`: UsageEvent v1, librdkafka's queue bound, 30 s queue-full wait.
    pub fn new(topic: impl Into<String>) -> ProducerOptions {
        ProducerOptions {
            topic: topic.into(),
            schema: SchemaId::UsageEventV1,
            max_queued_messages: Self::DEFAULT_MAX_QUEUED_MESSAGES,
            queue_full_timeout: Self::DEFAULT_QUEUE_FULL_TIMEOUT,
        }
    }
}

impl Default for ProducerOptions {
    fn default() -> Self {
        ProducerOptions::new(DEFAULT_TOPIC)
    }
}

/// Why producing failed.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// The caller's client config contradicts a setting the contract requires.
    #[error("producer setting {key}={value} conflicts with the required {required}")]
    ConflictingSetting {
        /// The setting.
        key: &'static str,
        /// The caller's value.
        value: String,
        /// The required value.
        required: &'static str,
    },
    /// The UsageEvent schema is not a UsageEvent schema.
    #[error("schema id {id} is not a UsageEvent schema")]
    NotAUsageSchema {
        /// The id given.
        id: u32,
    },
    /// librdkafka refused the configuration.
    #[error("could not create the kafka producer")]
    Create(#[source] KafkaError),
    /// The local queue stayed full for the whole queue-full timeout.
    #[error("local producer queue stayed full for {waited_ms} ms")]
    QueueFull {
        /// How long the send waited.
        waited_ms: u64,
    },
    /// librdkafka refused a record for another reason than a full queue.
    #[error("could not enqueue a record")]
    Enqueue(#[source] KafkaError),
    /// The producer hit a fatal error; it cannot send any more.
    #[error("the producer hit a fatal error")]
    Fatal(#[source] KafkaError),
    /// Records failed delivery.
    #[error("{failed} of {enqueued} records failed delivery")]
    Delivery {
        /// Records that failed.
        failed: u64,
        /// Records enqueued.
        enqueued: u64,
        /// The first failure.
        #[source]
        first: KafkaError,
    },
    /// A flush ran out of time with records still in flight.
    #[error("flush timed out with {in_flight} records in flight")]
    FlushTimeout {
        /// Records neither delivered nor failed yet.
        in_flight: i32,
    },
    /// A flush failed for another reason.
    #[error("flush failed")]
    Flush(#[source] KafkaError),
    /// Topic metadata could not be read.
    #[error("could not read metadata of topic {topic}")]
    Metadata {
        /// The topic.
        topic: String,
        /// The error.
        #[source]
        source: KafkaError,
    },
    /// The topic does not exist (or has no partitions).
    #[error("topic {topic} does not exist")]
    TopicMissing {
        /// The topic.
        topic: String,
    },
    /// A blocking task panicked or was cancelled.
    #[error("the blocking producer task did not complete")]
    TaskFailed(#[source] tokio::task::JoinError),
}

/// Counts of a producer's records so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryStats {
    /// Accepted into the local queue.
    pub enqueued: u64,
    /// Acknowledged by the broker.
    pub delivered: u64,
    /// Failed delivery.
    pub failed: u64,
}

/// The producer's librdkafka context: counts delivery reports, keeps the first failure,
/// and forwards librdkafka's logs and errors to `tracing`.
struct DeliveryTracker {
    enqueued: AtomicU64,
    delivered: AtomicU64,
    failed: AtomicU64,
    first_failure: Mutex<Option<KafkaError>>,
    fatal: AtomicBool,
    /// Origin of the enqueue times carried as delivery opaques (µs after it).
    created: Instant,
    delivered_counter: Counter,
    /// One per [`FAILURE_REASONS`] entry, in that order.
    failed_counters: [Counter; FAILURE_REASONS.len()],
    queue_depth: Gauge,
    latency: Histogram,
}

impl DeliveryTracker {
    fn new() -> DeliveryTracker {
        let failed_counters = FAILURE_REASONS
            .map(|reason| metrics::counter!(metric_names::DELIVERY_FAILURES, "reason" => reason));
        for counter in &failed_counters {
            counter.increment(0);
        }
        let delivered_counter = metrics::counter!(metric_names::RECORDS_DELIVERED);
        delivered_counter.increment(0);
        let queue_depth = metrics::gauge!(metric_names::QUEUE_DEPTH);
        queue_depth.set(0.0);
        DeliveryTracker {
            enqueued: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            first_failure: Mutex::new(None),
            fatal: AtomicBool::new(false),
            created: Instant::now(),
            delivered_counter,
            failed_counters,
            queue_depth,
            latency: metrics::histogram!(metric_names::DELIVERY_LATENCY),
        }
    }

    /// The delivery opaque of a record enqueued now: µs since `created`.
    fn enqueue_stamp(&self) -> usize {
        usize::try_from(self.created.elapsed().as_micros()).unwrap_or(usize::MAX)
    }

    /// Records one delivery report of a record stamped `stamp`.
    fn record_latency(&self, stamp: usize) {
        let now = self.created.elapsed().as_micros();
        let micros = now.saturating_sub(stamp as u128);
        self.latency.record(micros as f64 / 1_000_000.0);
    }

    /// Sets the queue-depth gauge from the counts.
    fn update_queue_depth(&self) {
        let stats = self.stats();
        let depth = stats
            .enqueued
            .saturating_sub(stats.delivered.saturating_add(stats.failed));
        self.queue_depth.set(depth as f64);
    }

    fn keep_failure(&self, error: &KafkaError) {
        // A poisoned lock only means another thread panicked while storing an error;
        // the stored value is still a valid Option.
        let mut first = self
            .first_failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if first.is_none() {
            *first = Some(error.clone());
        }
    }

    fn first_failure(&self) -> Option<KafkaError> {
        self.first_failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Current counts.
    fn stats(&self) -> DeliveryStats {
        DeliveryStats {
            enqueued: self.enqueued.load(Ordering::Acquire),
            delivered: self.delivered.load(Ordering::Acquire),
            failed: self.failed.load(Ordering::Acquire),
        }
    }
}

impl ClientContext for DeliveryTracker {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        match level {
            // Broker connection failures (refused, disconnected, all brokers down):
            // librdkafka reconnects and retries the messages by itself; a delivery that
            // finally fails is counted and reported through `delivery`.
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
                if facility == "FAIL" =>
            {
                tracing::warn!(target: "librdkafka", facility, "{message}");
            }
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", facility, "{message}");
            }
            RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", facility, "{message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", facility, "{message}");
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            tracing::error!(%error, reason, "producer fatal error");
            self.keep_failure(&error);
            self.fatal.store(true, Ordering::Release);
        } else {
            tracing::warn!(%error, reason, "producer error");
        }
    }
}

impl ProducerContext for DeliveryTracker {
    /// When the record was enqueued ([`DeliveryTracker::enqueue_stamp`]).
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, stamp: usize) {
        self.record_latency(stamp);
        match result {
            Ok(_) => {
                self.delivered.fetch_add(1, Ordering::AcqRel);
                self.delivered_counter.increment(1);
            }
            Err((error, _)) => {
                self.keep_failure(error);
                self.failed.fetch_add(1, Ordering::AcqRel);
                let reason = failure_reason(error);
                let index = FAILURE_REASONS
                    .iter()
                    .position(|known| *known == reason)
                    .unwrap_or(FAILURE_REASONS.len() - 1);
                self.failed_counters[index].increment(1);
            }
        }
        self.update_queue_depth();
    }
}

/// Settings forced on every producer, with the values accepted for them.
const REQUIRED_SETTINGS: [(&str, &str, &[&str]); 4] = [
    ("enable.idempotence", "true", &["true"]),
    ("acks", "all", &["all", "-1"]),
    ("request.required.acks", "all", &["all", "-1"]),
    ("partitioner", "murmur2_random", &["murmur2_random"]),
];

/// Settings defaulted unless the caller set them (or an alias of them).
const DEFAULT_SETTINGS: [(&[&str], &str); 3] = [
    (&["linger.ms", "queue.buffering.max.ms"], "5"),
    (&["batch.size"], "1000000"),
    (&["compression.type", "compression.codec"], "lz4"),
];

/// Applies the forced and default settings to a copy of the caller's config.
pub fn producer_client_config(
    base: &ClientConfig,
    options: &ProducerOptions,
) -> Result<ClientConfig, ProduceError> {
    let mut config = base.clone();
    for (key, required, accepted) in REQUIRED_SETTINGS {
        if let Some(value) = config.get(key)
            && !accepted.contains(&value)
        {
            return Err(ProduceError::ConflictingSetting {
                key,
                value: value.to_owned(),
                required,
            });
        }
    }
    config.remove("request.required.acks");
    config.set("enable.idempotence", "true");
    config.set("acks", "all");
    config.set("partitioner", "murmur2_random");
    for (aliases, value) in DEFAULT_SETTINGS {
        if aliases.iter().all(|alias| config.get(alias).is_none()) {
            config.set(aliases[0], value);
        }
    }
    config.set(
        "queue.buffering.max.messages",
        options.max_queued_messages.to_string(),
    );
    Ok(config)
}

/// A typed, idempotent producer of UsageEvents. Cheap to clone: clones share one
/// librdkafka producer and one delivery tracker.
#[derive(Clone)]
pub struct UsageProducer {
    inner: ThreadedProducer<DeliveryTracker>,
    topic: Arc<str>,
    schema: SchemaId,
    queue_full_timeout: Duration,
    enqueued_counter: Counter,
    queue_full_counter: Counter,
}

impl std::fmt::Debug for UsageProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageProducer")
            .field("topic", &self.topic)
            .field("schema", &self.schema)
            .field("stats", &self.delivery_stats())
            .finish_non_exhaustive()
    }
}

impl UsageProducer {
    /// Creates a producer from the caller's client config (see the module docs for
    /// what is forced and defaulted).
    pub fn new(
        base: &ClientConfig,
        options: ProducerOptions,
    ) -> Result<UsageProducer, ProduceError> {
        if !matches!(
            options.schema,
            SchemaId::UsageEventV1 | SchemaId::UsageEventV2
        ) {
            return Err(ProduceError::NotAUsageSchema {
                id: options.schema.id(),
            });
        }
        let config = producer_client_config(base, &options)?;
        let inner: ThreadedProducer<DeliveryTracker> = config
            .create_with_context(DeliveryTracker::new())
            .map_err(ProduceError::Create)?;
        let enqueued_counter = metrics::counter!(metric_names::RECORDS_ENQUEUED);
        enqueued_counter.increment(0);
        let queue_full_counter = metrics::counter!(metric_names::QUEUE_FULL_WAITS);
        queue_full_counter.increment(0);
        Ok(UsageProducer {
            inner,
            topic: Arc::from(options.topic.as_str()),
            schema: options.schema,
            queue_full_timeout: options.queue_full_timeout,
            enqueued_counter,
            queue_full_counter,
        })
    }

    /// The topic written.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Encodes `event` and enqueues it with key = `tenant_id` and Kafka timestamp
    /// `timestamp_ms` (the send time). Does not wait for delivery.
    pub fn send(&self, event: &UsageEvent, timestamp_ms: i64) -> Result<(), ProduceError> {
        let mut value = Vec::with_capacity(192);
        encode_usage_event(event, self.schema, &mut value);
        self.enqueue(Some(event.tenant_id.as_bytes()), &value, timestamp_ms, None)
    }

    /// [`send`](Self::send) with the Kafka timestamp taken from the system clock, as a
    /// gateway does.
    pub fn send_now(&self, event: &UsageEvent) -> Result<(), ProduceError> {
        self.send(event, now_ms())
    }

    /// Enqueues raw bytes (partitioned by `key` with murmur2; a record without key goes
    /// to a random partition). For malformed test traffic and replays.
    pub fn send_raw(
        &self,
        key: Option<&[u8]>,
        payload: &[u8],
        timestamp_ms: i64,
    ) -> Result<(), ProduceError> {
        self.enqueue(key, payload, timestamp_ms, None)
    }

    /// Enqueues a watermark tick to `partition` (ticks have no key: they belong to a
    /// partition, not a tenant).
    pub fn send_tick(
        &self,
        partition: i32,
        tick: &UsageTick,
        timestamp_ms: i64,
    ) -> Result<(), ProduceError> {
        let mut value = Vec::with_capacity(16);
        encode_tick(tick, &mut value);
        self.enqueue(None, &value, timestamp_ms, Some(partition))
    }

    fn enqueue(
        &self,
        key: Option<&[u8]>,
        payload: &[u8],
        timestamp_ms: i64,
        partition: Option<i32>,
    ) -> Result<(), ProduceError> {
        let tracker = self.inner.context();
        if tracker.fatal.load(Ordering::Acquire) {
            let error = tracker
                .first_failure()
                .unwrap_or(KafkaError::MessageProduction(RDKafkaErrorCode::Fatal));
            return Err(ProduceError::Fatal(error));
        }
        let mut record: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(&self.topic, tracker.enqueue_stamp())
                .payload(payload)
                .timestamp(timestamp_ms);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(partition) = partition {
            record = record.partition(partition);
        }
        let mut started_waiting: Option<Instant> = None;
        let mut backoff = Duration::from_millis(1);
        loop {
            match self.inner.send(record) {
                Ok(()) => {
                    tracker.enqueued.fetch_add(1, Ordering::AcqRel);
                    self.enqueued_counter.increment(1);
                    tracker.update_queue_depth();
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    let started = *started_waiting.get_or_insert_with(|| {
                        self.queue_full_counter.increment(1);
                        Instant::now()
                    });
                    let waited = started.elapsed();
                    if waited >= self.queue_full_timeout {
                        return Err(ProduceError::QueueFull {
                            waited_ms: waited.as_millis() as u64,
                        });
                    }
                    std::thread::sleep(backoff.min(self.queue_full_timeout - waited));
                    backoff = (backoff * 2).min(Duration::from_millis(50));
                    record = returned;
                }
                Err((error, _)) => return Err(ProduceError::Enqueue(error)),
            }
        }
    }

    /// Counts of records so far.
    pub fn delivery_stats(&self) -> DeliveryStats {
        self.inner.context().stats()
    }

    /// Records enqueued but neither delivered nor failed yet.
    pub fn in_flight(&self) -> i32 {
        self.inner.in_flight_count()
    }

    /// Returns the first delivery failure, if any record failed so far.
    pub fn check_deliveries(&self) -> Result<DeliveryStats, ProduceError> {
        let tracker = self.inner.context();
        let stats = tracker.stats();
        if stats.failed > 0 || tracker.fatal.load(Ordering::Acquire) {
            let first = tracker
                .first_failure()
                .unwrap_or(KafkaError::MessageProduction(RDKafkaErrorCode::Fatal));
            return Err(ProduceError::Delivery {
                failed: stats.failed,
                enqueued: stats.enqueued,
                first,
            });
        }
        Ok(stats)
    }

    /// Waits up to `timeout` for every enqueued record to be delivered or failed, then
    /// reports: an error if any record failed since the producer was created.
    ///
    /// Blocks the calling thread: from async code use [`flush`](Self::flush) or
    /// `spawn_blocking`.
    pub fn flush_blocking(&self, timeout: Duration) -> Result<DeliveryStats, ProduceError> {
        match self.inner.flush(timeout) {
            Ok(()) => {}
            Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut)) => {
                return Err(ProduceError::FlushTimeout {
                    in_flight: self.in_flight(),
                });
            }
            Err(error) => return Err(ProduceError::Flush(error)),
        }
        self.check_deliveries()
    }

    /// [`flush_blocking`](Self::flush_blocking) on tokio's blocking pool.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future does not stop the flush: it runs to its timeout on the
    /// blocking pool, and nothing is lost. Calling `flush` again is safe.
    pub async fn flush(&self, timeout: Duration) -> Result<DeliveryStats, ProduceError> {
        let producer = self.clone();
        tokio::task::spawn_blocking(move || producer.flush_blocking(timeout))
            .await
            .map_err(ProduceError::TaskFailed)?
    }

    /// The topic's partition count from broker metadata. Blocks up to `timeout`.
    pub fn partition_count_blocking(&self, timeout: Duration) -> Result<usize, ProduceError> {
        let metadata = self
            .inner
            .client()
            .fetch_metadata(Some(&self.topic), timeout)
            .map_err(|source| ProduceError::Metadata {
                topic: self.topic.to_string(),
                source,
            })?;
        let topic = metadata
            .topics()
            .iter()
            .find(|topic| topic.name() == &*self.topic);
        match topic {
            Some(topic) if topic.error().is_none() && !topic.partitions().is_empty() => {
                Ok(topic.partitions().len())
            }
            _ => Err(ProduceError::TopicMissing {
                topic: self.topic.to_string(),
            }),
        }
    }
}

/// The system clock in UTC ms (0 if it is before the epoch).
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forces_idempotence_acks_and_partitioner() {
        let mut base = ClientConfig::new();
        base.set("bootstrap.servers", "localhost:9092")
            .set("security.protocol", "SASL_SSL");
        let config =
            producer_client_config(&base, &ProducerOptions::default()).expect("compatible config");
        assert_eq!(config.get("enable.idempotence"), Some("true"));
        assert_eq!(config.get("acks"), Some("all"));
        assert_eq!(config.get("partitioner"), Some("murmur2_random"));
        assert_eq!(config.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(config.get("queue.buffering.max.messages"), Some("100000"));
    }

    #[test]
    fn keeps_caller_overrides_of_defaults() {
        let mut base = ClientConfig::new();
        base.set("linger.ms", "50").set("compression.codec", "zstd");
        let config =
            producer_client_config(&base, &ProducerOptions::default()).expect("compatible config");
        assert_eq!(config.get("linger.ms"), Some("50"));
        assert_eq!(config.get("compression.codec"), Some("zstd"));
        assert_eq!(config.get("compression.type"), None);
        assert_eq!(config.get("batch.size"), Some("1000000"));
    }

    #[test]
    fn rejects_settings_that_break_the_contract() {
        for (key, value) in [
            ("enable.idempotence", "false"),
            ("acks", "1"),
            ("partitioner", "consistent_random"),
        ] {
            let mut base = ClientConfig::new();
            base.set(key, value);
            let error =
                producer_client_config(&base, &ProducerOptions::default()).expect_err("conflict");
            assert!(
                matches!(error, ProduceError::ConflictingSetting { key: found, .. } if found == key)
            );
        }
    }

    #[test]
    fn failure_reasons_come_from_the_error_code() {
        let cases = [
            (RDKafkaErrorCode::MessageTimedOut, "timed_out"),
            (RDKafkaErrorCode::PurgeQueue, "purged"),
            (RDKafkaErrorCode::PurgeInflight, "purged"),
            (RDKafkaErrorCode::MessageSizeTooLarge, "too_large"),
            (RDKafkaErrorCode::UnknownTopicOrPartition, "unknown_topic"),
            (RDKafkaErrorCode::TopicAuthorizationFailed, "not_authorized"),
            (RDKafkaErrorCode::Fatal, "fatal"),
            (RDKafkaErrorCode::InvalidRecord, "other"),
        ];
        for (code, reason) in cases {
            let error = KafkaError::MessageProduction(code);
            assert_eq!(failure_reason(&error), reason, "{code:?}");
            assert!(FAILURE_REASONS.contains(&reason));
        }
    }

    #[test]
    fn refuses_a_non_usage_schema() {
        let options = ProducerOptions {
            schema: SchemaId::BillingAggregateV1,
            ..ProducerOptions::default()
        };
        let error =
            UsageProducer::new(&ClientConfig::new(), options).expect_err("not a usage schema");
        assert!(matches!(error, ProduceError::NotAUsageSchema { id: 4 }));
    }
}
