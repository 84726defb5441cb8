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
