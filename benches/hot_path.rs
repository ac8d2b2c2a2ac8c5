//! The aggregator's in-process hot path on one core, at steady-state size.
//!
//! What is measured is the code the Kafka loop runs for every input record:
//! [`tally_aggregator::record::apply_record`] (decode → validate against the Kafka
//! timestamp → routing check → payload fingerprint → `PartitionState::on_event`: dedupe,
//! window, classification) and, periodically, `PartitionState::drain_closed` (pricing)
//! plus the Avro encoding of every drained row, as at a commit. Kafka I/O is not part of
//! it: `benches/e2e_throughput.rs` measures that.
//!
//! Input is `tally_gen::Generator` traffic for one partition with every record
//! class (on time, out of order, corrections, duplicates, too late, rejected), copied
//! before it is timed into one buffer per batch, keys and values back to back in offset
//! order, as librdkafka hands records to the loop (pointing into the fetched record
//! batch; see `Fetched`). Before
//! measuring, the state is filled for longer than the dedupe horizon, so ids expire as
//! fast as they arrive and windows close as fast as they open: the measured state
//! holds about 2.3 M remembered ids and 60–100 k open panes (5 000 tenants), and stays
//! there. Records are generated outside the timed regions (`iter_custom`), in batches
//! that continue the same stream, so no event is ever replayed.
//!
//! First, three fixed runs of 1 M records each print events/s by wall clock and by the
//! thread's CPU time (the figure to compare on a shared machine; set
//! `TALLY_BENCH_FIXED_ONLY=1` to stop there). Then the criterion benchmarks (criterion
//! reports `elem/s`, i.e. records/s, and time per record or row):
//! - `hot_path/apply_record+drain`: the whole path;
//! - `stage/decode`, `stage/validate`, `stage/fingerprint`, `stage/on_event`: one stage
//!   each (decode and validate on a fixed batch; `on_event` on the advancing stream);
//! - `stage/drain_price_encode_per_row`: pricing and encoding, per drained row.
//!
//! The state's size (`approx_state_bytes`, remembered ids, open panes and windows) is
//! printed after the pre-fill.
//!
//! Run with `cargo bench --bench hot_path`. Under `cargo test --benches` (criterion's
//! test mode, detected by the absence of `--bench` on the command line) the pre-fill is
//! small and every benchmark runs once.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use tally_aggregator::record::{
    InputRecord, PREFETCH_AHEAD, RecordOutcome, RecordRules, apply_record, prefetch_record,
};
use tally_core::codec::{Decoded, decode_record, encode_aggregate};
use tally_core::contracts::Contracts;
use tally_core::dedupe::{DedupeSet, payload_fingerprint};
use tally_core::event::UsageEvent;
use tally_core::partition::{PartitionParams, PartitionState};
use tally_core::validate::{ValidationLimits, validate_event};
use tally_core::window::WindowSize;
use tally_gen::{GeneratedRecord, Generator, GeneratorConfig};

const WINDOW_MS: i64 = 60_000;
const MAX_OUT_OF_ORDERNESS_MS: i64 = 5_000;
const ALLOWED_LATENESS_MS: i64 = 60_000;
/// Four windows: the smallest horizon the generator places corrections in.
const CORRECTION_HORIZON_MS: i64 = 240_000;
const DEDUPE_HORIZON_MS: i64 = ALLOWED_LATENESS_MS + CORRECTION_HORIZON_MS;
/// Records between two drains: about one second of traffic at the target rate, i.e.
/// one drain per commit interval.
const DRAIN_EVERY: u64 = 1_000_000;
/// Records generated per untimed batch.
const BATCH: usize = 50_000;

/// The size of the measurement: full under `cargo bench`, tiny in test mode.
#[derive(Debug, Clone, Copy)]
struct Scale {
    /// Simulated events per second (sets how many ids fit in the dedupe horizon).
    rate_per_sec: u64,
    /// Tenants (sets how many panes a window holds).
    tenants: u32,
    /// Records fed before measuring.
    prefill: u64,
}

impl Scale {
    fn detect() -> Scale {
        if std::env::args().any(|arg| arg == "--bench") {
            // Ids remembered at steady state ≈ rate × (dedupe horizon + half a window)
            // ≈ 7 000 × 330 s ≈ 2.3 M; the pre-fill spans 420 s of traffic, past the
            // horizon plus a window, so expiry is in its steady state.
            Scale {
                rate_per_sec: 7_000,
                tenants: 5_000,
                prefill: 7_000 * 420,
            }
        } else {
            Scale {
                rate_per_sec: 200,
                tenants: 200,
                prefill: 20_000,
            }
        }
    }
}

/// One partition's state and the stream that feeds it.
/// A batch of input records laid out as a Kafka consumer receives them: every key and
/// value back to back in one buffer, in offset order. librdkafka hands out records
/// whose key and value point into the fetched (decompressed) record batch, so the
/// loop reads them sequentially; the generator's own records are separate allocations
/// wherever the allocator put them, which the loop never sees. Built outside the timed
/// regions.
struct Fetched {
    bytes: Vec<u8>,
    records: Vec<FetchedRecord>,
}

/// Where one record of a [`Fetched`] batch lies in its buffer.
#[derive(Debug, Clone, Copy)]
struct FetchedRecord {
    key: Option<(usize, usize)>,
    value: (usize, usize),
    timestamp_ms: i64,
}

/// One record of a [`Fetched`] batch.
#[derive(Debug, Clone, Copy)]
struct RecordView<'a> {
    key: Option<&'a [u8]>,
    value: &'a [u8],
    timestamp_ms: i64,
}

impl Fetched {
    fn new(generated: &[GeneratedRecord]) -> Fetched {
        let size = generated
            .iter()
            .map(|record| record.value.len() + record.key.as_ref().map_or(0, |key| key.len()))
            .sum();
        let mut bytes = Vec::with_capacity(size);
        let mut records = Vec::with_capacity(generated.len());
        for record in generated {
            let key = record.key.as_ref().map(|key| {
                let start = bytes.len();
                bytes.extend_from_slice(key.as_ref());
                (start, key.len())
            });
            let start = bytes.len();
            bytes.extend_from_slice(&record.value);
            records.push(FetchedRecord {
                key,
                value: (start, record.value.len()),
                timestamp_ms: record.timestamp_ms,
            });
        }
        Fetched { bytes, records }
    }

    fn len(&self) -> usize {
        self.records.len()
    }

    fn view(&self, record: FetchedRecord) -> RecordView<'_> {
        RecordView {
            key: record
                .key
                .map(|(start, len)| &self.bytes[start..start + len]),
            value: &self.bytes[record.value.0..record.value.0 + record.value.1],
            timestamp_ms: record.timestamp_ms,
        }
    }

    fn get(&self, index: usize) -> RecordView<'_> {
        self.view(self.records[index])
    }

    fn iter(&self) -> impl Iterator<Item = RecordView<'_>> {
        self.records.iter().map(|record| self.view(*record))
    }
}

struct Stream {
    generator: Generator,
    state: PartitionState,
    contracts: Contracts,
    limits: ValidationLimits,
    next_offset: i64,
    since_drain: u64,
}

impl Stream {
    fn new(scale: Scale) -> Stream {
        let generator = Generator::new(GeneratorConfig {
            seed: 7,
            count: 1_000_000_000,
            rate_per_sec: scale.rate_per_sec,
            partitions: 1,
            tenants: scale.tenants,
            window_ms: WINDOW_MS,
            max_out_of_orderness_ms: MAX_OUT_OF_ORDERNESS_MS,
            allowed_lateness_ms: ALLOWED_LATENESS_MS,
            correction_horizon_ms: CORRECTION_HORIZON_MS,
            ..GeneratorConfig::default()
        })
        .expect("valid generator config");
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/contracts/default.toml");
        let text = std::fs::read_to_string(&path).expect("read the default contracts");
        let window = WindowSize::new(WINDOW_MS).expect("a minute divides a quarter hour");
        let contracts = Contracts::load(&text, window).expect("default contracts load");
        let state = PartitionState::new(PartitionParams {
            window,
            max_out_of_orderness_ms: MAX_OUT_OF_ORDERNESS_MS,
            allowed_lateness_ms: ALLOWED_LATENESS_MS,
            correction_horizon_ms: CORRECTION_HORIZON_MS,
            dedupe_horizon_ms: DEDUPE_HORIZON_MS,
            source_topic: "usage.events".to_owned(),
            partition: 0,
        })
        .expect("valid partition params");
        Stream {
            generator,
            state,
            contracts,
            limits: ValidationLimits::default(),
            next_offset: 0,
            since_drain: 0,
        }
    }

    fn batch(&mut self, len: usize) -> Fetched {
        let generated: Vec<GeneratedRecord> = (0..len)
            .map(|_| self.generator.next_record().expect("the stream is long"))
            .collect();
        Fetched::new(&generated)
    }

    /// What the loop does before applying the record at `index` of a batch: starts
    /// fetching the state of the record [`PREFETCH_AHEAD`] places ahead.
    fn prefetch(&self, batch: &Fetched, index: usize) {
        if index + PREFETCH_AHEAD < batch.len() {
            prefetch_record(&self.state, batch.get(index + PREFETCH_AHEAD).value);
        }
    }

    /// The loop's per-record step, plus the commit-time drain every [`DRAIN_EVERY`]
    /// records. Returns rows drained.
    fn apply(&mut self, record: RecordView<'_>, buffer: &mut Vec<u8>) -> usize {
        let rules = RecordRules {
            contracts: &self.contracts,
            limits: &self.limits,
            partition_count: 1,
        };
        let input = InputRecord {
            partition: 0,
            offset: self.next_offset,
            key: record.key,
            value: record.value,
            timestamp_ms: Some(record.timestamp_ms),
        };
        self.next_offset += 1;
        let outcome = apply_record(&mut self.state, &rules, &input);
        black_box(outcome);
        self.since_drain += 1;
        if self.since_drain >= DRAIN_EVERY {
            self.since_drain = 0;
            return self.drain(buffer);
        }
        0
    }

    /// Drains, prices and encodes every closed row, as a commit does.
    fn drain(&mut self, buffer: &mut Vec<u8>) -> usize {
        let rows = self
            .state
            .drain_closed(&self.contracts)
            .expect("rows price with the contracts they were classified with");
        for row in &rows {
            buffer.clear();
            encode_aggregate(row, buffer);
            black_box(&buffer);
        }
        rows.len()
    }

    /// Decodes and validates a batch for the stage benchmarks (usage events only).
    fn decoded(&self, records: &Fetched) -> Vec<(i64, UsageEvent)> {
        records
            .iter()
            .filter_map(|record| match decode_record(record.value) {
                Ok(Decoded::Usage(event)) => Some((record.timestamp_ms, event)),
                _ => None,
            })
            .filter(|(ts, event)| validate_event(event, Some(*ts), &self.limits).is_ok())
            .collect()
    }
}

/// Fills the state and prints its size. A shadow dedupe set, fed the same counted ids
/// and expired at the same watermark, splits the estimate into ids and panes.
fn prefill(stream: &mut Stream, records: u64) {
    let started = Instant::now();
    let mut shadow = DedupeSet::new(DEDUPE_HORIZON_MS);
    let mut buffer = Vec::new();
    let mut left = records;
    while left > 0 {
        let take = usize::try_from(left.min(BATCH as u64)).expect("small");
        let fetched = stream.batch(take);
        for (index, record) in fetched.iter().enumerate() {
            stream.prefetch(&fetched, index);
            let counted_before = stream.state.counters().counted;
            stream.apply(record, &mut buffer);
            if stream.state.counters().counted > counted_before
                && let Ok(Decoded::Usage(event)) = decode_record(record.value)
            {
                let window = stream
                    .state
                    .params()
                    .window
                    .window_of(event.occurred_at_ms)
                    .expect("counted events have a window");
                shadow.claim(event.event_id, window.end_ms, payload_fingerprint(&event));
            }
            if let Some(watermark) = stream.state.watermark() {
                shadow.expire(watermark);
            }
        }
        left -= take as u64;
    }
    stream.drain(&mut buffer);
    let state = &stream.state;
    let total = state.approx_state_bytes();
    let ids = state.remembered_ids();
    let panes = state.open_panes();
    let id_bytes = shadow.approx_bytes();
    let counters = state.counters();
    println!(
        "pre-fill: {records} records in {:.1} s; remembered ids {ids} (shadow set {}), \
         open panes (keys) {panes}, open windows {}",
        started.elapsed().as_secs_f64(),
        shadow.len(),
        state.open_windows(),
    );
    println!(
        "pre-fill counters: counted {} (corrections {}), duplicates {}, too late {}, rejected {}",
        counters.counted,
        counters.corrections,
        counters.duplicates,
        counters.too_late,
        counters.rejected
    );
    println!(
        "state: approx_state_bytes {total} ({:.1} MiB); dedupe set {id_bytes} bytes = {:.1} \
         bytes per remembered id; the rest {} bytes = {:.1} bytes per open key",
        total as f64 / (1024.0 * 1024.0),
        id_bytes as f64 / ids.max(1) as f64,
        total.saturating_sub(id_bytes),
        total.saturating_sub(id_bytes) as f64 / panes.max(1) as f64,
    );
}

/// Runs `timed` over freshly generated batches until `iters` records were measured.
fn over_stream(
    stream: &mut Stream,
    iters: u64,
    mut timed: impl FnMut(&mut Stream, &Fetched) -> Duration,
) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let take = usize::try_from(left.min(BATCH as u64)).expect("small");
        let batch = stream.batch(take);
        total += timed(stream, &batch);
        left -= take as u64;
    }
    total
}

fn benches(c: &mut Criterion, stream: &mut Stream, test_mode: bool) {
    let measurement = if test_mode {
        Duration::from_millis(100)
    } else {
        Duration::from_secs(8)
    };

    let mut group = c.benchmark_group("hot_path");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10).measurement_time(measurement);
    group.bench_function("apply_record+drain", |b| {
        let mut buffer = Vec::with_capacity(1024);
        b.iter_custom(|iters| {
            over_stream(stream, iters, |stream, batch| {
                let started = Instant::now();
                for (index, record) in batch.iter().enumerate() {
                    stream.prefetch(batch, index);
                    stream.apply(record, &mut buffer);
                }
                started.elapsed()
            })
        });
    });
    group.finish();

    let fixed = stream.batch(BATCH);
    let events = stream.decoded(&fixed);
    let mut group = c.benchmark_group("stage");
    group.throughput(Throughput::Elements(1));
    group.sample_size(20).measurement_time(measurement);
    group.bench_function("decode", |b| {
        let mut index = 0;
        b.iter(|| {
            index = (index + 1) % fixed.len();
            black_box(decode_record(black_box(fixed.get(index).value)))
        });
    });
    group.bench_function("validate", |b| {
        let mut index = 0;
        b.iter(|| {
            index = (index + 1) % events.len();
            let (ts, event) = &events[index];
            black_box(validate_event(black_box(event), Some(*ts), &stream.limits))
        });
    });
    group.bench_function("fingerprint", |b| {
        let mut index = 0;
        b.iter(|| {
            index = (index + 1) % events.len();
            black_box(payload_fingerprint(black_box(&events[index].1)))
        });
    });
    group.bench_function("on_event", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let batch = stream.batch(BATCH);
                let decoded = stream.decoded(&batch);
                let prints: Vec<u64> = decoded
                    .iter()
                    .map(|(_, event)| payload_fingerprint(event))
                    .collect();
                let take = decoded
                    .len()
                    .min(usize::try_from(left).unwrap_or(usize::MAX));
                let started = Instant::now();
                for ((_, event), print) in decoded.iter().zip(&prints).take(take) {
                    let offset = stream.next_offset;
                    stream.next_offset += 1;
                    black_box(
                        stream
                            .state
                            .on_event(offset, event, *print, &stream.contracts),
                    );
                }
                total += started.elapsed();
                left -= take as u64;
                // Not timed: keep the state at its steady size.
                stream.drain(&mut Vec::new());
            }
            total
        });
    });
    group.finish();

    let mut group = c.benchmark_group("stage");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10).measurement_time(measurement);
    group.bench_function("drain_price_encode_per_row", |b| {
        let mut buffer = Vec::with_capacity(1024);
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut rows = 0_u64;
            while rows < iters {
                // Not timed: feed records until rows are pending.
                while stream.state.closed_pending() == 0 {
                    let fetched = stream.batch(BATCH);
                    for record in fetched.iter() {
                        let rules = RecordRules {
                            contracts: &stream.contracts,
                            limits: &stream.limits,
                            partition_count: 1,
                        };
                        let input = InputRecord {
                            partition: 0,
                            offset: stream.next_offset,
                            key: record.key,
                            value: record.value,
                            timestamp_ms: Some(record.timestamp_ms),
                        };
                        stream.next_offset += 1;
                        let outcome = apply_record(&mut stream.state, &rules, &input);
                        debug_assert!(outcome != RecordOutcome::Tick);
                    }
                }
                let started = Instant::now();
                let drained = stream.drain(&mut buffer);
                total += started.elapsed();
                rows += drained as u64;
            }
            // Scale to exactly `iters` rows.
            total.mul_f64(iters as f64 / rows as f64)
        });
    });
    group.finish();
}

/// CPU time (user + system) of the calling thread, from `/proc/thread-self/stat`.
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<u64> = after
        .split_whitespace()
        .map(|field| field.parse().unwrap_or(0))
        .collect();
    // utime and stime (fields 14 and 15) in clock ticks of 10 ms.
    let ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// The whole path over a fixed number of records, timed by wall clock and by the
/// thread's CPU time: on a shared machine the CPU figure is the one that does not
/// count time the thread spent preempted.
fn fixed_run(stream: &mut Stream, records: u64) {
    let mut buffer = Vec::with_capacity(1024);
    let mut wall = Duration::ZERO;
    let mut cpu = Duration::ZERO;
    let mut rows = 0;
    let mut left = records;
    while left > 0 {
        let take = usize::try_from(left.min(BATCH as u64)).expect("small");
        let batch = stream.batch(take);
        let cpu_before = thread_cpu();
        let started = Instant::now();
        for (index, record) in batch.iter().enumerate() {
            stream.prefetch(&batch, index);
            rows += stream.apply(record, &mut buffer);
        }
        wall += started.elapsed();
        cpu += thread_cpu() - cpu_before;
        left -= take as u64;
    }
    println!(
        "fixed run: {records} records ({rows} rows drained): {:.2} s wall = {:.0} events/s; \
         {:.2} s thread CPU = {:.0} events/s per core",
        wall.as_secs_f64(),
        records as f64 / wall.as_secs_f64(),
        cpu.as_secs_f64(),
        records as f64 / cpu.as_secs_f64().max(0.01),
    );
}

fn main() {
    let scale = Scale::detect();
    let test_mode = !std::env::args().any(|arg| arg == "--bench");
    let mut stream = Stream::new(scale);
    prefill(&mut stream, scale.prefill);
    for _ in 0..3 {
        fixed_run(&mut stream, if test_mode { 10_000 } else { 1_000_000 });
    }
    if std::env::var_os("TALLY_BENCH_FIXED_ONLY").is_some() {
        return;
    }
    let mut criterion = Criterion::default().configure_from_args();
    benches(&mut criterion, &mut stream, test_mode);
    let state = &stream.state;
    println!(
        "after the benchmarks: remembered ids {}, open panes {}, approx_state_bytes {}",
        state.remembered_ids(),
        state.open_panes(),
        state.approx_state_bytes()
    );
    criterion.final_summary();
}
