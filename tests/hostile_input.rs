//! Hostile and oversized input against the real broker and the real `tally aggregate`.
//!
//! One input partition receives, among valid usage events: a gateway tick ten years
//! after its record timestamp, an event a day ahead of its record timestamp, every
//! length-limited string at its limit and one byte (or entry) over it, and a record of
//! nearly the input topic's `max.message.bytes`; last, an event stamped close to the
//! broker's own timestamp bound (its row is stamped more than an hour ahead of the
//! broker's clock) and a valid gateway tick that closes every window. The test checks
//! that each record lands where specified (usage.dlq with its reason and its original
//! bytes, or counted into a row), that the aggregator stays live (no aborted
//! transaction, every offset committed, clean exit on SIGTERM) and that every valid
//! event is counted: token sums per (window, dims) equal what the test sent.

mod support;

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use support::eos::{
    AggregatorProcess, ChildConfig, EventTime, committed_offset_sum, free_port, kafka_client,
    read_committed, wait_until,
};
use support::prometheus::{parse, scrape};
use support::{TestTopics, assert_success, rand_name, tally};
use tally_core::codec::{SchemaId, decode_aggregate, encode_tick, encode_usage_event};
use tally_core::event::{
    Cloud, EventId, RequestStatus, TickOrigin, TokenCounts, UsageEvent, UsageTick,
};

/// 2025-06-01T00:00:00Z, a window boundary.
const T0: i64 = 1_748_736_000_000;
/// The limits under test (tally's defaults, restated here).
const DIMENSION_LIMIT: usize = 256;
const REQUEST_ID_LIMIT: usize = 256;
const ATTRIBUTE_ENTRIES_LIMIT: usize = 64;
const ATTRIBUTES_BYTES_LIMIT: usize = 8192;
/// `max.message.bytes` of usage.events (tally's default).
const INPUT_MAX_MESSAGE_BYTES: usize = 1_048_588;
/// Kafka 4's default `message.timestamp.after.max.ms`, which usage.events keeps.
const ONE_HOUR_MS: i64 = 3_600_000;

/// A model name and a channel partner at the dimension limit, priced and shared.
fn long_model() -> String {
    "m".repeat(DIMENSION_LIMIT)
}
fn long_partner() -> String {
    "p".repeat(DIMENSION_LIMIT)
}

fn write_contracts(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("contracts.toml");
    let body = format!(
        r#"[[price_book]]
version = "2025-01"
effective_from = "2025-01-01T00:00:00Z"
currency = "USD"
billable_statuses = ["succeeded"]

[price_book.models.atlas-large]
input = 2_500_000_000
cached_input = 1_250_000_000
output = 10_000_000_000
reasoning = 10_000_000_000

[price_book.models."{model}"]
input = 1_000_000_000
cached_input = 500_000_000
output = 4_000_000_000
reasoning = 4_000_000_000

[[share_rules]]
version = "2025-01"
effective_from = "2025-01-01T00:00:00Z"

[[share_rules.rules]]
cloud = "aws"
channel_partner = "{partner}"
beneficiaries = [{{ partner = "northwind", basis_points = 2000 }}]
"#,
        model = long_model(),
        partner = long_partner(),
    );
    std::fs::write(&path, body).expect("write contracts");
    path
}

fn now_ms() -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    i64::try_from(since_epoch.as_millis()).expect("ms fit i64")
}

/// Where a record must land.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    /// Counted into a row.
    Counted(Box<UsageEvent>),
    /// Read as a tick (moves the watermark).
    Tick,
    /// usage.dlq with this reason and the original bytes.
    Dlq(&'static str),
}

/// One record the test sends.
struct Sent {
    what: String,
    key: Option<Vec<u8>>,
    value: Vec<u8>,
    timestamp_ms: i64,
    expect: Expect,
}

/// Builds the input, in send order.
struct Input {
    records: Vec<Sent>,
    next_id: u128,
}

impl Input {
    /// A valid event at `time_ms` (record timestamp = event time); each gets its own id
    /// and token counts, so a swapped or lost event changes a sum.
    fn valid_event(&mut self, time_ms: i64) -> UsageEvent {
        self.next_id += 1;
        let id = self.next_id;
        let small = u64::try_from(id).expect("small");
        UsageEvent {
            event_id: EventId(0x5eed_0000_0000_0000_0000_0000_0000_0000 + id),
            request_id: format!("req-{id}"),
            occurred_at_ms: time_ms,
            tenant_id: "tenant-hostile".to_owned(),
            model: "atlas-large".to_owned(),
            cloud: Cloud::Aws,
            channel_partner: None,
            region: "eu-west-1".to_owned(),
            tokens: TokenCounts {
                input: 100 + small,
                cached_input: small,
                output: 10 * small,
                reasoning: 3,
            },
            status: RequestStatus::Succeeded,
            attributes: BTreeMap::from([("gateway".to_owned(), "gw-1".to_owned())]),
            service_tier: None,
        }
    }

    fn push_event(&mut self, what: &str, event: UsageEvent, timestamp_ms: i64, expect: Expect) {
        let mut value = Vec::new();
        let schema = if event.service_tier.is_some() {
            SchemaId::UsageEventV2
        } else {
            SchemaId::UsageEventV1
        };
        encode_usage_event(&event, schema, &mut value);
        self.records.push(Sent {
            what: what.to_owned(),
            key: Some(event.tenant_id.as_bytes().to_vec()),
            value,
            timestamp_ms,
            expect,
        });
    }

    fn counted(&mut self, what: &str, event: UsageEvent) {
        let timestamp_ms = event.occurred_at_ms;
        let expect = Expect::Counted(Box::new(event.clone()));
        self.push_event(what, event, timestamp_ms, expect);
    }

    fn rejected(&mut self, what: &str, event: UsageEvent, reason: &'static str) {
        let timestamp_ms = event.occurred_at_ms;
        self.push_event(what, event, timestamp_ms, Expect::Dlq(reason));
    }

    fn tick(&mut self, what: &str, tick_time_ms: i64, timestamp_ms: i64, expect: Expect) {
        let mut value = Vec::new();
        encode_tick(
            &UsageTick {
                tick_time_ms,
                origin: TickOrigin::Gateway,
            },
            &mut value,
        );
        self.records.push(Sent {
            what: what.to_owned(),
            key: None,
            value,
            timestamp_ms,
            expect,
        });
    }

    /// A string of `len` bytes that starts with a two-byte character (limits count
    /// bytes, not characters).
    fn text(len: usize, fill: char) -> String {
        let mut text = "é".to_owned();
        text.extend(std::iter::repeat_n(fill, len - 2));
        assert_eq!(text.len(), len);
        text
    }

    /// One event with `set` applied at the limit (counted) and one over it (rejected).
    fn limit_pair(&mut self, field: &str, time_ms: i64, set: impl Fn(&mut UsageEvent, bool)) {
        let mut at = self.valid_event(time_ms);
        set(&mut at, false);
        self.counted(&format!("{field} at its limit"), at);
        let mut over = self.valid_event(time_ms);
        set(&mut over, true);
        self.rejected(&format!("{field} over its limit"), over, "field_too_long");
    }
}

/// Token sums and event count of one (window, dims).
type Key = (i64, String, String, String, Option<String>, String);
type Totals = BTreeMap<Key, [u64; 5]>;

fn add(totals: &mut Totals, key: Key, tokens: &TokenCounts, events: u64) {
    let entry = totals.entry(key).or_default();
    entry[0] += tokens.input;
    entry[1] += tokens.cached_input;
    entry[2] += tokens.output;
    entry[3] += tokens.reasoning;
    entry[4] += events;
}

#[test]
fn hostile_records_land_where_specified_and_valid_ones_are_counted() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let topics = TestTopics::random();
    let group = rand_name("hostile");
    let metrics = format!("127.0.0.1:{}", free_port());
    // Idle ticks only after 2 minutes: the input's own last tick closes the windows.
    let mut child = ChildConfig::new(&group, EventTime::EOS, 1).live_stream();
    child.metrics_listen = metrics.clone();
    let config = child.write(dir.path(), "hostile", &topics, 1);
    let contracts = write_contracts(dir.path());
    assert_success(&tally(&["topics", "create"], &config), "topics create");

    let window_ms = EventTime::EOS.window_ms;
    let mut input = Input {
        records: Vec::new(),
        next_id: 0,
    };
    // Window [T0, T0 + 10 s): ten valid events.
    for step in 0..10 {
        let event = input.valid_event(T0 + step * 500);
        input.counted("valid, first window", event);
    }
    // A gateway tick ten years after its record timestamp.
    let ten_years_ms = 10 * 365 * 24 * ONE_HOUR_MS;
    input.tick(
        "tick ten years ahead",
        T0 + 5_000 + ten_years_ms,
        T0 + 5_000,
        Expect::Dlq("tick_time_out_of_bounds"),
    );
    // An event a day ahead of its record timestamp.
    let ahead = input.valid_event(T0 + 5_000 + 24 * ONE_HOUR_MS);
    input.push_event(
        "event a day ahead",
        ahead,
        T0 + 5_000,
        Expect::Dlq("event_time_out_of_bounds"),
    );
    // Every limit: at it (counted), one over (rejected).
    let at = |over: bool, limit: usize| if over { limit + 1 } else { limit };
    let limits_at = T0 + 6_000;
    input.limit_pair("tenant_id", limits_at, |event, over| {
        event.tenant_id = Input::text(at(over, DIMENSION_LIMIT), 't');
    });
    input.limit_pair("model", limits_at, |event, over| {
        event.model = if over {
            format!("{}m", long_model())
        } else {
            long_model()
        };
    });
    input.limit_pair("region", limits_at, |event, over| {
        event.region = Input::text(at(over, DIMENSION_LIMIT), 'r');
    });
    input.limit_pair("channel_partner", limits_at, |event, over| {
        event.channel_partner = Some(if over {
            format!("{}p", long_partner())
        } else {
            long_partner()
        });
    });
    input.limit_pair("service_tier", limits_at, |event, over| {
        event.service_tier = Some(Input::text(at(over, DIMENSION_LIMIT), 's'));
    });
    input.limit_pair("request_id", limits_at, |event, over| {
        event.request_id = Input::text(at(over, REQUEST_ID_LIMIT), 'q');
    });
    input.limit_pair("attribute entries", limits_at, |event, over| {
        event.attributes = (0..at(over, ATTRIBUTE_ENTRIES_LIMIT))
            .map(|index| (format!("k{index:03}"), "v".to_owned()))
            .collect();
    });
    input.limit_pair("attribute bytes", limits_at, |event, over| {
        // "k" + value = the limit (or one more).
        let value = "v".repeat(at(over, ATTRIBUTES_BYTES_LIMIT) - 1);
        event.attributes = BTreeMap::from([("k".to_owned(), value)]);
    });
    // A record of nearly the input topic's max message size: one huge attribute.
    let mut huge = input.valid_event(T0 + 7_000);
    huge.attributes = BTreeMap::from([(
        "blob".to_owned(),
        "x".repeat(INPUT_MAX_MESSAGE_BYTES - 8_000),
    )]);
    input.rejected("record near max.message.bytes", huge, "field_too_long");
    // Window [T0 + 10 s, T0 + 20 s): ten more valid events, after all of the above.
    for step in 0..10 {
        let event = input.valid_event(T0 + window_ms + step * 500);
        input.counted("valid, second window", event);
    }
    // Last: an event whose record timestamp is 58 min ahead of the broker's clock
    // (inside usage.events' one-hour bound) and whose event time is 4.5 min later
    // still (inside the 5 min skew): its row is stamped > 1 h ahead of the broker.
    let near_future_sent_at = now_ms() + 58 * 60_000;
    let mut near_future = input.valid_event(near_future_sent_at + 270_000);
    near_future.tenant_id = "tenant-future".to_owned();
    input.push_event(
        "event stamped near the broker's bound",
        near_future.clone(),
        near_future_sent_at,
        Expect::Counted(Box::new(near_future.clone())),
    );
    // A valid gateway tick closing every window: 4.9 min ahead of its timestamp.
    let tick_sent_at = near_future_sent_at + 30_000;
    input.tick(
        "closing tick",
        tick_sent_at + 294_000,
        tick_sent_at,
        Expect::Tick,
    );

    // Send, one record per batch (the large one must be alone in its batch).
    let producer: BaseProducer = kafka_client(&support::bootstrap())
        .set("enable.idempotence", "true")
        .set("message.max.bytes", "1100000")
        .create()
        .expect("producer");
    for sent in &input.records {
        let mut record = BaseRecord::<[u8], [u8]>::to(&topics.usage_events)
            .partition(0)
            .payload(&sent.value)
            .timestamp(sent.timestamp_ms);
        if let Some(key) = &sent.key {
            record = record.key(key);
        }
        producer
            .send(record)
            .unwrap_or_else(|(error, _)| panic!("send {}: {error}", sent.what));
        producer
            .flush(Duration::from_secs(30))
            .unwrap_or_else(|error| panic!("flush {}: {error}", sent.what));
    }
    let near_future_window_end = (near_future.occurred_at_ms / window_ms + 1) * window_ms;
    let produced_at = now_ms();
    // The input as the broker holds it: every record, in send order.
    let stored = read_committed(&support::bootstrap(), &topics.usage_events, 1);
    assert_eq!(
        stored.len(),
        input.records.len(),
        "every record was accepted"
    );
    for (record, sent) in stored.iter().zip(&input.records) {
        assert_eq!(
            record.value, sent.value,
            "{} at offset {}",
            sent.what, record.offset
        );
    }
    let offsets: Vec<i64> = stored.iter().map(|record| record.offset).collect();

    // Expected outcome, computed from what was sent.
    let mut expected_rows = Totals::new();
    let mut expected_dlq: BTreeMap<i64, (&'static str, &[u8])> = BTreeMap::new();
    let mut expected_reasons: BTreeMap<&str, u64> = BTreeMap::new();
    let mut usage_records = 0_u64;
    for (sent, offset) in input.records.iter().zip(&offsets) {
        match &sent.expect {
            Expect::Counted(event) => {
                usage_records += 1;
                let window_start = event.occurred_at_ms.div_euclid(window_ms) * window_ms;
                let key = (
                    window_start,
                    event.tenant_id.clone(),
                    event.model.clone(),
                    event.cloud.as_str().to_owned(),
                    event.channel_partner.clone(),
                    event.region.clone(),
                );
                add(&mut expected_rows, key, &event.tokens, 1);
            }
            Expect::Dlq(reason) => {
                // A rejected tick is a rejected record: consumed like usage.
                usage_records += 1;
                expected_dlq.insert(*offset, (reason, &sent.value));
                *expected_reasons.entry(reason).or_default() += 1;
            }
            Expect::Tick => {}
        }
    }

    let mut aggregator = AggregatorProcess::spawn(
        &config,
        "hostile-0",
        dir.path(),
        "aggregator",
        &["--contracts", contracts.to_str().expect("utf-8 path")],
    );
    let consumed_metric = "tally_aggregator_consumed_records_total";
    let ticks_metric = "tally_aggregator_ticks_read_total";
    let mut exposition = None;
    wait_until(Duration::from_secs(45), "every record is committed", || {
        if let Some(status) = aggregator.try_status() {
            panic!(
                "the aggregator exited early ({status}):\n{}",
                aggregator.log_tail(40)
            );
        }
        if TcpStream::connect(&metrics).is_err() {
            return false; // the endpoint is not up yet
        }
        let scraped = parse(&scrape(&metrics));
        assert!(
            scraped.sum(ticks_metric).unwrap_or(0.0) <= 1.0,
            "a tick outside the time bounds was read"
        );
        let done = scraped.sum(consumed_metric) == Some(usage_records as f64)
            && scraped.sum(ticks_metric) == Some(1.0);
        exposition = Some(scraped);
        done
    });
    let exposition = exposition.expect("scraped");
    let total_offsets = i64::try_from(input.records.len()).expect("small");
    wait_until(Duration::from_secs(15), "the offsets are committed", || {
        committed_offset_sum(&support::bootstrap(), &group, &topics.usage_events, 1)
            == total_offsets
    });

    // Live: nothing aborted, the rejected records counted by reason.
    assert_eq!(
        exposition
            .sum("tally_aggregator_transactions_aborted_total")
            .unwrap_or(0.0),
        0.0,
        "no transaction aborted"
    );
    for (reason, count) in &expected_reasons {
        assert_eq!(
            exposition.sum_where("tally_aggregator_rejected_records_total", "reason", reason),
            *count as f64,
            "rejected records with reason {reason}"
        );
    }

    // usage.dlq: each rejected record at its offset, with its reason and original bytes.
    let dlq = read_committed(&support::bootstrap(), &topics.dlq, 1);
    let mut found_dlq: BTreeMap<i64, (String, Vec<u8>)> = BTreeMap::new();
    for record in dlq {
        let offset: i64 = record.headers["tally.source.offset"]
            .parse()
            .expect("offset header");
        let reason = record.headers["tally.reason"].clone();
        assert!(
            !record.headers.contains_key("tally.original.bytes"),
            "no copy was truncated"
        );
        found_dlq.insert(offset, (reason, record.value));
    }
    assert_eq!(
        found_dlq.keys().collect::<Vec<_>>(),
        expected_dlq.keys().collect::<Vec<_>>(),
        "usage.dlq holds exactly the rejected offsets"
    );
    for (offset, (reason, value)) in &expected_dlq {
        let (found_reason, found_value) = &found_dlq[offset];
        assert_eq!(found_reason, reason, "reason at offset {offset}");
        assert!(found_value == value, "original bytes at offset {offset}");
    }
    assert!(
        read_committed(&support::bootstrap(), &topics.late, 1).is_empty(),
        "nothing was too late"
    );

    // billing.aggregates: the token sums per (window, dims) the test sent.
    let rows = read_committed(&support::bootstrap(), &topics.billing_aggregates, 1);
    let mut found_rows = Totals::new();
    for record in &rows {
        let row = decode_aggregate(&record.value).expect("row decodes");
        assert_eq!(
            record.timestamp_ms,
            Some(row.window_end_ms),
            "a row is stamped with its window end"
        );
        let key = (
            row.window_start_ms,
            row.dims.tenant_id.clone(),
            row.dims.model.clone(),
            row.dims.cloud.as_str().to_owned(),
            row.dims.channel_partner.clone(),
            row.dims.region.clone(),
        );
        add(&mut found_rows, key, &row.tokens, row.event_count);
    }
    assert_eq!(found_rows, expected_rows, "token sums per (window, dims)");
    // The near-future row was accepted although stamped more than Kafka's default
    // one hour ahead of the broker's clock when it was written.
    assert!(
        near_future_window_end - now_ms() > ONE_HOUR_MS,
        "the near-future row is stamped > 1 h ahead (window end {near_future_window_end}, \
         produced at {produced_at})"
    );

    let status = aggregator.terminate(Duration::from_secs(10));
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    eprintln!("hostile input test took {:?}", started.elapsed());
}
