//! `tally statement`, `tally export` and `tally export ack`: partner statements and
//! marketplace files from the billing store (see `tally_sink::statement` and
//! `tally_sink::export` for the formats and rules).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tally_core::config::Config;
use tally_sink::export::{self, AckArgs, ExportArgs, ExportRequest};
use tally_sink::mapping::Mapping;
use tally_sink::statement::{self, StatementArgs};
use tally_sink::{Store, StoreLocation};
use tracing::{info, warn};

/// Bound of the broker calls of the export's readiness check.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

/// Writes `text` to `out` (a temporary file renamed into place) or standard output.
pub(crate) fn write_output(out: Option<&std::path::Path>, text: &str) -> anyhow::Result<()> {
    match out {
        Some(path) => {
            let partial = path.with_extension("partial");
            std::fs::write(&partial, text)
                .with_context(|| format!("cannot write {}", partial.display()))?;
            std::fs::rename(&partial, path)
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok(())
        }
        None => {
            print!("{text}");
            Ok(())
        }
    }
}

pub(crate) async fn statement(args: StatementArgs) -> anyhow::Result<()> {
    let format = args.format;
    let out = args.out.clone();
    let text = tokio::task::spawn_blocking(move || {
        statement::build(&args).and_then(|built| statement::render(&built, format))
    })
    .await
    .context("statement thread failed")??;
    write_output(out.as_deref(), &text)
}

/// Stored next offsets and high watermarks of the aggregates topic.
fn sink_position(
    config: &Config,
    location: &StoreLocation,
) -> anyhow::Result<(BTreeMap<i32, i64>, BTreeMap<i32, i64>)> {
    let topic = &config.topics.billing_aggregates;
    let stored = Store::open(location, Duration::from_secs(30))?.load_offsets(topic)?;
    let consumer: BaseConsumer = crate::kafka::client_config(&config.kafka)
        .create()
        .context("cannot create the kafka client")?;
    let metadata = consumer
        .fetch_metadata(Some(topic), KAFKA_TIMEOUT)
        .context("cannot read the aggregates topic's metadata")?;
    let mut high = BTreeMap::new();
    for found in metadata.topics() {
        if found.name() != topic {
            continue;
        }
        for partition in found.partitions() {
            let (_, hw) = consumer
                .fetch_watermarks(topic, partition.id(), KAFKA_TIMEOUT)
                .with_context(|| {
                    format!("cannot read the watermarks of {topic}/{}", partition.id())
                })?;
            high.insert(partition.id(), hw);
        }
    }
    if high.is_empty() {
        anyhow::bail!("topic {topic} has no partitions (does it exist?)");
    }
    Ok((stored, high))
}

pub(crate) async fn export(config: Config, args: ExportArgs) -> anyhow::Result<()> {
    let (Some(marketplace), Some(mapping_path), Some(out)) =
        (args.marketplace, args.mapping.as_ref(), args.out.clone())
    else {
        anyhow::bail!("tally export needs --marketplace, --mapping and --out");
    };
    let text = std::fs::read_to_string(mapping_path)
        .with_context(|| format!("cannot read --mapping {}", mapping_path.display()))?;
    let mapping = Mapping::parse(&text, marketplace)?;
    let location = args.store.location()?;
    let now_ms = match &args.now {
        Some(value) => export::parse_now(value)?,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .context("the system clock is before 1970")?
            .as_millis()
            .try_into()
            .context("the system clock is out of range")?,
    };
    let aggregator = &config.aggregator;
    let liveness_ms = aggregator.window_ms
        + aggregator.allowed_lateness_ms
        + aggregator.idle_timeout_ms
        + 2 * aggregator.commit_interval_ms;
    let sink_caught_up = if args.skip_kafka_check {
        warn!("kafka check skipped: hours are exported on the liveness bound alone");
        println!("kafka check: skipped (--skip-kafka-check)");
        true
    } else {
        let (config, location) = (config.clone(), location.clone());
        let (stored, high) = tokio::task::spawn_blocking(move || sink_position(&config, &location))
            .await
            .context("kafka check thread failed")??;
        let caught_up = export::caught_up(&stored, &high);
        println!(
            "kafka check: sink {} the last stable offset of every partition",
            if caught_up {
                "reached"
            } else {
                "has not reached"
            }
        );
        caught_up
    };
    let request = ExportRequest {
        location,
        mapping,
        out,
        now_ms,
        liveness_ms,
        sink_caught_up,
    };
    let summary = tokio::task::spawn_blocking(move || export::run(&request))
        .await
        .context("export thread failed")??;
    info!(
        hours = summary.hours_exported.len(),
        overdue = summary.hours_overdue.len(),
        records = summary.records_written,
        "export done"
    );
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

pub(crate) async fn ack(args: AckArgs) -> anyhow::Result<()> {
    let read = |path: &std::path::Path, flag: &str| -> anyhow::Result<serde_json::Value> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {flag} {}", path.display()))?;
        if text.trim().is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_str(&text)
            .with_context(|| format!("{flag} {} is not JSON", path.display()))
    };
    let request = read(&args.request, "--request")?;
    let response = read(&args.response, "--response")?;
    let location = args.store.location()?;
    let summary = tokio::task::spawn_blocking(move || {
        export::ack(
            &location,
            args.marketplace,
            &request,
            &response,
            args.http_status,
        )
    })
    .await
    .context("ack thread failed")??;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
