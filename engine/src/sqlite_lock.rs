//! SQLite is single-instance: `mailqueue serve` holds an exclusive lock on `<database file>.lock` for its whole
//! life, so a second `serve` on the same file is refused with a clear message instead of two instances fetching
//! the same mailboxes. The lock is advisory (`flock`) and goes away with the process, even after `kill -9`.
//! `mailqueue import` and `migrate` do not take it: they may run beside `serve`. In-memory databases are exempt.

use std::{
    fs::{File, OpenOptions, TryLockError},
    path::{Path, PathBuf},
};

/// The held lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct SqliteLock {
    _file: File,
    pub path: PathBuf,
}

/// Takes the lock for the SQLite database at `url`. `Ok(None)` for PostgreSQL and in-memory SQLite.
pub fn acquire(url: &str) -> anyhow::Result<Option<SqliteLock>> {
    let Some(db) = sqlite_file(url) else {
        return Ok(None);
    };
    let path = lock_path(&db);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot create the directory {} for {}: {e}",
                dir.display(),
                db.display()
            )
        })?;
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot open the lock file {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(SqliteLock { _file: file, path })),
        Err(TryLockError::WouldBlock) => anyhow::bail!(
            "another mailqueue instance is already serving the SQLite database {db} (it holds {lock}). SQLite is \
             single-instance: stop the other instance, or use PostgreSQL (`database.url: postgres://…`) to run \
             several instances",
            db = db.display(),
            lock = path.display(),
        ),
        Err(TryLockError::Error(e)) => {
            anyhow::bail!(
                "cannot lock {} for the SQLite database {}: {e}",
                path.display(),
                db.display()
            )
        }
    }
}

/// `<file>.lock` beside the database file.
fn lock_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    name.into()
}

/// The database file of a SQLite URL (`sqlite://path`, `sqlite:path`, with or without `?options`); `None` for
/// other databases and in-memory ones (`sqlite::memory:`, `mode=memory`).
fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() || path.starts_with(':') || query.split('&').any(|p| p == "mode=memory") {
        return None;
    }
    Some(PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_file_of_sqlite_urls() {
        assert_eq!(
            sqlite_file("sqlite:///var/lib/mq.db"),
            Some("/var/lib/mq.db".into())
        );
        assert_eq!(
            sqlite_file("sqlite://data/mq.db?mode=rwc"),
            Some("data/mq.db".into())
        );
        assert_eq!(sqlite_file("sqlite:mq.db"), Some("mq.db".into()));
        assert_eq!(sqlite_file("sqlite::memory:"), None);
        assert_eq!(sqlite_file("sqlite://:memory:"), None);
        assert_eq!(sqlite_file("sqlite://x.db?mode=memory"), None);
        assert_eq!(sqlite_file("postgres://u@h/db"), None);
        assert_eq!(
            lock_path(Path::new("/a/mq.db")),
            PathBuf::from("/a/mq.db.lock")
        );
    }

    #[test]
    fn a_second_lock_on_one_file_is_refused_with_a_clear_message() {
        let dir = std::env::temp_dir().join(format!("mq-lock-{:08x}", rand::random::<u32>()));
        let url = format!("sqlite://{}", dir.join("mq.db").display());
        let first = acquire(&url).unwrap().expect("a lock");
        let e = acquire(&url).unwrap_err().to_string();
        assert!(
            e.contains("mq.db") && e.contains("single-instance") && e.contains("PostgreSQL"),
            "{e}"
        );
        drop(first);
        assert!(acquire(&url).unwrap().is_some(), "released on drop");
        assert!(acquire("sqlite::memory:").unwrap().is_none());
        let _ = std::fs::remove_dir_all(dir);
    }
}
