//! A fresh database per run: a new PostgreSQL database (created on the server at `MQ_BENCH_PG_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`, and dropped at the end) or a SQLite file in a temporary
//! directory. `MQ_BENCH_PG_LOG_MS=N` makes the server log the benchmark database's statements that take N ms or
//! more (`log_min_duration_statement`), for profiling.

use anyhow::Context as _;
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};

/// Which store a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DbKind {
    Postgres,
    Sqlite,
}

impl DbKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Sqlite => "sqlite",
        }
    }
}

/// The PostgreSQL server's admin URL (`MQ_BENCH_PG_URL`).
pub fn pg_admin_url() -> String {
    std::env::var("MQ_BENCH_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// An empty database for one run; [`BenchDb::drop_database`] removes it.
pub struct BenchDb {
    pub kind: DbKind,
    pub url: String,
    pg: Option<(String, String)>,
    dir: Option<tempfile::TempDir>,
}

impl BenchDb {
    /// Creates `mq_bench_<random>` on PostgreSQL, or `mailqueue.db` in a temporary directory.
    pub async fn create(kind: DbKind) -> anyhow::Result<Self> {
        match kind {
            DbKind::Sqlite => {
                let dir = tempfile::Builder::new().prefix("mq-bench-").tempdir()?;
                let url = format!("sqlite://{}", dir.path().join("mailqueue.db").display());
                Ok(Self {
                    kind,
                    url,
                    pg: None,
                    dir: Some(dir),
                })
            }
            DbKind::Postgres => {
                let admin = pg_admin_url();
                let name = format!("mq_bench_{:016x}", rand::random::<u64>());
                let conn = sea_orm::Database::connect(&admin).await.with_context(|| {
                    format!(
                        "PostgreSQL at {admin} is not reachable; start it or set MQ_BENCH_PG_URL"
                    )
                })?;
                conn.execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .with_context(|| format!("CREATE DATABASE {name}"))?;
                // For profiling: the server logs the statements of this database that take at least this long.
                if let Ok(ms) = std::env::var("MQ_BENCH_PG_LOG_MS") {
                    let ms: u32 = ms
                        .trim()
                        .parse()
                        .context("MQ_BENCH_PG_LOG_MS: milliseconds")?;
                    conn.execute_unprepared(&format!(
                        "ALTER DATABASE {name} SET log_min_duration_statement = {ms}"
                    ))
                    .await?;
                }
                let _ = conn.close().await;
                let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
                Ok(Self {
                    kind,
                    url: format!("{base}/{name}"),
                    pg: Some((admin.clone(), name)),
                    dir: None,
                })
            }
        }
    }

    /// Drops the PostgreSQL database (closing what is still connected) or removes the SQLite directory.
    pub async fn drop_database(mut self) -> anyhow::Result<()> {
        if let Some((admin, name)) = self.pg.take() {
            let conn = sea_orm::Database::connect(&admin).await?;
            conn.execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await
                .with_context(|| format!("DROP DATABASE {name}"))?;
            let _ = conn.close().await;
        }
        if let Some(dir) = self.dir.take() {
            dir.close()?;
        }
        Ok(())
    }
}

/// The first column of the first row of `sql` as an integer (a `COUNT(*)`).
pub async fn count(db: &DatabaseConnection, sql: &str) -> anyhow::Result<i64> {
    let row = db
        .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .with_context(|| sql.to_owned())?
        .with_context(|| format!("{sql}: no row"))?;
    Ok(row.try_get_by_index::<i64>(0)?)
}

/// Stored inbound messages, contacts and quarantined mails, counted in the database.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    pub messages: i64,
    pub contacts: i64,
    pub quarantined: i64,
}

impl Counts {
    pub async fn read(db: &DatabaseConnection) -> anyhow::Result<Self> {
        Ok(Self {
            messages: count(
                db,
                "SELECT COUNT(*) FROM messages WHERE direction = 'inbound'",
            )
            .await?,
            contacts: count(db, "SELECT COUNT(*) FROM contacts").await?,
            quarantined: count(db, "SELECT COUNT(*) FROM quarantine").await?,
        })
    }
}
