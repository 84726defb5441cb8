//! SQL of the `messages` table.

use std::{
    borrow::Cow,
    collections::{HashMap, HashSet},
};

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbErr, FromQueryResult, Value};

use super::{padded, placeholders, stmt};

/// Fields of a new message, inbound (ingest) or outbound (reply).
#[derive(Debug, Clone)]
pub struct NewMessage<'a> {
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
    /// Borrowed from the fetched mail when ingesting: written in pieces when large (see `store::VALUE_PIECE`).
    pub raw: Option<Cow<'a, [u8]>>,
    pub size: i64,
    pub created_by: Option<String>,
}

const INSERT_SQL: &str = "INSERT INTO messages (contact_id, direction, source_key, mailbox, message_id, in_reply_to, \"references\", \
     from_address, from_name, reply_to, to_addresses, cc_addresses, subject, sent_at, headers, text_body, \
     html_body, raw, size, created_by, created_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21)";

/// The row's values, and the whole raw bytes when the row holds only their first piece (the rest is appended).
fn insert_values(m: NewMessage<'_>) -> ([Value; 21], Option<Cow<'_, [u8]>>) {
    let (raw, whole) = match m.raw {
        None => (Option::<Vec<u8>>::None.into(), None),
        Some(raw) => {
            let (first, rest) = super::first_piece(&raw);
            let large = rest.is_some();
            (first, large.then_some(raw))
        }
    };
    let values = [
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
        raw,
        m.size.into(),
        m.created_by.into(),
        Utc::now().into(),
    ];
    (values, whole)
}

/// Appends the raw bytes after the first piece to message `id`.
async fn append_raw(db: &impl ConnectionTrait, id: i64, whole: &[u8]) -> Result<(), DbErr> {
    super::append_pieces(db, "messages", "raw", id, &whole[super::VALUE_PIECE..]).await
}

/// Inserts a message and returns its id. A second message with the same `source_key` fails with a unique
/// violation (`DbErr::sql_err`).
pub async fn insert(db: &impl ConnectionTrait, m: NewMessage<'_>) -> Result<i64, DbErr> {
    let (values, whole) = insert_values(m);
    let row = db
        .query_one_raw(stmt(db, &format!("{INSERT_SQL} RETURNING id"), values))
        .await?
        .ok_or(DbErr::RecordNotInserted)?;
    let id = row.try_get::<i64>("", "id")?;
    if let Some(whole) = whole {
        append_raw(db, id, &whole).await?;
    }
    Ok(id)
}

/// Messages per statement of [`insert_many`] at most (21 values each) …
const MESSAGES_PER_INSERT: usize = 256;
/// … and at most about this many bytes of raw mail and bodies per statement.
const BYTES_PER_INSERT: usize = 32 * 1024 * 1024;

/// Inserts messages, each with its own distinct `source_key`, in few multi-row statements (see
/// `store::insert_chunks`); returns their ids in the given order. A source key that is taken fails the statement
/// with a unique violation, as [`insert`] does.
pub async fn insert_many(
    db: &impl ConnectionTrait,
    messages: Vec<NewMessage<'_>>,
) -> Result<Vec<i64>, DbErr> {
    let keys: Vec<Option<String>> = messages.iter().map(|m| m.source_key.clone()).collect();
    let bytes = |m: &NewMessage<'_>| {
        m.raw.as_ref().map_or(0, |r| r.len())
            + m.text_body.as_ref().map_or(0, String::len)
            + m.html_body.as_ref().map_or(0, String::len)
    };
    let mut ids: HashMap<String, i64> = HashMap::with_capacity(keys.len());
    for chunk in super::insert_chunks(messages, MESSAGES_PER_INSERT, BYTES_PER_INSERT, bytes) {
        let prefix = INSERT_SQL.split(" VALUES ").next().unwrap_or(INSERT_SQL);
        let sql = format!(
            "{prefix} VALUES {} RETURNING id, source_key",
            super::value_rows(chunk.len(), 21)
        );
        let mut values = Vec::with_capacity(chunk.len() * 21);
        let mut large = Vec::new();
        for m in chunk {
            let key = m.source_key.clone();
            let (row, whole) = insert_values(m);
            values.extend(row);
            if let Some(whole) = whole {
                large.push((key, whole));
            }
        }
        for row in db.query_all_raw(stmt(db, &sql, values)).await? {
            ids.insert(row.try_get("", "source_key")?, row.try_get("", "id")?);
        }
        for (key, whole) in large {
            let id = key
                .and_then(|k| ids.get(&k).copied())
                .ok_or(DbErr::RecordNotInserted)?;
            append_raw(db, id, &whole).await?;
        }
    }
    keys.into_iter()
        .map(|k| {
            k.and_then(|k| ids.get(&k).copied())
                .ok_or(DbErr::RecordNotInserted)
        })
        .collect()
}

/// Values per `IN (…)` list of one statement (a power of two; lists are padded, see `store::padded_len`).
const KEYS_PER_QUERY: usize = 512;

/// `values` as `IN (…)` values padded with NULLs, and the list's length.
fn text_list(values: &[String]) -> (Vec<Value>, usize) {
    let values = padded(
        values.iter().map(|v| Value::from(v.clone())),
        Value::String(None),
    );
    let n = values.len();
    (values, n)
}

/// The keys among `keys` that a stored message or quarantined mail has: one statement over both tables per 512
/// keys.
pub async fn known_source_keys(
    db: &impl ConnectionTrait,
    keys: &[String],
) -> Result<HashSet<String>, DbErr> {
    let mut known = HashSet::new();
    for chunk in keys.chunks(KEYS_PER_QUERY) {
        let (list, n) = text_list(chunk);
        let sql = format!(
            "SELECT source_key FROM messages WHERE source_key IN ({}) \
             UNION ALL SELECT source_key FROM quarantine WHERE source_key IN ({})",
            placeholders(1, n),
            placeholders(n + 1, n)
        );
        let values = list.iter().chain(&list).cloned();
        for row in db.query_all_raw(stmt(db, &sql, values)).await? {
            known.insert(row.try_get::<String>("", "source_key")?);
        }
    }
    Ok(known)
}

/// How many inbound messages each of `senders` (exact `from_address`) has stored since `since`; senders without
/// any are missing from the map. Served by `messages_from_created_idx`.
pub async fn inbound_counts_since(
    db: &impl ConnectionTrait,
    senders: &[String],
    since: DateTime<Utc>,
) -> Result<HashMap<String, i64>, DbErr> {
    let mut counts = HashMap::new();
    for chunk in senders.chunks(KEYS_PER_QUERY) {
        let (list, n) = text_list(chunk);
        let sql = format!(
            "SELECT from_address, COUNT(*) AS n FROM messages \
             WHERE from_address IN ({}) AND created_at > $1 AND direction = 'inbound' GROUP BY from_address",
            placeholders(2, n)
        );
        let values = std::iter::once(Value::from(since)).chain(list);
        for row in db.query_all_raw(stmt(db, &sql, values)).await? {
            counts.insert(
                row.try_get::<String>("", "from_address")?,
                row.try_get::<i64>("", "n")?,
            );
        }
    }
    Ok(counts)
}

/// An outbound message (a reply of ours) found by its Message-ID, with its outbox row if it has one.
#[derive(Debug, Clone, FromQueryResult)]
pub struct OutboundHit {
    /// The stored outbound message.
    pub id: i64,
    pub contact_id: i64,
    pub message_id: String,
    pub outbox_id: Option<i64>,
}

/// Outbound messages whose Message-ID is one of `ids`, newest first (`ids` padded like every `IN` list).
pub async fn find_outbound_by_message_ids(
    db: &impl ConnectionTrait,
    ids: &[String],
) -> Result<Vec<OutboundHit>, DbErr> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let (list, n) = text_list(ids);
    let sql = format!(
        "SELECT m.id, m.contact_id, m.message_id, o.id AS outbox_id FROM messages m \
         LEFT JOIN outbox o ON o.message_id = m.id \
         WHERE m.message_id IN ({}) AND m.direction = 'outbound' ORDER BY m.id DESC",
        placeholders(1, n)
    );
    OutboundHit::find_by_statement(stmt(db, &sql, list))
        .all(db)
        .await
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
    let (list, n) = text_list(ids);
    let sql = format!(
        "SELECT id, contact_id, message_id, direction, from_address FROM messages WHERE message_id IN ({}) ORDER BY id DESC",
        placeholders(1, n)
    );
    ThreadHit::find_by_statement(stmt(db, &sql, list))
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

/// Message `id`, without raw bytes.
pub async fn get(db: &impl ConnectionTrait, id: i64) -> Result<Option<MessageRow>, DbErr> {
    let sql = format!("SELECT {ROW_COLUMNS} FROM messages WHERE id = $1");
    MessageRow::find_by_statement(stmt(db, &sql, [id.into()]))
        .one(db)
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

/// Which of `ids` (Message-IDs without angle brackets) are stored as inbound messages that arrived on the queue
/// address `mailbox`. After an IMAP folder's UIDVALIDITY changed (its UIDs, and so the source keys, start over),
/// the mailbox workers skip mail already stored under the old UIDs by this. Served by `messages_message_id_idx`.
pub async fn inbound_message_ids_from(
    db: &impl ConnectionTrait,
    mailbox: &str,
    ids: &[String],
) -> Result<HashSet<String>, DbErr> {
    let mut found = HashSet::new();
    for chunk in ids.chunks(KEYS_PER_QUERY) {
        let sql = format!(
            "SELECT DISTINCT message_id FROM messages WHERE direction = 'inbound' AND mailbox = $1 \
             AND message_id IN ({})",
            placeholders(2, chunk.len())
        );
        let values = std::iter::once(Value::from(mailbox.to_owned()))
            .chain(chunk.iter().map(|i| Value::from(i.clone())));
        for row in db.query_all_raw(stmt(db, &sql, values)).await? {
            found.insert(row.try_get::<String>("", "message_id")?);
        }
    }
    Ok(found)
}

/// Deletes every message of the contacts `ids` (retention; their attachments and outbox rows go first). Returns
/// how many were deleted.
pub async fn delete_for_contacts(db: &impl ConnectionTrait, ids: &[i64]) -> Result<u64, DbErr> {
    if ids.is_empty() {
        return Ok(0);
    }
    let ids = padded(ids.iter().map(|&id| Value::from(id)), Value::BigInt(None));
    let sql = format!(
        "DELETE FROM messages WHERE contact_id IN ({})",
        placeholders(1, ids.len())
    );
    Ok(db.execute_raw(stmt(db, &sql, ids)).await?.rows_affected())
}

/// Drops the raw bytes of up to `limit` messages of contacts closed before `before` (and not before `since`, when
/// given: the part a previous pass already covered), keeping the parsed fields and recording `raw_deleted_at`.
/// Messages whose reply is still pending or being sent keep theirs. Returns how many messages lost their raw bytes.
pub async fn drop_raw_of_closed(
    db: &impl ConnectionTrait,
    before: DateTime<Utc>,
    since: Option<DateTime<Utc>>,
    limit: u32,
) -> Result<u64, DbErr> {
    let (since_sql, mut values): (&str, Vec<Value>) = match since {
        Some(since) => (" AND c.closed_at >= $4", vec![since.into()]),
        None => ("", Vec::new()),
    };
    values.splice(
        0..0,
        [Utc::now().into(), before.into(), i64::from(limit).into()],
    );
    let sql = format!(
        "UPDATE messages SET raw = NULL, raw_deleted_at = $1 WHERE id IN (\
         SELECT m.id FROM contacts c JOIN messages m ON m.contact_id = c.id \
         WHERE c.state = 'closed' AND c.closed_at < $2{since_sql} AND m.raw IS NOT NULL \
         AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.message_id = m.id AND o.state IN ('pending', 'sending')) \
         LIMIT $3)"
    );
    Ok(db
        .execute_raw(stmt(db, &sql, values))
        .await?
        .rows_affected())
}

/// When retention dropped the raw bytes of message `id` of contact `contact_id` (`None`: they were not dropped,
/// or there is no such message).
pub async fn raw_deleted_at(
    db: &impl ConnectionTrait,
    contact_id: i64,
    id: i64,
) -> Result<Option<DateTime<Utc>>, DbErr> {
    let row = db
        .query_one_raw(stmt(
            db,
            "SELECT raw_deleted_at FROM messages WHERE id = $1 AND contact_id = $2",
            [id.into(), contact_id.into()],
        ))
        .await?;
    Ok(row
        .map(|r| r.try_get::<Option<DateTime<Utc>>>("", "raw_deleted_at"))
        .transpose()?
        .flatten())
}
