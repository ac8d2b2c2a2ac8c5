//! `tally export` output as the tests read it: the marketplaces and the records of
//! their request files, with the shape checks every export test shares.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value as Json;
use tally_core::event::Cloud;

use super::finance::HOUR_MS;
use super::money::parse_utc_ms;

/// A marketplace `tally export` writes requests for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Market {
    Aws,
    Azure,
    Gcp,
}

impl Market {
    /// The `--marketplace` value, also the output directory's name.
    pub const fn name(self) -> &'static str {
        match self {
            Market::Aws => "aws",
            Market::Azure => "azure",
            Market::Gcp => "gcp",
        }
    }

    /// The largest quantity one record may carry.
    pub const fn max(self) -> i64 {
        match self {
            Market::Aws => 2_147_483_647,
            Market::Azure => 9_007_199_254_740_991,
            Market::Gcp => i64::MAX,
        }
    }

    /// The cloud whose usage the marketplace bills.
    pub const fn cloud(self) -> Cloud {
        match self {
            Market::Aws => Cloud::Aws,
            Market::Azure => Cloud::Azure,
            Market::Gcp => Cloud::Gcp,
        }
    }

    /// Hours the marketplace still takes, after the hour's start.
    pub const fn deadline_after_start_ms(self) -> i64 {
        match self {
            Market::Aws => 6 * HOUR_MS,
            Market::Azure => 24 * HOUR_MS,
            Market::Gcp => 2 * HOUR_MS,
        }
    }
}

/// A record's (customer, dimension, hour start in ms).
pub type RecordKey = (String, String, i64);

/// ms of `YYYY-MM-DDTHH:00:00Z` (whole hours only).
pub fn hour_of(text: &str) -> i64 {
    assert!(text.ends_with(":00:00Z"), "{text} is on the hour");
    let ms = parse_utc_ms(text).expect("an RFC 3339 hour");
    assert_eq!(ms % HOUR_MS, 0, "{text} is on the hour");
    ms
}

/// Every `.json` file of `market` under `out` (the request files and the manifest), by
/// file name, with their bytes.
pub fn json_files(out: &Path, market: Market) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(out.join(market.name())).expect("output dir") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        if name.ends_with(".json") {
            files.insert(name, std::fs::read(&path).expect("read"));
        }
    }
    files
}

/// The request files of `market` under `out`: [`json_files`] without the manifest.
pub fn request_files(out: &Path, market: Market) -> BTreeMap<String, Vec<u8>> {
    let mut files = json_files(out, market);
    files.remove("manifest.json");
    files
}

/// The records of one request body of `market`, checked for what every export
/// must hold: 1 to 25 records; the product code (AWS); the customer's plan,
/// `plan_of(customer)` (AWS `LicenseArn`, absent for an empty plan; Azure `planId`);
/// integer quantities within the market's range (Azure's positive, GCP's an int64 in
/// a JSON string); hours on the hour (GCP operations one hour long).
pub fn request_records(
    market: Market,
    body: &Json,
    product_code: &str,
    plan_of: impl Fn(&str) -> String,
) -> Vec<(RecordKey, i64)> {
    let list = match market {
        Market::Aws => {
            assert_eq!(body["ProductCode"], product_code);
            body["UsageRecords"].as_array().expect("records")
        }
        Market::Azure => body["request"].as_array().expect("events"),
        Market::Gcp => body["operations"].as_array().expect("operations"),
    };
    assert!(
        !list.is_empty() && list.len() <= 25,
        "{} records in one request",
        list.len()
    );
    list.iter()
        .map(|record| match market {
            Market::Aws => {
                let customer = record["CustomerAWSAccountId"].as_str().expect("account");
                let plan = plan_of(customer);
                if plan.is_empty() {
                    assert!(record.get("LicenseArn").is_none());
                } else {
                    assert_eq!(record["LicenseArn"].as_str(), Some(plan.as_str()));
                }
                let seconds = record["Timestamp"].as_i64().expect("epoch seconds");
                assert_eq!(seconds % 3600, 0, "stamped on the hour");
                let quantity = record["Quantity"].as_i64().expect("integer quantity");
                assert!((0..=market.max()).contains(&quantity), "{quantity}");
                let dimension = record["Dimension"].as_str().expect("dimension");
                (
                    (customer.to_owned(), dimension.to_owned(), seconds * 1000),
                    quantity,
                )
            }
            Market::Azure => {
                let customer = record["resourceId"].as_str().expect("resource");
                assert_eq!(record["planId"].as_str(), Some(plan_of(customer).as_str()));
                let quantity = record["quantity"].as_i64().expect("integer quantity");
                assert!(
                    (1..=market.max()).contains(&quantity),
                    "azure quantities are positive: {quantity}"
                );
                let start = hour_of(record["effectiveStartTime"].as_str().expect("start"));
                let dimension = record["dimension"].as_str().expect("dimension");
                ((customer.to_owned(), dimension.to_owned(), start), quantity)
            }
            Market::Gcp => {
                let start = hour_of(record["startTime"].as_str().expect("start"));
                let end = hour_of(record["endTime"].as_str().expect("end"));
                assert_eq!(end - start, HOUR_MS, "one hour per operation");
                let set = &record["metricValueSets"][0];
                let quantity: i64 = set["metricValues"][0]["int64Value"]
                    .as_str()
                    .expect("int64Value is a JSON string")
                    .parse()
                    .expect("an int64");
                assert!(quantity >= 0, "{quantity}");
                let customer = record["consumerId"].as_str().expect("consumer");
                let metric = set["metricName"].as_str().expect("metric");
                ((customer.to_owned(), metric.to_owned(), start), quantity)
            }
        })
        .collect()
}

/// The records of every request file of `market` under `out`, each (customer,
/// dimension, hour) at most once, checked as [`request_records`] says.
pub fn all_records(
    out: &Path,
    market: Market,
    product_code: &str,
    plan_of: impl Fn(&str) -> String,
) -> BTreeMap<RecordKey, i64> {
    let mut records = BTreeMap::new();
    for (name, bytes) in request_files(out, market) {
        let body: Json = serde_json::from_slice(&bytes).expect("request json");
        for (key, quantity) in request_records(market, &body, product_code, &plan_of) {
            assert!(
                records.insert(key, quantity).is_none(),
                "{name}: a record appears twice"
            );
        }
    }
    records
}
