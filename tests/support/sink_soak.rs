//! The sink's side of the aggregator crash soak (`tests/aggregator_kill.rs`): `tally
//! sink` loads the soak's billing.aggregates into a fresh PostgreSQL database while the
//! aggregator is being killed, and is itself SIGKILLed and restarted, several times
//! inside an open database transaction.
//!
//! Knowing a transaction is open: the sink runs with the store's commit-delay test hook
//! (`TALLY_SINK_TEST_COMMIT_DELAY_MS`), so after writing a batch its session sits
//! `idle in transaction` for [`COMMIT_DELAY`] before COMMIT. A targeted kill polls
//! `pg_stat_activity` for the sink's session (`application_name` = tally-sink, the
//! run's database) in that state with a transaction id, entered less than half the delay
//! ago, and sends SIGKILL right away (within the other half, measured). It counts as a
//! kill inside an open transaction only if PostgreSQL then reports that transaction
//! id aborted (`pg_xact_status`) and the store's committed offsets are those read while
//! it was open. The other kills land at random moments.
//!
//! The sink's last restart runs without the delay. At the end (after the aggregator's
//! final run) it catches up, is stopped with
//! SIGTERM, and the store is compared with a read_committed read of the topic row for
//! row (ids, digests of the record bytes, decoded fields), each id once, offsets at the
//! end of every partition; roll-ups equal the sums of the topic's rows, the generator's
//! token truth per 15-minute bucket and dims, and money recomputed from each stored
//! row's tokens and the contracts ([`super::money`]), summed per roll-up line.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tally_gen::GroundTruth;

use super::TestTopics;
use super::eos::{log_tail, read_committed};
use super::money::TruthContracts;
use super::sink::{
    SinkProcess, assert_store_equals, pg_fresh_database, pg_runtime, pg_snapshot, sink_config,
};

/// The store's pause between a batch's writes and its COMMIT in the soak.
pub const COMMIT_DELAY: Duration = Duration::from_millis(500);
/// SIGKILLs of the sink in the soak.
pub const SINK_KILLS: usize = 6;
/// Of which aimed inside an open transaction.
pub const TARGETED_KILLS: usize = 4;
/// Bound of one wait (progress after a restart, an open transaction, the catch-up).
const WAIT_TIMEOUT: Duration = Duration::from_secs(120);

/// What the sink's kill loop did.
#[derive(Debug, Default, Clone)]
pub struct SinkKillReport {
    /// SIGKILLs sent.
    pub kills: usize,
    /// Of which proved to land inside an open transaction (aborted by PostgreSQL).
    pub kills_in_open_transaction: usize,
    /// Committed rows in the store at each kill.
    pub rows_at_kill: Vec<i64>,
}

/// The sink under the soak: its database, config and kill thread.
pub struct SinkSoak {
    url: String,
    log: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(SinkProcess, SinkKillReport)>>,
    started: Instant,
}

impl SinkSoak {
    /// Creates a fresh database, starts the sink on `topics.billing_aggregates` and a
    /// thread that SIGKILLs and restarts it [`SINK_KILLS`] times.
    pub fn start(dir: &Path, topics: &TestTopics, seed: u64) -> SinkSoak {
        let url = pg_fresh_database();
        let database = url.rsplit_once('/').expect("a database").1.to_owned();
        let config = sink_config(dir, "sink-soak", topics, "", &[]);
        let group = super::rand_name("sink-soak");
        let log = dir.join("sink-soak.log");
        let stop = Arc::new(AtomicBool::new(false));
        let first = spawn_sink(&config, &url, &group, &log, Some(COMMIT_DELAY));
        let killer = Killer {
            pg: Pg::connect(&url),
            url: url.clone(),
            database,
            config,
            group,
            log: log.clone(),
            stop: Arc::clone(&stop),
        };
        SinkSoak {
            url,
            log,
            stop,
            thread: Some(thread::spawn(move || killer.run(first, seed))),
            started: Instant::now(),
        }
    }

    /// After the aggregator's final run: waits for the kill loop, lets the sink catch
    /// up with the topic, stops it with SIGTERM and checks the store (module docs).
    pub fn finish(
        mut self,
        bootstrap: &str,
        topics: &TestTopics,
        truth: &GroundTruth,
        contracts: &TruthContracts,
    ) -> SinkKillReport {
        let thread = self.thread.take().expect("the kill thread");
        let began = Instant::now();
        while !thread.is_finished() {
            assert!(
                began.elapsed() < WAIT_TIMEOUT * 3,
                "the sink's kill loop did not end:\n{}",
                log_tail(&self.log, 40)
            );
            thread::sleep(Duration::from_millis(100));
        }
        let (mut sink, report) = match thread.join() {
            Ok(done) => done,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        let read_began = Instant::now();
        let records = read_committed(
            bootstrap,
            &topics.billing_aggregates,
            super::kill::PARTITIONS,
        );
        let mut ends: BTreeMap<i64, i64> = BTreeMap::new();
        for record in &records {
            let end = ends.entry(i64::from(record.partition)).or_insert(0);
            *end = (*end).max(record.offset + 1);
        }
        let read = read_began.elapsed();
        let caught_up = Instant::now();
        loop {
            let offsets = pg_offsets(&self.url);
            if ends
                .iter()
                .all(|(partition, end)| offsets.get(partition) == Some(end))
            {
                break;
            }
            if let Some(status) = sink.child.try_wait().expect("wait") {
                panic!(
                    "the sink exited ({status}) before catching up: store {offsets:?}, topic \
                     {ends:?}\n{}",
                    log_tail(&self.log, 40)
                );
            }
            assert!(
                caught_up.elapsed() < WAIT_TIMEOUT,
                "the sink did not catch up: store {offsets:?}, topic {ends:?}\n{}",
                log_tail(&self.log, 40)
            );
            thread::sleep(Duration::from_millis(100));
        }
        let catch_up = caught_up.elapsed();
        let status = Command::new("kill")
            .args(["-TERM", &sink.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        let exit = super::sink::wait_exit(&mut sink.child, Duration::from_secs(30));
        assert!(exit.success(), "sink exit after SIGTERM: {exit}");

        let stopped = caught_up.elapsed() - catch_up;
        let checks_began = Instant::now();
        let snapshot = pg_snapshot(&self.url);
        let snapshot_read = checks_began.elapsed();
        assert_store_equals(&snapshot, &records);
        let topic_checked = checks_began.elapsed() - snapshot_read;
        let (rows, distinct) = pg_row_and_id_counts(&self.url);
        assert_eq!(rows, distinct, "no id stored twice");
        assert_eq!(rows, records.len() as i64, "one stored row per topic row");
        // Every row the aggregator wrote carries tally's identity of its content, so
        // none took the store's slow path for foreign ids.
        let foreign = query_i64s(
            &self.url,
            "SELECT count(*), count(DISTINCT id) FROM tally_foreign_row_ids",
        );
        assert_eq!(
            foreign,
            vec![(0, 0)],
            "no foreign ids among the aggregator's rows"
        );
        assert_rollups_equal_truth(&snapshot, truth);
        let money_began = Instant::now();
        assert_rollup_money_recomputed(&snapshot, contracts);
        let money_checked = money_began.elapsed();
        eprintln!(
            "sink soak: {report:?}, {} rows; after the aggregator: topic read {read:?}, \
             catch-up {catch_up:?}, SIGTERM exit {stopped:?}, store read {snapshot_read:?}, \
             checks {:?} (against the topic {topic_checked:?}, money {money_checked:?}); \
             sink wall time {:?}",
            records.len(),
            checks_began.elapsed() - snapshot_read,
            self.started.elapsed()
        );
        assert_eq!(report.kills, SINK_KILLS, "{report:?}");
        assert!(
            report.kills_in_open_transaction >= 3,
            "at least 3 kills inside an open transaction: {report:?}"
        );
        report
    }
}

impl Drop for SinkSoak {
    /// Without [`SinkSoak::finish`] (the soak failed first): stops the kill loop, whose
    /// sink process is killed when its handle drops.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Starts `tally sink`; `commit_delay` sets the store's commit-delay test hook.
fn spawn_sink(
    config: &Path,
    url: &str,
    group: &str,
    log: &Path,
    commit_delay: Option<Duration>,
) -> SinkProcess {
    let log = File::options()
        .create(true)
        .append(true)
        .open(log)
        .expect("sink log");
    let child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["sink", "--database", url, "--group-id", group, "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .env(
            tally_sink::COMMIT_DELAY_ENV,
            commit_delay
                .map_or(0, |delay| delay.as_millis())
                .to_string(),
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn tally sink");
    SinkProcess { child }
}

/// The kill thread's state.
struct Killer {
    url: String,
    database: String,
    pg: Pg,
    config: PathBuf,
    group: String,
    log: PathBuf,
    stop: Arc<AtomicBool>,
}

/// The sink's session in an open transaction, as `pg_stat_activity` shows it.
struct OpenTransaction {
    xid: String,
    /// Offsets committed while the transaction was open.
    offsets: BTreeMap<i64, i64>,
}

impl Killer {
    fn run(self, mut sink: SinkProcess, seed: u64) -> (SinkProcess, SinkKillReport) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut report = SinkKillReport::default();
        for kill in 0..SINK_KILLS {
            // The restarted sink commits something first, so each run does work.
            let rows_before = self.pg.rows();
            self.wait("committed progress", &mut sink.child, |_| {
                self.pg.rows() > rows_before
            });
            let targeted = kill < TARGETED_KILLS;
            let open = if targeted {
                let mut found = None;
                self.wait("an open transaction", &mut sink.child, |child| {
                    found = self.kill_in_open_transaction(child);
                    found.is_some()
                });
                found
            } else {
                thread::sleep(Duration::from_millis(rng.random_range(0..1_500)));
                let _ = sink.child.kill();
                None
            };
            let _ = sink.child.wait();
            report.kills += 1;
            report.rows_at_kill.push(self.pg.rows());
            if let Some(open) = open
                && self.aborted(&open)
            {
                report.kills_in_open_transaction += 1;
            }
            // The last restart runs without the commit delay, so the catch-up after the
            // aggregator's final run is quick.
            let delay = (kill + 1 < SINK_KILLS).then_some(COMMIT_DELAY);
            sink = spawn_sink(&self.config, &self.url, &self.group, &self.log, delay);
        }
        (sink, report)
    }

    /// Calls `done` every 20 ms until it is true; panics after [`WAIT_TIMEOUT`], when
    /// the sink exits or when the soak was dropped.
    fn wait(&self, what: &str, sink: &mut Child, mut done: impl FnMut(&mut Child) -> bool) {
        let began = Instant::now();
        while !done(sink) {
            if let Some(status) = sink.try_wait().expect("wait") {
                panic!(
                    "the sink exited ({status}) while waiting for {what}:\n{}",
                    log_tail(&self.log, 40)
                );
            }
            assert!(
                !self.stop.load(Ordering::SeqCst) && began.elapsed() < WAIT_TIMEOUT,
                "no {what} within {WAIT_TIMEOUT:?}:\n{}",
                log_tail(&self.log, 40)
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// If the sink's session is idle in a transaction that wrote, entered less than
    /// half the commit delay ago: reads the committed offsets and SIGKILLs the sink
    /// before the other half has passed. The transaction, when it was killed in.
    fn kill_in_open_transaction(&self, sink: &mut Child) -> Option<OpenTransaction> {
        let half_ms = i64::try_from(COMMIT_DELAY.as_millis() / 2).expect("small");
        let began = Instant::now();
        let rows = self.pg.query(
            "SELECT backend_xid::text, \
             (extract(epoch FROM clock_timestamp() - state_change) * 1000)::bigint \
             FROM pg_stat_activity WHERE datname = $1 AND application_name = $2 \
             AND state = 'idle in transaction' AND backend_xid IS NOT NULL",
            &[&self.database, &tally_sink::APPLICATION_NAME],
        );
        let row = rows.first()?;
        let age_ms: i64 = row.get(1);
        if age_ms >= half_ms {
            return None;
        }
        let xid: String = row.get(0);
        let offsets = self.pg.offsets();
        // Past the other half the COMMIT may have run: no kill, look again.
        if began.elapsed() >= COMMIT_DELAY / 2 {
            return None;
        }
        let _ = sink.kill();
        Some(OpenTransaction { xid, offsets })
    }

    /// Whether PostgreSQL reports the killed transaction aborted and the committed
    /// offsets unchanged by it.
    fn aborted(&self, open: &OpenTransaction) -> bool {
        let began = Instant::now();
        loop {
            let status: Option<String> = pg_runtime().block_on(async {
                let (client, connection) =
                    tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
                        .await
                        .ok()?;
                let driver = tokio::spawn(connection);
                // A fresh test cluster is in xid epoch 0, so the 32-bit xid is the
                // full transaction id.
                let status = client
                    .query_one("SELECT pg_xact_status(($1::text)::xid8)", &[&open.xid])
                    .await
                    .ok()
                    .and_then(|row| row.get::<_, Option<String>>(0));
                drop(client);
                let _ = driver.await;
                status
            });
            match status.as_deref() {
                Some("aborted") => return pg_offsets(&self.url) == open.offsets,
                Some("committed") => return false,
                _ => {}
            }
            assert!(
                began.elapsed() < Duration::from_secs(30),
                "transaction {} still {status:?} 30 s after the kill",
                open.xid
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One connection to the run's database, kept for the kill loop's polling (a new
/// connection per poll would fork a server process every few milliseconds).
struct Pg {
    runtime: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

impl Pg {
    fn connect(url: &str) -> Pg {
        let runtime = pg_runtime();
        let client = runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(connection);
            client
        });
        Pg { runtime, client }
    }

    fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Vec<tokio_postgres::Row> {
        self.runtime
            .block_on(self.client.query(sql, params))
            .unwrap_or_else(|error| panic!("{sql}: {error}"))
    }

    /// Committed rows; 0 before the sink's first start created the tables.
    fn rows(&self) -> i64 {
        self.runtime
            .block_on(
                self.client
                    .query_opt("SELECT count(*) FROM tally_rows", &[]),
            )
            .ok()
            .flatten()
            .map_or(0, |row| row.get(0))
    }

    /// Committed offsets; none before the sink's first start created the tables.
    fn offsets(&self) -> BTreeMap<i64, i64> {
        self.runtime
            .block_on(self.client.query(
                "SELECT kafka_partition, next_offset FROM tally_sink_offsets",
                &[],
            ))
            .unwrap_or_default()
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect()
    }
}

fn query_i64s(url: &str, sql: &str) -> Vec<(i64, i64)> {
    pg_runtime().block_on(async {
        let Ok((client, connection)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await
        else {
            return Vec::new();
        };
        let driver = tokio::spawn(connection);
        let rows = client
            .query(sql, &[])
            .await
            .map(|rows| {
                rows.iter()
                    .map(|row| (row.get::<_, i64>(0), row.get::<_, i64>(1)))
                    .collect()
            })
            .unwrap_or_default();
        drop(client);
        let _ = driver.await;
        rows
    })
}

fn pg_offsets(url: &str) -> BTreeMap<i64, i64> {
    query_i64s(
        url,
        "SELECT kafka_partition, next_offset FROM tally_sink_offsets",
    )
    .into_iter()
    .collect()
}

fn pg_row_and_id_counts(url: &str) -> (i64, i64) {
    query_i64s(url, "SELECT count(*), count(DISTINCT id) FROM tally_rows")
        .first()
        .copied()
        .expect("counts")
}

/// Σ events and tokens of the store's roll-ups per (15-minute bucket, tenant, model,
/// cloud, channel partner, region), both row kinds, equal the generator's truth summed
/// into the same buckets (on time and corrections).
pub fn assert_rollups_equal_truth(snapshot: &super::sink::Snapshot, truth: &GroundTruth) {
    let mut stored: BTreeMap<Vec<String>, [i64; 5]> = BTreeMap::new();
    for (key, sums) in &snapshot.rollups {
        let line = stored.entry(key[..6].to_vec()).or_default();
        for (total, value) in line.iter_mut().zip(&sums[1..6]) {
            *total += value;
        }
    }
    let mut expected: BTreeMap<Vec<String>, [i64; 5]> = BTreeMap::new();
    for window in &truth.windows {
        let events = window.on_time.events + window.correction.events;
        if events == 0 {
            continue;
        }
        // 15 minutes = 900 000 ms; the soak's windows start after the epoch.
        let bucket = window.window_start_ms - window.window_start_ms % 900_000;
        let key = vec![
            bucket.to_string(),
            window.tenant_id.clone(),
            window.model.clone(),
            window.cloud.clone(),
            window.channel_partner.clone().unwrap_or_default(),
            window.region.clone(),
        ];
        let line = expected.entry(key).or_default();
        for (total, value) in line.iter_mut().zip([
            events,
            window.on_time.input_tokens + window.correction.input_tokens,
            window.on_time.cached_input_tokens + window.correction.cached_input_tokens,
            window.on_time.output_tokens + window.correction.output_tokens,
            window.on_time.reasoning_tokens + window.correction.reasoning_tokens,
        ]) {
            *total += i64::try_from(value).expect("fits i64");
        }
    }
    assert_eq!(stored.len(), expected.len(), "roll-up lines vs the truth");
    for (key, want) in &expected {
        assert_eq!(stored.get(key), Some(want), "roll-up {key:?} vs the truth");
    }
}

/// The amounts the contracts give a stored row (a [`super::sink::Snapshot`] row's
/// `ints` and `texts`), by the tests' own arithmetic ([`TruthContracts::expected`]).
pub fn stored_row_expected(
    contracts: &TruthContracts,
    ints: &[i64],
    texts: &[String],
) -> Result<super::money::ExpectedAmounts, String> {
    let tokens = [ints[4], ints[5], ints[6], ints[7]]
        .map(|value| u64::try_from(value).expect("non-negative tokens"));
    let channel_partner = (texts[3] != "-").then_some(texts[3].as_str());
    contracts.expected(
        &texts[1],
        &texts[2],
        channel_partner,
        ints[0],
        tokens,
        texts[5] == "billable",
    )
}

/// Each stored row's money recomputed from its tokens and the contracts, summed per
/// roll-up line (gross, net) and per share line, equals the store's roll-ups.
pub fn assert_rollup_money_recomputed(
    snapshot: &super::sink::Snapshot,
    contracts: &TruthContracts,
) {
    let mut money: BTreeMap<Vec<String>, (i64, i64)> = BTreeMap::new();
    let mut shares: BTreeMap<Vec<String>, i64> = BTreeMap::new();
    for (id, (_digest, ints, texts)) in &snapshot.rows {
        let channel_partner = (texts[3] != "-").then_some(texts[3].as_str());
        let expected = stored_row_expected(contracts, ints, texts)
            .unwrap_or_else(|problem| panic!("row {id}: {problem}"));
        let bucket = ints[0] - ints[0] % 900_000;
        let key = vec![
            bucket.to_string(),
            texts[0].clone(),
            texts[1].clone(),
            texts[2].clone(),
            channel_partner.unwrap_or_default().to_owned(),
            texts[4].clone(),
            texts[5].clone(),
            expected.currency.clone(),
        ];
        let line = money.entry(key.clone()).or_default();
        line.0 += expected.gross_micros;
        line.1 += expected.net_micros;
        for (beneficiary, _bps, amount) in &expected.shares {
            let mut share_key = key.clone();
            share_key.push(beneficiary.clone());
            *shares.entry(share_key).or_default() += amount;
        }
    }
    let stored: BTreeMap<Vec<String>, (i64, i64)> = snapshot
        .rollups
        .iter()
        .map(|(key, sums)| (key.clone(), (sums[6], sums[7])))
        .collect();
    assert_eq!(stored, money, "roll-up gross and net vs recomputed money");
    let stored_shares: BTreeMap<Vec<String>, i64> = snapshot
        .shares
        .iter()
        .filter(|(_, amount)| **amount != 0)
        .map(|(key, amount)| (key.clone(), *amount))
        .collect();
    shares.retain(|_, amount| *amount != 0);
    assert_eq!(stored_shares, shares, "share roll-ups vs recomputed shares");
}
