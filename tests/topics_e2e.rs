//! `tally topics create` against the real broker: creates, is idempotent, never alters.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
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
    assert_eq!(stdout.matches(": created").count(), 5, "stdout: {stdout}");

    let second = tally(&["topics", "create"], &config);
    assert_success(&second, "second topics create");
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert_eq!(
        stdout.matches("exists, matches the config").count(),
        5,
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

/// `message.timestamp.after.max.ms` that `tally topics create` gives usage.events
/// (Kafka 4's one-hour default) and the topics tally writes with input-derived
/// timestamps: one hour + 5 min of allowed skew (`validation.max_event_time_ahead_ms`)
/// + one 1-minute window.
const INPUT_AFTER_MAX_MS: i64 = 3_600_000;
const OUTPUT_AFTER_MAX_MS: i64 = 3_600_000 + 300_000 + 60_000;

fn now_ms() -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    i64::try_from(since_epoch.as_millis()).expect("ms fit i64")
}

/// Produces one record stamped `timestamp_ms` to `topic`.
async fn produce_stamped(topic: &str, timestamp_ms: i64) -> Result<(), KafkaError> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("message.timeout.ms", "10000")
        .create()
        .expect("producer");
    producer
        .send(
            FutureRecord::<[u8], [u8]>::to(topic)
                .payload(b"stamped")
                .timestamp(timestamp_ms),
            Duration::from_secs(10),
        )
        .await
        .map(|_| ())
        .map_err(|(error, _)| error)
}

#[tokio::test]
async fn output_topics_take_timestamps_an_hour_ahead_and_the_input_does_not() {
    let dir = tempfile::tempdir().expect("temp dir");
    let topics = TestTopics::random();
    let config = write_config(dir.path(), &topics, 1, "");
    assert_success(&tally(&["topics", "create"], &config), "topics create");

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .expect("admin client");
    let key = "message.timestamp.after.max.ms";
    assert_eq!(
        topic_config(&admin, &topics.usage_events, key).await,
        INPUT_AFTER_MAX_MS.to_string()
    );
    for output in [&topics.billing_aggregates, &topics.late, &topics.dlq] {
        assert_eq!(
            topic_config(&admin, output, key).await,
            OUTPUT_AFTER_MAX_MS.to_string(),
            "{output}"
        );
    }

    // A row of a window whose events were stamped near the input's bound: 62 minutes
    // ahead of the broker's clock. The aggregates topic takes it; usage.events
    // (Kafka's default bound) would not.
    let ahead = now_ms() + 62 * 60_000;
    produce_stamped(&topics.billing_aggregates, ahead)
        .await
        .expect("the aggregates topic takes a timestamp 62 min ahead");
    let refused = produce_stamped(&topics.usage_events, ahead)
        .await
        .expect_err("usage.events refuses a timestamp 62 min ahead");
    assert_eq!(
        refused.rdkafka_error_code(),
        Some(RDKafkaErrorCode::InvalidTimestamp),
        "{refused}"
    );
}

#[tokio::test]
async fn existing_topics_with_a_too_small_timestamp_bound_are_errors_and_left_alone() {
    let dir = tempfile::tempdir().expect("temp dir");
    let topics = TestTopics::random();
    let config = write_config(dir.path(), &topics, 1, "");
    assert_success(&tally(&["topics", "create"], &config), "topics create");

    let checked = tally(&["config", "check", "--topics"], &config);
    assert_success(&checked, "config check --topics");
    let stdout = String::from_utf8_lossy(&checked.stdout);
    assert_eq!(
        stdout.matches("exists, matches the config").count(),
        5,
        "stdout: {stdout}"
    );

    // Ten minutes of allowed skew: the outputs need 1 h + 10 min + 1 min.
    let wider = dir.path().join("wider");
    std::fs::create_dir(&wider).expect("dir");
    let wider = write_config(
        &wider,
        &topics,
        1,
        "[validation]\nmax_event_time_ahead_ms = 600000\n",
    );
    for args in [
        &["topics", "create"][..],
        &["config", "check", "--topics"][..],
    ] {
        let output = tally(args, &wider);
        assert!(!output.status.success(), "{args:?} must fail");
        let stderr = String::from_utf8_lossy(&output.stderr);
        for output_topic in [&topics.billing_aggregates, &topics.late, &topics.dlq] {
            assert!(stderr.contains(output_topic.as_str()), "stderr: {stderr}");
        }
        assert!(
            stderr.contains("message.timestamp.after.max.ms"),
            "stderr: {stderr}"
        );
        assert!(stderr.contains("4260000"), "stderr: {stderr}");
    }

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .expect("admin client");
    assert_eq!(
        topic_config(
            &admin,
            &topics.billing_aggregates,
            "message.timestamp.after.max.ms"
        )
        .await,
        OUTPUT_AFTER_MAX_MS.to_string(),
        "the topic was altered"
    );

    // Missing topics are listed by the check, not created.
    let absent = TestTopics::random();
    let absent_config = dir.path().join("absent");
    std::fs::create_dir(&absent_config).expect("dir");
    let absent_config = write_config(&absent_config, &absent, 1, "");
    let checked = tally(&["config", "check", "--topics"], &absent_config);
    assert_success(&checked, "config check --topics of missing topics");
    let stdout = String::from_utf8_lossy(&checked.stdout);
    assert_eq!(stdout.matches("missing").count(), 5, "stdout: {stdout}");
    let metadata = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("metadata");
    assert!(
        metadata
            .topics()
            .iter()
            .all(|topic| topic.name() != absent.usage_events),
        "the check created a topic"
    );
}
