//! SQL of the `messages` table.

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbErr, FromQueryResult, Value};

use super::{placeholders, stmt};

/// Fields of a new message, inbound (ingest) or outbound (reply).
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub contact_id: i64,
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    pub source_key: Option<String>,
    pub mailbox: Option<String>,
    /// Without angle brackets.
    pub message_id: Option<String>,
    pub in_reply_to: Option<String>,
    /// JSON array of Message-IDs.
    pub references: serde_json::Value,
    pub from_address: Option<String>,
    pub from_name: Option<String>,
    pub reply_to: Option<String>,
    /// JSON array of `{ "name": …, "address": … }`.
    pub to_addresses: serde_json::Value,
    pub cc_addresses: serde_json::Value,
    pub subject: Option<String>,
    pub sent_at: Option<DateTime<Utc>>,
    /// JSON array of `[name, value]` pairs in order.
    pub headers: serde_json::Value,
    pub text_body: Option<String>,
    pub html_body: Option<String>,
    pub raw: Option<Vec<u8>>,
    pub size: i64,
    pub created_by: Option<String>,
}

/// Inserts a message and returns its id. A second message with the same `source_key` fails with a unique
/// violation (`DbErr::sql_err`), which ingest turns into a duplicate.
pub async fn insert(db: &impl ConnectionTrait, m: NewMessage) -> Result<i64, DbErr> {
    let row = db
        .query_one_raw(stmt(
            db,
            "INSERT INTO messages (contact_id, direction, source_key, mailbox, message_id, in_reply_to, \"references\", \
             from_address, from_name, reply_to, to_addresses, cc_addresses, subject, sent_at, headers, text_body, \
             html_body, raw, size, created_by, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21) \
             RETURNING id",
            [
                m.contact_id.into(),
                m.direction.into(),
                m.source_key.into(),
                m.mailbox.into(),
                m.message_id.into(),
                m.in_reply_to.into(),
                m.references.into(),
                m.from_address.into(),
                m.from_name.into(),
                m.reply_to.into(),
                m.to_addresses.into(),
                m.cc_addresses.into(),
                m.subject.into(),
                m.sent_at.into(),
                m.headers.into(),
                m.text_body.into(),
                m.html_body.into(),
                m.raw.into(),
                m.size.into(),
                m.created_by.into(),
                Utc::now().into(),
            ],
        ))
        .await?
        .ok_or(DbErr::RecordNotInserted)?;
    row.try_get::<i64>("", "id")
}

/// Whether a message with this source key is stored.
pub async fn source_key_exists(db: &impl ConnectionTrait, key: &str) -> Result<bool, DbErr> {
    let row = db
        .query_one_raw(stmt(
            db,
            "SELECT 1 AS x FROM messages WHERE source_key = $1",
            [key.into()],
        ))
        .await?;
    Ok(row.is_some())
}

/// A stored message found by its RFC 5322 Message-ID (threading).
#[derive(Debug, Clone, FromQueryResult)]
pub struct ThreadHit {
    pub id: i64,
    pub contact_id: i64,
    pub message_id: String,
    pub direction: String,
    pub from_address: Option<String>,
}

/// Stored messages (inbound and outbound) whose Message-ID is one of `ids`, newest first.
pub async fn find_by_message_ids(
    db: &impl ConnectionTrait,
    ids: &[String],
) -> Result<Vec<ThreadHit>, DbErr> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT id, contact_id, message_id, direction, from_address FROM messages WHERE message_id IN ({}) ORDER BY id DESC",
        placeholders(1, ids.len())
    );
    ThreadHit::find_by_statement(stmt(db, &sql, ids.iter().map(|i| Value::from(i.clone()))))
        .all(db)
        .await
}

/// A message without its raw bytes.
#[derive(Debug, Clone, FromQueryResult)]
pub struct MessageRow {
    pub id: i64,
    pub contact_id: i64,
    pub direction: String,
    pub source_key: Option<String>,
    pub mailbox: Option<String>,
    pub message_id: Option<String>,
    pub in_reply_to: Option<String>,
    pub references: serde_json::Value,
    pub from_address: Option<String>,
    pub from_name: Option<String>,
    pub reply_to: Option<String>,
    pub to_addresses: serde_json::Value,
    pub cc_addresses: serde_json::Value,
    pub subject: Option<String>,
    pub sent_at: Option<DateTime<Utc>>,
    pub headers: serde_json::Value,
    pub text_body: Option<String>,
    pub html_body: Option<String>,
    pub size: i64,
    pub created_by: Option<String>,
    pub created_at: DateTime<Utc>,
}

const ROW_COLUMNS: &str = "id, contact_id, direction, source_key, mailbox, message_id, in_reply_to, \"references\", \
     from_address, from_name, reply_to, to_addresses, cc_addresses, subject, sent_at, headers, text_body, html_body, \
     size, created_by, created_at";

/// The messages of a contact, oldest first, without raw bytes.
pub async fn list_for_contact(
    db: &impl ConnectionTrait,
    contact_id: i64,
) -> Result<Vec<MessageRow>, DbErr> {
    let sql = format!("SELECT {ROW_COLUMNS} FROM messages WHERE contact_id = $1 ORDER BY id");
    MessageRow::find_by_statement(stmt(db, &sql, [contact_id.into()]))
        .all(db)
        .await
}

/// The newest inbound message of a contact (the one a reply answers).
pub async fn latest_inbound(
    db: &impl ConnectionTrait,
    contact_id: i64,
) -> Result<Option<MessageRow>, DbErr> {
    let sql = format!(
        "SELECT {ROW_COLUMNS} FROM messages WHERE contact_id = $1 AND direction = 'inbound' ORDER BY id DESC LIMIT 1"
    );
    MessageRow::find_by_statement(stmt(db, &sql, [contact_id.into()]))
        .one(db)
        .await
}

/// The raw bytes of message `id` of contact `contact_id`: `None` when there is no such message of that contact,
/// `Some(None)` when the message exists but has no raw bytes (a reply not sent yet).
pub async fn raw(
    db: &impl ConnectionTrait,
    contact_id: i64,
    id: i64,
) -> Result<Option<Option<Vec<u8>>>, DbErr> {
    let row = db
        .query_one_raw(stmt(
            db,
            "SELECT raw FROM messages WHERE id = $1 AND contact_id = $2",
            [id.into(), contact_id.into()],
        ))
        .await?;
    row.map(|r| r.try_get::<Option<Vec<u8>>>("", "raw"))
        .transpose()
}
