//! Loading the configuration: a TOML file, then environment overrides.
//!
//! Overrides use the `TALLY_` prefix and `__` between path segments, e.g.
//! `TALLY_KAFKA__BOOTSTRAP_SERVERS=broker:9092` or `TALLY_AGGREGATOR__WINDOW_MS=300000`.
//! Only variables containing `__` are read, so unrelated `TALLY_*` variables are ignored.
//! Unknown fields, wrong types and impossible values fail here, naming the field.
//!
//! Secrets from files: `kafka.sasl_password_file` is read here, once, and its content
//! becomes `kafka.client."sasl.password"`, so every Kafka client (the aggregator's,
//! the producer's, the admin client) gets it the same way. Environment variables cannot
//! set that dotted key (`TALLY_KAFKA__CLIENT__SASL.PASSWORD` splits at the dot), and a
//! mounted Secret file keeps the password out of the process environment.
//! `tally config check` prints password settings as `<redacted>`.

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
    let mut config: Config = figment
        .extract()
        .map_err(|error| anyhow::anyhow!(describe(error)))?;
    read_secret_files(&mut config)?;
    config.validate().context("configuration is invalid")?;
    Ok(config)
}

/// librdkafka's password setting, filled from `kafka.sasl_password_file`.
const SASL_PASSWORD: &str = "sasl.password";

/// Moves the content of `kafka.sasl_password_file` into `kafka.client."sasl.password"`.
fn read_secret_files(config: &mut Config) -> anyhow::Result<()> {
    let Some(path) = config.kafka.sasl_password_file.clone() else {
        return Ok(());
    };
    if config.kafka.client.contains_key(SASL_PASSWORD) {
        anyhow::bail!(
            "invalid config field `kafka.sasl_password_file`: `kafka.client.\"{SASL_PASSWORD}\"` \
             is set too; set only one of them"
        );
    }
    let content = std::fs::read_to_string(&path).with_context(|| {
        format!("invalid config field `kafka.sasl_password_file`: cannot read {path:?}")
    })?;
    let password = content.strip_suffix('\n').map_or(content.as_str(), |line| {
        line.strip_suffix('\r').unwrap_or(line)
    });
    if password.is_empty() {
        anyhow::bail!("invalid config field `kafka.sasl_password_file`: {path:?} is empty");
    }
    config
        .kafka
        .client
        .insert(SASL_PASSWORD.to_owned(), password.to_owned());
    Ok(())
}

/// The config with every password-like librdkafka setting replaced by `<redacted>`,
/// for printing.
pub(crate) fn redacted(config: &Config) -> Config {
    let mut config = config.clone();
    for (key, value) in &mut config.kafka.client {
        if key.contains("password") || key.contains("secret") {
            "<redacted>".clone_into(value);
        }
    }
    config
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config_with_password_file(content: &str) -> (tempfile::TempDir, Config) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sasl-password");
        std::fs::write(&path, content).expect("write password file");
        let mut config = Config::default();
        config.kafka.sasl_password_file = Some(path.display().to_string());
        (dir, config)
    }

    #[test]
    fn password_file_content_without_its_newline_becomes_sasl_password() {
        let (_dir, mut config) = config_with_password_file("s3cret\"with quote\n");
        read_secret_files(&mut config).expect("readable file");
        assert_eq!(
            config.kafka.client.get("sasl.password").map(String::as_str),
            Some("s3cret\"with quote")
        );
        let printed = redacted(&config);
        assert_eq!(
            printed
                .kafka
                .client
                .get("sasl.password")
                .map(String::as_str),
            Some("<redacted>")
        );
    }

    #[test]
    fn password_file_and_inline_password_together_name_the_field() {
        let (_dir, mut config) = config_with_password_file("a\n");
        config
            .kafka
            .client
            .insert("sasl.password".to_owned(), "b".to_owned());
        let error = read_secret_files(&mut config).expect_err("both set");
        assert!(error.to_string().contains("kafka.sasl_password_file"));
    }

    #[test]
    fn missing_or_empty_password_file_names_the_field() {
        let (_dir, mut config) = config_with_password_file("\n");
        let empty = read_secret_files(&mut config).expect_err("empty");
        assert!(empty.to_string().contains("kafka.sasl_password_file"));

        let mut config = Config::default();
        config.kafka.sasl_password_file = Some("/nonexistent/sasl-password".to_owned());
        let missing = read_secret_files(&mut config).expect_err("missing");
        assert!(format!("{missing:#}").contains("kafka.sasl_password_file"));
    }
}
