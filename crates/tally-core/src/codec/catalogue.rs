//! The schema catalogue: `schemas/catalogue.json` and the `.avsc` files it names,
//! parsed with `apache-avro`.
//!
//! The hand-written codec in [`crate::codec`] is specialised to the catalogue's schemas;
//! this module is what ties the two together. [`Catalogue::check`] proves, at start-up
//! and in tests, that:
//!
//! - every catalogue entry has a [`SchemaId`] with the same numeric id, and the schema
//!   file's full name is the one that id stands for (so a renumbered or swapped file is
//!   caught before a single record is decoded under the wrong schema);
//! - `tally.UsageEvent` v1 and v2 can each read the other (full compatibility, as
//!   `apache-avro`'s resolution rules define it), so producers and aggregators can be
//!   upgraded in either order.
//!
//! Decisions:
//! - Two sources: [`Catalogue::embedded`] compiles the repository's `schemas/` into the
//!   binary (what the pipeline runs with: the wire format cannot drift from the build),
//!   and [`Catalogue::load`] reads a directory (for tooling and for checking edited
//!   schemas before a release).
//! - Construction fails only when a file cannot be read or parsed, or when a
//!   [`SchemaId`] this build knows has no entry: after that [`Catalogue::schema`] is
//!   infallible. Everything else (unknown ids, names, compatibility) is [`Catalogue::check`]'s job.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use apache_avro::Schema;
use apache_avro::schema_compatibility::SchemaCompatibility;
use serde::Deserialize;

use super::SchemaId;

/// Name of the catalogue file inside a schema directory.
pub const CATALOGUE_FILE: &str = "catalogue.json";

/// The schema files compiled into the binary, by file name.
const EMBEDDED_FILES: [(&str, &str); 5] = [
    (
        CATALOGUE_FILE,
        include_str!("../../../../schemas/catalogue.json"),
    ),
    (
        "usage_event.v1.avsc",
        include_str!("../../../../schemas/usage_event.v1.avsc"),
    ),
    (
        "usage_event.v2.avsc",
        include_str!("../../../../schemas/usage_event.v2.avsc"),
    ),
    (
        "usage_tick.v1.avsc",
        include_str!("../../../../schemas/usage_tick.v1.avsc"),
    ),
    (
        "billing_aggregate.v1.avsc",
        include_str!("../../../../schemas/billing_aggregate.v1.avsc"),
    ),
];

impl SchemaId {
    /// The Avro full name of the schema this id stands for.
    pub const fn full_name(self) -> &'static str {
        match self {
            SchemaId::UsageEventV1 | SchemaId::UsageEventV2 => "tally.UsageEvent",
            SchemaId::UsageTickV1 => "tally.UsageTick",
            SchemaId::BillingAggregateV1 => "tally.BillingAggregate",
        }
    }
}

/// Why the catalogue could not be loaded, or failed its [`check`](Catalogue::check).
/// Every variant names the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum CatalogueError {
    /// A file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The catalogue names a file that is not embedded in this build.
    #[error("{CATALOGUE_FILE} names {file}, which is not embedded in this build")]
    NotEmbedded {
        /// The file named.
        file: String,
    },
    /// `catalogue.json` is not valid JSON of the expected shape.
    #[error("{file} is not a valid catalogue")]
    Json {
        /// The file.
        file: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A `.avsc` file is not a valid Avro schema.
    #[error("{file} is not a valid Avro schema")]
    Schema {
        /// The file.
        file: String,
        /// The parse error.
        #[source]
        source: Box<apache_avro::Error>,
    },
    /// Two catalogue entries share an id.
    #[error("{CATALOGUE_FILE} lists schema id {id} twice ({file} and an earlier entry)")]
    DuplicateId {
        /// The id.
        id: u32,
        /// The file of the second entry.
        file: String,
    },
    /// A schema id this build knows has no catalogue entry.
    #[error("{CATALOGUE_FILE} has no entry for schema id {} ({})", schema.id(), schema.full_name())]
    MissingId {
        /// The id missing.
        schema: SchemaId,
    },
    /// A catalogue entry's id is not one this build knows.
    #[error("{file}: catalogue id {id} is not a schema id this build knows")]
    UnknownId {
        /// The entry's file.
        file: String,
        /// The id.
        id: u32,
    },
    /// An entry's full name (in the catalogue or in the `.avsc`) differs from the name
    /// its id stands for.
    #[error("{file}: schema id {id} must be {expected}, found {found}")]
    NameMismatch {
        /// The entry's file.
        file: String,
        /// The id.
        id: u32,
        /// The full name the id stands for.
        expected: &'static str,
        /// The full name found.
        found: String,
    },
    /// One schema cannot read data written with another.
    #[error("{reader_file} cannot read data written with {writer_file}")]
    Incompatible {
        /// The writer schema's file.
        writer_file: String,
        /// The reader schema's file.
        reader_file: String,
        /// What `apache-avro` found.
        #[source]
        source: apache_avro::error::CompatibilityError,
    },
}

/// One entry of `catalogue.json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogueEntry {
    /// The fixed schema id written in the frame header.
    pub id: u32,
    /// The Schema Registry subject the schema belongs to.
    pub subject: String,
    /// The schema's Avro full name.
    pub name: String,
    /// The schema's version within its subject.
    pub version: u32,
    /// The `.avsc` file, relative to the catalogue.
    pub file: String,
}

/// The shape of `catalogue.json`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogueFile {
    #[serde(rename = "doc")]
    _doc: Option<String>,
    schemas: Vec<CatalogueEntry>,
}

/// The parsed catalogue: every entry with its parsed schema.
#[derive(Debug, Clone)]
pub struct Catalogue {
    /// Entries in catalogue order, each with its schema.
    entries: Vec<(CatalogueEntry, Schema)>,
    /// Index into `entries` for each [`SchemaId`], in [`SchemaId::ALL`] order.
    known: [usize; SchemaId::ALL.len()],
}

impl Catalogue {
    /// The catalogue compiled into this build from the repository's `schemas/`.
    pub fn embedded() -> Result<Catalogue, CatalogueError> {
        Catalogue::from_source(|file| {
            EMBEDDED_FILES
                .iter()
                .find(|(name, _)| *name == file)
                .map(|(_, text)| (*text).to_owned())
                .ok_or_else(|| CatalogueError::NotEmbedded {
                    file: file.to_owned(),
                })
        })
    }

    /// Reads `catalogue.json` and the schema files it names from `dir`.
    pub fn load(dir: &Path) -> Result<Catalogue, CatalogueError> {
        Catalogue::from_source(|file| {
            let path = dir.join(file);
            std::fs::read_to_string(&path).map_err(|source| CatalogueError::Read { path, source })
        })
    }

    /// Builds the catalogue, reading each file's text through `read`.
    fn from_source(
        read: impl Fn(&str) -> Result<String, CatalogueError>,
    ) -> Result<Catalogue, CatalogueError> {
        let text = read(CATALOGUE_FILE)?;
        let file: CatalogueFile =
            serde_json::from_str(&text).map_err(|source| CatalogueError::Json {
                file: CATALOGUE_FILE.to_owned(),
                source,
            })?;
        let mut seen = BTreeMap::new();
        let mut entries = Vec::with_capacity(file.schemas.len());
        for entry in file.schemas {
            if seen.insert(entry.id, entries.len()).is_some() {
                return Err(CatalogueError::DuplicateId {
                    id: entry.id,
                    file: entry.file,
                });
            }
            let text = read(&entry.file)?;
            let schema = Schema::parse_str(&text).map_err(|source| CatalogueError::Schema {
                file: entry.file.clone(),
                source: Box::new(source),
            })?;
            entries.push((entry, schema));
        }
        let mut known = [0; SchemaId::ALL.len()];
        for (slot, schema) in known.iter_mut().zip(SchemaId::ALL) {
            *slot = *seen
                .get(&schema.id())
                .ok_or(CatalogueError::MissingId { schema })?;
        }
        Ok(Catalogue { entries, known })
    }

    /// The parsed schema for `id`.
    pub fn schema(&self, id: SchemaId) -> &Schema {
        &self.entries[self.known[Self::position(id)]].1
    }

    /// The catalogue entry for `id`.
    pub fn entry(&self, id: SchemaId) -> &CatalogueEntry {
        &self.entries[self.known[Self::position(id)]].0
    }

    /// Every entry in catalogue order.
    pub fn entries(&self) -> impl Iterator<Item = &CatalogueEntry> {
        self.entries.iter().map(|(entry, _)| entry)
    }

    /// Position of `id` in [`SchemaId::ALL`].
    fn position(id: SchemaId) -> usize {
        // SchemaId::ALL lists every variant, so the search always succeeds.
        SchemaId::ALL
            .iter()
            .position(|known| *known == id)
            .unwrap_or_default()
    }

    /// Checks that every entry maps to a [`SchemaId`] with the same id and full name,
    /// and that UsageEvent v1 and v2 can each read the other. Returns the first problem.
    pub fn check(&self) -> Result<(), CatalogueError> {
        for (entry, schema) in &self.entries {
            let Some(id) = SchemaId::from_id(entry.id) else {
                return Err(CatalogueError::UnknownId {
                    file: entry.file.clone(),
                    id: entry.id,
                });
            };
            let expected = id.full_name();
            let parsed_name = schema
                .name()
                .map(|name| name.fullname(None))
                .unwrap_or_default();
            for found in [entry.name.as_str(), parsed_name.as_str()] {
                if found != expected {
                    return Err(CatalogueError::NameMismatch {
                        file: entry.file.clone(),
                        id: entry.id,
                        expected,
                        found: found.to_owned(),
                    });
                }
            }
        }
        let pairs = [
            (SchemaId::UsageEventV1, SchemaId::UsageEventV2),
            (SchemaId::UsageEventV2, SchemaId::UsageEventV1),
        ];
        for (writer, reader) in pairs {
            SchemaCompatibility::can_read(self.schema(writer), self.schema(reader)).map_err(
                |source| CatalogueError::Incompatible {
                    writer_file: self.entry(writer).file.clone(),
                    reader_file: self.entry(reader).file.clone(),
                    source,
                },
            )?;
        }
        Ok(())
    }
}
