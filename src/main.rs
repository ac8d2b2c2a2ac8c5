//! `tally`: the one binary of the pipeline.
//!
//! Subcommands: `aggregate` (the exactly-once aggregator), `topics create` (create
//! and check the pipeline's topics), `produce`
//! (deterministic synthetic traffic with a ground-truth file), `sink` (aggregates into
//! the billing store), `report` (totals from the store in any time zone), `config check`
//! (validate the configuration and its contracts; with `--topics`, the existing topics
//! too), `statement` (a partner's monthly revenue-share statement), `export` and `export
//! ack` (marketplace usage files and their ledger), `replay` (re-aggregate a range into
//! an isolated output), `reconcile` (compare two sets of aggregates), `demo` (the whole
//! pipeline in one process on librdkafka's mock cluster) and `bench` (the end-to-end
//! benchmark harness against a real broker).
//!
//! Exit codes: 0 on success; 78 when the Kafka cluster refused the credentials or the
//! TLS handshake (see `kafka.rs`); 3 when `replay` refuses (see `replay.rs`); 1 for any
//! other error. `reconcile` exits 0 when equal, 1 when the sides differ, 2 on error.

mod aggregate;
mod bench;
mod demo;
mod kafka;
mod produce;
mod replay;
mod settings;
mod sink;
mod statements;
mod telemetry;
mod topics;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing::error;

/// Streaming usage metering: exact, attributed billing aggregates from Kafka usage events.
#[derive(Debug, Parser)]
#[command(name = "tally", version, about)]
struct Cli {
    /// Configuration file (TOML). Environment overrides: TALLY_<SECTION>__<FIELD>.
    #[arg(long, global = true, env = "TALLY_CONFIG")]
    config: Option<PathBuf>,
    /// Log line format on stderr: text (coloured only on a terminal) or json (one
    /// object per line, for log pipelines).
    #[arg(
        long,
        global = true,
        env = "TALLY_LOG_FORMAT",
        value_enum,
        ignore_case = true,
        default_value_t
    )]
    log_format: telemetry::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage the pipeline's topics.
    Topics {
        #[command(subcommand)]
        action: TopicsAction,
    },
    /// Aggregate usage.events into billing aggregates, exactly once (runs until SIGTERM).
    Aggregate(Box<tally_aggregator::AggregateArgs>),
    /// Produce deterministic synthetic traffic into usage.events and write its ground truth.
    Produce(Box<tally_gen::GeneratorArgs>),
    /// Write billing.aggregates into the billing store, exactly once (runs until SIGTERM).
    Sink(Box<tally_sink::SinkArgs>),
    /// Hourly, daily or monthly totals from the billing store in any IANA time zone.
    Report(Box<tally_sink::report::ReportArgs>),
    /// A partner's revenue-share statement for one month, from the billing store.
    Statement(Box<tally_sink::statement::StatementArgs>),
    /// Hourly marketplace usage files (AWS, Azure, GCP) from the billing store, and
    /// (`export ack`) the marketplace's answers into the ledger.
    Export(Box<ExportCommand>),
    /// Re-aggregate a range of usage.events into an isolated output (topic or store),
    /// under the live contracts or what-if ones.
    Replay(Box<tally_replay::ReplayArgs>),
    /// Compare two sets of aggregates (topics, stores, replay outputs) for a period; exit
    /// 0 when equal, 1 when they differ, 2 on error.
    Reconcile(Box<tally_replay::ReconcileArgs>),
    /// The whole pipeline in one process, no services needed: mock Kafka, generator,
    /// aggregator, sink into SQLite, live progress and a billing report.
    Demo(Box<demo::DemoArgs>),
    /// End-to-end benchmark against a real broker: preload, a counting consumer as the
    /// ceiling, `tally aggregate` and `tally sink` as child processes, paced latency.
    Bench(Box<bench::BenchArgs>),
    /// Inspect the configuration.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
}

impl Command {
    /// Whether the command connects to the configured Kafka cluster (and so first
    /// checks that it accepts the credentials). A command not listed here (the report
    /// reads only the store) skips the check; list a new command that talks to Kafka.
    fn uses_kafka(&self) -> bool {
        match self {
            Command::Topics { .. }
            | Command::Aggregate(_)
            | Command::Produce(_)
            | Command::Sink(_)
            | Command::Replay(_) => true,
            Command::Config {
                action: ConfigAction::Check { topics },
            } => *topics,
            Command::Export(command) => command.action.is_none() && !command.run.skip_kafka_check,
            _ => false,
        }
    }
}

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct ExportCommand {
    #[command(subcommand)]
    action: Option<ExportAction>,
    #[command(flatten)]
    run: tally_sink::export::ExportArgs,
}

#[derive(Debug, Subcommand)]
enum ExportAction {
    /// Record the marketplace's answer to a posted request file in the ledger.
    Ack(tally_sink::export::AckArgs),
}

#[derive(Debug, Subcommand)]
enum TopicsAction {
    /// Create missing topics; check existing ones against the config (never alter them).
    Create,
}

#[derive(Debug, Subcommand)]
enum ConfigAction {
    /// Validate the configuration and the contracts it names, and print the
    /// configuration with defaults filled in (and, as comments, the bounds derived
    /// from it).
    Check {
        /// Also connect to `kafka.bootstrap_servers` and check the existing topics
        /// (partitions, cleanup policy, max.message.bytes,
        /// message.timestamp.after.max.ms) as `tally topics create` would, without
        /// creating or changing anything.
        #[arg(long)]
        topics: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo's progress line and report are its output: only warnings are logged
    // unless RUST_LOG asks for more.
    let default_level = if matches!(cli.command, Command::Demo(_)) {
        "warn"
    } else {
        "info"
    };
    telemetry::init_logs(cli.log_format, default_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            error!(error = %err, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let reconcile = matches!(cli.command, Command::Reconcile(_));
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!(error = format!("{err:#}"), "tally failed");
            if reconcile {
                replay::failure_exit_code(true, &err)
            } else if kafka::is_authentication_error(&err) {
                ExitCode::from(kafka::EXIT_KAFKA_AUTHENTICATION)
            } else {
                replay::failure_exit_code(false, &err)
            }
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = settings::load(cli.config.as_deref())?;
    if cli.command.uses_kafka() {
        kafka::check_authentication(&config).await?;
    }
    match cli.command {
        Command::Config {
            action: ConfigAction::Check { topics },
        } => {
            let derived = settings::check_contracts(&config)?;
            println!("{}", toml_pretty(&settings::redacted(&config))?);
            println!("{derived}");
            if topics {
                for (topic, outcome) in topics::check_all(&config).await? {
                    println!("# {topic}: {}", outcome.describe());
                }
            }
            Ok(())
        }
        Command::Aggregate(args) => aggregate::run(config, &args).await,
        Command::Produce(args) => produce::run(&config, &args).await,
        Command::Sink(args) => sink::run(config, &args).await,
        Command::Report(args) => sink::report(*args).await,
        Command::Statement(args) => statements::statement(*args).await,
        Command::Export(command) => match command.action {
            Some(ExportAction::Ack(args)) => statements::ack(args).await,
            None => statements::export(config, command.run).await,
        },
        Command::Replay(args) => replay::replay(config, *args).await,
        Command::Reconcile(args) => replay::reconcile(config, *args).await,
        Command::Demo(args) => demo::run(config, &args).await,
        Command::Bench(args) => bench::run(config, &args).await,
        Command::Topics {
            action: TopicsAction::Create,
        } => {
            for (topic, outcome) in topics::create_all(&config).await? {
                println!("{topic}: {}", outcome.describe());
            }
            Ok(())
        }
    }
}

fn toml_pretty(config: &tally_core::config::Config) -> anyhow::Result<String> {
    Ok(toml::to_string_pretty(config)?)
}
