//! `tally topics create`: creates the pipeline's topics, idempotently.
//!
//! A missing topic is created with the partitions, replication and configs of the config
//! file. An existing topic is checked, never altered: different partitions (which would
//! re-route tenants) or a different cleanup policy is an error that names the topic.
//! Running the command twice is harmless.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use tally_core::config::{Config, SIDE_TOPIC_EXTRA_BYTES};
use tracing::info;

/// What a topic should look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TopicSpec {
    pub(crate) name: String,
    pub(crate) partitions: i32,
    pub(crate) replication_factor: i32,
    pub(crate) configs: BTreeMap<&'static str, String>,
}

/// The topics of the pipeline, as the config describes them.
pub(crate) fn specs(config: &Config) -> Vec<TopicSpec> {
    let topics = &config.topics;
    let spec = |name: &str, partitions: i32, max_bytes: i32, retention_ms: i64| TopicSpec {
        name: name.to_owned(),
        partitions,
        replication_factor: topics.replication_factor,
        configs: BTreeMap::from([
            ("cleanup.policy", "delete".to_owned()),
            ("retention.ms", retention_ms.to_string()),
            ("max.message.bytes", max_bytes.to_string()),
            ("message.timestamp.type", "CreateTime".to_owned()),
        ]),
    };
    let side_bytes = topics.max_message_bytes + SIDE_TOPIC_EXTRA_BYTES;
    vec![
        spec(
            &topics.usage_events,
            topics.partitions,
            topics.max_message_bytes,
            topics.retention_ms,
        ),
        spec(
            &topics.billing_aggregates,
            topics.output_partitions,
            topics.max_message_bytes,
            topics.retention_ms,
        ),
        spec(
            &topics.late,
            topics.output_partitions,
            side_bytes,
            topics.side_retention_ms,
        ),
        spec(
            &topics.dlq,
            topics.output_partitions,
            side_bytes,
            topics.side_retention_ms,
        ),
        spec(
            &topics.checkpoints,
            topics.partitions,
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
}

/// Creates the missing topics and checks the existing ones.
pub(crate) async fn create_all(config: &Config) -> anyhow::Result<Vec<(String, TopicOutcome)>> {
    let admin: Arc<AdminClient<DefaultClientContext>> = Arc::new(
        crate::kafka::client_config(&config.kafka)
            .create()
            .context("cannot create the kafka admin client")?,
    );
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
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
        match check_existing(&admin, &options, spec).await? {
            None => {
                info!(topic = %spec.name, "topic exists and matches the config");
                outcomes.push((spec.name.clone(), TopicOutcome::AlreadyMatches));
            }
            Some(problem) => problems.push(problem),
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

/// Compares an existing topic with its spec; `Some(problem)` when they differ in a way
/// tally must not fix by itself.
async fn check_existing(
    admin: &Arc<AdminClient<DefaultClientContext>>,
    options: &AdminOptions,
    spec: &TopicSpec,
) -> anyhow::Result<Option<String>> {
    let partitions = partition_count(admin, &spec.name).await?;
    if partitions != spec.partitions {
        return Ok(Some(format!(
            "topic {} has {partitions} partitions, the config says {} (tally never changes the partition count: it would re-route tenants)",
            spec.name, spec.partitions
        )));
    }
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic(&spec.name)], options)
        .await
        .context("describe configs request failed")?;
    let Some(Ok(resource)) = described.into_iter().next() else {
        bail!("cannot describe the configs of topic {}", spec.name);
    };
    let cleanup_policy = resource
        .get("cleanup.policy")
        .and_then(|entry| entry.value.clone())
        .unwrap_or_default();
    let wanted = spec
        .configs
        .get("cleanup.policy")
        .map(String::as_str)
        .unwrap_or("delete");
    if cleanup_policy != wanted {
        return Ok(Some(format!(
            "topic {} has cleanup.policy={cleanup_policy}, the config needs {wanted}",
            spec.name
        )));
    }
    Ok(None)
}

/// The partition count of `topic`, from broker metadata. Metadata fetches block inside
/// librdkafka, so they run on the blocking pool.
pub(crate) async fn partition_count(
    admin: &Arc<AdminClient<DefaultClientContext>>,
    topic: &str,
) -> anyhow::Result<i32> {
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
        bail!("metadata error for topic {topic}: {error:?}");
    }
    i32::try_from(found.partitions().len()).context("partition count overflows i32")
}
