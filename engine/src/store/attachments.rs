//! SQL of the `attachments` table.

use std::borrow::Cow;

use mailqueue_schema::entity::attachment;
use sea_orm::{ConnectionTrait, DbErr, EntityTrait, FromQueryResult, Value};

use super::{placeholders, stmt};

/// Fields of a new attachment; `size` is the length of `data`.
#[derive(Debug, Clone)]
pub struct NewAttachment<'a> {
    pub message_id: i64,
    pub filename: Option<String>,
    pub content_type: String,
    /// Without angle brackets.
    pub content_id: Option<String>,
    pub inline: bool,
    /// Borrowed from the parsed mail when ingesting: written in pieces when large (see `store::VALUE_PIECE`).
    pub data: Cow<'a, [u8]>,
}

pub async fn insert(db: &impl ConnectionTrait, a: NewAttachment<'_>) -> Result<i64, DbErr> {
    let size = a.data.len() as i64;
    let (first, rest) = super::first_piece(&a.data);
    let row = db
        .query_one_raw(stmt(
            db,
            "INSERT INTO attachments (message_id, filename, content_type, content_id, inline, size, data) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
            [
                a.message_id.into(),
                a.filename.into(),
                a.content_type.into(),
                a.content_id.into(),
                a.inline.into(),
                size.into(),
                first,
            ],
        ))
        .await?
        .ok_or(DbErr::RecordNotInserted)?;
    let id = row.try_get::<i64>("", "id")?;
    if let Some(rest) = rest {
        super::append_pieces(db, "attachments", "data", id, rest).await?;
    }
    Ok(id)
}

/// Attachments per statement of [`insert_many`] at most (7 values each) …
const ROWS_PER_INSERT: usize = 256;
/// … and at most about this many bytes of data per statement (a single larger attachment goes alone).
const BYTES_PER_INSERT: usize = 32 * 1024 * 1024;

/// Inserts attachments in the given order, in statements of a power-of-two number of rows (see
/// `store::pow2_chunks`) and about 32 MB of data at most.
pub async fn insert_many(
    db: &impl ConnectionTrait,
    attachments: Vec<NewAttachment<'_>>,
) -> Result<(), DbErr> {
    // Large attachments go one by one, in pieces; the runs between them in multi-row statements, in order.
    let mut run = Vec::new();
    for a in attachments {
        if a.data.len() > super::VALUE_PIECE {
            insert_runs(db, std::mem::take(&mut run)).await?;
            insert(db, a).await?;
        } else {
            run.push(a);
        }
    }
    insert_runs(db, run).await
}

async fn insert_runs(db: &impl ConnectionTrait, rows: Vec<NewAttachment<'_>>) -> Result<(), DbErr> {
    for chunk in super::insert_chunks(rows, ROWS_PER_INSERT, BYTES_PER_INSERT, |a| a.data.len()) {
        insert_chunk(db, chunk).await?;
    }
    Ok(())
}

async fn insert_chunk(
    db: &impl ConnectionTrait,
    chunk: Vec<NewAttachment<'_>>,
) -> Result<(), DbErr> {
    let rows = super::value_rows(chunk.len(), 7);
    let sql = format!(
        "INSERT INTO attachments (message_id, filename, content_type, content_id, inline, size, data) VALUES {rows}"
    );
    let values = chunk.into_iter().flat_map(|a| {
        let size = a.data.len() as i64;
        [
            a.message_id.into(),
            a.filename.into(),
            a.content_type.into(),
            a.content_id.into(),
            a.inline.into(),
            size.into(),
            a.data.into_owned().into(),
        ]
    });
    db.execute_raw(stmt(db, &sql, values)).await?;
    Ok(())
}

/// An attachment without its data.
#[derive(Debug, Clone, FromQueryResult)]
pub struct AttachmentRow {
    pub id: i64,
    pub message_id: i64,
    pub filename: Option<String>,
    pub content_type: String,
    pub content_id: Option<String>,
    pub inline: bool,
    pub size: i64,
}

/// The attachments of the given messages, in id order, without their data.
pub async fn list_for_messages(
    db: &impl ConnectionTrait,
    message_ids: &[i64],
) -> Result<Vec<AttachmentRow>, DbErr> {
    if message_ids.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT id, message_id, filename, content_type, content_id, inline, size FROM attachments \
         WHERE message_id IN ({}) ORDER BY id",
        placeholders(1, message_ids.len())
    );
    AttachmentRow::find_by_statement(stmt(db, &sql, message_ids.iter().map(|&i| Value::from(i))))
        .all(db)
        .await
}

/// The attachments of message `message_id` with their data, in id order.
pub async fn list_with_data(
    db: &impl ConnectionTrait,
    message_id: i64,
) -> Result<Vec<attachment::Model>, DbErr> {
    attachment::Entity::find()
        .from_raw_sql(stmt(
            db,
            "SELECT * FROM attachments WHERE message_id = $1 ORDER BY id",
            [message_id.into()],
        ))
        .all(db)
        .await
}

/// Attachment `id` if it belongs to a message of contact `contact_id`.
pub async fn get_for_contact(
    db: &impl ConnectionTrait,
    contact_id: i64,
    id: i64,
) -> Result<Option<attachment::Model>, DbErr> {
    attachment::Entity::find()
        .from_raw_sql(stmt(
            db,
            "SELECT a.* FROM attachments a JOIN messages m ON m.id = a.message_id WHERE a.id = $1 AND m.contact_id = $2",
            [id.into(), contact_id.into()],
        ))
        .one(db)
        .await
}

/// Deletes the attachments of every message of the contacts `ids` (retention). Returns how many were deleted.
pub async fn delete_for_contacts(db: &impl ConnectionTrait, ids: &[i64]) -> Result<u64, DbErr> {
    if ids.is_empty() {
        return Ok(0);
    }
    let ids = super::padded(ids.iter().map(|&id| Value::from(id)), Value::BigInt(None));
    let sql = format!(
        "DELETE FROM attachments WHERE message_id IN (SELECT id FROM messages WHERE contact_id IN ({}))",
        placeholders(1, ids.len())
    );
    Ok(db.execute_raw(stmt(db, &sql, ids)).await?.rows_affected())
}
