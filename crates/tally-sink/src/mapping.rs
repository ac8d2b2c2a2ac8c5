//! The marketplace mapping file of `tally export` (TOML), validated at load.
//!
//! ```toml
//! [aws]
//! product_code = "prod-abc123"          # BatchMeterUsage ProductCode
//! clouds = ["aws"]                      # optional: whose usage goes here (default: the marketplace's own cloud)
//! [aws.customers]
//! tenant-001 = { account_id = "111122223333" }
//! tenant-002 = { account_id = "444455556666", license_arn = "arn:aws:license-manager::…" }
//! [[aws.dimensions]]
//! model = "atlas-large"
//! measure = "output_tokens"             # input_tokens | cached_input_tokens | output_tokens | reasoning_tokens | gross_micros
//! dimension = "large_output_1k"
//! unit_size = 1000                      # measure per unit of the dimension
//!
//! [azure]
//! [azure.customers]
//! tenant-003 = { resource_id = "…", plan_id = "gold" }
//! [[azure.dimensions]]
//! …
//!
//! [gcp]
//! service_name = "atlas.endpoints.example.cloud.goog"
//! [gcp.customers]
//! tenant-004 = { consumer_id = "project:acme-prod" }
//! [[gcp.dimensions]]
//! …
//! ```
//!
//! Several (model, measure) entries may feed one dimension (e.g. input and cached input
//! tokens into `input_1k`) when they give it the same unit size. Errors name the entry
//! (`aws.dimensions[2]`, `gcp.customers.tenant-004`).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::error::SinkError;

/// A marketplace tally writes files for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Marketplace {
    /// AWS Marketplace, `BatchMeterUsage`.
    Aws,
    /// Azure Marketplace metered billing, `batchUsageEvent`.
    Azure,
    /// Google Cloud Marketplace, Service Control `services.report`.
    Gcp,
}

impl Marketplace {
    /// The lower-case name (flag value, ledger column, directory).
    pub const fn name(self) -> &'static str {
        match self {
            Marketplace::Aws => "aws",
            Marketplace::Azure => "azure",
            Marketplace::Gcp => "gcp",
        }
    }

    /// Largest quantity one record may carry; the excess carries to the next hour.
    /// AWS: Int32. Azure: a JSON number (a double), so 2^53 − 1 keeps every integer
    /// exact. GCP: `int64Value`.
    pub const fn max_quantity(self) -> i64 {
        match self {
            Marketplace::Aws => i32::MAX as i64,
            Marketplace::Azure => (1_i64 << 53) - 1,
            Marketplace::Gcp => i64::MAX,
        }
    }

    /// The hour starting at `hour_start_ms` can no longer be sent from this instant on.
    /// AWS rejects records 6 h or more after their hour; Azure 24 h; GCP wants reports
    /// within the hour after the interval ends.
    pub const fn deadline_ms(self, hour_start_ms: i64) -> i64 {
        const HOUR: i64 = 3_600_000;
        match self {
            Marketplace::Aws => hour_start_ms + 6 * HOUR,
            Marketplace::Azure => hour_start_ms + 24 * HOUR,
            Marketplace::Gcp => hour_start_ms + 2 * HOUR,
        }
    }
}

impl std::str::FromStr for Marketplace {
    type Err = String;
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "aws" => Ok(Marketplace::Aws),
            "azure" => Ok(Marketplace::Azure),
            "gcp" => Ok(Marketplace::Gcp),
            other => Err(format!("{other:?} is not aws, azure or gcp")),
        }
    }
}

/// What a dimension counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Measure {
    /// Uncached input tokens.
    InputTokens,
    /// Cached input tokens.
    CachedInputTokens,
    /// Output tokens.
    OutputTokens,
    /// Reasoning tokens.
    ReasoningTokens,
    /// Gross amount, micro-units of the currency.
    GrossMicros,
}

impl std::str::FromStr for Measure {
    type Err = String;
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "input_tokens" => Ok(Measure::InputTokens),
            "cached_input_tokens" => Ok(Measure::CachedInputTokens),
            "output_tokens" => Ok(Measure::OutputTokens),
            "reasoning_tokens" => Ok(Measure::ReasoningTokens),
            "gross_micros" => Ok(Measure::GrossMicros),
            other => Err(format!(
                "measure {other:?} is not input_tokens, cached_input_tokens, output_tokens, reasoning_tokens or gross_micros"
            )),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MappingFile {
    /// AWS Marketplace.
    aws: Option<Section<AwsCustomer>>,
    /// Azure Marketplace.
    azure: Option<Section<AzureCustomer>>,
    /// Google Cloud Marketplace.
    gcp: Option<Section<GcpCustomer>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Section<C> {
    /// AWS: the product code of every request.
    #[serde(default)]
    product_code: Option<String>,
    /// GCP: the Service Control service name.
    #[serde(default)]
    service_name: Option<String>,
    /// Clouds whose usage this marketplace bills (default: the marketplace's own).
    #[serde(default)]
    clouds: Option<Vec<String>>,
    /// Tenant id → the marketplace's customer.
    #[serde(default = "BTreeMap::new")]
    customers: BTreeMap<String, C>,
    /// (model, measure) → dimension.
    #[serde(default)]
    dimensions: Vec<DimensionEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AwsCustomer {
    /// `CustomerAWSAccountId`: 12 digits.
    account_id: String,
    /// `LicenseArn` for concurrent agreements.
    #[serde(default)]
    license_arn: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AzureCustomer {
    /// `resourceId` of the SaaS subscription or managed application.
    resource_id: String,
    /// `planId`.
    plan_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GcpCustomer {
    /// `consumerId`, e.g. `project:acme-prod`.
    consumer_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DimensionEntry {
    /// Model as on the rows.
    model: String,
    /// What is counted.
    measure: String,
    /// The marketplace's dimension (AWS, Azure) or metric name (GCP).
    dimension: String,
    /// Measure per unit of the dimension (1000 = one unit per thousand tokens).
    unit_size: i64,
}

/// A marketplace's customer for a tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Customer {
    /// AWS account id, Azure resource id or GCP consumer id.
    pub id: String,
    /// AWS license ARN or Azure plan id; empty when none.
    pub plan: String,
}

/// A validated (model, measure) → dimension entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dimension {
    /// Model.
    pub model: String,
    /// Measure.
    pub measure: Measure,
    /// Dimension name.
    pub name: String,
    /// Measure per unit, ≥ 1.
    pub unit_size: i64,
}

/// One marketplace's validated mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// The marketplace.
    pub marketplace: Marketplace,
    /// AWS product code or GCP service name; empty for Azure.
    pub product: String,
    /// Clouds whose usage is billed here.
    pub clouds: Vec<String>,
    /// Tenant → customer.
    pub customers: BTreeMap<String, Customer>,
    /// Dimension entries in file order.
    pub dimensions: Vec<Dimension>,
}

fn invalid(problem: String) -> SinkError {
    SinkError::Setting {
        field: "--mapping",
        problem,
    }
}

impl Mapping {
    /// Parses and validates the `marketplace` section of a mapping document.
    pub fn parse(text: &str, marketplace: Marketplace) -> Result<Mapping, SinkError> {
        let file: MappingFile = toml::from_str(text)
            .map_err(|error| invalid(format!("not a mapping file: {error}")))?;
        let section = marketplace.name();
        let (product, clouds, customers, dimensions) = match marketplace {
            Marketplace::Aws => {
                let aws = file
                    .aws
                    .ok_or_else(|| invalid("has no [aws] section".to_owned()))?;
                let product = aws
                    .product_code
                    .clone()
                    .filter(|code| !code.trim().is_empty())
                    .ok_or_else(|| invalid("aws.product_code must be set".to_owned()))?;
                if aws.service_name.is_some() {
                    return Err(invalid("aws.service_name is a gcp setting".to_owned()));
                }
                let mut customers = BTreeMap::new();
                for (tenant, customer) in &aws.customers {
                    let digits = customer.account_id.len() == 12
                        && customer
                            .account_id
                            .bytes()
                            .all(|byte| byte.is_ascii_digit());
                    if !digits {
                        return Err(invalid(format!(
                            "aws.customers.{tenant}: account_id must be 12 digits"
                        )));
                    }
                    customers.insert(
                        tenant.clone(),
                        Customer {
                            id: customer.account_id.clone(),
                            plan: customer.license_arn.clone().unwrap_or_default(),
                        },
                    );
                }
                (product, aws.clouds, customers, aws.dimensions)
            }
            Marketplace::Azure => {
                let azure = file
                    .azure
                    .ok_or_else(|| invalid("has no [azure] section".to_owned()))?;
                if azure.product_code.is_some() || azure.service_name.is_some() {
                    return Err(invalid(
                        "azure takes neither product_code nor service_name".to_owned(),
                    ));
                }
                let mut customers = BTreeMap::new();
                for (tenant, customer) in &azure.customers {
                    if customer.resource_id.trim().is_empty() || customer.plan_id.trim().is_empty()
                    {
                        return Err(invalid(format!(
                            "azure.customers.{tenant}: resource_id and plan_id must be set"
                        )));
                    }
                    customers.insert(
                        tenant.clone(),
                        Customer {
                            id: customer.resource_id.clone(),
                            plan: customer.plan_id.clone(),
                        },
                    );
                }
                (String::new(), azure.clouds, customers, azure.dimensions)
            }
            Marketplace::Gcp => {
                let gcp = file
                    .gcp
                    .ok_or_else(|| invalid("has no [gcp] section".to_owned()))?;
                let product = gcp
                    .service_name
                    .clone()
                    .filter(|name| !name.trim().is_empty())
                    .ok_or_else(|| invalid("gcp.service_name must be set".to_owned()))?;
                if gcp.product_code.is_some() {
                    return Err(invalid("gcp.product_code is an aws setting".to_owned()));
                }
                let mut customers = BTreeMap::new();
                for (tenant, customer) in &gcp.customers {
                    let id = &customer.consumer_id;
                    let known = ["project:", "project_number:", "api_key:"]
                        .iter()
                        .any(|prefix| id.starts_with(prefix) && id.len() > prefix.len());
                    if !known {
                        return Err(invalid(format!(
                            "gcp.customers.{tenant}: consumer_id must be project:ID, project_number:N or api_key:KEY"
                        )));
                    }
                    customers.insert(
                        tenant.clone(),
                        Customer {
                            id: id.clone(),
                            plan: String::new(),
                        },
                    );
                }
                (product, gcp.clouds, customers, gcp.dimensions)
            }
        };
        if customers.is_empty() {
            return Err(invalid(format!("{section}.customers is empty")));
        }
        // Tenants may share a customer (their usage adds up), but then with one plan.
        let mut plan_of: BTreeMap<&str, (&str, &str)> = BTreeMap::new();
        for (tenant, customer) in &customers {
            if let Some((other, plan)) = plan_of.get(customer.id.as_str())
                && *plan != customer.plan
            {
                return Err(invalid(format!(
                    "{section}.customers.{tenant}: customer {} has another plan or licence under {other}",
                    customer.id
                )));
            }
            plan_of.insert(&customer.id, (tenant, &customer.plan));
        }
        if dimensions.is_empty() {
            return Err(invalid(format!("{section}.dimensions is empty")));
        }
        let clouds = clouds.unwrap_or_else(|| vec![section.to_owned()]);
        if clouds.is_empty() || clouds.iter().any(|cloud| cloud.trim().is_empty()) {
            return Err(invalid(format!(
                "{section}.clouds must name at least one cloud"
            )));
        }
        let mut validated: Vec<Dimension> = Vec::with_capacity(dimensions.len());
        let mut unit_of: BTreeMap<String, i64> = BTreeMap::new();
        for (index, entry) in dimensions.iter().enumerate() {
            let name = format!("{section}.dimensions[{index}]");
            let measure: Measure = entry
                .measure
                .parse()
                .map_err(|problem: String| invalid(format!("{name}: {problem}")))?;
            if entry.model.trim().is_empty() || entry.dimension.trim().is_empty() {
                return Err(invalid(format!(
                    "{name}: model and dimension must not be empty"
                )));
            }
            if entry.unit_size < 1 {
                return Err(invalid(format!("{name}: unit_size must be at least 1")));
            }
            if validated
                .iter()
                .any(|other| other.model == entry.model && other.measure == measure)
            {
                return Err(invalid(format!(
                    "{name}: ({}, {}) is mapped twice",
                    entry.model, entry.measure
                )));
            }
            if let Some(unit) = unit_of.get(&entry.dimension)
                && *unit != entry.unit_size
            {
                return Err(invalid(format!(
                    "{name}: dimension {} has unit_size {unit} in an earlier entry",
                    entry.dimension
                )));
            }
            unit_of.insert(entry.dimension.clone(), entry.unit_size);
            validated.push(Dimension {
                model: entry.model.clone(),
                measure,
                name: entry.dimension.clone(),
                unit_size: entry.unit_size,
            });
        }
        Ok(Mapping {
            marketplace,
            product,
            clouds,
            customers,
            dimensions: validated,
        })
    }

    /// Unit size of a dimension name.
    pub fn unit_size(&self, dimension: &str) -> Option<i64> {
        self.dimensions
            .iter()
            .find(|entry| entry.name == dimension)
            .map(|entry| entry.unit_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AWS: &str = r#"
[aws]
product_code = "prod-1"
[aws.customers]
t1 = { account_id = "111122223333" }
[[aws.dimensions]]
model = "m"
measure = "output_tokens"
dimension = "out_1k"
unit_size = 1000
[[aws.dimensions]]
model = "m"
measure = "input_tokens"
dimension = "in_1k"
unit_size = 1000
"#;

    #[test]
    fn a_valid_section_loads_with_the_default_cloud() {
        let mapping = Mapping::parse(AWS, Marketplace::Aws).expect("valid");
        assert_eq!(mapping.clouds, vec!["aws".to_owned()]);
        assert_eq!(mapping.customers["t1"].id, "111122223333");
        assert_eq!(mapping.unit_size("out_1k"), Some(1000));
    }

    #[test]
    fn errors_name_the_entry() {
        let zero = AWS.replacen("unit_size = 1000\n[[aws", "unit_size = 0\n[[aws", 1);
        let error = Mapping::parse(&zero, Marketplace::Aws).expect_err("unit 0");
        assert!(
            error.to_string().contains("aws.dimensions[0]: unit_size"),
            "{error}"
        );
        let account = AWS.replace("111122223333", "1234");
        let error = Mapping::parse(&account, Marketplace::Aws).expect_err("short account");
        assert!(error.to_string().contains("aws.customers.t1"), "{error}");
        let unknown = AWS.replace(
            "unit_size = 1000\n[[aws",
            "unit_size = 1000\nunits = 1\n[[aws",
        );
        assert!(Mapping::parse(&unknown, Marketplace::Aws).is_err());
        let shared = AWS.replace(
            "t1 = { account_id = \"111122223333\" }",
            "t1 = { account_id = \"111122223333\" }\nt2 = { account_id = \"111122223333\", license_arn = \"arn:x\" }",
        );
        let error = Mapping::parse(&shared, Marketplace::Aws).expect_err("two plans");
        assert!(error.to_string().contains("aws.customers.t2"), "{error}");
        let twice = AWS.replace("input_tokens", "output_tokens");
        let error = Mapping::parse(&twice, Marketplace::Aws).expect_err("mapped twice");
        assert!(error.to_string().contains("aws.dimensions[1]"), "{error}");
        let error = Mapping::parse(AWS, Marketplace::Gcp).expect_err("no gcp section");
        assert!(error.to_string().contains("[gcp]"), "{error}");
    }
}
