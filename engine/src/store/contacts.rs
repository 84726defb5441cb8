//! SQL of the `contacts` table.

use std::time::Duration;

use chrono::{DateTime, Utc};
use mailqueue_schema::entity::contact;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, Value};

use super::{
    Backend,
    events::{self, ContactEvent},
    placeholders, stmt,
};

/// Fields of a new contact.
#[derive(Debug, Clone)]
pub struct NewContact {
    pub queue_id: i64,
    pub priority: i32,
    pub language: String,
    pub arrived_on: String,
    pub customer_address: Option<String>,
    pub customer_name: Option<String>,
    pub subject: Option<String>,
    pub queued_at: DateTime<Utc>,
}

/// The `INSERT` of one new contact (state `queued`), its values from [`insert_values`]; callers add `RETURNING`.
const INSERT_ONE: &str = "INSERT INTO contacts (queue_id, state, priority, language, arrived_on, customer_address, \
     customer_name, subject, queued_at, created_at, updated_at) \
     VALUES ($1, 'queued', $2, $3, $4, $5, $6, $7, $8, $9, $9)";

fn insert_values(c: NewContact, now: DateTime<Utc>) -> [Value; 9] {
    [
        c.queue_id.into(),
        c.priority.into(),
        c.language.into(),
        c.arrived_on.into(),
        c.customer_address.into(),
        c.customer_name.into(),
        c.subject.into(),
        c.queued_at.into(),
        now.into(),
    ]
}

pub async fn insert(db: &impl ConnectionTrait, c: NewContact) -> Result<contact::Model, DbErr> {
    let sql = format!("{INSERT_ONE} RETURNING *");
    one(db, &sql, insert_values(c, Utc::now()))
        .await?
        .ok_or_else(|| DbErr::RecordNotInserted)
}

pub async fn get(db: &impl ConnectionTrait, id: i64) -> Result<Option<contact::Model>, DbErr> {
    contact::Entity::find_by_id(id).one(db).await
}

/// Reads a contact and, on PostgreSQL, locks its row until the transaction ends, so a check of its state holds
/// until commit (a concurrent close waits). SQLite's write transaction already excludes other writers.
pub async fn get_for_update(
    db: &impl ConnectionTrait,
    id: i64,
) -> Result<Option<contact::Model>, DbErr> {
    let sql = match Backend::of(db) {
        Backend::Postgres => "SELECT * FROM contacts WHERE id = $1 FOR UPDATE",
        Backend::Sqlite => "SELECT * FROM contacts WHERE id = $1",
    };
    contact::Entity::find()
        .from_raw_sql(stmt(db, sql, [id.into()]))
        .one(db)
        .await
}

/// Reads the contacts `ids` in id order and, on PostgreSQL, locks their rows until the transaction ends (see
/// [`get_for_update`]); locking in id order keeps two such transactions from deadlocking each other.
pub async fn get_many_for_update(
    db: &impl ConnectionTrait,
    ids: &[i64],
) -> Result<Vec<contact::Model>, DbErr> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let lock = match Backend::of(db) {
        Backend::Postgres => " FOR UPDATE",
        Backend::Sqlite => "",
    };
    let ids = super::padded(ids.into_iter().map(Value::from), Value::BigInt(None));
    let sql = format!(
        "SELECT * FROM contacts WHERE id IN ({}) ORDER BY id{lock}",
        placeholders(1, ids.len())
    );
    contact::Entity::find()
        .from_raw_sql(stmt(db, &sql, ids))
        .all(db)
        .await
}

/// Contacts per statement of [`insert_many`] at most (12 values each).
const CONTACTS_PER_INSERT: usize = 256;

/// Inserts new contacts (state `queued`) and returns their ids in the given order. PostgreSQL: the ids are taken
/// from the identity's sequence in one statement, then the rows inserted with them in few multi-row statements.
/// SQLite (in-process, so statements are cheap): one `INSERT … RETURNING id` per contact.
pub async fn insert_many(
    db: &impl ConnectionTrait,
    contacts: Vec<NewContact>,
) -> Result<Vec<i64>, DbErr> {
    if contacts.is_empty() {
        return Ok(Vec::new());
    }
    let now = Utc::now();
    if Backend::of(db) == Backend::Sqlite {
        let sql = format!("{INSERT_ONE} RETURNING id");
        let mut ids = Vec::with_capacity(contacts.len());
        for c in contacts {
            let row = db
                .query_one_raw(stmt(db, &sql, insert_values(c, now)))
                .await?
                .ok_or(DbErr::RecordNotInserted)?;
            ids.push(row.try_get::<i64>("", "id")?);
        }
        return Ok(ids);
    }
    let ids: Vec<i64> = db
        .query_all_raw(stmt(
            db,
            "SELECT nextval(pg_get_serial_sequence('contacts', 'id')) AS id FROM generate_series(1, $1)",
            [(contacts.len() as i64).into()],
        ))
        .await?
        .iter()
        .map(|r| r.try_get::<i64>("", "id"))
        .collect::<Result<_, _>>()?;
    if ids.len() != contacts.len() {
        return Err(DbErr::RecordNotInserted);
    }
    let rows: Vec<(i64, NewContact)> = ids.iter().copied().zip(contacts).collect();
    for chunk in super::insert_chunks(rows, CONTACTS_PER_INSERT, usize::MAX, |_| 0) {
        let sql = format!(
            "INSERT INTO contacts (id, queue_id, state, priority, language, arrived_on, customer_address, \
             customer_name, subject, queued_at, created_at, updated_at) VALUES {}",
            super::value_rows(chunk.len(), 12)
        );
        let values = chunk.into_iter().flat_map(|(id, c)| {
            [
                id.into(),
                c.queue_id.into(),
                "queued".into(),
                c.priority.into(),
                c.language.into(),
                c.arrived_on.into(),
                c.customer_address.into(),
                c.customer_name.into(),
                c.subject.into(),
                c.queued_at.into(),
                now.into(),
                now.into(),
            ]
        });
        db.execute_raw(stmt(db, &sql, values)).await?;
    }
    Ok(ids)
}

/// Re-opens the closed contacts among `ids`; their wait starts now.
pub async fn reopen_many(db: &impl ConnectionTrait, ids: &[i64]) -> Result<(), DbErr> {
    if ids.is_empty() {
        return Ok(());
    }
    let list = super::padded(ids.iter().copied().map(Value::from), Value::BigInt(None));
    let sql = format!(
        "UPDATE contacts SET state = 'queued', closed_at = NULL, queued_at = $1, updated_at = $1 \
         WHERE state = 'closed' AND id IN ({})",
        placeholders(2, list.len())
    );
    let values = std::iter::once(Value::from(Utc::now())).chain(list);
    db.execute_raw(stmt(db, &sql, values)).await?;
    Ok(())
}

/// What `claim_next` may take.
#[derive(Debug, Clone)]
pub struct ClaimFilter<'a> {
    pub queue_ids: &'a [i64],
    /// Empty means any language.
    pub languages: &'a [String],
}

/// Claims the waiting contact with the lowest priority value, then the oldest, in one statement, and logs `event`
/// for it (see [`update_logged`]).
///
/// PostgreSQL: `id = (SELECT … FOR UPDATE SKIP LOCKED)` runs the subquery once (an InitPlan); `IN (SELECT …)`
/// may re-run it per row and claim many rows (see shared notes). SQLite runs one writer at a time, so the
/// statement is atomic without row locks.
pub async fn claim_next(
    db: &DatabaseConnection,
    filter: &ClaimFilter<'_>,
    agent: &str,
    lease: Duration,
    event: &ContactEvent<'_>,
) -> Result<Option<contact::Model>, DbErr> {
    if filter.queue_ids.is_empty() {
        return Ok(None);
    }
    let now = Utc::now();
    let mut values: Vec<Value> = vec![agent.into(), now.into(), expiry(now, lease).into()];
    let queues = placeholders(values.len() + 1, filter.queue_ids.len());
    values.extend(filter.queue_ids.iter().map(|&id| Value::from(id)));
    let language = if filter.languages.is_empty() {
        String::new()
    } else {
        let p = placeholders(values.len() + 1, filter.languages.len());
        values.extend(filter.languages.iter().map(|l| Value::from(l.clone())));
        format!(" AND language IN ({p})")
    };
    let lock = match Backend::of(db) {
        Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        Backend::Sqlite => "",
    };
    // SQLite plans without statistics (nothing runs ANALYZE): over several queues it read every waiting contact of
    // them through the per-queue index and sorted them, per claim (54 claims/s with 50,000 waiting). `+queue_id`
    // keeps that index out, so the claim walks the claim-order index and stops at the first match. One queue keeps
    // the per-queue index, which is in claim order too. PostgreSQL chooses by its statistics (autovacuum).
    let queue_id = match Backend::of(db) {
        Backend::Sqlite if filter.queue_ids.len() > 1 => "+queue_id",
        _ => "queue_id",
    };
    let sql = format!(
        "UPDATE contacts SET state = 'claimed', claimed_by = $1, claimed_at = $2, lease_expires_at = $3, updated_at = $2 \
         WHERE id = (SELECT id FROM contacts WHERE state = 'queued' AND {queue_id} IN ({queues}){language} \
         ORDER BY priority, queued_at, id LIMIT 1{lock}) RETURNING *"
    );
    let rows = update_logged(db, &sql, values, event).await?;
    if rows.len() > 1 {
        return Err(DbErr::Custom(format!(
            "claim_next updated {} rows; expected at most one",
            rows.len()
        )));
    }
    Ok(rows.into_iter().next())
}

/// Claims a specific waiting contact for `agent` (router assignment).
pub async fn assign(
    db: &impl ConnectionTrait,
    id: i64,
    agent: &str,
    lease: Duration,
) -> Result<Option<contact::Model>, DbErr> {
    let now = Utc::now();
    one(
        db,
        "UPDATE contacts SET state = 'claimed', claimed_by = $2, claimed_at = $3, lease_expires_at = $4, updated_at = $3 \
         WHERE id = $1 AND state = 'queued' RETURNING *",
        [id.into(), agent.into(), now.into(), expiry(now, lease).into()],
    )
    .await
}

/// Extends the lease of a contact claimed by `agent`.
pub async fn heartbeat(
    db: &impl ConnectionTrait,
    id: i64,
    agent: &str,
    lease: Duration,
) -> Result<Option<contact::Model>, DbErr> {
    let now = Utc::now();
    one(
        db,
        "UPDATE contacts SET lease_expires_at = $3, updated_at = $4 WHERE id = $1 AND state = 'claimed' AND claimed_by = $2 RETURNING *",
        [id.into(), agent.into(), expiry(now, lease).into(), now.into()],
    )
    .await
}

/// Puts a claimed contact back in its queue, keeping its age. `holder` restricts to the claiming agent.
pub async fn release(
    db: &impl ConnectionTrait,
    id: i64,
    holder: Option<&str>,
) -> Result<Option<contact::Model>, DbErr> {
    one(
        db,
        "UPDATE contacts SET state = 'queued', claimed_by = NULL, claimed_at = NULL, lease_expires_at = NULL, updated_at = $3 \
         WHERE id = $1 AND state = 'claimed' AND ($2 IS NULL OR claimed_by = $2) RETURNING *",
        [id.into(), holder.map(str::to_owned).into(), Utc::now().into()],
    )
    .await
}

/// Moves an open contact to another queue with that queue's priority and language; it waits there, keeping its age.
pub async fn transfer(
    db: &impl ConnectionTrait,
    id: i64,
    holder: Option<&str>,
    queue_id: i64,
    priority: i32,
    language: &str,
) -> Result<Option<contact::Model>, DbErr> {
    one(
        db,
        "UPDATE contacts SET queue_id = $3, priority = $4, language = $5, state = 'queued', claimed_by = NULL, \
         claimed_at = NULL, lease_expires_at = NULL, updated_at = $6 \
         WHERE id = $1 AND state <> 'closed' AND ($2 IS NULL OR (state = 'claimed' AND claimed_by = $2)) RETURNING *",
        [id.into(), holder.map(str::to_owned).into(), queue_id.into(), priority.into(), language.into(), Utc::now().into()],
    )
    .await
}

/// Closes an open contact and logs `event` for it (see [`update_logged`]). `holder` restricts to the claiming agent.
pub async fn close(
    db: &DatabaseConnection,
    id: i64,
    holder: Option<&str>,
    event: &ContactEvent<'_>,
) -> Result<Option<contact::Model>, DbErr> {
    let now = Utc::now();
    let rows = update_logged(
        db,
        "UPDATE contacts SET state = 'closed', closed_at = $3, claimed_by = NULL, claimed_at = NULL, lease_expires_at = NULL, updated_at = $3 \
         WHERE id = $1 AND state <> 'closed' AND ($2 IS NULL OR (state = 'claimed' AND claimed_by = $2)) RETURNING *",
        vec![id.into(), holder.map(str::to_owned).into(), now.into()],
        event,
    )
    .await?;
    Ok(rows.into_iter().next())
}

/// Runs `update` (an `UPDATE contacts … RETURNING *` over `values`) and appends `event` for each contact it
/// changed, atomically; the caller wakes event readers after it returns.
///
/// PostgreSQL: one statement, committed on its own — the update in a data-modifying CTE that feeds the events
/// insert. That is one round trip instead of four (BEGIN, UPDATE, INSERT, COMMIT), which made a claim a quarter
/// cheaper for the server and shorter for the client. SQLite has no data-modifying CTEs, and its statements are
/// calls in process: a write transaction of the update and one insert per changed contact.
async fn update_logged(
    db: &DatabaseConnection,
    update: &str,
    mut values: Vec<Value>,
    event: &ContactEvent<'_>,
) -> Result<Vec<contact::Model>, DbErr> {
    if Backend::of(db) == Backend::Postgres {
        let log = events::insert_for_contacts("changed", "", values.len() + 1);
        values.extend(event.values());
        let sql = format!("WITH changed AS ({update}), logged AS ({log}) SELECT * FROM changed");
        return contact::Entity::find()
            .from_raw_sql(stmt(db, &sql, values))
            .all(db)
            .await;
    }
    let txn = super::begin_write(db).await?;
    let rows = contact::Entity::find()
        .from_raw_sql(stmt(&txn, update, values))
        .all(&txn)
        .await?;
    let log = events::insert_for_contacts("contacts", " WHERE c.id = $5", 1);
    for row in &rows {
        let values = event.values().into_iter().chain([row.id.into()]);
        txn.execute_raw(stmt(&txn, &log, values)).await?;
    }
    txn.commit().await?;
    Ok(rows)
}

/// Re-opens a closed contact; its wait starts now.
pub async fn reopen(db: &impl ConnectionTrait, id: i64) -> Result<Option<contact::Model>, DbErr> {
    let now = Utc::now();
    one(
        db,
        "UPDATE contacts SET state = 'queued', closed_at = NULL, queued_at = $2, updated_at = $2 WHERE id = $1 AND state = 'closed' RETURNING *",
        [id.into(), now.into()],
    )
    .await
}

/// Contacts whose lease expired before `now` (to name their former holders in events).
pub async fn expired(
    db: &impl ConnectionTrait,
    now: DateTime<Utc>,
    limit: u64,
) -> Result<Vec<contact::Model>, DbErr> {
    contact::Entity::find()
        .from_raw_sql(stmt(
            db,
            "SELECT * FROM contacts WHERE state = 'claimed' AND lease_expires_at < $1 ORDER BY lease_expires_at LIMIT $2",
            [now.into(), (limit as i64).into()],
        ))
        .all(db)
        .await
}

/// Returns one expired contact to its queue, if it is still expired and held by `holder`.
pub async fn rescue_one(
    db: &impl ConnectionTrait,
    id: i64,
    holder: &str,
    now: DateTime<Utc>,
) -> Result<Option<contact::Model>, DbErr> {
    one(
        db,
        "UPDATE contacts SET state = 'queued', claimed_by = NULL, claimed_at = NULL, lease_expires_at = NULL, updated_at = $3 \
         WHERE id = $1 AND state = 'claimed' AND claimed_by = $2 AND lease_expires_at < $3 RETURNING *",
        [id.into(), holder.into(), now.into()],
    )
    .await
}

async fn one<const N: usize>(
    db: &impl ConnectionTrait,
    sql: &str,
    values: [Value; N],
) -> Result<Option<contact::Model>, DbErr> {
    contact::Entity::find()
        .from_raw_sql(stmt(db, sql, values))
        .one(db)
        .await
}

fn expiry(now: DateTime<Utc>, lease: Duration) -> DateTime<Utc> {
    now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::minutes(5))
}

/// A closed contact the retention job deletes.
#[derive(Debug, Clone, sea_orm::FromQueryResult)]
pub struct ClosedContact {
    pub id: i64,
    pub queue_id: i64,
}

/// Locks up to `limit` contacts closed before `before`, oldest closed first, that have no reply waiting to be sent
/// (a pending or sending reply would be lost). PostgreSQL: `FOR UPDATE SKIP LOCKED`, so instances running retention
/// at once take different contacts and never wait on each other, and a concurrent re-open (which locks the contact)
/// either finishes first (the contact is no longer closed) or waits until the contact is gone.
pub async fn lock_closed_before(
    db: &impl ConnectionTrait,
    before: DateTime<Utc>,
    limit: u32,
) -> Result<Vec<ClosedContact>, DbErr> {
    use sea_orm::FromQueryResult;
    let lock = match Backend::of(db) {
        Backend::Postgres => " FOR UPDATE OF c SKIP LOCKED",
        Backend::Sqlite => "",
    };
    let sql = format!(
        "SELECT c.id, c.queue_id FROM contacts c WHERE c.state = 'closed' AND c.closed_at < $1 \
         AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.contact_id = c.id AND o.state IN ('pending', 'sending')) \
         ORDER BY c.closed_at, c.id LIMIT $2{lock}"
    );
    ClosedContact::find_by_statement(stmt(db, &sql, [before.into(), i64::from(limit).into()]))
        .all(db)
        .await
}

/// Deletes the contacts `ids` that are still closed (their messages, attachments and outbox rows must be deleted
/// first). Returns how many were deleted.
pub async fn delete_closed(db: &impl ConnectionTrait, ids: &[i64]) -> Result<u64, DbErr> {
    if ids.is_empty() {
        return Ok(0);
    }
    let ids = super::padded(ids.iter().map(|&id| Value::from(id)), Value::BigInt(None));
    let sql = format!(
        "DELETE FROM contacts WHERE state = 'closed' AND id IN ({})",
        placeholders(1, ids.len())
    );
    Ok(db.execute_raw(stmt(db, &sql, ids)).await?.rows_affected())
}
