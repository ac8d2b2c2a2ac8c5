//! `tally reconcile`: compare two sets of billing aggregates for a period.
//!
//! A source is a topic (`topic:NAME`, read with read_committed up to the end offsets of
//! when the command starts: the aggregates topic, or a replay's output topic) or a
//! billing store (`sqlite:FILE`, `postgres://…`: the sink's store, or a replay's).
//! Rows with `from ≤ window start` and `window end ≤ to` take part.
//!
//! Rows are matched by their natural key — source topic and partition, window, dims,
//! row kind, correction sequence — not by id: the id also hashes the contract versions,
//! and a what-if replay under a relabelled contract must still line up with what was
//! billed. `left` is the reference: a row only on the left is **missing** (from the
//! right), a row only on the right is **extra**; a row on both sides whose id, event
//! count, tokens, currency, gross, shares, net or versions differ is **mismatching**,
//! else **matching**. A key seen twice in one source (a topic written twice) counts once
//! when the copies are identical; differing copies make the source an error.
//!
//! Totals by cloud, by partner (beneficiary shares) and by tenant are sums over the rows
//! on each side and their difference (right − left). Money is integer micro-units
//! throughout (sums in `i128`), never a float.
//!
//! Exit codes (set by the binary): 0 when both sides are equal, 1 when they differ, 2 on
//! error.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use tally_aggregator::kafka::client_config;
use tally_core::aggregate::BillingAggregate;
use tally_core::codec::decode_aggregate;
use tally_core::config::Config;
use tally_core::timefmt::{format_utc_ms, parse_rfc3339_ms};
use tally_sink::StoreLocation;

use crate::error::ReplayError;

const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// `tally reconcile` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ReconcileArgs {
    /// The reference side: `topic:NAME`, `sqlite:FILE` or `postgres://…`.
    #[arg(long)]
    pub left: String,
    /// The side compared with it (same forms).
    #[arg(long)]
    pub right: String,
    /// Period start (RFC 3339): rows of windows starting at or after it.
    #[arg(long)]
    pub from: String,
    /// Period end (RFC 3339, exclusive): rows of windows ending at or before it.
    #[arg(long)]
    pub to: String,
    /// `table`, `csv` or `json`.
    #[arg(long, default_value = "table")]
    pub format: Format,
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Readable text.
    Table,
    /// One line per differing field and per total: `section,status,key,field,left,right,difference`.
    Csv,
    /// One JSON document.
    Json,
}

/// Where rows come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A topic, read_committed.
    Topic(String),
    /// A billing store.
    Store(StoreLocation),
}

impl Source {
    /// Parses `topic:NAME`, `sqlite:FILE` or `postgres://…`.
    pub fn parse(field: &'static str, text: &str) -> Result<Source, ReplayError> {
        if let Some(topic) = text.strip_prefix("topic:") {
            if topic.is_empty() {
                return Err(ReplayError::Setting {
                    field,
                    problem: "topic: needs a topic name".to_owned(),
                });
            }
            return Ok(Source::Topic(topic.to_owned()));
        }
        if text.starts_with("sqlite:")
            || text.starts_with("postgres://")
            || text.starts_with("postgresql://")
        {
            return Ok(Source::Store(StoreLocation::parse(field, text)?));
        }
        Err(ReplayError::Setting {
            field,
            problem: format!("{text:?}: expected topic:NAME, sqlite:FILE or postgres://…"),
        })
    }
}

/// The natural key of a row: what identifies it apart from its contract versions.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct RowKey {
    /// Input topic.
    pub source_topic: String,
    /// Input partition.
    pub source_partition: i32,
    /// Window start, UTC ms.
    pub window_start_ms: i64,
    /// Window end, UTC ms.
    pub window_end_ms: i64,
    /// Tenant.
    pub tenant_id: String,
    /// Model.
    pub model: String,
    /// Cloud.
    pub cloud: String,
    /// Channel partner.
    pub channel_partner: Option<String>,
    /// Region.
    pub region: String,
    /// `billable` or `non_billable`.
    pub row_kind: String,
    /// 0 on time, 1, 2, … corrections.
    pub correction_seq: i64,
}

impl RowKey {
    fn label(&self) -> String {
        format!(
            "{}/{}/{}/{}/{}/{}/{}/{}/{}/{}",
            self.source_topic,
            self.source_partition,
            format_utc_ms(self.window_start_ms),
            self.tenant_id,
            self.model,
            self.cloud,
            self.channel_partner.as_deref().unwrap_or(""),
            self.region,
            self.row_kind,
            self.correction_seq
        )
    }
}

/// The compared content of a row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RowValue {
    /// Row id.
    pub id: String,
    /// Events counted.
    pub event_count: i64,
    /// Input, cached input, output, reasoning tokens.
    pub tokens: [i64; 4],
    /// Currency.
    pub currency: String,
    /// Gross, micro-units.
    pub gross_micros: i64,
    /// Shares by beneficiary, micro-units.
    pub shares: BTreeMap<String, i64>,
    /// Net, micro-units.
    pub net_micros: i64,
    /// Price-book version.
    pub price_book_version: String,
    /// Share-rule version.
    pub share_rule_version: String,
}

/// Token kinds, in [`RowValue::tokens`] order.
pub const TOKEN_KINDS: [&str; 4] = ["input", "cached_input", "output", "reasoning"];

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The key and value of a decoded row.
pub fn row_of(row: &BillingAggregate) -> (RowKey, RowValue) {
    let key = RowKey {
        source_topic: row.source_topic.clone(),
        source_partition: row.source_partition,
        window_start_ms: row.window_start_ms,
        window_end_ms: row.window_end_ms,
        tenant_id: row.dims.tenant_id.clone(),
        model: row.dims.model.clone(),
        cloud: row.dims.cloud.as_str().to_owned(),
        channel_partner: row.dims.channel_partner.clone(),
        region: row.dims.region.clone(),
        row_kind: row.row_kind.as_str().to_owned(),
        correction_seq: i64::from(row.correction_seq),
    };
    let value = RowValue {
        id: row.id.clone(),
        event_count: to_i64(row.event_count),
        tokens: [
            to_i64(row.tokens.input),
            to_i64(row.tokens.cached_input),
            to_i64(row.tokens.output),
            to_i64(row.tokens.reasoning),
        ],
        currency: row.currency.clone(),
        gross_micros: row.gross_micros,
        shares: row
            .shares
            .iter()
            .map(|share| (share.beneficiary.clone(), share.amount_micros))
            .collect(),
        net_micros: row.net_micros,
        price_book_version: row.price_book_version.clone(),
        share_rule_version: row.share_rule_version.clone(),
    };
    (key, value)
}

/// One side's rows by key.
pub type Rows = BTreeMap<RowKey, RowValue>;

fn insert(rows: &mut Rows, source: &str, key: RowKey, value: RowValue) -> Result<(), ReplayError> {
    match rows.get(&key) {
        Some(existing) if *existing != value => Err(ReplayError::Source {
            source_name: source.to_owned(),
            problem: format!(
                "two different rows for {} (ids {} and {})",
                key.label(),
                existing.id,
                value.id
            ),
        }),
        Some(_) => Ok(()),
        None => {
            rows.insert(key, value);
            Ok(())
        }
    }
}

/// Sums of one group of rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Rows.
    pub rows: i128,
    /// Events.
    pub events: i128,
    /// Tokens by kind ([`TOKEN_KINDS`]).
    pub tokens: [i128; 4],
    /// Gross, micro-units.
    pub gross_micros: i128,
    /// Shares, micro-units.
    pub share_micros: i128,
    /// Net, micro-units.
    pub net_micros: i128,
}

impl Totals {
    fn add(&mut self, value: &RowValue) {
        self.rows += 1;
        self.events += i128::from(value.event_count);
        for (sum, tokens) in self.tokens.iter_mut().zip(value.tokens) {
            *sum += i128::from(tokens);
        }
        self.gross_micros += i128::from(value.gross_micros);
        self.share_micros += value.shares.values().map(|v| i128::from(*v)).sum::<i128>();
        self.net_micros += i128::from(value.net_micros);
    }

    fn minus(&self, other: &Totals) -> Totals {
        let mut tokens = [0i128; 4];
        for (index, slot) in tokens.iter_mut().enumerate() {
            *slot = self.tokens[index] - other.tokens[index];
        }
        Totals {
            rows: self.rows - other.rows,
            events: self.events - other.events,
            tokens,
            gross_micros: self.gross_micros - other.gross_micros,
            share_micros: self.share_micros - other.share_micros,
            net_micros: self.net_micros - other.net_micros,
        }
    }
}

/// Totals of one group on both sides.
#[derive(Debug, Clone, Serialize)]
pub struct GroupTotals {
    /// The group (a cloud, a partner, a tenant).
    pub name: String,
    /// Left side.
    pub left: Totals,
    /// Right side.
    pub right: Totals,
    /// right − left.
    pub difference: Totals,
}

/// How a key compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// On both sides, different content.
    Mismatching,
    /// Only on the left.
    Missing,
    /// Only on the right.
    Extra,
}

/// One differing row.
#[derive(Debug, Clone, Serialize)]
pub struct Difference {
    /// How it differs.
    pub status: Status,
    /// Its natural key.
    pub key: RowKey,
    /// The left row, if any.
    pub left: Option<RowValue>,
    /// The right row, if any.
    pub right: Option<RowValue>,
    /// Token differences (right − left) by kind.
    pub tokens_difference: [i128; 4],
    /// Gross difference (right − left), micro-units.
    pub gross_difference_micros: i128,
    /// Net difference (right − left), micro-units.
    pub net_difference_micros: i128,
    /// Share differences (right − left) by beneficiary, micro-units; only non-zero ones.
    pub share_differences_micros: BTreeMap<String, i128>,
}

/// Counts of rows.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Counts {
    /// Rows on the left.
    pub left: u64,
    /// Rows on the right.
    pub right: u64,
    /// Equal on both sides.
    pub matching: u64,
    /// On both sides, different.
    pub mismatching: u64,
    /// Only on the left.
    pub missing: u64,
    /// Only on the right.
    pub extra: u64,
}

/// The whole comparison.
#[derive(Debug, Clone, Serialize)]
pub struct ReconcileReport {
    /// Left source as given.
    pub left: String,
    /// Right source as given.
    pub right: String,
    /// Period start.
    pub from: String,
    /// Period end (exclusive).
    pub to: String,
    /// Row counts.
    pub rows: Counts,
    /// Every differing row, by key.
    pub differences: Vec<Difference>,
    /// Totals by cloud.
    pub by_cloud: Vec<GroupTotals>,
    /// Share totals by beneficiary partner (`share_micros`; the other fields are 0).
    pub by_partner: Vec<GroupTotals>,
    /// Totals by tenant.
    pub by_tenant: Vec<GroupTotals>,
}

impl ReconcileReport {
    /// Whether the two sides hold the same rows.
    pub fn is_equal(&self) -> bool {
        self.rows.mismatching == 0 && self.rows.missing == 0 && self.rows.extra == 0
    }
}

fn difference_of(
    status: Status,
    key: &RowKey,
    left: Option<&RowValue>,
    right: Option<&RowValue>,
) -> Difference {
    let totals = |value: Option<&RowValue>| {
        let mut totals = Totals::default();
        if let Some(value) = value {
            totals.add(value);
        }
        totals
    };
    let delta = totals(right).minus(&totals(left));
    let mut shares: BTreeMap<String, i128> = BTreeMap::new();
    for (side, sign) in [(left, -1i128), (right, 1i128)] {
        if let Some(value) = side {
            for (partner, amount) in &value.shares {
                *shares.entry(partner.clone()).or_default() += sign * i128::from(*amount);
            }
        }
    }
    shares.retain(|_, amount| *amount != 0);
    Difference {
        status,
        key: key.clone(),
        left: left.cloned(),
        right: right.cloned(),
        tokens_difference: delta.tokens,
        gross_difference_micros: delta.gross_micros,
        net_difference_micros: delta.net_micros,
        share_differences_micros: shares,
    }
}

/// Compares two sides (pure).
pub fn compare(
    left_name: &str,
    left: &Rows,
    right_name: &str,
    right: &Rows,
    from_ms: i64,
    to_ms: i64,
) -> ReconcileReport {
    let mut counts = Counts {
        left: left.len() as u64,
        right: right.len() as u64,
        ..Counts::default()
    };
    let mut differences = Vec::new();
    for (key, value) in left {
        match right.get(key) {
            Some(other) if other == value => counts.matching += 1,
            Some(other) => {
                counts.mismatching += 1;
                differences.push(difference_of(
                    Status::Mismatching,
                    key,
                    Some(value),
                    Some(other),
                ));
            }
            None => {
                counts.missing += 1;
                differences.push(difference_of(Status::Missing, key, Some(value), None));
            }
        }
    }
    for (key, value) in right {
        if !left.contains_key(key) {
            counts.extra += 1;
            differences.push(difference_of(Status::Extra, key, None, Some(value)));
        }
    }
    differences.sort_by(|a, b| a.key.cmp(&b.key));
    let group = |name_of: &dyn Fn(&RowKey) -> String| {
        let mut groups: BTreeMap<String, (Totals, Totals)> = BTreeMap::new();
        for (key, value) in left {
            groups.entry(name_of(key)).or_default().0.add(value);
        }
        for (key, value) in right {
            groups.entry(name_of(key)).or_default().1.add(value);
        }
        groups
            .into_iter()
            .map(|(name, (left, right))| GroupTotals {
                name,
                difference: right.minus(&left),
                left,
                right,
            })
            .collect::<Vec<_>>()
    };
    let by_cloud = group(&|key: &RowKey| key.cloud.clone());
    let by_tenant = group(&|key: &RowKey| key.tenant_id.clone());
    let mut partners: BTreeMap<String, (Totals, Totals)> = BTreeMap::new();
    for (side, rows) in [(0, left), (1, right)] {
        for value in rows.values() {
            for (partner, amount) in &value.shares {
                let entry = partners.entry(partner.clone()).or_default();
                let totals = if side == 0 {
                    &mut entry.0
                } else {
                    &mut entry.1
                };
                totals.rows += 1;
                totals.share_micros += i128::from(*amount);
            }
        }
    }
    let by_partner = partners
        .into_iter()
        .map(|(name, (left, right))| GroupTotals {
            name,
            difference: right.minus(&left),
            left,
            right,
        })
        .collect();
    ReconcileReport {
        left: left_name.to_owned(),
        right: right_name.to_owned(),
        from: format_utc_ms(from_ms),
        to: format_utc_ms(to_ms),
        rows: counts,
        differences,
        by_cloud,
        by_partner,
        by_tenant,
    }
}

fn parse_time(field: &'static str, text: &str) -> Result<i64, ReplayError> {
    parse_rfc3339_ms(text).ok_or_else(|| ReplayError::Setting {
        field,
        problem: format!("{text:?} is not an RFC 3339 time"),
    })
}

/// Loads both sides and compares them (blocking).
pub fn run(config: &Config, args: &ReconcileArgs) -> Result<ReconcileReport, ReplayError> {
    let from_ms = parse_time("--from", &args.from)?;
    let to_ms = parse_time("--to", &args.to)?;
    if to_ms <= from_ms {
        return Err(ReplayError::Setting {
            field: "--from/--to",
            problem: "--from must be before --to".to_owned(),
        });
    }
    let left = load(
        config,
        &Source::parse("--left", &args.left)?,
        &args.left,
        from_ms,
        to_ms,
    )?;
    let right = load(
        config,
        &Source::parse("--right", &args.right)?,
        &args.right,
        from_ms,
        to_ms,
    )?;
    Ok(compare(
        &args.left,
        &left,
        &args.right,
        &right,
        from_ms,
        to_ms,
    ))
}

/// The rows of `source` whose windows lie in `[from_ms, to_ms)`.
pub fn load(
    config: &Config,
    source: &Source,
    name: &str,
    from_ms: i64,
    to_ms: i64,
) -> Result<Rows, ReplayError> {
    match source {
        Source::Topic(topic) => load_topic(config, topic, name, from_ms, to_ms),
        Source::Store(StoreLocation::Sqlite(path)) => load_sqlite(path, name, from_ms, to_ms),
        Source::Store(StoreLocation::Postgres(url)) => load_postgres(url, name, from_ms, to_ms),
    }
}

fn kafka(operation: &'static str) -> impl FnOnce(KafkaError) -> ReplayError {
    move |source| ReplayError::Kafka { operation, source }
}

fn load_topic(
    config: &Config,
    topic: &str,
    name: &str,
    from_ms: i64,
    to_ms: i64,
) -> Result<Rows, ReplayError> {
    let consumer: BaseConsumer = client_config(&config.kafka)
        .set("group.id", "tally-reconcile")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()
        .map_err(kafka("create the reader"))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), KAFKA_TIMEOUT)
        .map_err(kafka("fetch the topic's metadata"))?;
    let Some(found) = metadata.topics().iter().find(|found| {
        found.name() == topic && found.error().is_none() && !found.partitions().is_empty()
    }) else {
        return Err(ReplayError::Source {
            source_name: name.to_owned(),
            problem: "the topic does not exist".to_owned(),
        });
    };
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    let mut assignment = TopicPartitionList::new();
    for partition in found.partitions() {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition.id(), KAFKA_TIMEOUT)
            .map_err(kafka("fetch the topic's offsets"))?;
        if high > low {
            ends.insert(partition.id(), high);
            assignment
                .add_partition_offset(topic, partition.id(), Offset::Offset(low))
                .map_err(kafka("assign the topic"))?;
        }
    }
    let mut rows = Rows::new();
    if ends.is_empty() {
        return Ok(rows);
    }
    consumer
        .assign(&assignment)
        .map_err(kafka("assign the topic"))?;
    let mut last_progress = Instant::now();
    while !ends.is_empty() {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                last_progress = Instant::now();
                let value = message.payload().unwrap_or_default();
                let row = decode_aggregate(value).map_err(|error| ReplayError::Source {
                    source_name: name.to_owned(),
                    problem: format!(
                        "partition {} offset {} is not a BillingAggregate: {error}",
                        message.partition(),
                        message.offset()
                    ),
                })?;
                if row.window_start_ms >= from_ms && row.window_end_ms <= to_ms {
                    let (key, value) = row_of(&row);
                    insert(&mut rows, name, key, value)?;
                }
                if ends
                    .get(&message.partition())
                    .is_some_and(|end| message.offset() + 1 >= *end)
                {
                    ends.remove(&message.partition());
                }
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                // read_committed: the end is the last stable offset; a commit marker may
                // be the high watermark's last offset.
                if let Ok(position) = consumer.position()
                    && let Some(offset) = position
                        .find_partition(topic, partition)
                        .and_then(|element| element.offset().to_raw())
                    && ends.get(&partition).is_some_and(|end| offset >= *end)
                {
                    ends.remove(&partition);
                }
            }
            Some(Err(source)) => {
                return Err(ReplayError::Kafka {
                    operation: "read the topic",
                    source,
                });
            }
            None => {}
        }
        if last_progress.elapsed() > STALL_TIMEOUT {
            return Err(ReplayError::Stalled {
                topic: topic.to_owned(),
                partition: ends.keys().next().copied().unwrap_or_default(),
                position: -1,
                seconds: STALL_TIMEOUT.as_secs(),
            });
        }
    }
    Ok(rows)
}

const ROWS_QUERY: &str = "SELECT id, source_topic, source_partition, window_start_ms, window_end_ms, \
     tenant_id, model, cloud, channel_partner, region, row_kind, correction_seq, event_count, \
     input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, currency, gross_micros, \
     net_micros, price_book_version, share_rule_version FROM tally_rows \
     WHERE window_start_ms >= $1 AND window_end_ms <= $2";
const SHARES_QUERY: &str = "SELECT s.row_id, s.beneficiary, s.amount_micros FROM tally_row_shares s \
     JOIN tally_rows r ON r.id = s.row_id WHERE r.window_start_ms >= $1 AND r.window_end_ms <= $2";

/// A stored row in the column order of [`ROWS_QUERY`].
struct StoredColumns {
    id: String,
    key: RowKey,
    event_count: i64,
    tokens: [i64; 4],
    currency: String,
    gross_micros: i64,
    net_micros: i64,
    price_book_version: String,
    share_rule_version: String,
}

fn assemble(
    name: &str,
    stored: Vec<StoredColumns>,
    shares: Vec<(String, String, i64)>,
) -> Result<Rows, ReplayError> {
    let mut by_row: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for (row_id, beneficiary, amount) in shares {
        by_row
            .entry(row_id)
            .or_default()
            .insert(beneficiary, amount);
    }
    let mut rows = Rows::new();
    for columns in stored {
        let value = RowValue {
            shares: by_row.remove(&columns.id).unwrap_or_default(),
            id: columns.id,
            event_count: columns.event_count,
            tokens: columns.tokens,
            currency: columns.currency,
            gross_micros: columns.gross_micros,
            net_micros: columns.net_micros,
            price_book_version: columns.price_book_version,
            share_rule_version: columns.share_rule_version,
        };
        insert(&mut rows, name, columns.key, value)?;
    }
    Ok(rows)
}

fn load_sqlite(path: &str, name: &str, from_ms: i64, to_ms: i64) -> Result<Rows, ReplayError> {
    let source = |error: rusqlite::Error| ReplayError::Source {
        source_name: name.to_owned(),
        problem: error.to_string(),
    };
    let connection = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(source)?;
    let query = ROWS_QUERY.replace("$1", "?1").replace("$2", "?2");
    let mut statement = connection.prepare(&query).map_err(source)?;
    let stored = statement
        .query_map([from_ms, to_ms], |row| {
            Ok(StoredColumns {
                id: row.get(0)?,
                key: RowKey {
                    source_topic: row.get(1)?,
                    source_partition: row.get(2)?,
                    window_start_ms: row.get(3)?,
                    window_end_ms: row.get(4)?,
                    tenant_id: row.get(5)?,
                    model: row.get(6)?,
                    cloud: row.get(7)?,
                    channel_partner: row.get(8)?,
                    region: row.get(9)?,
                    row_kind: row.get(10)?,
                    correction_seq: row.get(11)?,
                },
                event_count: row.get(12)?,
                tokens: [row.get(13)?, row.get(14)?, row.get(15)?, row.get(16)?],
                currency: row.get(17)?,
                gross_micros: row.get(18)?,
                net_micros: row.get(19)?,
                price_book_version: row.get(20)?,
                share_rule_version: row.get(21)?,
            })
        })
        .map_err(source)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(source)?;
    let query = SHARES_QUERY.replace("$1", "?1").replace("$2", "?2");
    let mut statement = connection.prepare(&query).map_err(source)?;
    let shares = statement
        .query_map([from_ms, to_ms], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .map_err(source)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(source)?;
    assemble(name, stored, shares)
}

fn load_postgres(url: &str, name: &str, from_ms: i64, to_ms: i64) -> Result<Rows, ReplayError> {
    let source = |error: tokio_postgres::Error| ReplayError::Source {
        source_name: name.to_owned(),
        problem: error.to_string(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| ReplayError::Output(format!("cannot start a runtime: {error}")))?;
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .map_err(source)?;
        tokio::spawn(connection);
        let stored = client
            .query(ROWS_QUERY, &[&from_ms, &to_ms])
            .await
            .map_err(source)?
            .into_iter()
            .map(|row| {
                Ok(StoredColumns {
                    id: row.try_get(0)?,
                    key: RowKey {
                        source_topic: row.try_get(1)?,
                        source_partition: i32::try_from(row.try_get::<_, i64>(2)?).unwrap_or(-1),
                        window_start_ms: row.try_get(3)?,
                        window_end_ms: row.try_get(4)?,
                        tenant_id: row.try_get(5)?,
                        model: row.try_get(6)?,
                        cloud: row.try_get(7)?,
                        channel_partner: row.try_get(8)?,
                        region: row.try_get(9)?,
                        row_kind: row.try_get(10)?,
                        correction_seq: row.try_get(11)?,
                    },
                    event_count: row.try_get(12)?,
                    tokens: [
                        row.try_get(13)?,
                        row.try_get(14)?,
                        row.try_get(15)?,
                        row.try_get(16)?,
                    ],
                    currency: row.try_get(17)?,
                    gross_micros: row.try_get(18)?,
                    net_micros: row.try_get(19)?,
                    price_book_version: row.try_get(20)?,
                    share_rule_version: row.try_get(21)?,
                })
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(source)?;
        let shares = client
            .query(SHARES_QUERY, &[&from_ms, &to_ms])
            .await
            .map_err(source)?
            .into_iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)))
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(source)?;
        assemble(name, stored, shares)
    })
}

/// Renders the report.
pub fn render(report: &ReconcileReport, format: Format) -> Result<String, ReplayError> {
    match format {
        Format::Json => serde_json::to_string_pretty(report)
            .map(|text| text + "\n")
            .map_err(|error| ReplayError::Output(error.to_string())),
        Format::Csv => Ok(render_csv(report)),
        Format::Table => Ok(render_table(report)),
    }
}

fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

/// Field-level lines of one difference: (field, left, right, difference).
fn difference_fields(difference: &Difference) -> Vec<(String, String, String, String)> {
    let mut lines = Vec::new();
    let left = difference.left.as_ref();
    let right = difference.right.as_ref();
    let number = |value: Option<i64>| value.map_or_else(String::new, |value| value.to_string());
    let text = |value: Option<&str>| value.unwrap_or("").to_owned();
    let mut push_number = |field: String, l: Option<i64>, r: Option<i64>| {
        let delta = i128::from(r.unwrap_or(0)) - i128::from(l.unwrap_or(0));
        if l != r {
            lines.push((field, number(l), number(r), delta.to_string()));
        }
    };
    push_number(
        "event_count".to_owned(),
        left.map(|v| v.event_count),
        right.map(|v| v.event_count),
    );
    for (index, kind) in TOKEN_KINDS.iter().enumerate() {
        push_number(
            format!("{kind}_tokens"),
            left.map(|v| v.tokens[index]),
            right.map(|v| v.tokens[index]),
        );
    }
    push_number(
        "gross_micros".to_owned(),
        left.map(|v| v.gross_micros),
        right.map(|v| v.gross_micros),
    );
    push_number(
        "net_micros".to_owned(),
        left.map(|v| v.net_micros),
        right.map(|v| v.net_micros),
    );
    let mut partners: Vec<&String> = left
        .into_iter()
        .chain(right)
        .flat_map(|value| value.shares.keys())
        .collect();
    partners.sort();
    partners.dedup();
    for partner in partners {
        push_number(
            format!("share:{partner}"),
            left.and_then(|v| v.shares.get(partner).copied()),
            right.and_then(|v| v.shares.get(partner).copied()),
        );
    }
    for (field, l, r) in [
        (
            "id",
            left.map(|v| v.id.as_str()),
            right.map(|v| v.id.as_str()),
        ),
        (
            "currency",
            left.map(|v| v.currency.as_str()),
            right.map(|v| v.currency.as_str()),
        ),
        (
            "price_book_version",
            left.map(|v| v.price_book_version.as_str()),
            right.map(|v| v.price_book_version.as_str()),
        ),
        (
            "share_rule_version",
            left.map(|v| v.share_rule_version.as_str()),
            right.map(|v| v.share_rule_version.as_str()),
        ),
    ] {
        if l != r {
            lines.push((field.to_owned(), text(l), text(r), String::new()));
        }
    }
    lines
}

fn status_name(status: Status) -> &'static str {
    match status {
        Status::Mismatching => "mismatching",
        Status::Missing => "missing",
        Status::Extra => "extra",
    }
}

fn totals_fields(totals: &Totals) -> Vec<(&'static str, i128)> {
    vec![
        ("rows", totals.rows),
        ("events", totals.events),
        ("input_tokens", totals.tokens[0]),
        ("cached_input_tokens", totals.tokens[1]),
        ("output_tokens", totals.tokens[2]),
        ("reasoning_tokens", totals.tokens[3]),
        ("gross_micros", totals.gross_micros),
        ("share_micros", totals.share_micros),
        ("net_micros", totals.net_micros),
    ]
}

fn render_csv(report: &ReconcileReport) -> String {
    let mut out = String::from(
        "# amounts are integer micro-units of the row currency; left is the reference, difference = right - left\n\
         section,status,key,field,left,right,difference\n",
    );
    let c = &report.rows;
    for (field, value) in [
        ("left", c.left),
        ("right", c.right),
        ("matching", c.matching),
        ("mismatching", c.mismatching),
        ("missing", c.missing),
        ("extra", c.extra),
    ] {
        let _ = writeln!(out, "rows,{field},,,,,{value}");
    }
    for difference in &report.differences {
        for (field, left, right, delta) in difference_fields(difference) {
            let _ = writeln!(
                out,
                "row,{},{},{},{},{},{}",
                status_name(difference.status),
                csv_field(&difference.key.label()),
                csv_field(&field),
                csv_field(&left),
                csv_field(&right),
                delta
            );
        }
    }
    for (section, groups) in [
        ("cloud", &report.by_cloud),
        ("partner", &report.by_partner),
        ("tenant", &report.by_tenant),
    ] {
        for group in groups {
            let left = totals_fields(&group.left);
            let right = totals_fields(&group.right);
            let delta = totals_fields(&group.difference);
            for ((field, l), ((_, r), (_, d))) in left.iter().zip(right.iter().zip(delta.iter())) {
                if section == "partner" && *field != "share_micros" && *field != "rows" {
                    continue;
                }
                let _ = writeln!(
                    out,
                    "{section},,{},{field},{l},{r},{d}",
                    csv_field(&group.name)
                );
            }
        }
    }
    out
}

fn render_table(report: &ReconcileReport) -> String {
    let mut out = String::new();
    let c = &report.rows;
    let _ = writeln!(
        out,
        "reconcile {} (left, the reference) with {} (right)",
        report.left, report.right
    );
    let _ = writeln!(out, "windows from {} to {}", report.from, report.to);
    let _ = writeln!(
        out,
        "rows: left {}, right {}; matching {}, mismatching {}, missing {}, extra {}",
        c.left, c.right, c.matching, c.mismatching, c.missing, c.extra
    );
    let _ = writeln!(
        out,
        "amounts in integer micro-units of the row currency; difference = right - left"
    );
    if !report.differences.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<12} {:<22} {:>14} {:>14} {:>14}  key",
            "status", "field", "left", "right", "difference"
        );
        for difference in &report.differences {
            for (field, left, right, delta) in difference_fields(difference) {
                // A missing or extra row is shown by its counts and amounts only.
                let shown = match difference.status {
                    Status::Mismatching => field != "id",
                    Status::Missing | Status::Extra => {
                        matches!(
                            field.as_str(),
                            "event_count" | "gross_micros" | "net_micros"
                        )
                    }
                };
                if !shown {
                    continue;
                }
                let _ = writeln!(
                    out,
                    "{:<12} {:<22} {:>14} {:>14} {:>14}  {}",
                    status_name(difference.status),
                    field,
                    left,
                    right,
                    delta,
                    difference.key.label()
                );
            }
        }
    }
    for (title, groups) in [("cloud", &report.by_cloud), ("tenant", &report.by_tenant)] {
        let _ = writeln!(
            out,
            "\n{:<24} {:>16} {:>16} {:>14} {:>16} {:>16} {:>14}",
            title, "gross left", "gross right", "gross diff", "net left", "net right", "net diff"
        );
        for group in groups {
            let _ = writeln!(
                out,
                "{:<24} {:>16} {:>16} {:>14} {:>16} {:>16} {:>14}",
                group.name,
                group.left.gross_micros,
                group.right.gross_micros,
                group.difference.gross_micros,
                group.left.net_micros,
                group.right.net_micros,
                group.difference.net_micros
            );
        }
    }
    let _ = writeln!(
        out,
        "\n{:<24} {:>16} {:>16} {:>14}",
        "partner", "share left", "share right", "share diff"
    );
    for group in &report.by_partner {
        let _ = writeln!(
            out,
            "{:<24} {:>16} {:>16} {:>14}",
            group.name,
            group.left.share_micros,
            group.right.share_micros,
            group.difference.share_micros
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tenant: &str, cloud: &str, sequence: i64) -> RowKey {
        RowKey {
            source_topic: "usage.events".to_owned(),
            source_partition: 0,
            window_start_ms: 0,
            window_end_ms: 60_000,
            tenant_id: tenant.to_owned(),
            model: "atlas-large".to_owned(),
            cloud: cloud.to_owned(),
            channel_partner: None,
            region: "eu".to_owned(),
            row_kind: "billable".to_owned(),
            correction_seq: sequence,
        }
    }

    fn value(id: &str, gross: i64, share: i64) -> RowValue {
        RowValue {
            id: id.to_owned(),
            event_count: 1,
            tokens: [10, 0, 5, 0],
            currency: "USD".to_owned(),
            gross_micros: gross,
            shares: [("microsoft".to_owned(), share)].into_iter().collect(),
            net_micros: gross - share,
            price_book_version: "v1".to_owned(),
            share_rule_version: "v1".to_owned(),
        }
    }

    #[test]
    fn finds_mismatching_missing_and_extra_rows_and_sums_their_differences() {
        let mut left = Rows::new();
        left.insert(key("a", "aws", 0), value("1", 1_000, 200));
        left.insert(key("a", "aws", 1), value("2", 500, 100));
        left.insert(key("b", "azure", 0), value("3", 300, 60));
        let mut right = left.clone();
        right.insert(key("a", "aws", 0), value("1", 1_000, 250));
        right.remove(&key("a", "aws", 1));
        right.insert(key("c", "gcp", 0), value("4", 40, 0));
        let report = compare("l", &left, "r", &right, 0, 60_000);
        assert!(!report.is_equal());
        let rows = report.rows;
        assert_eq!(
            (rows.matching, rows.mismatching, rows.missing, rows.extra),
            (1, 1, 1, 1)
        );
        let statuses: Vec<Status> = report.differences.iter().map(|d| d.status).collect();
        assert_eq!(
            statuses,
            vec![Status::Mismatching, Status::Missing, Status::Extra]
        );
        let mismatch = &report.differences[0];
        assert_eq!(mismatch.gross_difference_micros, 0);
        assert_eq!(mismatch.net_difference_micros, -50);
        assert_eq!(mismatch.share_differences_micros["microsoft"], 50);
        // microsoft: left 200 + 100 + 60, right 250 + 60 (+ 0 on the extra row).
        let microsoft = &report.by_partner[0];
        assert_eq!(microsoft.name, "microsoft");
        assert_eq!(
            (microsoft.left.share_micros, microsoft.right.share_micros),
            (360, 310)
        );
        assert_eq!(microsoft.difference.share_micros, -50);
        let aws = report
            .by_cloud
            .iter()
            .find(|g| g.name == "aws")
            .expect("aws");
        assert_eq!(aws.difference.gross_micros, -500);
        assert_eq!(aws.difference.tokens, [-10, 0, -5, 0]);
        let csv = render(&report, Format::Csv).expect("csv");
        assert!(csv.contains("row,mismatching,"));
        assert!(csv.contains(",share:microsoft,200,250,50\n"));
    }

    #[test]
    fn equal_sides_are_equal_and_sources_parse() {
        let mut rows = Rows::new();
        rows.insert(key("a", "aws", 0), value("1", 1_000, 200));
        assert!(compare("l", &rows, "r", &rows, 0, 1).is_equal());
        assert_eq!(
            Source::parse("--left", "topic:billing.aggregates").expect("topic"),
            Source::Topic("billing.aggregates".to_owned())
        );
        assert!(matches!(
            Source::parse("--left", "sqlite:x.db").expect("sqlite"),
            Source::Store(StoreLocation::Sqlite(_))
        ));
        assert!(Source::parse("--left", "billing.aggregates").is_err());
        assert!(Source::parse("--left", "topic:").is_err());
    }
}
