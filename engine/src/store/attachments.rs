//! SQL of the `attachments` table.

use mailqueue_schema::entity::attachment;
use sea_orm::{ConnectionTrait, DbErr, EntityTrait, FromQueryResult, Value};

use super::{placeholders, stmt};

/// Fields of a new attachment; `size` is the length of `data`.
#[derive(Debug, Clone)]
pub struct NewAttachment {
    pub message_id: i64,
    pub filename: Option<String>,
    pub content_type: String,
    /// Without angle brackets.
    pub content_id: Option<String>,
    pub inline: bool,
    pub data: Vec<u8>,
}

pub async fn insert(db: &impl ConnectionTrait, a: NewAttachment) -> Result<i64, DbErr> {
    let size = a.data.len() as i64;
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
                a.data.into(),
            ],
        ))
        .await?
        .ok_or(DbErr::RecordNotInserted)?;
    row.try_get::<i64>("", "id")
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
