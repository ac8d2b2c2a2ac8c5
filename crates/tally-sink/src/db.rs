//! A small SQL connection for the store's readers and the export bookkeeping:
//! statements with `$1, $2, …` placeholders, 64-bit integer and text values only,
//! the same text for PostgreSQL and SQLite.
//!
//! [`Db::open`] first opens the store through [`Store::open`], so the schema's
//! migrations have run, then keeps a connection of its own. Every PostgreSQL round
//! trip is bounded by the timeout given at open.

use std::time::Duration;

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, NoTls};
use tracing::debug;

use crate::error::SinkError;
use crate::store::{Store, StoreLocation};

/// A column or parameter value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Value {
    /// SQL NULL.
    Null,
    /// A 64-bit integer.
    Int(i64),
    /// Text.
    Text(String),
}

impl Value {
    /// The integer, or an error naming `column`.
    pub(crate) fn int(&self, column: &'static str) -> Result<i64, SinkError> {
        match self {
            Value::Int(value) => Ok(*value),
            other => Err(SinkError::Store(format!(
                "column {column}: expected an integer, found {other:?}"
            ))),
        }
    }

    /// The text (NULL reads as empty), or an error naming `column`.
    pub(crate) fn text(&self, column: &'static str) -> Result<String, SinkError> {
        match self {
            Value::Text(value) => Ok(value.clone()),
            Value::Null => Ok(String::new()),
            other => Err(SinkError::Store(format!(
                "column {column}: expected text, found {other:?}"
            ))),
        }
    }
}

impl From<i64> for Value {
    fn from(value: i64) -> Self {
        Value::Int(value)
    }
}

impl From<&str> for Value {
    fn from(value: &str) -> Self {
        Value::Text(value.to_owned())
    }
}

impl From<String> for Value {
    fn from(value: String) -> Self {
        Value::Text(value)
    }
}

/// An open connection to the billing store.
pub(crate) enum Db {
    /// SQLite.
    Sqlite(rusqlite::Connection),
    /// PostgreSQL on a private current-thread runtime.
    Postgres {
        /// Drives the client's futures.
        runtime: tokio::runtime::Runtime,
        /// The connection.
        client: Client,
        /// Bound of every round trip.
        timeout: Duration,
    },
}

impl std::fmt::Debug for Db {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            Db::Sqlite(_) => "Db::Sqlite",
            Db::Postgres { .. } => "Db::Postgres",
        })
    }
}

fn lite(operation: &'static str) -> impl FnOnce(rusqlite::Error) -> SinkError {
    move |source| SinkError::Sqlite { operation, source }
}

fn pg(operation: &'static str) -> impl FnOnce(tokio_postgres::Error) -> SinkError {
    move |source| SinkError::Postgres { operation, source }
}

/// `$1, $2, …` as SQLite's `?1, ?2, …`.
fn sqlite_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(character) = chars.next() {
        if character == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('?');
        } else {
            out.push(character);
        }
    }
    out
}

impl Db {
    /// Opens the store at `location` (a missing SQLite file is an error naming
    /// `--database`), applying missing migrations.
    pub(crate) fn open(location: &StoreLocation, timeout: Duration) -> Result<Db, SinkError> {
        if let StoreLocation::Sqlite(path) = location
            && !std::path::Path::new(path).exists()
        {
            return Err(SinkError::Setting {
                field: "--database",
                problem: format!("no SQLite store at {path}"),
            });
        }
        drop(Store::open(location, timeout)?);
        match location {
            StoreLocation::Sqlite(path) => {
                let connection = rusqlite::Connection::open(path).map_err(lite("open"))?;
                connection
                    .busy_timeout(timeout)
                    .map_err(lite("set busy_timeout"))?;
                Ok(Db::Sqlite(connection))
            }
            StoreLocation::Postgres(url) => {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|error| {
                        SinkError::Store(format!("cannot start a runtime: {error}"))
                    })?;
                let url = url.clone();
                let connected = runtime.block_on(async move {
                    let connect = tokio_postgres::connect(&url, NoTls);
                    match tokio::time::timeout(timeout, connect).await {
                        Ok(result) => result.map_err(pg("connect")),
                        Err(_) => Err(SinkError::Timeout {
                            operation: "connect",
                            timeout_ms: timeout.as_millis(),
                        }),
                    }
                });
                let (client, connection) = connected?;
                runtime.spawn(async move {
                    if let Err(error) = connection.await {
                        debug!(error = %error, "postgresql connection closed");
                    }
                });
                Ok(Db::Postgres {
                    runtime,
                    client,
                    timeout,
                })
            }
        }
    }

    /// True for PostgreSQL.
    pub(crate) const fn is_postgres(&self) -> bool {
        matches!(self, Db::Postgres { .. })
    }

    /// Starts a write transaction (SQLite: `BEGIN IMMEDIATE`, the file's write lock).
    pub(crate) fn begin_write(&mut self) -> Result<(), SinkError> {
        match self {
            Db::Sqlite(connection) => connection
                .execute_batch("BEGIN IMMEDIATE")
                .map_err(lite("begin")),
            Db::Postgres { .. } => self.execute("BEGIN", &[]).map(|_| ()),
        }
    }

    /// Starts a read-only snapshot (PostgreSQL: REPEATABLE READ).
    pub(crate) fn begin_read(&mut self) -> Result<(), SinkError> {
        match self {
            Db::Sqlite(connection) => connection.execute_batch("BEGIN").map_err(lite("begin")),
            Db::Postgres { .. } => self
                .execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", &[])
                .map(|_| ()),
        }
    }

    /// Commits the open transaction.
    pub(crate) fn commit(&mut self) -> Result<(), SinkError> {
        self.execute("COMMIT", &[]).map(|_| ())
    }

    /// Rolls the open transaction back (errors ignored: the connection is dropped after
    /// a failure anyway).
    pub(crate) fn rollback(&mut self) {
        let _ = self.execute("ROLLBACK", &[]);
    }

    /// Runs a statement; the number of rows it changed.
    pub(crate) fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, SinkError> {
        match self {
            Db::Sqlite(connection) => {
                let mut statement = connection
                    .prepare_cached(&sqlite_placeholders(sql))
                    .map_err(lite("prepare"))?;
                let changed = statement
                    .execute(rusqlite::params_from_iter(params.iter().map(lite_value)))
                    .map_err(lite("execute"))?;
                Ok(u64::try_from(changed).unwrap_or(u64::MAX))
            }
            Db::Postgres {
                runtime,
                client,
                timeout,
            } => {
                let values = pg_values(params);
                let refs: Vec<&(dyn ToSql + Sync)> =
                    values.iter().map(|value| value.as_ref()).collect();
                let timeout = *timeout;
                runtime.block_on(async {
                    match tokio::time::timeout(timeout, client.execute(sql, &refs)).await {
                        Ok(result) => result.map_err(pg("execute")),
                        Err(_) => Err(SinkError::Timeout {
                            operation: "execute",
                            timeout_ms: timeout.as_millis(),
                        }),
                    }
                })
            }
        }
    }

    /// Runs a query; every row's columns as values.
    pub(crate) fn query(
        &mut self,
        sql: &str,
        params: &[Value],
    ) -> Result<Vec<Vec<Value>>, SinkError> {
        match self {
            Db::Sqlite(connection) => {
                let mut statement = connection
                    .prepare_cached(&sqlite_placeholders(sql))
                    .map_err(lite("prepare"))?;
                let columns = statement.column_count();
                let mut rows = statement
                    .query(rusqlite::params_from_iter(params.iter().map(lite_value)))
                    .map_err(lite("query"))?;
                let mut out = Vec::new();
                while let Some(row) = rows.next().map_err(lite("query"))? {
                    let mut values = Vec::with_capacity(columns);
                    for index in 0..columns {
                        values.push(match row.get_ref(index).map_err(lite("read a column"))? {
                            rusqlite::types::ValueRef::Null => Value::Null,
                            rusqlite::types::ValueRef::Integer(value) => Value::Int(value),
                            rusqlite::types::ValueRef::Text(bytes) => {
                                Value::Text(String::from_utf8_lossy(bytes).into_owned())
                            }
                            other => {
                                return Err(SinkError::Store(format!(
                                    "unexpected column type {:?}",
                                    other.data_type()
                                )));
                            }
                        });
                    }
                    out.push(values);
                }
                Ok(out)
            }
            Db::Postgres {
                runtime,
                client,
                timeout,
            } => {
                let values = pg_values(params);
                let refs: Vec<&(dyn ToSql + Sync)> =
                    values.iter().map(|value| value.as_ref()).collect();
                let timeout = *timeout;
                let rows = runtime.block_on(async {
                    match tokio::time::timeout(timeout, client.query(sql, &refs)).await {
                        Ok(result) => result.map_err(pg("query")),
                        Err(_) => Err(SinkError::Timeout {
                            operation: "query",
                            timeout_ms: timeout.as_millis(),
                        }),
                    }
                })?;
                let mut out = Vec::with_capacity(rows.len());
                for row in rows {
                    let mut values = Vec::with_capacity(row.len());
                    for (index, column) in row.columns().iter().enumerate() {
                        let value = match *column.type_() {
                            Type::INT8 => row
                                .try_get::<_, Option<i64>>(index)
                                .map(|value| value.map_or(Value::Null, Value::Int)),
                            Type::INT4 => row
                                .try_get::<_, Option<i32>>(index)
                                .map(|value| value.map_or(Value::Null, |v| Value::Int(v.into()))),
                            _ => row
                                .try_get::<_, Option<String>>(index)
                                .map(|value| value.map_or(Value::Null, Value::Text)),
                        }
                        .map_err(pg("read a column"))?;
                        values.push(value);
                    }
                    out.push(values);
                }
                Ok(out)
            }
        }
    }
}

fn lite_value(value: &Value) -> rusqlite::types::Value {
    match value {
        Value::Null => rusqlite::types::Value::Null,
        Value::Int(value) => rusqlite::types::Value::Integer(*value),
        Value::Text(value) => rusqlite::types::Value::Text(value.clone()),
    }
}

fn pg_values(params: &[Value]) -> Vec<Box<dyn ToSql + Sync>> {
    params
        .iter()
        .map(|value| -> Box<dyn ToSql + Sync> {
            match value {
                Value::Null => Box::new(None::<String>),
                Value::Int(value) => Box::new(*value),
                Value::Text(value) => Box::new(value.clone()),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_sqlite_numbered_parameters() {
        assert_eq!(
            sqlite_placeholders("SELECT a FROM t WHERE b = $1 AND c = '$x' AND d = $12"),
            "SELECT a FROM t WHERE b = ?1 AND c = '$x' AND d = ?12"
        );
    }
}
