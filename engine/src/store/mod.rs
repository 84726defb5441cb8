//! All SQL of the engine, one module per table. Statements are written once with `$N` placeholders, which both
//! PostgreSQL and SQLite (through sqlx) accept; where the dialects differ the module says so.

pub mod attachments;
pub mod contacts;
pub mod events;
pub mod messages;
pub mod outbox;
pub mod quarantine;

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbErr, SqliteTransactionMode,
    Statement, TransactionOptions, TransactionTrait, Value,
};

pub use mailqueue_schema::Backend;

/// Starts a write transaction. On SQLite it is `BEGIN IMMEDIATE`, so two writers never deadlock upgrading read
/// locks (a deferred transaction fails with "database is locked" instead of waiting).
pub async fn begin_write(db: &DatabaseConnection) -> Result<DatabaseTransaction, DbErr> {
    db.begin_with_options(TransactionOptions {
        sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
        ..Default::default()
    })
    .await
}

/// A statement for the connection's backend.
pub fn stmt(
    db: &impl ConnectionTrait,
    sql: &str,
    values: impl IntoIterator<Item = Value>,
) -> Statement {
    Statement::from_sql_and_values(db.get_database_backend(), sql, values)
}

/// `$first, $first+1, …` placeholders for an `IN (…)` list of `n` values.
pub fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}
