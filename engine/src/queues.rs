//! Queues: synced from the YAML at start (upsert; a queue removed from the YAML is disabled, never deleted with
//! its contacts) and their live figures for the API.

use std::collections::HashMap;

use chrono::Utc;
use mailqueue_config::Config;
use sea_orm::{ConnectionTrait, DatabaseConnection, FromQueryResult};
use serde::Serialize;
use utoipa::ToSchema;

use crate::{engine::QueueDirectory, error::Result, store};

/// A queue as the engine knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueInfo {
    pub id: i64,
    pub name: String,
    pub priority: i32,
    pub language: String,
    pub enabled: bool,
}

/// Upserts configured queues, disables the rest, and returns the directory of all queues.
pub async fn sync(db: &DatabaseConnection, config: &Config) -> Result<QueueDirectory> {
    let now = Utc::now();
    let txn = store::begin_write(db).await?;
    for q in &config.queues {
        let language = q
            .language
            .as_ref()
            .unwrap_or(&config.defaults.language)
            .to_string();
        txn.execute_raw(store::stmt(
            &txn,
            "INSERT INTO queues (name, priority, language, enabled, created_at, updated_at) \
             VALUES ($1, $2, $3, TRUE, $4, $4) \
             ON CONFLICT (name) DO UPDATE SET priority = $2, language = $3, enabled = TRUE, updated_at = $4",
            [q.name.clone().into(), q.priority.into(), language.into(), now.into()],
        ))
        .await?;
    }
    let names: Vec<sea_orm::Value> = config
        .queues
        .iter()
        .map(|q| q.name.clone().into())
        .collect();
    let disable = if names.is_empty() {
        "UPDATE queues SET enabled = FALSE, updated_at = $1 WHERE enabled".to_owned()
    } else {
        format!(
            "UPDATE queues SET enabled = FALSE, updated_at = $1 WHERE enabled AND name NOT IN ({})",
            store::placeholders(2, names.len())
        )
    };
    txn.execute_raw(store::stmt(
        &txn,
        &disable,
        std::iter::once(now.into()).chain(names),
    ))
    .await?;
    let rows = QueueRow::find_by_statement(store::stmt(
        &txn,
        "SELECT id, name, priority, language, enabled FROM queues",
        [],
    ))
    .all(&txn)
    .await?;
    txn.commit().await?;
    let by_name: HashMap<_, _> = rows
        .into_iter()
        .map(|r| {
            (
                r.name.clone(),
                QueueInfo {
                    id: r.id,
                    name: r.name,
                    priority: r.priority,
                    language: r.language,
                    enabled: r.enabled,
                },
            )
        })
        .collect();
    Ok(QueueDirectory { by_name })
}

#[derive(FromQueryResult)]
struct QueueRow {
    id: i64,
    name: String,
    priority: i32,
    language: String,
    enabled: bool,
}

/// Live figures of one queue.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct QueueStats {
    pub name: String,
    pub priority: i32,
    pub language: String,
    pub enabled: bool,
    pub waiting: i64,
    pub claimed: i64,
    /// Age in seconds of the oldest waiting contact.
    pub oldest_waiting_seconds: Option<i64>,
    pub by_language: Vec<LanguageStats>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LanguageStats {
    pub language: String,
    pub waiting: i64,
    pub claimed: i64,
    pub oldest_waiting_seconds: Option<i64>,
}

#[derive(FromQueryResult)]
struct StatsRow {
    queue_id: i64,
    language: String,
    state: String,
    n: i64,
    oldest: Option<chrono::DateTime<Utc>>,
}

/// Waiting and claimed counts and oldest waiting age per queue and language, for `queue_ids`.
pub async fn stats(
    db: &DatabaseConnection,
    dir: &QueueDirectory,
    queue_ids: &[i64],
) -> Result<Vec<QueueStats>> {
    let now = Utc::now();
    let rows = StatsRow::find_by_statement(store::stmt(
        db,
        // One branch per state, each matching a partial index (`contacts_queue_claim_idx`, `contacts_lease_idx`),
        // so the cost follows the open contacts, not the history (`state IN (…)` scans the whole table).
        "SELECT queue_id, language, 'queued' AS state, COUNT(*) AS n, MIN(queued_at) AS oldest FROM contacts \
         WHERE state = 'queued' GROUP BY queue_id, language \
         UNION ALL SELECT queue_id, language, 'claimed' AS state, COUNT(*) AS n, MIN(queued_at) AS oldest \
         FROM contacts WHERE state = 'claimed' GROUP BY queue_id, language",
        [],
    ))
    .all(db)
    .await?;
    let age = |t: Option<chrono::DateTime<Utc>>| t.map(|t| (now - t).num_seconds().max(0));
    let mut out: Vec<QueueStats> = Vec::new();
    let mut infos: Vec<_> = dir
        .by_name
        .values()
        .filter(|q| queue_ids.contains(&q.id))
        .collect();
    infos.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
    for q in infos {
        let mut s = QueueStats {
            name: q.name.clone(),
            priority: q.priority,
            language: q.language.clone(),
            enabled: q.enabled,
            waiting: 0,
            claimed: 0,
            oldest_waiting_seconds: None,
            by_language: Vec::new(),
        };
        for r in rows.iter().filter(|r| r.queue_id == q.id) {
            let pos = match s.by_language.iter().position(|l| l.language == r.language) {
                Some(p) => p,
                None => {
                    s.by_language.push(LanguageStats {
                        language: r.language.clone(),
                        waiting: 0,
                        claimed: 0,
                        oldest_waiting_seconds: None,
                    });
                    s.by_language.len() - 1
                }
            };
            let l = &mut s.by_language[pos];
            if r.state == "queued" {
                l.waiting += r.n;
                s.waiting += r.n;
                l.oldest_waiting_seconds = age(r.oldest);
                s.oldest_waiting_seconds = s.oldest_waiting_seconds.max(age(r.oldest));
            } else {
                l.claimed += r.n;
                s.claimed += r.n;
            }
        }
        s.by_language.sort_by(|a, b| a.language.cmp(&b.language));
        out.push(s);
    }
    Ok(out)
}
