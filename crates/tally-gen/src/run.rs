//! Streams a [`Generator`] into Kafka: the engine of `tally produce`.
//!
//! [`produce_blocking`] checks that the topic has the partition count the generator
//! routes for (murmur2 mod partitions must land each record where the truth says),
//! sends every record with its simulated send time as Kafka timestamp, as fast as the
//! producer takes them or paced to [`ProduceOptions::real_rate_per_sec`], flushes, and
//! returns the [`GroundTruth`] of exactly the records produced.
//!
//! Stopping early (the [`ProduceOptions::stop`] flag) still flushes and returns an exact
//! truth for the prefix produced, marked `complete: false`. A delivery failure stops
//! the run with [`GenError::Produce`] holding the producer's
//! [`ProduceError::Delivery`]: the truth would no longer describe the topic.

use std::num::NonZeroU64;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tally_producer::{ProduceError, UsageProducer};

use crate::generator::{Generator, GeneratorConfig, GeneratorConfigError, GroundTruth};

/// Why a generated run failed.
#[derive(Debug, thiserror::Error)]
pub enum GenError {
    /// The generator config is invalid (the field is named in the source).
    #[error("invalid generator config")]
    Config(#[from] GeneratorConfigError),
    /// The topic's partition count is not the one the generator routes for.
    #[error("topic {topic} has {actual} partitions, the generator is configured for {expected}")]
    PartitionCountMismatch {
        /// The topic.
        topic: String,
        /// Partitions in the generator config.
        expected: u32,
        /// Partitions of the topic.
        actual: usize,
    },
    /// The producer failed (metadata, enqueue, delivery or flush).
    #[error("the producer failed")]
    Produce(#[from] ProduceError),
    /// The blocking run panicked or was cancelled.
    #[error("the blocking generator task did not complete")]
    TaskFailed(#[source] tokio::task::JoinError),
}

/// How a run is driven.
#[derive(Debug, Clone)]
pub struct ProduceOptions {
    /// Real records per second to hold; `None` sends as fast as the producer accepts.
    pub real_rate_per_sec: Option<NonZeroU64>,
    /// Longest wait for the final flush.
    pub flush_timeout: Duration,
    /// How often progress is reported (checked every 1024 records).
    pub progress_interval: Duration,
    /// Set to stop the run early (e.g. on Ctrl-C); checked before every record.
    pub stop: Option<Arc<AtomicBool>>,
    /// Whether to check the topic's partition count against the config first.
    pub check_partition_count: bool,
    /// Longest wait for topic metadata.
    pub metadata_timeout: Duration,
}

impl Default for ProduceOptions {
    fn default() -> Self {
        ProduceOptions {
            real_rate_per_sec: None,
            flush_timeout: Duration::from_secs(120),
            progress_interval: Duration::from_secs(1),
            stop: None,
            check_partition_count: true,
            metadata_timeout: Duration::from_secs(30),
        }
    }
}

/// A progress snapshot of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProgressReport {
    /// Records handed to the producer.
    pub produced: u64,
    /// Records the run will produce in total.
    pub total: u64,
    /// Records the broker acknowledged.
    pub delivered: u64,
    /// Records that failed delivery.
    pub failed: u64,
    /// Wall time since the run started.
    pub elapsed: Duration,
    /// Simulated send time of the last record, UTC ms.
    pub simulated_time_ms: i64,
    /// Whether this is the final report (after the flush).
    pub finished: bool,
}

impl ProgressReport {
    /// Records per second of wall time so far.
    pub fn records_per_sec(&self) -> f64 {
        let seconds = self.elapsed.as_secs_f64();
        if seconds > 0.0 {
            self.produced as f64 / seconds
        } else {
            0.0
        }
    }
}

/// Generates `config`'s records into `producer`'s topic and returns their truth.
///
/// Blocks the calling thread for the whole run: call it from a plain thread or
/// `spawn_blocking` (or use [`produce`]).
pub fn produce_blocking(
    config: GeneratorConfig,
    producer: &UsageProducer,
    options: &ProduceOptions,
    mut progress: impl FnMut(&ProgressReport),
) -> Result<GroundTruth, GenError> {
    let mut generator = Generator::new(config)?;
    if options.check_partition_count {
        let actual = producer.partition_count_blocking(options.metadata_timeout)?;
        let expected = generator.config().partitions;
        if actual != expected as usize {
            return Err(GenError::PartitionCountMismatch {
                topic: producer.topic().to_owned(),
                expected,
                actual,
            });
        }
    }
    let total = generator.config().count;
    let started = Instant::now();
    let mut last_report = started;
    let mut simulated_time_ms = generator.send_time_ms(0);
    let report = |produced: u64, simulated_time_ms: i64, finished: bool| {
        let stats = producer.delivery_stats();
        ProgressReport {
            produced,
            total,
            delivered: stats.delivered,
            failed: stats.failed,
            elapsed: started.elapsed(),
            simulated_time_ms,
            finished,
        }
    };
    tracing::info!(
        topic = producer.topic(),
        total,
        "producing generated traffic"
    );
    loop {
        if options
            .stop
            .as_ref()
            .is_some_and(|stop| stop.load(Ordering::Acquire))
        {
            tracing::info!(produced = generator.produced(), "stopping early");
            break;
        }
        let produced = generator.produced();
        if let Some(rate) = options.real_rate_per_sec {
            let due = Duration::from_secs_f64(produced as f64 / rate.get() as f64);
            let elapsed = started.elapsed();
            if due > elapsed + Duration::from_millis(1) {
                std::thread::sleep(due - elapsed);
            }
        }
        if produced % 1024 == 0 && last_report.elapsed() >= options.progress_interval {
            producer.check_deliveries()?;
            progress(&report(produced, simulated_time_ms, false));
            last_report = Instant::now();
        }
        let Some(record) = generator.next_record() else {
            break;
        };
        simulated_time_ms = record.timestamp_ms;
        producer.send_raw(record.key.as_deref(), &record.value, record.timestamp_ms)?;
    }
    producer.flush_blocking(options.flush_timeout)?;
    progress(&report(generator.produced(), simulated_time_ms, true));
    Ok(generator.truth())
}

/// [`produce_blocking`] on tokio's blocking pool.
///
/// # Cancel safety
///
/// Dropping the future does not stop the run: the blocking task keeps producing until
/// the end. To stop a run, set [`ProduceOptions::stop`] and await the future, which
/// then flushes and returns the truth of the records produced.
pub async fn produce(
    config: GeneratorConfig,
    producer: UsageProducer,
    options: ProduceOptions,
    progress: impl FnMut(&ProgressReport) + Send + 'static,
) -> Result<GroundTruth, GenError> {
    tokio::task::spawn_blocking(move || produce_blocking(config, &producer, &options, progress))
        .await
        .map_err(GenError::TaskFailed)?
}
