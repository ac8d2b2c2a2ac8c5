//! `tally topics create`: creates the pipeline's topics, idempotently; and the topic
//! check of `tally config check --topics`.
//!
//! A missing topic is created with the partitions, replication and configs of the config
//! file. An existing topic is checked, never altered: a difference tally depends on is
//! an error that names the topic and the setting. Running the command twice is
//! harmless.
//!
//! # Timestamps
//! Kafka 4 brokers reject a record stamped more than `message.timestamp.after.max.ms`
//! ahead of their clock. usage.events gets `topics.input_timestamp_after_max_ms`
//! (Kafka 4's one-hour default unless configured): how far ahead a gateway may stamp.
//! billing.aggregates, usage.late and usage.dlq get
//! [`Config::output_timestamp_after_max_ms`] (the input bound plus
//! `max_event_time_ahead_ms` plus one window), because the aggregator stamps rows with
//! their window end and copies with the input record's timestamp; a smaller bound there
//! would reject a record inside the aggregator's transaction and abort it on every
//! retry. An existing topic is an error when usage.events allows more than the
//! configured input bound or an output allows less than the output bound.
//!
//! # What an existing topic must match
//! - partitions: equal (a different count re-routes tenants);
//! - `cleanup.policy`: equal;
//! - `max.message.bytes` of billing.aggregates, usage.late and usage.dlq: at least the
//!   configured value (the aggregator checks at start that no accepted event makes a
//!   row larger than `topics.max_message_bytes`);
//! - `message.timestamp.after.max.ms`: see above.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use rdkafka::admin::{
    AdminClient, AdminOptions, ConfigResource, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use tally_core::config::{Config, SIDE_TOPIC_EXTRA_BYTES};
use tracing::info;

/// `message.timestamp.after.max.ms`: how far ahead of the broker's clock a record's
/// timestamp may be.
const TIMESTAMP_AFTER_MAX_MS: &str = "message.timestamp.after.max.ms";
/// `max.message.bytes`: the largest record batch the topic takes.
const MAX_MESSAGE_BYTES: &str = "max.message.bytes";

/// Whether tally reads a topic or writes to it with input-derived timestamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TopicRole {
    /// usage.events: written by gateways (and the aggregator's ticks).
    Input,
    /// billing.aggregates, usage.late, usage.dlq, the checkpoints: written by the
    /// aggregator.
    Output,
}

/// What a topic should look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TopicSpec {
    pub(crate) name: String,
    pub(crate) role: TopicRole,
    pub(crate) partitions: i32,
    pub(crate) replication_factor: i32,
    pub(crate) configs: BTreeMap<&'static str, String>,
}

/// The topics of the pipeline, as the config describes them.
pub(crate) fn specs(config: &Config) -> Vec<TopicSpec> {
    let topics = &config.topics;
    let output_after_max_ms = config.output_timestamp_after_max_ms();
    let spec = |name: &str, role: TopicRole, max_bytes: i32, retention_ms: i64| {
        let (partitions, after_max_ms) = match role {
            TopicRole::Input => (topics.partitions, topics.input_timestamp_after_max_ms),
            TopicRole::Output => (topics.output_partitions, output_after_max_ms),
        };
        TopicSpec {
            name: name.to_owned(),
            role,
            partitions,
            replication_factor: topics.replication_factor,
            configs: BTreeMap::from([
                ("cleanup.policy", "delete".to_owned()),
                ("retention.ms", retention_ms.to_string()),
                (MAX_MESSAGE_BYTES, max_bytes.to_string()),
                ("message.timestamp.type", "CreateTime".to_owned()),
                (TIMESTAMP_AFTER_MAX_MS, after_max_ms.to_string()),
            ]),
        }
    };
    let side_bytes = topics.max_message_bytes + SIDE_TOPIC_EXTRA_BYTES;
    vec![
        spec(
            &topics.usage_events,
            TopicRole::Input,
            topics.max_message_bytes,
            topics.retention_ms,
        ),
        spec(
            &topics.billing_aggregates,
            TopicRole::Output,
            topics.max_message_bytes,
            topics.retention_ms,
        ),
        spec(
            &topics.late,
            TopicRole::Output,
            side_bytes,
            topics.side_retention_ms,
        ),
        spec(
            &topics.dlq,
            TopicRole::Output,
            side_bytes,
            topics.side_retention_ms,
        ),
        spec(
            &topics.checkpoints,
            TopicRole::Output,
            topics.max_message_bytes,
            topics.retention_ms,
        ),
    ]
}

/// What happened to one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TopicOutcome {
    /// It did not exist and was created.
    Created,
    /// It existed and matches the config.
    AlreadyMatches,
    /// It does not exist (only from [`check_all`], which creates nothing).
    Missing,
}

impl TopicOutcome {
    /// How the commands print it.
    pub(crate) fn describe(&self) -> &'static str {
        match self {
            TopicOutcome::Created => "created",
            TopicOutcome::AlreadyMatches => "exists, matches the config",
            TopicOutcome::Missing => "missing (`tally topics create` creates it)",
        }
    }
}

/// An admin client whose metadata requests never create a topic (librdkafka's
/// `allow.auto.create.topics` defaults to true for this client type).
fn admin_client(config: &Config) -> anyhow::Result<Arc<AdminClient<DefaultClientContext>>> {
    Ok(Arc::new(
        crate::kafka::client_config(&config.kafka)
            .set("allow.auto.create.topics", "false")
            .create()
            .context("cannot create the kafka admin client")?,
    ))
}

fn admin_options() -> AdminOptions {
    AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(30)))
        .request_timeout(Some(Duration::from_secs(30)))
}

/// Creates the missing topics and checks the existing ones.
pub(crate) async fn create_all(config: &Config) -> anyhow::Result<Vec<(String, TopicOutcome)>> {
    let admin = admin_client(config)?;
    let options = admin_options();
    let specs = specs(config);
    let mut outcomes = Vec::new();
    let mut problems = Vec::new();
    for spec in &specs {
        let config_pairs: Vec<(&str, &str)> = spec
            .configs
            .iter()
            .map(|(key, value)| (*key, value.as_str()))
            .collect();
        let mut new_topic = NewTopic::new(
            &spec.name,
            spec.partitions,
            TopicReplication::Fixed(spec.replication_factor),
        );
        for (key, value) in &config_pairs {
            new_topic = new_topic.set(key, value);
        }
        let results = admin
            .create_topics([&new_topic], &options)
            .await
            .context("create topics request failed")?;
        let created = match results.into_iter().next() {
            Some(Ok(_)) => true,
            Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => false,
            Some(Err((topic, code))) => bail!("cannot create topic {topic}: {code}"),
            None => bail!("the broker returned no result for topic {}", spec.name),
        };
        if created {
            info!(topic = %spec.name, partitions = spec.partitions, "created topic");
            outcomes.push((spec.name.clone(), TopicOutcome::Created));
            continue;
        }
        let Some(differences) = check_existing(&admin, &options, spec).await? else {
            bail!("topic {} already exists but has no metadata", spec.name);
        };
        if differences.is_empty() {
            info!(topic = %spec.name, "topic exists and matches the config");
            outcomes.push((spec.name.clone(), TopicOutcome::AlreadyMatches));
        } else {
            problems.extend(differences);
        }
    }
    if !problems.is_empty() {
        bail!(
            "existing topics differ from the config and were left unchanged: {}",
            problems.join("; ")
        );
    }
    Ok(outcomes)
}

/// Checks the existing topics against the config without creating or altering
/// anything (`tally config check --topics`). Missing topics are reported, not errors.
pub(crate) async fn check_all(config: &Config) -> anyhow::Result<Vec<(String, TopicOutcome)>> {
    let admin = admin_client(config)?;
    let options = admin_options();
    let mut outcomes = Vec::new();
    let mut problems = Vec::new();
    for spec in specs(config) {
        let Some(differences) = check_existing(&admin, &options, &spec).await? else {
            outcomes.push((spec.name.clone(), TopicOutcome::Missing));
            continue;
        };
        if differences.is_empty() {
            outcomes.push((spec.name.clone(), TopicOutcome::AlreadyMatches));
        } else {
            problems.extend(differences);
        }
    }
    if !problems.is_empty() {
        bail!(
            "existing topics differ from the config: {}",
            problems.join("; ")
        );
    }
    Ok(outcomes)
}

/// The configs of `topic`.
async fn describe(
    admin: &Arc<AdminClient<DefaultClientContext>>,
    options: &AdminOptions,
    topic: &str,
) -> anyhow::Result<ConfigResource> {
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], options)
        .await
        .context("describe configs request failed")?;
    match described.into_iter().next() {
        Some(Ok(resource)) => Ok(resource),
        Some(Err(code)) => bail!("cannot describe the configs of topic {topic}: {code}"),
        None => bail!("the broker returned no configs for topic {topic}"),
    }
}

/// Compares an existing topic with its spec: one message per difference tally must
/// not fix by itself, naming the topic and the setting; `None` when the topic does
/// not exist.
async fn check_existing(
    admin: &Arc<AdminClient<DefaultClientContext>>,
    options: &AdminOptions,
    spec: &TopicSpec,
) -> anyhow::Result<Option<Vec<String>>> {
    let Some(partitions) = partition_count(admin, &spec.name).await? else {
        return Ok(None);
    };
    let resource = describe(admin, options, &spec.name).await?;
    let mut problems = Vec::new();
    if partitions != spec.partitions {
        problems.push(format!(
            "topic {} has {partitions} partitions, the config says {} (tally never changes the partition count: it would re-route tenants)",
            spec.name, spec.partitions
        ));
    }
    let value = |key: &str| {
        resource
            .get(key)
            .and_then(|entry| entry.value.clone())
            .unwrap_or_default()
    };
    let wanted = |key: &str| spec.configs.get(key).cloned().unwrap_or_default();
    let cleanup_policy = value("cleanup.policy");
    if cleanup_policy != wanted("cleanup.policy") {
        problems.push(format!(
            "topic {} has cleanup.policy={cleanup_policy}, the config needs {}",
            spec.name,
            wanted("cleanup.policy")
        ));
    }
    let existing_after_max = value(TIMESTAMP_AFTER_MAX_MS);
    problems.extend(timestamp_problem(
        &spec.name,
        spec.role,
        &existing_after_max,
        &wanted(TIMESTAMP_AFTER_MAX_MS),
    ));
    if spec.role == TopicRole::Output {
        let existing_bytes = value(MAX_MESSAGE_BYTES);
        let needed_bytes = wanted(MAX_MESSAGE_BYTES);
        let too_small = match (existing_bytes.parse::<i64>(), needed_bytes.parse::<i64>()) {
            (Ok(existing), Ok(needed)) => existing < needed,
            _ => true,
        };
        if too_small {
            problems.push(format!(
                "topic {} has {MAX_MESSAGE_BYTES}={existing_bytes}, the config needs at least {needed_bytes} (rows and copied records larger than the topic takes would abort every transaction)",
                spec.name
            ));
        }
    }
    Ok(Some(problems))
}

/// The problem with an existing topic's `message.timestamp.after.max.ms`, if any:
/// usage.events may not allow more than the configured input bound (the outputs'
/// bound is derived from it), an output may not allow less than its bound. A value
/// that is not a number is a problem too.
pub(crate) fn timestamp_problem(
    topic: &str,
    role: TopicRole,
    existing: &str,
    wanted: &str,
) -> Option<String> {
    let (Ok(existing_ms), Ok(wanted_ms)) = (existing.parse::<i64>(), wanted.parse::<i64>()) else {
        return Some(format!(
            "topic {topic} has {TIMESTAMP_AFTER_MAX_MS}={existing:?}, expected a number of ms (the config needs {wanted})"
        ));
    };
    match role {
        TopicRole::Input if existing_ms > wanted_ms => Some(format!(
            "topic {topic} has {TIMESTAMP_AFTER_MAX_MS}={existing_ms}, more than topics.input_timestamp_after_max_ms={wanted_ms}: gateways could stamp records further ahead than the output topics' bound covers (set topics.input_timestamp_after_max_ms to {existing_ms}, or lower the topic's setting)"
        )),
        TopicRole::Output if existing_ms < wanted_ms => Some(format!(
            "topic {topic} has {TIMESTAMP_AFTER_MAX_MS}={existing_ms}, the config needs at least {wanted_ms} (input bound + validation.max_event_time_ahead_ms + aggregator.window_ms): a row or copied record stamped further ahead would abort every transaction"
        )),
        TopicRole::Input | TopicRole::Output => None,
    }
}

/// The partition count of `topic` from broker metadata, `None` when it does not exist.
/// Metadata fetches block inside librdkafka, so they run on the blocking pool.
pub(crate) async fn partition_count(
    admin: &Arc<AdminClient<DefaultClientContext>>,
    topic: &str,
) -> anyhow::Result<Option<i32>> {
    let admin = Arc::clone(admin);
    let topic_name = topic.to_owned();
    let metadata = tokio::task::spawn_blocking(move || {
        admin
            .inner()
            .fetch_metadata(Some(&topic_name), Duration::from_secs(10))
    })
    .await
    .context("metadata task failed")?
    .with_context(|| format!("cannot fetch metadata of topic {topic}"))?;
    let Some(found) = metadata.topics().first() else {
        bail!("no metadata for topic {topic}");
    };
    if let Some(error) = found.error() {
        if RDKafkaErrorCode::from(error) == RDKafkaErrorCode::UnknownTopicOrPartition {
            return Ok(None);
        }
        bail!("metadata error for topic {topic}: {error:?}");
    }
    let count = i32::try_from(found.partitions().len()).context("partition count overflows i32")?;
    Ok(Some(count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_get_the_input_bound_plus_skew_plus_one_window() {
        let config = Config::default();
        let specs = specs(&config);
        let after_max: Vec<(&str, &str)> = specs
            .iter()
            .map(|spec| {
                (
                    spec.name.as_str(),
                    spec.configs[TIMESTAMP_AFTER_MAX_MS].as_str(),
                )
            })
            .collect();
        // 1 h; then 1 h + 5 min + 1 min.
        assert_eq!(
            after_max,
            [
                ("usage.events", "3600000"),
                ("billing.aggregates", "3960000"),
                ("usage.late", "3960000"),
                ("usage.dlq", "3960000"),
                ("tally.checkpoints", "3960000"),
            ]
        );
    }

    #[test]
    fn existing_timestamp_bounds_are_checked_by_role() {
        assert_eq!(
            timestamp_problem("in", TopicRole::Input, "3600000", "3600000"),
            None
        );
        assert_eq!(
            timestamp_problem("in", TopicRole::Input, "60000", "3600000"),
            None
        );
        let input = timestamp_problem("in", TopicRole::Input, "3600001", "3600000")
            .expect("the input allows more than configured");
        assert!(input.contains("topic in") && input.contains(TIMESTAMP_AFTER_MAX_MS));
        assert_eq!(
            timestamp_problem("out", TopicRole::Output, "3960000", "3960000"),
            None
        );
        let output = timestamp_problem("out", TopicRole::Output, "3600000", "3960000")
            .expect("the output allows less than needed");
        assert!(output.contains("topic out") && output.contains(TIMESTAMP_AFTER_MAX_MS));
        assert!(timestamp_problem("out", TopicRole::Output, "", "3960000").is_some());
    }
}
