//! SQL of the `quarantine` table.

use std::collections::HashMap;

use chrono::Utc;
use mailqueue_schema::entity::quarantine;
use sea_orm::{ConnectionTrait, DbErr, EntityTrait, Value};

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

const INSERT_SQL: &str = "INSERT INTO quarantine (source_key, mailbox, queue, reason, size, raw, created_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7)";

fn insert_values(q: NewQuarantine) -> [Value; 7] {
    let size = q.raw.len() as i64;
    [
        q.source_key.into(),
        q.mailbox.into(),
        q.queue.into(),
        q.reason.into(),
        size.into(),
        q.raw.into(),
        Utc::now().into(),
    ]
}

/// Inserts a quarantine row and returns its id. A second row with the same `source_key` fails with a unique
/// violation (`DbErr::sql_err`).
pub async fn insert(db: &impl ConnectionTrait, q: NewQuarantine) -> Result<i64, DbErr> {
    let row = db
        .query_one_raw(stmt(
            db,
            &format!("{INSERT_SQL} RETURNING id"),
            insert_values(q),
        ))
        .await?
        .ok_or(DbErr::RecordNotInserted)?;
    row.try_get::<i64>("", "id")
}

/// Inserts a quarantine row unless one with the same `source_key` is stored: `Some(id)` when inserted, `None`
/// when the key was taken (a concurrent insert of the same key is waited for on PostgreSQL).
pub async fn insert_new(db: &impl ConnectionTrait, q: NewQuarantine) -> Result<Option<i64>, DbErr> {
    let row = db
        .query_one_raw(stmt(
            db,
            &format!("{INSERT_SQL} ON CONFLICT (source_key) DO NOTHING RETURNING id"),
            insert_values(q),
        ))
        .await?;
    row.map(|r| r.try_get::<i64>("", "id")).transpose()
}

/// Quarantine rows per statement of [`insert_many`] at most, and about this many bytes of raw mail.
const ROWS_PER_INSERT: usize = 256;
const BYTES_PER_INSERT: usize = 32 * 1024 * 1024;

/// Inserts quarantine rows, each with its own distinct `source_key`, in few multi-row statements; returns their ids
/// in the given order. A source key that is taken fails the statement with a unique violation.
pub async fn insert_many(
    db: &impl ConnectionTrait,
    rows: Vec<NewQuarantine>,
) -> Result<Vec<i64>, DbErr> {
    let keys: Vec<Option<String>> = rows.iter().map(|q| q.source_key.clone()).collect();
    let mut ids: HashMap<String, i64> = HashMap::with_capacity(keys.len());
    for chunk in super::insert_chunks(rows, ROWS_PER_INSERT, BYTES_PER_INSERT, |q| q.raw.len()) {
        let prefix = INSERT_SQL.split(" VALUES ").next().unwrap_or(INSERT_SQL);
        let sql = format!(
            "{prefix} VALUES {} RETURNING id, source_key",
            super::value_rows(chunk.len(), 7)
        );
        let values = chunk.into_iter().flat_map(insert_values);
        for row in db.query_all_raw(stmt(db, &sql, values)).await? {
            ids.insert(row.try_get("", "source_key")?, row.try_get("", "id")?);
        }
    }
    keys.into_iter()
        .map(|k| {
            k.and_then(|k| ids.get(&k).copied())
                .ok_or(DbErr::RecordNotInserted)
        })
        .collect()
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
