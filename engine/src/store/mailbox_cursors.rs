//! SQL of the `mailbox_cursors` table: how far each IMAP mailbox folder was read.

use chrono::Utc;
use sea_orm::{ConnectionTrait, DbErr, FromQueryResult};

use super::{Backend, stmt};

/// Where an IMAP folder was read up to: every UID up to `last_uid` (within `uidvalidity`) is stored.
#[derive(Debug, Clone, PartialEq, Eq, FromQueryResult)]
pub struct Cursor {
    /// The mailbox (login or address) as the IMAP worker names it.
    pub mailbox: String,
    /// The IMAP folder, e.g. `INBOX`.
    pub folder: String,
    /// The folder's UIDVALIDITY; UIDs of another UIDVALIDITY are not comparable.
    pub uidvalidity: i64,
    /// The highest UID stored.
    pub last_uid: i64,
}

/// The cursor of `mailbox`/`folder`, if one was stored.
pub async fn get(
    db: &impl ConnectionTrait,
    mailbox: &str,
    folder: &str,
) -> Result<Option<Cursor>, DbErr> {
    Cursor::find_by_statement(stmt(
        db,
        "SELECT mailbox, folder, uidvalidity, last_uid FROM mailbox_cursors WHERE mailbox = $1 AND folder = $2",
        [mailbox.into(), folder.into()],
    ))
    .one(db)
    .await
}

/// Makes the transaction the only writer of `mailbox`/`folder` until it ends: on PostgreSQL a transaction-scoped
/// advisory lock on the pair (other writers of the same folder wait); SQLite's write transaction already excludes
/// every other writer. Two instances that store the same folder's mail at once so take turns instead of
/// deadlocking on each other's rows, and the second sees the first one's mail as stored.
pub async fn lock(db: &impl ConnectionTrait, mailbox: &str, folder: &str) -> Result<(), DbErr> {
    if Backend::of(db) == Backend::Postgres {
        db.execute_raw(stmt(
            db,
            "SELECT pg_advisory_xact_lock(hashtextextended($1 || chr(10) || $2, 7355608003))",
            [mailbox.into(), folder.into()],
        ))
        .await?;
    }
    Ok(())
}

/// Stores a cursor, normally in the transaction that stored the mail up to it. Within one UIDVALIDITY the cursor
/// only moves forward: a stale writer with a smaller `last_uid` changes nothing. A different UIDVALIDITY (the
/// folder was rebuilt, UIDs start over) always replaces the row. Returns whether the row changed.
pub async fn upsert(db: &impl ConnectionTrait, c: &Cursor) -> Result<bool, DbErr> {
    let done = db
        .execute_raw(stmt(
            db,
            "INSERT INTO mailbox_cursors (mailbox, folder, uidvalidity, last_uid, updated_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (mailbox, folder) DO UPDATE SET uidvalidity = excluded.uidvalidity, \
             last_uid = excluded.last_uid, updated_at = excluded.updated_at \
             WHERE excluded.uidvalidity <> mailbox_cursors.uidvalidity OR excluded.last_uid > mailbox_cursors.last_uid",
            [
                c.mailbox.clone().into(),
                c.folder.clone().into(),
                c.uidvalidity.into(),
                c.last_uid.into(),
                Utc::now().into(),
            ],
        ))
        .await?;
    Ok(done.rows_affected() > 0)
}
