//! SQL of the `mailbox_leases` table: which instance fetches a mailbox folder, until when.
//!
//! A lease is keyed like the stored cursor (`mailbox_cursors`: the queue address and the folder), so the instance
//! holding it is the only one that moves that cursor. Taking a lease is one conditional upsert: it inserts a free
//! key, or takes over a row that expired or is already ours, and returns nothing when another instance holds a live
//! lease, so two instances can never both hold one. Times are the instances' clocks (as for contact leases); the
//! holder stops well before its lease runs out to leave room for clock skew (see `mailboxes::leases`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbErr, FromQueryResult};

use super::stmt;

/// A lease row.
#[derive(Debug, Clone, PartialEq, Eq, FromQueryResult)]
pub struct Lease {
    /// The queue address, as in `mailbox_cursors.mailbox`.
    pub mailbox: String,
    pub folder: String,
    /// The holding instance (`instances.id`).
    pub owner: String,
    pub acquired_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// The key of a lease, as [`renew`] returns it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, FromQueryResult)]
pub struct LeaseKey {
    pub mailbox: String,
    pub folder: String,
}

fn expiry(now: DateTime<Utc>, ttl: Duration) -> DateTime<Utc> {
    now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX)
}

/// Takes the lease of `mailbox`/`folder` for `owner` until `now + ttl` if it is free, expired, or already
/// `owner`'s. Returns whether `owner` holds it now. One statement, so concurrent takers cannot both win.
pub async fn acquire(
    db: &impl ConnectionTrait,
    mailbox: &str,
    folder: &str,
    owner: &str,
    now: DateTime<Utc>,
    ttl: Duration,
) -> Result<bool, DbErr> {
    let row = db
        .query_one_raw(stmt(
            db,
            "INSERT INTO mailbox_leases (mailbox, folder, owner, acquired_at, expires_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (mailbox, folder) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at, \
             acquired_at = CASE WHEN mailbox_leases.owner = excluded.owner THEN mailbox_leases.acquired_at \
             ELSE excluded.acquired_at END \
             WHERE mailbox_leases.expires_at < $4 OR mailbox_leases.owner = $3 \
             RETURNING owner",
            [
                mailbox.into(),
                folder.into(),
                owner.into(),
                now.into(),
                expiry(now, ttl).into(),
            ],
        ))
        .await?;
    Ok(row.is_some())
}

/// Extends every lease `owner` still holds to `now + ttl`; returns their keys. A lease missing from the answer
/// was taken over by another instance (after it expired) or released.
pub async fn renew(
    db: &impl ConnectionTrait,
    owner: &str,
    now: DateTime<Utc>,
    ttl: Duration,
) -> Result<Vec<LeaseKey>, DbErr> {
    LeaseKey::find_by_statement(stmt(
        db,
        "UPDATE mailbox_leases SET expires_at = $2 WHERE owner = $1 RETURNING mailbox, folder",
        [owner.into(), expiry(now, ttl).into()],
    ))
    .all(db)
    .await
}

/// Gives up `owner`'s lease of `mailbox`/`folder` (another instance may take it at once). Returns whether there
/// was one.
pub async fn release(
    db: &impl ConnectionTrait,
    mailbox: &str,
    folder: &str,
    owner: &str,
) -> Result<bool, DbErr> {
    let done = db
        .execute_raw(stmt(
            db,
            "DELETE FROM mailbox_leases WHERE mailbox = $1 AND folder = $2 AND owner = $3",
            [mailbox.into(), folder.into(), owner.into()],
        ))
        .await?;
    Ok(done.rows_affected() > 0)
}

/// Gives up every lease of `owner` (shutdown). Returns how many.
pub async fn release_all(db: &impl ConnectionTrait, owner: &str) -> Result<u64, DbErr> {
    let done = db
        .execute_raw(stmt(
            db,
            "DELETE FROM mailbox_leases WHERE owner = $1",
            [owner.into()],
        ))
        .await?;
    Ok(done.rows_affected())
}

/// Every lease row (live or expired), by mailbox and folder.
pub async fn all(db: &impl ConnectionTrait) -> Result<Vec<Lease>, DbErr> {
    Lease::find_by_statement(stmt(
        db,
        "SELECT mailbox, folder, owner, acquired_at, expires_at FROM mailbox_leases ORDER BY mailbox, folder",
        [],
    ))
    .all(db)
    .await
}

/// Drops every lease not held by `owner`. Only for SQLite, where `serve`'s lock file proves that no other instance
/// runs: the leases of an instance that died (e.g. `kill -9`) need not wait for their expiry.
pub async fn forget_others(db: &impl ConnectionTrait, owner: &str) -> Result<u64, DbErr> {
    let done = db
        .execute_raw(stmt(
            db,
            "DELETE FROM mailbox_leases WHERE owner <> $1",
            [owner.into()],
        ))
        .await?;
    Ok(done.rows_affected())
}
