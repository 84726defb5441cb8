//! SQL of the `instances` table: the running `mailqueue serve` processes, each heartbeating its row. The live rows
//! (not yet expired) are what an instance divides the mailboxes by.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbErr, FromQueryResult};

use super::stmt;

/// An instance row.
#[derive(Debug, Clone, PartialEq, Eq, FromQueryResult)]
pub struct Instance {
    pub id: String,
    pub hostname: String,
    pub pid: i64,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// Inserts or refreshes the row of instance `id`: alive until `now + ttl`.
pub async fn heartbeat(
    db: &impl ConnectionTrait,
    id: &str,
    hostname: &str,
    pid: u32,
    now: DateTime<Utc>,
    ttl: Duration,
) -> Result<(), DbErr> {
    let expires = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
    db.execute_raw(stmt(
        db,
        "INSERT INTO instances (id, hostname, pid, started_at, heartbeat_at, expires_at) VALUES ($1, $2, $3, $4, $4, $5) \
         ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, expires_at = excluded.expires_at",
        [
            id.into(),
            hostname.into(),
            i64::from(pid).into(),
            now.into(),
            expires.into(),
        ],
    ))
    .await?;
    Ok(())
}

/// The instances alive at `now`, by id.
pub async fn live(db: &impl ConnectionTrait, now: DateTime<Utc>) -> Result<Vec<Instance>, DbErr> {
    Instance::find_by_statement(stmt(
        db,
        "SELECT id, hostname, pid, started_at, heartbeat_at, expires_at FROM instances WHERE expires_at >= $1 ORDER BY id",
        [now.into()],
    ))
    .all(db)
    .await
}

/// Removes the row of instance `id` (it stops; the others count one less at once).
pub async fn remove(db: &impl ConnectionTrait, id: &str) -> Result<(), DbErr> {
    db.execute_raw(stmt(db, "DELETE FROM instances WHERE id = $1", [id.into()]))
        .await?;
    Ok(())
}

/// Removes the rows of instances that died before `before` (kept a while for operators to see).
pub async fn purge(db: &impl ConnectionTrait, before: DateTime<Utc>) -> Result<u64, DbErr> {
    let done = db
        .execute_raw(stmt(
            db,
            "DELETE FROM instances WHERE expires_at < $1",
            [before.into()],
        ))
        .await?;
    Ok(done.rows_affected())
}

/// Removes the rows of every instance but `id`. Only for SQLite, where `serve`'s lock file proves that no other
/// instance runs (a row left by a process that died would otherwise halve this one's share until it expired).
pub async fn forget_others(db: &impl ConnectionTrait, id: &str) -> Result<u64, DbErr> {
    let done = db
        .execute_raw(stmt(
            db,
            "DELETE FROM instances WHERE id <> $1",
            [id.into()],
        ))
        .await?;
    Ok(done.rows_affected())
}
