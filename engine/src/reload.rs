//! Configuration reload, on SIGHUP and `POST /v1/admin/reload`.
//!
//! The file the engine was started with is read and validated again with the same loader as at start. An invalid
//! file changes nothing: the engine keeps running on its old configuration and the errors are logged and returned,
//! each with `FILE:LINE:COL`. A valid one is applied at once: [`Engine::replace_config`] syncs the queues (a queue
//! removed from the file is disabled, never deleted) and tells the services that follow the configuration (mailbox
//! workers, outbox worker, retention), and the API tokens are swapped. What cannot change without a restart
//! (`database.url`, `api.listen`) keeps its old value and is reported as needing a restart.
//!
//! Reloads run one at a time. Each instance reloads its own configuration: with several instances, reload each.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use mailqueue_config::{Config, Diagnostic};
use serde::Serialize;
use utoipa::ToSchema;

use crate::{api::auth::Tokens, engine::Engine};

/// Reloads the configuration of one engine; cheap to clone.
#[derive(Clone)]
pub struct Reloader {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    /// The file the engine was started with; `None` when it was started from a configuration in memory.
    file: Option<PathBuf>,
    tokens: Arc<Tokens>,
    /// Serialises reloads (a SIGHUP and a POST at once).
    running: tokio::sync::Mutex<()>,
}

/// One problem of a configuration file, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ConfigProblem {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// The key path at that position, e.g. `queues[1].priority`.
    pub field: Option<String>,
    pub message: String,
}

impl From<&Diagnostic> for ConfigProblem {
    fn from(d: &Diagnostic) -> Self {
        Self {
            file: d.file.display().to_string(),
            line: d.line,
            column: d.column,
            field: d.field.clone(),
            message: d.message.clone(),
        }
    }
}

/// Names of entries added, removed and changed by a reload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct Changes {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

impl Changes {
    /// The changes between two lists of entries, each named by `name`.
    fn between<T: PartialEq>(old: &[T], new: &[T], name: impl Fn(&T) -> &str) -> Self {
        let mut changes = Self::default();
        for e in new {
            match old.iter().find(|o| name(o) == name(e)) {
                None => changes.added.push(name(e).to_owned()),
                Some(o) if o != e => changes.changed.push(name(e).to_owned()),
                Some(_) => {}
            }
        }
        for o in old {
            if !new.iter().any(|n| name(n) == name(o)) {
                changes.removed.push(name(o).to_owned());
            }
        }
        changes
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// The API tokens after a reload (by name; secrets never appear).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct TokenChanges {
    /// Tokens configured now.
    pub count: usize,
    #[serde(flatten)]
    pub changes: Changes,
}

/// A setting that changed in the file but keeps its old value until the engine restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct NeedsRestart {
    /// E.g. `database.url`.
    pub field: String,
    pub message: String,
}

/// What a successful reload changed.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ReloadReport {
    /// The file that was read.
    pub file: String,
    /// Whether anything took effect.
    pub changed: bool,
    /// Queues: removed ones are disabled (their contacts stay stored; see `notes`).
    pub queues: Changes,
    pub incoming_servers: Changes,
    /// `added`, `removed`, `changed` or `unchanged`.
    pub outgoing_server: String,
    pub tokens: TokenChanges,
    /// Other sections that changed: `defaults`, `ingest`, `retention`.
    pub sections: Vec<String>,
    /// Settings that changed in the file but need a restart; the old values stay in effect.
    pub needs_restart: Vec<NeedsRestart>,
    /// What the changes mean for stored contacts, in words.
    pub notes: Vec<String>,
    /// Warnings of the loader (the same as `mailqueue check-config` prints).
    pub warnings: Vec<ConfigProblem>,
}

/// Why a reload did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The engine was started from a configuration in memory, not from a file.
    #[error("this engine was not started from a configuration file, so there is nothing to reload")]
    NoFile,
    /// The file is invalid; nothing changed.
    #[error("{file}: {} error(s); still running on the previous configuration", errors.len())]
    Invalid {
        file: String,
        errors: Vec<ConfigProblem>,
    },
    /// The file is valid but applying it failed (the database could not be reached); nothing changed.
    #[error("applying the new configuration failed, still running on the previous one: {0}")]
    Apply(#[source] crate::Error),
}

impl ReloadError {
    /// The problems of an invalid file (none for the other errors).
    pub fn problems(&self) -> &[ConfigProblem] {
        match self {
            Self::Invalid { errors, .. } => errors,
            _ => &[],
        }
    }
}

impl Reloader {
    /// A reloader for `engine`, re-reading `file` and swapping `tokens`.
    pub fn new(engine: Engine, file: Option<PathBuf>, tokens: Arc<Tokens>) -> Self {
        Self {
            inner: Arc::new(Inner {
                engine,
                file,
                tokens,
                running: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// The API tokens this reloader swaps (the router authenticates against them).
    pub fn tokens(&self) -> Arc<Tokens> {
        self.inner.tokens.clone()
    }

    /// The configuration file, when the engine was started from one.
    pub fn file(&self) -> Option<&Path> {
        self.inner.file.as_deref()
    }

    /// Reads, validates and applies the configuration file; logs the outcome.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let _one_at_a_time = self.inner.running.lock().await;
        let result = self.reload_now().await;
        match &result {
            Ok(report) => log_report(report),
            Err(ReloadError::Invalid { file, errors }) => {
                for e in errors {
                    tracing::error!(
                        "configuration reload: {}:{}:{}: {}",
                        e.file,
                        e.line,
                        e.column,
                        e.message
                    );
                }
                tracing::error!(
                    file = %file,
                    errors = errors.len(),
                    "configuration reload refused: {file} has {} error(s); still running on the previous configuration",
                    errors.len()
                );
            }
            Err(e) => tracing::error!("configuration reload failed: {e:#}"),
        }
        result
    }

    async fn reload_now(&self) -> Result<ReloadReport, ReloadError> {
        let file = self.inner.file.clone().ok_or(ReloadError::NoFile)?;
        let shown = file.display().to_string();
        let path = file.clone();
        // The loader reads the file and its secret files: blocking I/O.
        let loaded = tokio::task::spawn_blocking(move || mailqueue_config::load(&path))
            .await
            .map_err(|e| ReloadError::Apply(crate::Error::Other(e.into())))?
            .map_err(|errors| ReloadError::Invalid {
                file: shown.clone(),
                errors: errors.0.iter().map(ConfigProblem::from).collect(),
            })?;
        let engine = &self.inner.engine;
        let old = engine.config().await;
        let mut new = loaded.config;
        let needs_restart = keep_restart_only(&old, &mut new);
        let mut report = diff(&old, &new, shown);
        report.needs_restart = needs_restart;
        report.warnings = loaded.warnings.iter().map(ConfigProblem::from).collect();
        report.notes = self.notes(&report.queues).await;
        engine
            .replace_config(new.clone())
            .await
            .map_err(ReloadError::Apply)?;
        self.inner.tokens.replace(&new);
        report.tokens.count = self.inner.tokens.len();
        Ok(report)
    }

    /// What the queue changes mean for stored contacts.
    async fn notes(&self, queues: &Changes) -> Vec<String> {
        if queues.removed.is_empty() {
            return Vec::new();
        }
        let engine = &self.inner.engine;
        let dir = engine.queues().await;
        let ids: Vec<i64> = queues
            .removed
            .iter()
            .filter_map(|n| dir.by_name.get(n).map(|q| q.id))
            .collect();
        let stats = crate::queues::stats(&engine.db, &dir, &ids)
            .await
            .unwrap_or_default();
        queues
            .removed
            .iter()
            .map(|name| {
                let (waiting, claimed) = stats
                    .iter()
                    .find(|s| &s.name == name)
                    .map_or((0, 0), |s| (s.waiting, s.claimed));
                format!(
                    "queue `{name}` is disabled, not deleted: its {waiting} waiting and {claimed} claimed contact(s) \
                     stay stored and visible (GET /v1/queues shows it with `enabled: false`); nobody can claim from \
                     it, claimed contacts can still be worked and closed, a router or admin can transfer its waiting \
                     contacts to another queue, and adding the queue back makes them claimable again"
                )
            })
            .collect()
    }
}

/// Copies the settings that need a restart from `old` into `new`, naming each that differed.
fn keep_restart_only(old: &Config, new: &mut Config) -> Vec<NeedsRestart> {
    let mut kept = Vec::new();
    if new.database.url != old.database.url {
        // The URL may hold a password: never show it.
        kept.push(NeedsRestart {
            field: "database.url".into(),
            message: "database.url changed; the engine keeps using the database it started with until it is \
                      restarted"
                .into(),
        });
        new.database.url.clone_from(&old.database.url);
    }
    if new.api.listen != old.api.listen {
        kept.push(NeedsRestart {
            field: "api.listen".into(),
            message: format!(
                "api.listen changed to `{}`; the API keeps listening on `{}` until the engine is restarted",
                new.api.listen, old.api.listen
            ),
        });
        new.api.listen.clone_from(&old.api.listen);
    }
    if new.defaults.max_email_size_mb > old.defaults.max_email_size_mb {
        // The setting itself applies (ingest and the reply checks read it); only the HTTP body limit is fixed.
        kept.push(NeedsRestart {
            field: "defaults.max_email_size_mb".into(),
            message: format!(
                "defaults.max_email_size_mb grew to {}: ingest and reply checks use it now, but the HTTP body limit \
                 of POST /v1/contacts/{{id}}/replies stays at the size of {} MB until the engine is restarted",
                new.defaults.max_email_size_mb, old.defaults.max_email_size_mb
            ),
        });
    }
    kept
}

/// What differs between the running configuration and the new one.
fn diff(old: &Config, new: &Config, file: String) -> ReloadReport {
    let queues = Changes::between(&old.queues, &new.queues, |q| &q.name);
    let incoming_servers =
        Changes::between(&old.incoming_servers, &new.incoming_servers, |s| &s.name);
    let outgoing_server = match (&old.outgoing_server, &new.outgoing_server) {
        (None, None) => "unchanged",
        (None, Some(_)) => "added",
        (Some(_), None) => "removed",
        (Some(o), Some(n)) if o == n => "unchanged",
        (Some(_), Some(_)) => "changed",
    }
    .to_owned();
    let tokens = TokenChanges {
        count: new.api.tokens.len(),
        changes: Changes::between(&old.api.tokens, &new.api.tokens, |t| &t.name),
    };
    // Defaults and Ingest compare by their Debug text (it holds no secrets).
    let mut sections = Vec::new();
    if format!("{:?}", old.defaults) != format!("{:?}", new.defaults) {
        sections.push("defaults".to_owned());
    }
    if format!("{:?}", old.ingest) != format!("{:?}", new.ingest) {
        sections.push("ingest".to_owned());
    }
    if old.retention != new.retention {
        sections.push("retention".to_owned());
    }
    let changed = !queues.is_empty()
        || !incoming_servers.is_empty()
        || outgoing_server != "unchanged"
        || !tokens.changes.is_empty()
        || !sections.is_empty();
    ReloadReport {
        file,
        changed,
        queues,
        incoming_servers,
        outgoing_server,
        tokens,
        sections,
        needs_restart: Vec::new(),
        notes: Vec::new(),
        warnings: Vec::new(),
    }
}

fn log_report(r: &ReloadReport) {
    let list = |c: &Changes| {
        format!(
            "+[{}] -[{}] ~[{}]",
            c.added.join(", "),
            c.removed.join(", "),
            c.changed.join(", ")
        )
    };
    tracing::info!(
        file = %r.file,
        changed = r.changed,
        queues = %list(&r.queues),
        incoming_servers = %list(&r.incoming_servers),
        outgoing_server = %r.outgoing_server,
        tokens = r.tokens.count,
        "configuration reloaded from {}{}",
        r.file,
        if r.changed { "" } else { " (no changes)" }
    );
    for n in &r.needs_restart {
        tracing::warn!(field = %n.field, "configuration reload: {}", n.message);
    }
    for n in &r.notes {
        tracing::info!("configuration reload: {n}");
    }
    for w in &r.warnings {
        tracing::warn!(
            "configuration reload: {}:{}:{}: {}",
            w.file,
            w.line,
            w.column,
            w.message
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_name_added_removed_and_changed_entries() {
        let old = [("a", 1), ("b", 2), ("c", 3)];
        let new = [("a", 1), ("b", 20), ("d", 4)];
        let c = Changes::between(&old, &new, |e| e.0);
        assert_eq!(c.added, ["d"]);
        assert_eq!(c.removed, ["c"]);
        assert_eq!(c.changed, ["b"]);
        assert!(Changes::between(&old, &old, |e| e.0).is_empty());
    }
}
