//! The `--database` flag every command that opens the billing store shares
//! (`tally sink`, `report`, `statement`, `export`, `export ack`): one definition of the
//! flag, its environment variable and default, and one parse into a [`StoreLocation`].
//!
//! Each command flattens [`StoreArgs`] into its own flags. `tally sink` documents the
//! accepted forms; the other commands keep their short help by overriding the flag's
//! help where they flatten it.

use crate::error::SinkError;
use crate::store::StoreLocation;

/// The flag's name, as errors report it.
pub const DATABASE_FLAG: &str = "--database";

/// The help the commands other than `tally sink` show for `--database`.
pub const DATABASE_HELP_AS_FOR_SINK: &str = "The billing store (as for `tally sink`)";

/// Where the billing store is.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct StoreArgs {
    /// The billing store: `postgres://…` / `postgresql://…` for PostgreSQL, or
    /// `sqlite:PATH` (or a plain path) for SQLite. Prefer the environment variable
    /// for connection strings with passwords.
    #[arg(
        long,
        env = "TALLY_SINK_DATABASE",
        default_value = "sqlite:tally-billing.db"
    )]
    pub database: String,
}

impl StoreArgs {
    /// The flag as given (tests and embedders build it without clap).
    pub fn new(database: impl Into<String>) -> StoreArgs {
        StoreArgs {
            database: database.into(),
        }
    }

    /// The parsed location; an error names `--database`.
    pub fn location(&self) -> Result<StoreLocation, SinkError> {
        StoreLocation::parse(DATABASE_FLAG, &self.database)
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Debug, Parser)]
    struct Flags {
        #[command(flatten)]
        store: StoreArgs,
    }

    #[test]
    fn location_is_the_parsed_flag_and_errors_name_it() {
        // The forms themselves are `StoreLocation::parse`'s (see its tests).
        assert_eq!(
            StoreArgs::new("sqlite:a.db").location().ok(),
            Some(StoreLocation::Sqlite("a.db".to_owned()))
        );
        for given in ["", "  ", "sqlite:"] {
            match StoreArgs::new(given).location() {
                Err(SinkError::Setting { field, .. }) => assert_eq!(field, "--database"),
                other => panic!("{given:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn declares_the_flag_with_its_environment_variable_and_default() {
        let command = Flags::command();
        let argument = command
            .get_arguments()
            .find(|argument| argument.get_id() == "database")
            .expect("the flag exists");
        let defaults: Vec<_> = argument.get_default_values().iter().collect();
        assert_eq!(defaults, ["sqlite:tally-billing.db"]);
        assert_eq!(
            argument.get_env(),
            Some(std::ffi::OsStr::new("TALLY_SINK_DATABASE"))
        );
        let flags = Flags::try_parse_from(["t", "--database", "sqlite:x.db"]).expect("parses");
        assert_eq!(flags.store, StoreArgs::new("sqlite:x.db"));
    }
}
