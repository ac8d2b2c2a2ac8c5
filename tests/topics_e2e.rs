//! `tally topics create` against the real broker: creates, is idempotent, never alters.

mod support;

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use support::{TestTopics, assert_success, bootstrap, tally, write_config};

async fn topic_config(admin: &AdminClient<DefaultClientContext>, topic: &str, key: &str) -> String {
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &AdminOptions::new())
        .await
        .expect("describe configs");
    let resource = described
        .into_iter()
        .next()
        .expect("one resource")
        .expect("described");
    resource
        .get(key)
        .and_then(|entry| entry.value.clone())
        .expect("config present")
}

#[tokio::test]
async fn creates_topics_once_and_checks_them_on_rerun() {
    let dir = tempfile::tempdir().expect("temp dir");
    let topics = TestTopics::random();
    let config = write_config(dir.path(), &topics, 4, "");

    let first = tally(&["topics", "create"], &config);
    assert_success(&first, "first topics create");
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert_eq!(stdout.matches(": created").count(), 4, "stdout: {stdout}");

    let second = tally(&["topics", "create"], &config);
    assert_success(&second, "second topics create");
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert_eq!(
        stdout.matches("exists, matches the config").count(),
        4,
        "stdout: {stdout}"
    );

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .expect("admin client");
    let events_max = topic_config(&admin, &topics.usage_events, "max.message.bytes").await;
    let dlq_max = topic_config(&admin, &topics.dlq, "max.message.bytes").await;
    let late_max = topic_config(&admin, &topics.late, "max.message.bytes").await;
    let events_max: i64 = events_max.parse().expect("number");
    assert!(dlq_max.parse::<i64>().expect("number") >= events_max + 64 * 1024);
    assert!(late_max.parse::<i64>().expect("number") >= events_max + 64 * 1024);
    assert_eq!(
        topic_config(&admin, &topics.usage_events, "retention.ms").await,
        "-1"
    );
    assert_eq!(
        topic_config(&admin, &topics.billing_aggregates, "retention.ms").await,
        "-1"
    );
    let metadata = admin
        .inner()
        .fetch_metadata(Some(&topics.usage_events), Duration::from_secs(10))
        .expect("metadata");
    assert_eq!(metadata.topics()[0].partitions().len(), 4);
}

#[tokio::test]
async fn existing_topic_with_other_partition_count_is_an_error_and_left_alone() {
    let dir = tempfile::tempdir().expect("temp dir");
    let topics = TestTopics::random();
    let config = write_config(dir.path(), &topics, 4, "");
    assert_success(&tally(&["topics", "create"], &config), "topics create");

    let other = write_config(dir.path(), &topics, 5, "");
    let output = tally(&["topics", "create"], &other);
    assert!(!output.status.success(), "a partition mismatch must fail");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&topics.usage_events), "stderr: {stderr}");
    assert!(stderr.contains("4 partitions"), "stderr: {stderr}");

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .expect("admin client");
    let metadata = admin
        .inner()
        .fetch_metadata(Some(&topics.usage_events), Duration::from_secs(10))
        .expect("metadata");
    assert_eq!(
        metadata.topics()[0].partitions().len(),
        4,
        "the topic was altered"
    );
}
