//! `tally replay` and `tally reconcile`: re-derive aggregates into an isolated output,
//! and compare two sets of aggregates.
//!
//! Both block on librdkafka and the database, so they run on a blocking thread. Exit
//! codes: `tally replay` exits 3 when it refuses (a production output, deleted warm-up
//! input, a checkpoint of other semantics, what-if contracts that change
//! classification; nothing is written then) and 1 on other errors; `tally reconcile`
//! exits 0 when both sides are equal, 1 when they differ and 2 on any error.

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::Context;
use tally_core::config::Config;
use tally_replay::reconcile;
use tally_replay::{ReconcileArgs, ReplayArgs, ReplayError};
use tracing::info;

/// Exit code of a refused replay.
const REFUSED: u8 = 3;
/// Exit code of `tally reconcile` on any error.
const RECONCILE_ERROR: u8 = 2;
/// Exit code of `tally reconcile` when the sides differ.
const RECONCILE_DIFFER: u8 = 1;

pub(crate) async fn replay(config: Config, args: ReplayArgs) -> anyhow::Result<()> {
    let summary = tokio::task::spawn_blocking(move || tally_replay::replay::run(&config, &args))
        .await
        .context("replay thread failed")??;
    info!(rows = summary.rows, "replay finished");
    let text = serde_json::to_string(&summary)?;
    println!("{text}");
    Ok(())
}

pub(crate) async fn reconcile(config: Config, args: ReconcileArgs) -> anyhow::Result<()> {
    let format = args.format;
    let report = tokio::task::spawn_blocking(move || reconcile::run(&config, &args))
        .await
        .context("reconcile thread failed")??;
    let text = reconcile::render(&report, format)?;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    if !report.is_equal() {
        std::process::exit(i32::from(RECONCILE_DIFFER));
    }
    Ok(())
}

/// The exit code of a failed command: 2 for `tally reconcile`, 3 for a refused replay,
/// else 1.
pub(crate) fn failure_exit_code(reconcile: bool, error: &anyhow::Error) -> ExitCode {
    if reconcile {
        return ExitCode::from(RECONCILE_ERROR);
    }
    if error
        .downcast_ref::<ReplayError>()
        .is_some_and(ReplayError::is_refusal)
    {
        return ExitCode::from(REFUSED);
    }
    ExitCode::FAILURE
}
