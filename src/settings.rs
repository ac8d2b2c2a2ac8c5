//! Loading the configuration: a TOML file, then environment overrides.
//!
//! Overrides use the `TALLY_` prefix and `__` between path segments, e.g.
//! `TALLY_KAFKA__BOOTSTRAP_SERVERS=broker:9092` or `TALLY_AGGREGATOR__WINDOW_MS=300000`.
//! Only variables containing `__` are read, so unrelated `TALLY_*` variables are ignored.
//! Unknown fields, wrong types and impossible values fail here, naming the field.

use std::path::Path;

use anyhow::Context;
use figment::Figment;
use figment::providers::{Env, Format, Toml};
use tally_core::config::Config;
use tally_core::contracts::Contracts;
use tally_core::window::WindowSize;

/// Loads and validates the configuration from `path` (if given) and the environment.
pub(crate) fn load(path: Option<&Path>) -> anyhow::Result<Config> {
    let mut figment = Figment::new();
    if let Some(path) = path {
        if !path.exists() {
            anyhow::bail!("config file {} does not exist", path.display());
        }
        figment = figment.merge(Toml::file(path));
    }
    let figment = figment.merge(
        Env::prefixed("TALLY_")
            .filter(|key| key.as_str().contains("__"))
            .split("__"),
    );
    let config: Config = figment
        .extract()
        .map_err(|error| anyhow::anyhow!(describe(error)))?;
    config.validate().context("configuration is invalid")?;
    Ok(config)
}

/// Figment's message names the key (`for key "default.aggregator.window_ms"`); drop
/// the profile prefix so the field reads as it is written in the file.
fn describe(error: figment::Error) -> String {
    error
        .into_iter()
        .map(|error| {
            let field = error.path.join(".");
            let place = error
                .metadata
                .as_ref()
                .map(|metadata| format!(" (from {})", metadata.name))
                .unwrap_or_default();
            if field.is_empty() {
                format!("invalid config: {}{place}", error.kind)
            } else {
                format!("invalid config field `{field}`: {}{place}", error.kind)
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Loads the contracts file of `aggregator.contracts_path` and checks the config
/// against it ([`Config::check_contracts`]: no accepted event makes a row larger than
/// `topics.max_message_bytes`). Returns the derived bounds as TOML comments.
pub(crate) fn check_contracts(config: &Config) -> anyhow::Result<String> {
    let path = &config.aggregator.contracts_path;
    let text = std::fs::read_to_string(path).with_context(|| {
        format!("cannot read the contracts file {path} (aggregator.contracts_path)")
    })?;
    let window = WindowSize::new(config.aggregator.window_ms)
        .map_err(|error| anyhow::anyhow!("aggregator.window_ms: {error}"))?;
    let contracts =
        Contracts::load(&text, window).with_context(|| format!("invalid contracts file {path}"))?;
    let bound = config
        .check_contracts(&contracts)
        .context("configuration is invalid")?;
    Ok(format!(
        "# derived: largest billing row {} bytes, {} as a Kafka record (topics.max_message_bytes = {})\n\
         # derived: message.timestamp.after.max.ms of {}: {}; of {}, {} and {}: {}",
        bound.value_bytes,
        bound.record_bytes,
        config.topics.max_message_bytes,
        config.topics.usage_events,
        config.topics.input_timestamp_after_max_ms,
        config.topics.billing_aggregates,
        config.topics.late,
        config.topics.dlq,
        config.output_timestamp_after_max_ms(),
    ))
}
