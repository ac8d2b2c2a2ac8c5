//! `tally produce`: deterministic synthetic traffic into usage.events.
//!
//! The partition count and the aggregator's event-time parameters default to the
//! config file's, so the ground truth the generator writes is what the aggregator
//! configured by the same file must reproduce. Progress goes to stderr once a second;
//! the final line reports records/s. Ctrl-C stops early: what was sent is flushed and
//! the truth (marked incomplete) describes exactly those records.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use tally_core::config::Config;
use tally_gen::{GeneratorArgs, GeneratorConfig, ProgressReport};
use tally_producer::{ProducerOptions, UsageProducer};
use tracing::info;

pub(crate) async fn run(config: &Config, args: &GeneratorArgs) -> anyhow::Result<()> {
    if let Some(address) = crate::telemetry::init_metrics(&config.metrics.listen, &[])? {
        info!(%address, "serving metrics");
    }
    tally_producer::producer::describe_metrics();
    let partitions =
        u32::try_from(config.topics.partitions).context("topics.partitions must be positive")?;
    let defaults = GeneratorConfig {
        partitions,
        ..GeneratorConfig::for_aggregator(&config.aggregator)
    };
    let generator_config = args
        .to_config_with(&defaults)
        .context("invalid produce arguments")?;
    let mut options = args.produce_options();
    let stop = Arc::new(AtomicBool::new(false));
    options.stop = Some(Arc::clone(&stop));
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            stop.store(true, Ordering::Release);
        }
    });

    let client_config = crate::kafka::client_config(&config.kafka);
    let producer = UsageProducer::new(
        &client_config,
        ProducerOptions::new(config.topics.usage_events.clone()),
    )
    .context("cannot create the producer")?;
    let truth = tally_gen::produce(generator_config, producer, options, print_progress)
        .await
        .context("producing failed")?;
    info!(
        produced = truth.produced,
        counted = truth.counted,
        duplicates = truth.duplicates,
        too_late = truth.too_late,
        rejected = truth.rejected,
        "produced synthetic traffic"
    );
    if let Some(path) = &args.truth {
        truth
            .write(path)
            .with_context(|| format!("cannot write the ground truth to {}", path.display()))?;
        info!(path = %path.display(), "wrote ground truth");
    }
    Ok(())
}

fn print_progress(report: &ProgressReport) {
    let label = if report.finished { "done" } else { "progress" };
    eprintln!(
        "{label}: {}/{} records, {} delivered, {} failed, {:.0} records/s",
        report.produced,
        report.total,
        report.delivered,
        report.failed,
        report.records_per_sec()
    );
}
