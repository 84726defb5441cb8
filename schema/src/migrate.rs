//! Versioned SQL migrations for PostgreSQL and SQLite.

use std::time::Duration;

use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr, Statement,
};

/// The database kinds mailqueue runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    pub fn of(db: &impl ConnectionTrait) -> Self {
        match db.get_database_backend() {
            DbBackend::Postgres => Self::Postgres,
            _ => Self::Sqlite,
        }
    }
}

/// One migration: a version, a name, and its SQL for each backend (statements separated by `;\n`).
struct Migration {
    version: i64,
    name: &'static str,
    postgres: &'static str,
    sqlite: &'static str,
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        postgres: include_str!("sql/0001_initial.postgres.sql"),
        sqlite: include_str!("sql/0001_initial.sqlite.sql"),
    },
    Migration {
        version: 2,
        name: "sender_rate",
        postgres: include_str!("sql/0002_sender_rate.postgres.sql"),
        sqlite: include_str!("sql/0002_sender_rate.sqlite.sql"),
    },
    Migration {
        version: 3,
        name: "instances_and_mailbox_leases",
        postgres: include_str!("sql/0003_instances_and_mailbox_leases.postgres.sql"),
        sqlite: include_str!("sql/0003_instances_and_mailbox_leases.sqlite.sql"),
    },
    Migration {
        version: 4,
        name: "retention",
        postgres: include_str!("sql/0004_retention.postgres.sql"),
        sqlite: include_str!("sql/0004_retention.sqlite.sql"),
    },
    Migration {
        version: 5,
        name: "metrics_indexes",
        postgres: include_str!("sql/0005_metrics_indexes.postgres.sql"),
        sqlite: include_str!("sql/0005_metrics_indexes.sqlite.sql"),
    },
    Migration {
        version: 6,
        name: "lz4_compression",
        postgres: include_str!("sql/0006_lz4_compression.postgres.sql"),
        sqlite: include_str!("sql/0006_lz4_compression.sqlite.sql"),
    },
    Migration {
        version: 7,
        name: "events_notify_after_commit",
        postgres: include_str!("sql/0007_events_notify_after_commit.postgres.sql"),
        sqlite: include_str!("sql/0007_events_notify_after_commit.sqlite.sql"),
    },
];

/// Opens a connection pool. SQLite files are created when missing, run in WAL mode and wait for locks instead of
/// failing, so an `import` can run beside `serve`.
pub async fn connect(url: &str) -> Result<DatabaseConnection, DbErr> {
    let mut opts = ConnectOptions::new(url.to_owned());
    opts.sqlx_logging(false)
        .connect_timeout(Duration::from_secs(10))
        .acquire_timeout(Duration::from_secs(30));
    if url.starts_with("sqlite:") {
        if let Some(dir) = sqlite_parent_dir(url) {
            std::fs::create_dir_all(&dir).map_err(|e| {
                DbErr::Custom(format!(
                    "cannot create the directory {} for {url}: {e}",
                    dir.display()
                ))
            })?;
        }
        opts.max_connections(4).map_sqlx_sqlite_opts(|o| {
            o.create_if_missing(true)
                .journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(30))
                .foreign_keys(true)
        });
    } else {
        opts.max_connections(32).min_connections(1);
    }
    Database::connect(opts).await
}

fn sqlite_parent_dir(url: &str) -> Option<std::path::PathBuf> {
    let path = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let path = path.split('?').next()?;
    if path.is_empty() || path.starts_with(':') {
        return None;
    }
    std::path::Path::new(path)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Into::into)
}

/// Applies every migration not yet applied. Safe to run from several instances at once on PostgreSQL (an advisory
/// lock serialises them).
pub async fn migrate(db: &DatabaseConnection) -> Result<Vec<i64>, DbErr> {
    let backend = Backend::of(db);
    let txn = sea_orm::TransactionTrait::begin(db).await?;
    if backend == Backend::Postgres {
        txn.execute_unprepared("SELECT pg_advisory_xact_lock(7355608001)")
            .await?;
    }
    txn.execute_unprepared(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)",
    )
    .await?;
    let applied: Vec<i64> = txn
        .query_all_raw(Statement::from_string(
            txn.get_database_backend(),
            "SELECT version FROM schema_migrations",
        ))
        .await?
        .iter()
        .map(|r| r.try_get::<i64>("", "version"))
        .collect::<Result<_, _>>()?;
    let mut done = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        let sql = match backend {
            Backend::Postgres => m.postgres,
            Backend::Sqlite => m.sqlite,
        };
        for stmt in sql.split(";\n").map(str::trim).filter(|s| !s.is_empty()) {
            txn.execute_unprepared(stmt).await.map_err(|e| {
                DbErr::Migration(format!(
                    "migration {} {} failed at `{stmt}`: {e}",
                    m.version, m.name
                ))
            })?;
        }
        txn.execute_raw(Statement::from_sql_and_values(
            txn.get_database_backend(),
            match backend {
                Backend::Postgres => {
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)"
                }
                Backend::Sqlite => {
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)"
                }
            },
            [
                m.version.into(),
                m.name.into(),
                chrono::Utc::now().to_rfc3339().into(),
            ],
        ))
        .await?;
        tracing::info!(version = m.version, name = m.name, "applied migration");
        done.push(m.version);
    }
    txn.commit().await?;
    Ok(done)
}
