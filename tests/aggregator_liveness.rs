//! Liveness of `tally aggregate` on a real broker: how soon a quiet partition's usage
//! is in a committed row, with wall-clock time as the only thing that passes.
//!
//! With a window, allowed lateness and idle timeout of 1 s and a 200 ms commit interval,
//! an on-time event must be in a committed row within `window + allowed_lateness +
//! idle_timeout + 2 × commit_interval` (+1 s of slack) of its partition's last counted
//! event, and a correction within `idle_timeout + 2 × commit_interval` (+1 s) of its
//! arrival after a long idle, also when the aggregator was restarted during the idle
//! time. Duplicates and rejected records sent every 200 ms meanwhile must change
//! neither bound: they do not move the watermark, so they do not reset the idle time.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use support::eos::{
    committed_offset_sum, create_outputs, create_topics, fresh_outputs, kafka_client,
};
use support::{TestTopics, bootstrap, rand_name};
use tally_aggregator::{AggregatorError, AggregatorSettings, RunSummary, StartFrom};
use tally_core::aggregate::BillingAggregate;
use tally_core::codec::{SchemaId, decode_aggregate, encode_usage_event};
use tally_core::config::Config;
use tally_core::contracts::Contracts;
use tally_core::event::{Cloud, EventId, RequestStatus, TokenCounts, UsageEvent};
use tally_core::window::WindowSize;

const WINDOW_MS: i64 = 1_000;
const LATENESS_MS: i64 = 1_000;
const IDLE_MS: i64 = 1_000;
const COMMIT_MS: i64 = 200;
const SLACK_MS: i64 = 1_000;
/// Duplicates and rejected records arrive this often while the partition is quiet.
const JUNK_EVERY: Duration = Duration::from_millis(200);

const CONTRACTS: &str = include_str!("../deploy/contracts/default.toml");

fn now_ms() -> i64 {
    let elapsed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after the epoch");
    i64::try_from(elapsed.as_millis()).expect("fits")
}

fn settings(topics: &TestTopics, group: &str) -> AggregatorSettings {
    let mut config = Config::default();
    config.kafka.bootstrap_servers = bootstrap();
    config.topics.usage_events = topics.usage_events.clone();
    config.topics.billing_aggregates = topics.billing_aggregates.clone();
    config.topics.late = topics.late.clone();
    config.topics.dlq = topics.dlq.clone();
    config.topics.checkpoints = topics.checkpoints.clone();
    config.topics.partitions = 1;
    config.topics.output_partitions = 1;
    config.topics.replication_factor = 1;
    config.aggregator.group_id = group.to_owned();
    config.aggregator.window_ms = WINDOW_MS;
    config.aggregator.max_out_of_orderness_ms = 0;
    config.aggregator.allowed_lateness_ms = LATENESS_MS;
    config.aggregator.correction_horizon_ms = 300_000;
    config.aggregator.dedupe_horizon_ms = 301_000;
    config.aggregator.idle_timeout_ms = IDLE_MS;
    config.aggregator.commit_interval_ms = COMMIT_MS;
    config.aggregator.transaction_timeout_ms = 10_000;
    let contracts = Contracts::load(CONTRACTS, WindowSize::new(WINDOW_MS).expect("window"))
        .expect("contracts load");
    let mut settings = AggregatorSettings::new(config, contracts, rand_name("live"));
    settings.start_from = Some(StartFrom::Earliest);
    settings
}

/// The aggregator on a thread, stopped through its shutdown flag.
struct Running {
    shutdown: Arc<AtomicBool>,
    handle: JoinHandle<Result<RunSummary, AggregatorError>>,
}

impl Running {
    fn start(settings: AggregatorSettings) -> Running {
        let shutdown = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&shutdown);
        let handle = thread::spawn(move || tally_aggregator::run(settings, flag));
        Running { shutdown, handle }
    }

    fn stop(self) -> RunSummary {
        self.shutdown.store(true, Ordering::SeqCst);
        self.handle
            .join()
            .expect("the aggregator thread")
            .expect("a clean stop")
    }
}

/// Sends usage events, copies and junk to partition 0 of the input, stamped now.
struct Gateway {
    producer: BaseProducer,
    topic: String,
    next_id: u128,
}

impl Gateway {
    fn new(topic: &str) -> Gateway {
        // zstd-compressed, as a gateway may send them: the aggregator reads zstd
        // batches with the system libzstd its librdkafka links (Cargo.toml).
        let producer = kafka_client(&bootstrap())
            .set("enable.idempotence", "true")
            .set("linger.ms", "0")
            .set("compression.type", "zstd")
            .create()
            .expect("producer");
        Gateway {
            producer,
            topic: topic.to_owned(),
            next_id: 0x11fe_0000_0000_0000_0000_0000_0000_0000,
        }
    }

    fn event(&mut self, occurred_at_ms: i64) -> UsageEvent {
        self.next_id += 1;
        UsageEvent {
            event_id: EventId(self.next_id),
            request_id: format!("req-{}", self.next_id),
            occurred_at_ms,
            tenant_id: "tenant-live".to_owned(),
            model: "atlas-large".to_owned(),
            cloud: Cloud::Aws,
            channel_partner: None,
            region: "us-east-1".to_owned(),
            tokens: TokenCounts {
                input: 1_000,
                cached_input: 0,
                output: 100,
                reasoning: 0,
            },
            status: RequestStatus::Succeeded,
            attributes: BTreeMap::new(),
            service_tier: None,
        }
    }

    fn send_raw(&self, key: &str, value: &[u8]) {
        self.producer
            .send(
                BaseRecord::to(&self.topic)
                    .partition(0)
                    .key(key)
                    .payload(value)
                    .timestamp(now_ms()),
            )
            .expect("enqueue");
        self.producer
            .flush(Duration::from_secs(10))
            .expect("delivered");
    }

    fn send(&self, event: &UsageEvent) {
        let mut bytes = Vec::new();
        encode_usage_event(event, SchemaId::UsageEventV1, &mut bytes);
        self.send_raw(&event.tenant_id, &bytes);
    }

    /// A copy of `event`, then an undecodable record, alternately, every
    /// [`JUNK_EVERY`], while `until` is false.
    fn junk_until(&self, event: &UsageEvent, until: &mut dyn FnMut() -> bool, limit: Duration) {
        let started = Instant::now();
        let mut copy = true;
        while !until() {
            assert!(started.elapsed() < limit, "not within {limit:?}");
            if copy {
                self.send(event);
            } else {
                self.send_raw("tenant-live", b"not avro");
            }
            copy = !copy;
            thread::sleep(JUNK_EVERY);
        }
    }
}

/// A read_committed reader of the aggregates that notes when each row arrived.
struct Rows {
    consumer: BaseConsumer,
    seen: Vec<(BillingAggregate, Instant)>,
}

impl Rows {
    fn new(topic: &str) -> Rows {
        let consumer: BaseConsumer = kafka_client(&bootstrap())
            .set("group.id", rand_name("live-reader"))
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .create()
            .expect("reader");
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(topic, 0, Offset::Beginning)
            .expect("assign");
        consumer.assign(&assignment).expect("assign");
        Rows {
            consumer,
            seen: Vec::new(),
        }
    }

    /// Reads what is there now.
    fn poll(&mut self) {
        while let Some(message) = self.consumer.poll(Duration::from_millis(20)) {
            let message = message.expect("read");
            let row = decode_aggregate(message.payload().unwrap_or_default()).expect("a row");
            self.seen.push((row, Instant::now()));
        }
    }

    /// When the row of `window_start_ms` with `correction_seq` arrived, if it did.
    fn arrival(&mut self, window_start_ms: i64, correction_seq: u32) -> Option<Instant> {
        self.poll();
        self.seen
            .iter()
            .find(|(row, _)| {
                row.window_start_ms == window_start_ms && row.correction_seq == correction_seq
            })
            .map(|(_, at)| *at)
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).expect("fits")
}

#[test]
fn quiet_partitions_emit_rows_and_corrections_within_the_bounds() {
    let mut topics = TestTopics::random();
    let input = rand_name("live-events");
    create_topics(&bootstrap(), &[&input], 1);
    let outputs = fresh_outputs(&input);
    create_outputs(&outputs, 1);
    topics.usage_events = input.clone();
    topics.billing_aggregates = outputs.billing_aggregates.clone();
    topics.late = outputs.late.clone();
    topics.dlq = outputs.dlq.clone();
    topics.checkpoints = outputs.checkpoints.clone();
    let group = rand_name("live-group");
    let mut gateway = Gateway::new(&input);
    let mut rows = Rows::new(&topics.billing_aggregates);
    let aggregator = Running::start(settings(&topics, &group));

    // 1. On time: three events, then only junk.
    let events: Vec<UsageEvent> = (0..3).map(|_| gateway.event(now_ms())).collect();
    for event in &events {
        gateway.send(event);
    }
    let last_counted = Instant::now();
    let last_window = events[2].occurred_at_ms / WINDOW_MS * WINDOW_MS;
    let limit = Duration::from_secs(30);
    gateway.junk_until(
        &events[2],
        &mut || rows.arrival(last_window, 0).is_some(),
        limit,
    );
    let on_time_ms = millis(
        rows.arrival(last_window, 0)
            .expect("arrived")
            .duration_since(last_counted),
    );
    let on_time_bound = WINDOW_MS + LATENESS_MS + IDLE_MS + 2 * COMMIT_MS + SLACK_MS;
    eprintln!(
        "on-time row {on_time_ms} ms after the last counted event (bound {on_time_bound} ms); \
         window {last_window}"
    );
    assert!(on_time_ms <= on_time_bound);

    // 2. A correction after ten idle timeouts of quiet, junk included.
    let correction_bound = IDLE_MS + 2 * COMMIT_MS + SLACK_MS;
    let idle_until =
        Instant::now() + Duration::from_millis(u64::try_from(10 * IDLE_MS).expect("positive"));
    gateway.junk_until(&events[0], &mut || Instant::now() >= idle_until, limit);
    let late_event = gateway.event(events[0].occurred_at_ms);
    let late_window = late_event.occurred_at_ms / WINDOW_MS * WINDOW_MS;
    gateway.send(&late_event);
    let sent = Instant::now();
    gateway.junk_until(
        &events[0],
        &mut || rows.arrival(late_window, 1).is_some(),
        limit,
    );
    let correction_ms = millis(
        rows.arrival(late_window, 1)
            .expect("arrived")
            .duration_since(sent),
    );
    eprintln!("correction row {correction_ms} ms after it was sent (bound {correction_bound} ms)");
    assert!(correction_ms <= correction_bound);

    // 3. The same across a restart during the idle time: the idle base is committed.
    let summary = aggregator.stop();
    assert!(
        summary.ticks_written > 0,
        "ticks closed the windows: {summary:?}"
    );
    let aggregator = Running::start(settings(&topics, &group));
    // Ready once a copy sent now is committed past (the partition is restored and read).
    let before = committed_offset_sum(&bootstrap(), &group, &input, 1);
    gateway.junk_until(
        &events[0],
        &mut || committed_offset_sum(&bootstrap(), &group, &input, 1) > before + 1,
        limit,
    );
    let idle_until =
        Instant::now() + Duration::from_millis(u64::try_from(10 * IDLE_MS).expect("positive"));
    gateway.junk_until(&events[0], &mut || Instant::now() >= idle_until, limit);
    let after_restart = gateway.event(events[0].occurred_at_ms);
    gateway.send(&after_restart);
    let sent = Instant::now();
    gateway.junk_until(
        &events[0],
        &mut || rows.arrival(late_window, 2).is_some(),
        limit,
    );
    let restarted_ms = millis(
        rows.arrival(late_window, 2)
            .expect("arrived")
            .duration_since(sent),
    );
    eprintln!(
        "correction after a restart {restarted_ms} ms after it was sent (bound {correction_bound} ms)"
    );
    assert!(restarted_ms <= correction_bound);
    aggregator.stop();
}
