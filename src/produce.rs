//! `tally produce`: deterministic synthetic traffic into usage.events.
//!
//! The partition count and the aggregator's event-time parameters default to the
//! config file's, so the ground truth the generator writes is what the aggregator
//! configured by the same file must reproduce. Progress goes to stderr once a second;
//! the final line reports records/s. Ctrl-C stops early: what was sent is flushed and
//! the truth (marked incomplete) describes exactly those records.
//!
//! Like every process it serves `/metrics` (the producer's `tally_producer_*` series),
//! `/healthz` (the sending loop reported progress within the liveness bound) and
//! `/readyz` (200 once the producer is created, 503 before and after sending).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use tally_core::config::Config;
use tally_core::health::{Health, Phase};
use tally_gen::{GeneratorArgs, GeneratorConfig, ProgressReport};
use tally_producer::producer::{self, metric_names};
use tally_producer::{ProducerOptions, UsageProducer};
use tracing::info;

use crate::telemetry::HealthProbe;

pub(crate) async fn run(config: &Config, args: &GeneratorArgs) -> anyhow::Result<()> {
    let histograms: [(&str, &[f64]); 1] = [(
        metric_names::DELIVERY_LATENCY,
        &producer::DELIVERY_LATENCY_SECONDS_BUCKETS,
    )];
    let health = Health::new();
    let probe = HealthProbe::new(health.clone(), config.aggregator.transaction_timeout_ms);
    if let Some(address) =
        crate::telemetry::init_telemetry(&config.metrics.listen, &histograms, Some(probe))?
    {
        info!(%address, "serving metrics, healthz and readyz");
    }
    producer::describe_metrics();
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
    // Ready once the producer is up; the progress callback runs on the sending loop.
    health.set_phase(Phase::Running);
    health.beat();
    let beats = health.clone();
    let truth = tally_gen::produce(generator_config, producer, options, move |report| {
        beats.beat();
        print_progress(report);
    })
    .await
    .context("producing failed")?;
    health.set_phase(Phase::Stopping);
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
    if args.metrics_linger_ms > 0 {
        info!(
            linger_ms = args.metrics_linger_ms,
            "serving metrics after the run"
        );
        tokio::time::sleep(std::time::Duration::from_millis(args.metrics_linger_ms)).await;
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
