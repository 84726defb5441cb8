//! SQL of the `quarantine` table.

use chrono::Utc;
use mailqueue_schema::entity::quarantine;
use sea_orm::{ConnectionTrait, DbErr, EntityTrait};

use super::stmt;

/// A mail kept whole because it could not become a contact.
#[derive(Debug, Clone)]
pub struct NewQuarantine {
    pub source_key: Option<String>,
    pub mailbox: Option<String>,
    pub queue: Option<String>,
    pub reason: String,
    pub raw: Vec<u8>,
}

/// Inserts a quarantine row and returns its id. A second row with the same `source_key` fails with a unique
/// violation (`DbErr::sql_err`).
pub async fn insert(db: &impl ConnectionTrait, q: NewQuarantine) -> Result<i64, DbErr> {
    let size = q.raw.len() as i64;
    let row = db
        .query_one_raw(stmt(
            db,
            "INSERT INTO quarantine (source_key, mailbox, queue, reason, size, raw, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
            [
                q.source_key.into(),
                q.mailbox.into(),
                q.queue.into(),
                q.reason.into(),
                size.into(),
                q.raw.into(),
                Utc::now().into(),
            ],
        ))
        .await?
        .ok_or(DbErr::RecordNotInserted)?;
    row.try_get::<i64>("", "id")
}

/// Whether a quarantined mail with this source key is stored.
pub async fn source_key_exists(db: &impl ConnectionTrait, key: &str) -> Result<bool, DbErr> {
    let row = db
        .query_one_raw(stmt(
            db,
            "SELECT 1 AS x FROM quarantine WHERE source_key = $1",
            [key.into()],
        ))
        .await?;
    Ok(row.is_some())
}

/// One quarantined mail, with its raw bytes.
pub async fn get(db: &impl ConnectionTrait, id: i64) -> Result<Option<quarantine::Model>, DbErr> {
    quarantine::Entity::find_by_id(id).one(db).await
}
