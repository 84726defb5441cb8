//! SQL of the `events` table.
//!
//! Writers insert rows with `seq` NULL inside their own transaction. `sequence` numbers committed rows in id
//! order, one sequencer at a time (an advisory lock on PostgreSQL, the write lock on SQLite), so sequence numbers
//! grow in the order rows became visible: a reader that resumes after `seq` N can never miss a row that committed
//! late with a smaller id.
//!
//! On PostgreSQL each instance sends [`notify`] after it committed events (`events::spawn_notifier`), which wakes the
//! readers of every instance (`events::spawn_listener`).

use chrono::Utc;
use mailqueue_schema::entity::event;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, Value};

use super::{Backend, begin_write, stmt};

/// A new event row.
#[derive(Debug, Clone)]
pub struct NewEvent<'a> {
    pub kind: &'a str,
    pub contact_id: Option<i64>,
    pub queue: Option<&'a str>,
    pub actor: Option<&'a str>,
    pub data: serde_json::Value,
}

pub async fn insert(db: &impl ConnectionTrait, e: NewEvent<'_>) -> Result<(), DbErr> {
    db.execute_raw(stmt(
        db,
        "INSERT INTO events (kind, contact_id, queue, actor, data, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
        [
            e.kind.into(),
            e.contact_id.into(),
            e.queue.map(str::to_owned).into(),
            e.actor.map(str::to_owned).into(),
            e.data.into(),
            Utc::now().into(),
        ],
    ))
    .await?;
    Ok(())
}

/// The event logged for each contact a statement changes (`contacts::claim_next`, `contacts::close`).
#[derive(Debug, Clone)]
pub struct ContactEvent<'a> {
    pub kind: &'a str,
    pub actor: &'a str,
    pub data: serde_json::Value,
}

impl ContactEvent<'_> {
    /// The values of the placeholders of [`insert_for_contacts`]: kind, actor, data, creation time.
    pub fn values(&self) -> [Value; 4] {
        [
            self.kind.into(),
            self.actor.into(),
            self.data.clone().into(),
            Utc::now().into(),
        ]
    }
}

/// `INSERT INTO events … SELECT …` of one [`ContactEvent`] per row of `contacts` — a relation with the columns of
/// `contacts` (the table, or a data-modifying CTE's `RETURNING *`), aliased `c` and narrowed by `filter` — named with
/// the contact's queue. `$first` to `$first + 3` are [`ContactEvent::values`].
pub fn insert_for_contacts(contacts: &str, filter: &str, first: usize) -> String {
    let [kind, actor, data, at] = [first, first + 1, first + 2, first + 3];
    format!(
        "INSERT INTO events (kind, contact_id, queue, actor, data, created_at) \
         SELECT ${kind}, c.id, q.name, ${actor}, ${data}, ${at} FROM {contacts} c \
         LEFT JOIN queues q ON q.id = c.queue_id{filter}"
    )
}

/// `NOTIFY channel` in a transaction of its own (PostgreSQL only).
pub async fn notify(db: &impl ConnectionTrait, channel: &str) -> Result<(), DbErr> {
    db.execute_raw(stmt(db, "SELECT pg_notify($1, '')", [channel.into()]))
        .await?;
    Ok(())
}

/// Events per statement of [`insert_many`] at most (6 values each).
const EVENTS_PER_INSERT: usize = 256;

/// Inserts events in the given order (their ids, and so their sequence, follow it), in statements of a
/// power-of-two number of rows (see `store::pow2_chunks`).
pub async fn insert_many(db: &impl ConnectionTrait, events: &[NewEvent<'_>]) -> Result<(), DbErr> {
    let now = Utc::now();
    let mut rest = events;
    for size in super::pow2_chunks(events.len(), EVENTS_PER_INSERT) {
        let (chunk, tail) = rest.split_at(size);
        rest = tail;
        let rows = super::value_rows(chunk.len(), 6);
        let sql = format!(
            "INSERT INTO events (kind, contact_id, queue, actor, data, created_at) VALUES {rows}"
        );
        let values = chunk.iter().flat_map(|e| {
            [
                e.kind.into(),
                e.contact_id.into(),
                e.queue.map(str::to_owned).into(),
                e.actor.map(str::to_owned).into(),
                e.data.clone().into(),
                now.into(),
            ]
        });
        db.execute_raw(stmt(db, &sql, values)).await?;
    }
    Ok(())
}

const SEQUENCE_SQL: &str = "WITH todo AS (SELECT id, ROW_NUMBER() OVER (ORDER BY id) AS rn FROM events WHERE seq IS NULL), \
     base AS (SELECT COALESCE(MAX(seq), 0) AS m FROM events) \
     UPDATE events SET seq = base.m + todo.rn FROM todo, base WHERE events.id = todo.id";

/// Numbers every committed, unnumbered event. Returns how many were numbered.
pub async fn sequence(db: &DatabaseConnection) -> Result<u64, DbErr> {
    let txn = begin_write(db).await?;
    if Backend::of(&txn) == Backend::Postgres {
        // A separate statement, so the UPDATE's snapshot sees the previous sequencer's commit.
        txn.execute_unprepared("SELECT pg_advisory_xact_lock(7355608002)")
            .await?;
    }
    let n = txn.execute_unprepared(SEQUENCE_SQL).await?.rows_affected();
    txn.commit().await?;
    Ok(n)
}

/// Whether any committed event still awaits its sequence number.
pub async fn has_unsequenced(db: &DatabaseConnection) -> Result<bool, DbErr> {
    let row = db
        .query_one_raw(stmt(
            db,
            "SELECT 1 AS x FROM events WHERE seq IS NULL LIMIT 1",
            [],
        ))
        .await?;
    Ok(row.is_some())
}

/// Sequenced events after `after`, in order, at most `limit`.
pub async fn after(
    db: &DatabaseConnection,
    after: i64,
    limit: u64,
) -> Result<Vec<event::Model>, DbErr> {
    event::Entity::find()
        .from_raw_sql(stmt(
            db,
            "SELECT * FROM events WHERE seq > $1 ORDER BY seq LIMIT $2",
            [after.into(), (limit as i64).into()],
        ))
        .all(db)
        .await
}

/// The highest sequence number handed out so far (0 when none).
pub async fn last_seq(db: &DatabaseConnection) -> Result<i64, DbErr> {
    let row = db
        .query_one_raw(stmt(
            db,
            "SELECT COALESCE(MAX(seq), 0) AS m FROM events",
            [],
        ))
        .await?;
    Ok(row
        .map(|r| r.try_get::<i64>("", "m"))
        .transpose()?
        .unwrap_or(0))
}

/// Deletes up to `limit` sequenced events created before `before`, oldest first, in one statement. Unsequenced
/// events (the sequencer has yet to number them) and the event with the highest sequence number (the sequencer
/// continues from it) are always kept. Returns how many were deleted.
pub async fn delete_before(
    db: &impl ConnectionTrait,
    before: chrono::DateTime<Utc>,
    limit: u32,
) -> Result<u64, DbErr> {
    let r = db
        .execute_raw(stmt(
            db,
            "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE created_at < $1 AND seq IS NOT NULL \
             AND seq < (SELECT MAX(seq) FROM events) ORDER BY created_at LIMIT $2)",
            [before.into(), i64::from(limit).into()],
        ))
        .await?;
    Ok(r.rows_affected())
}

/// The kind of the newest `outgoing.unhealthy` or `outgoing.healthy` event (the outgoing server's last health
/// report from any instance), if any. The kinds are literals so the query uses `events_outgoing_health_idx`
/// (placeholders would defeat the partial index in a generic plan and scan the whole log backwards).
pub async fn latest_outgoing_health(db: &impl ConnectionTrait) -> Result<Option<String>, DbErr> {
    let row = db
        .query_one_raw(stmt(
            db,
            "SELECT kind FROM events WHERE kind IN ('outgoing.unhealthy', 'outgoing.healthy') \
             ORDER BY id DESC LIMIT 1",
            [],
        ))
        .await?;
    row.map(|r| r.try_get::<String>("", "kind")).transpose()
}
