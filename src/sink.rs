//! `tally sink` and `tally report`: the billing store's writer and its reader.
//!
//! The sink's Kafka loop and its database calls block, so it runs on its own
//! blocking thread; this async side serves `/metrics`, `/healthz` and `/readyz` and
//! turns SIGTERM or Ctrl-C into the shutdown flag (`/readyz` turns 503, the open batch
//! is written, then the process exits 0). A conflict,
//! an undecodable record or a lost partition stops the process with a non-zero exit.

use anyhow::Context;
use tally_core::config::Config;
use tally_core::health::Health;
use tally_sink::report::{self, ReportArgs, ReportRequest};
use tally_sink::{SinkArgs, SinkSettings, metrics};

use crate::telemetry::HealthProbe;
use tracing::info;

pub(crate) async fn run(config: Config, args: &SinkArgs) -> anyhow::Result<()> {
    let histograms: [(&str, &[f64]); 1] = [(
        metrics::DB_TRANSACTION,
        &metrics::DB_TRANSACTION_SECONDS_BUCKETS,
    )];
    let health = Health::new();
    let probe = HealthProbe::new(health.clone(), config.aggregator.transaction_timeout_ms);
    if let Some(address) =
        crate::telemetry::init_telemetry(&config.metrics.listen, &histograms, Some(probe))?
    {
        info!(%address, "serving metrics, healthz and readyz");
    }
    metrics::describe();
    metrics::register_zero();
    let mut settings = SinkSettings::from_args(config, args).context("cannot start the sink")?;
    settings.health = health.clone();

    let shutdown = crate::telemetry::shutdown_on_signal(health, "writing the open batch")?;

    let summary = tokio::task::spawn_blocking(move || tally_sink::run(settings, shutdown))
        .await
        .context("sink thread failed")??;
    info!(
        exit = ?summary.exit,
        batches = summary.batches,
        rows_inserted = summary.rows_inserted,
        rows_identical = summary.rows_identical,
        retries = summary.retries,
        "sink stopped"
    );
    Ok(())
}

pub(crate) async fn report(args: ReportArgs) -> anyhow::Result<()> {
    let request = ReportRequest::from_args(&args)?;
    let location = args.store.location()?;
    let text = tokio::task::spawn_blocking(move || {
        report::build(&location, &request).and_then(|built| report::render(&built, args.format))
    })
    .await
    .context("report thread failed")??;
    print!("{text}");
    Ok(())
}
