//! SQL of the `outbox` table.

use chrono::{DateTime, Utc};
use mailqueue_schema::entity::outbox;
use sea_orm::{ConnectionTrait, DbErr, EntityTrait, FromQueryResult};

use super::stmt;

/// Queues outbound message `message_id` of contact `contact_id` for sending: state `pending`, due now.
pub async fn insert(
    db: &impl ConnectionTrait,
    contact_id: i64,
    message_id: i64,
) -> Result<outbox::Model, DbErr> {
    let now = Utc::now();
    outbox::Entity::find()
        .from_raw_sql(stmt(
            db,
            "INSERT INTO outbox (contact_id, message_id, state, attempts, next_attempt_at, created_at, updated_at) \
             VALUES ($1, $2, 'pending', 0, $3, $3, $3) RETURNING *",
            [contact_id.into(), message_id.into(), now.into()],
        ))
        .one(db)
        .await?
        .ok_or(DbErr::RecordNotInserted)
}

/// An outbox row with the Message-ID of its outbound message.
#[derive(Debug, Clone, FromQueryResult)]
pub struct ReplyRow {
    pub id: i64,
    pub message_id: i64,
    pub rfc_message_id: Option<String>,
    pub state: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub sent_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// The replies of a contact, oldest first.
pub async fn list_for_contact(
    db: &impl ConnectionTrait,
    contact_id: i64,
) -> Result<Vec<ReplyRow>, DbErr> {
    ReplyRow::find_by_statement(stmt(
        db,
        "SELECT o.id, o.message_id, m.message_id AS rfc_message_id, o.state, o.attempts, o.last_error, o.sent_at, \
         o.created_at FROM outbox o JOIN messages m ON m.id = o.message_id WHERE o.contact_id = $1 ORDER BY o.id",
        [contact_id.into()],
    ))
    .all(db)
    .await
}

/// Claims up to `limit` due `pending` rows for worker `me`, oldest first: state `sending`, locked until
/// `now + lease`, one more attempt each. The attempts are recorded by this statement's commit, before anything is
/// sent. Several workers never claim the same row: on PostgreSQL `FOR UPDATE SKIP LOCKED` lets each take different
/// ones; SQLite serialises writers, and the `state = 'pending'` re-check keeps a row from being claimed twice.
///
/// The rows are picked in a `MATERIALIZED` CTE, so the locking subquery runs exactly once: an `IN (SELECT …
/// LIMIT n FOR UPDATE SKIP LOCKED)` may be planned as a semi-join that re-runs it and claims more than `limit`
/// (see the claim invariant in ARCHITECTURE.md).
pub async fn claim(
    db: &impl ConnectionTrait,
    me: &str,
    lease: chrono::Duration,
    limit: usize,
) -> Result<Vec<outbox::Model>, DbErr> {
    let now = Utc::now();
    let lock = match super::Backend::of(db) {
        super::Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        super::Backend::Sqlite => "",
    };
    let sql = format!(
        "WITH due AS MATERIALIZED (SELECT id FROM outbox WHERE state = 'pending' AND next_attempt_at <= $3 \
         ORDER BY next_attempt_at, id LIMIT $4{lock}) \
         UPDATE outbox SET state = 'sending', locked_by = $1, locked_until = $2, attempts = attempts + 1, \
         updated_at = $3 WHERE state = 'pending' AND id IN (SELECT id FROM due) RETURNING *"
    );
    let limit = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
    let mut rows = outbox::Entity::find()
        .from_raw_sql(stmt(
            db,
            &sql,
            [me.into(), (now + lease).into(), now.into(), limit.into()],
        ))
        .all(db)
        .await?;
    // RETURNING gives no order; send the oldest first.
    rows.sort_by_key(|r| (r.next_attempt_at, r.id));
    Ok(rows)
}

/// Rows left in `sending` past their lease (the worker that claimed them stopped while sending): marked `failed`
/// with `error`, never sent again blindly. Returns them.
pub async fn fail_expired(
    db: &impl ConnectionTrait,
    error: &str,
) -> Result<Vec<outbox::Model>, DbErr> {
    let now = Utc::now();
    outbox::Entity::find()
        .from_raw_sql(stmt(
            db,
            "UPDATE outbox SET state = 'failed', last_error = $1, locked_by = NULL, locked_until = NULL, \
             updated_at = $2 WHERE state = 'sending' AND locked_until < $2 RETURNING *",
            [error.into(), now.into()],
        ))
        .all(db)
        .await
}

/// Row `id`, claimed by `me`, was accepted by the server. Also corrects a row that was marked failed as
/// `unknown_error` meanwhile (its lease ran out during a very slow send): the outcome is known now. False if the row
/// is in neither state.
pub async fn mark_sent(
    db: &impl ConnectionTrait,
    id: i64,
    me: &str,
    server_reply: &str,
    at: DateTime<Utc>,
    unknown_error: &str,
) -> Result<bool, DbErr> {
    let r = db
        .execute_raw(stmt(
            db,
            "UPDATE outbox SET state = 'sent', server_reply = $1, sent_at = $2, last_error = NULL, \
             locked_by = NULL, locked_until = NULL, updated_at = $3 \
             WHERE id = $4 AND ((state = 'sending' AND locked_by = $5) OR (state = 'failed' AND last_error = $6))",
            [
                server_reply.into(),
                at.into(),
                Utc::now().into(),
                id.into(),
                me.into(),
                unknown_error.into(),
            ],
        ))
        .await?;
    Ok(r.rows_affected() == 1)
}

/// Row `id`, claimed by `me`, goes back to `pending` (due at `next`) or to `failed` (`next` = `None`), with
/// `error`. False if the claim was lost meanwhile.
pub async fn release(
    db: &impl ConnectionTrait,
    id: i64,
    me: &str,
    next: Option<DateTime<Utc>>,
    error: &str,
) -> Result<bool, DbErr> {
    let now = Utc::now();
    let (state, next) = match next {
        Some(at) => ("pending", at),
        None => ("failed", now),
    };
    let r = db
        .execute_raw(stmt(
            db,
            "UPDATE outbox SET state = $1, next_attempt_at = $2, last_error = $3, locked_by = NULL, \
             locked_until = NULL, updated_at = $4 WHERE id = $5 AND state = 'sending' AND locked_by = $6",
            [
                state.into(),
                next.into(),
                error.into(),
                now.into(),
                id.into(),
                me.into(),
            ],
        ))
        .await?;
    Ok(r.rows_affected() == 1)
}

/// Stores the built message's bytes, size and From on the outbound message.
pub async fn store_raw(
    db: &impl ConnectionTrait,
    message_id: i64,
    raw: &[u8],
    from: &str,
) -> Result<(), DbErr> {
    db.execute_raw(stmt(
        db,
        "UPDATE messages SET raw = $1, size = $2, from_address = COALESCE(from_address, $3) WHERE id = $4",
        [
            raw.to_vec().into(),
            (raw.len() as i64).into(),
            from.into(),
            message_id.into(),
        ],
    ))
    .await?;
    Ok(())
}

/// Deletes the outbox rows of the replies of the contacts `ids` (retention), found through their messages (the
/// unique index on `message_id`). Returns how many were deleted.
pub async fn delete_for_contacts(db: &impl ConnectionTrait, ids: &[i64]) -> Result<u64, DbErr> {
    use sea_orm::Value;
    if ids.is_empty() {
        return Ok(0);
    }
    let ids = super::padded(ids.iter().map(|&id| Value::from(id)), Value::BigInt(None));
    let sql = format!(
        "DELETE FROM outbox WHERE message_id IN (SELECT id FROM messages WHERE contact_id IN ({}))",
        super::placeholders(1, ids.len())
    );
    Ok(db.execute_raw(stmt(db, &sql, ids)).await?.rows_affected())
}

/// Replies not yet sent or failed, by state: `(pending, sending)`, for `/metrics`. Each count reads only its
/// partial index (`outbox_due_idx`, `outbox_sending_idx`), so it costs the depth, not the history of replies.
pub async fn depth(db: &impl ConnectionTrait) -> Result<(i64, i64), DbErr> {
    let rows = db
        .query_all_raw(stmt(
            db,
            "SELECT 'pending' AS state, COUNT(*) AS n FROM outbox WHERE state = 'pending' \
             UNION ALL SELECT 'sending' AS state, COUNT(*) AS n FROM outbox WHERE state = 'sending'",
            [],
        ))
        .await?;
    let mut depth = (0, 0);
    for row in rows {
        let n: i64 = row.try_get("", "n")?;
        match row.try_get::<String>("", "state")?.as_str() {
            "pending" => depth.0 = n,
            _ => depth.1 = n,
        }
    }
    Ok(depth)
}
