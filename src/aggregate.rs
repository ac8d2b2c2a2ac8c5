//! `tally aggregate`: runs the exactly-once aggregator until SIGTERM or Ctrl-C.
//!
//! librdkafka's consumer, producer and transaction calls block, so the aggregator runs
//! on its own blocking thread; this async side only serves `/metrics`, `/healthz` and
//! `/readyz` and turns signals into the shutdown flag. On SIGTERM `/readyz` turns 503
//! (`stopping`), the aggregator commits its open transaction, leaves the group and the
//! process exits 0.

use anyhow::Context;
use tally_aggregator::{AggregateArgs, AggregatorSettings, metrics};
use tally_core::config::Config;
use tally_core::health::Health;

use crate::telemetry::HealthProbe;
use tracing::info;

pub(crate) async fn run(config: Config, args: &AggregateArgs) -> anyhow::Result<()> {
    let histograms: [(&str, &[f64]); 2] = [
        (
            metrics::TRANSACTION_COMMIT,
            &metrics::COMMIT_SECONDS_BUCKETS,
        ),
        (
            metrics::WINDOW_EMIT_LATENCY,
            &metrics::WINDOW_EMIT_SECONDS_BUCKETS,
        ),
    ];
    let health = Health::new();
    let probe = HealthProbe::new(health.clone(), config.aggregator.transaction_timeout_ms);
    if let Some(address) =
        crate::telemetry::init_telemetry(&config.metrics.listen, &histograms, Some(probe))?
    {
        info!(%address, "serving metrics, healthz and readyz");
    }
    metrics::describe();
    let mut settings =
        AggregatorSettings::from_args(config, args).context("cannot start the aggregator")?;
    settings.health = health.clone();
    metrics::register_zero(&settings.contracts);

    let shutdown =
        crate::telemetry::shutdown_on_signal(health, "finishing the current transaction")?;

    let summary = tokio::task::spawn_blocking(move || tally_aggregator::run(settings, shutdown))
        .await
        .context("aggregator thread failed")??;
    info!(
        exit = ?summary.exit,
        transactions_committed = summary.transactions_committed,
        transactions_aborted = summary.transactions_aborted,
        rows_emitted = summary.rows_emitted,
        ticks_written = summary.ticks_written,
        records_restored = summary.records_restored,
        fatal_restarts = summary.fatal_restarts,
        "aggregator stopped"
    );
    Ok(())
}
