//! What each mailbox worker is doing, for `GET /v1/mailboxes` and the logs: state, counters, the current error
//! (class, cause, fix) and when the next attempt is due.
//!
//! Every worker owns a [`StatusHandle`] and is the only writer of its entry; the [`StatusBoard`] hands out copies.
//! Updates take a plain mutex for a few field writes and never across an `.await`, so a slow mailbox never holds
//! up another one or the API. State changes that matter to an operator are logged here, so that the API and the
//! logs always tell the same story: a connection (info), a failure with its class, cause and fix (warn), a
//! recovery (info), the stop (info). Nothing here ever holds a secret or a token: errors are built from
//! explanations and error texts that never contain them.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use chrono::{DateTime, Utc};
use mailqueue_connectors::{explain::Explanation, imap::ImapError, oauth::OAuthError};
use serde::Serialize;
use utoipa::ToSchema;

/// What a mailbox worker is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MailboxState {
    /// Getting a token, connecting, logging in, selecting the folder.
    Connecting,
    /// Fetching and storing new mail.
    Fetching,
    /// Waiting for new mail with IMAP IDLE (new mail is fetched as soon as the server announces it).
    Idle,
    /// Waiting for the next poll (the server has no IDLE).
    Polling,
    /// Waiting before the next attempt after a failure (`error`, `next_retry_at`).
    BackingOff,
    /// Another instance fetches this mailbox (`owner`), or it waits for this mailbox's lease.
    Standby,
    /// Stopped (shutdown).
    Stopped,
}

impl MailboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Fetching => "fetching",
            Self::Idle => "idle",
            Self::Polling => "polling",
            Self::BackingOff => "backing_off",
            Self::Standby => "standby",
            Self::Stopped => "stopped",
        }
    }
}

/// Why the last attempt failed, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct MailboxError {
    /// `token` (the token endpoint refused or failed), `auth` (the IMAP server refused the login), `config`,
    /// `connect`, `tls`, `no_such_folder`, `protocol`, `io` (IMAP), `store` (the database), `internal`.
    pub class: String,
    /// What went wrong.
    pub cause: String,
    /// What to change.
    pub fix: String,
    /// The whole error as logged.
    pub message: String,
    /// Microsoft's code when there is one, e.g. `AADSTS7000215`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Whether it may pass without anyone changing anything (network trouble, throttling, a server hiccup).
    pub temporary: bool,
    /// When this error was first seen (it repeats while `attempts` grows).
    pub since: DateTime<Utc>,
    /// Failed attempts in a row.
    pub attempts: u32,
}

impl MailboxError {
    /// An error of `class` explained by `explanation`; `message` is the error's own text.
    pub fn new(
        class: &str,
        explanation: Explanation,
        message: impl Into<String>,
        temporary: bool,
    ) -> Self {
        Self {
            class: class.to_owned(),
            cause: explanation.cause,
            fix: explanation.fix,
            message: message.into(),
            code: None,
            temporary,
            since: Utc::now(),
            attempts: 1,
        }
    }

    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    /// A token request that failed: Microsoft's AADSTS code with its cause and fix.
    pub fn token(e: &OAuthError) -> Self {
        let error = Self::new("token", e.explain(), e.to_string(), e.is_transient());
        match e.aadsts() {
            Some(code) => error.with_code(format!("AADSTS{code}")),
            None => error,
        }
    }

    /// An IMAP failure other than a refused login (see [`MailboxError::auth`] for that).
    pub fn imap(e: &ImapError) -> Self {
        let fix = match e.class() {
            "connect" => {
                "check `imap.host` and `imap.port` of the incoming server, DNS, and that the network allows the \
                 connection; mailqueue retries with backoff"
            }
            "tls" => {
                "check `imap.tls` (implicit on 993, starttls on 143), the server certificate, and `ca_file` for a \
                 private CA"
            }
            "no_such_folder" => {
                "set the address's `folder` to an existing folder (names are case-sensitive; sub-folders use the \
                 server's separator, e.g. `Inbox/Orders`)"
            }
            "auth" => "nothing to change if it passes; mailqueue retries with backoff",
            "io" => "nothing to change if it passes; the connection is re-opened with backoff",
            _ => "if it persists, report it with the server's answer shown in `message`",
        };
        let cause = e.to_string();
        Self::new(
            e.class(),
            Explanation::new(cause.clone(), fix),
            cause,
            e.is_temporary(),
        )
    }

    /// The IMAP server refused the login with a freshly issued token: `explanation` is the checklist for the
    /// kind of token (app or delegated).
    pub fn auth(e: &ImapError, explanation: Explanation) -> Self {
        Self::new("auth", explanation, e.to_string(), e.is_temporary())
    }

    /// The configuration cannot work (no secret, bad token endpoint, unreadable CA file).
    pub fn config(message: impl Into<String>, fix: &str) -> Self {
        let message = message.into();
        Self::new(
            "config",
            Explanation::new(message.clone(), fix),
            message,
            false,
        )
    }

    /// The database failed while storing mail; nothing was acted on at the server, so the mail is fetched again.
    pub fn store(e: &crate::Error) -> Self {
        let message = e.to_string();
        Self::new(
            "store",
            Explanation::new(
                format!("the mail could not be stored: {message}"),
                "check the database (reachable, not full, migrations applied); the mail stays on the server \
                 and is fetched again",
            ),
            message,
            true,
        )
    }

    /// The worker itself failed (a bug); it is restarted.
    pub fn internal(message: impl Into<String>) -> Self {
        let message = message.into();
        Self::new(
            "internal",
            Explanation::new(
                message.clone(),
                "the mailbox worker is restarted; please report this with the logs",
            ),
            message,
            true,
        )
    }
}

/// One mailbox as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct MailboxStatus {
    /// The queue address.
    pub address: String,
    pub queue: String,
    /// The incoming server's name.
    pub server: String,
    /// `oauth_service` or `oauth_user`.
    pub auth: String,
    /// The IMAP login (`account`, else the address).
    pub login: String,
    /// The folder fetched from.
    pub folder: String,
    /// The instance that holds the mailbox's lease and fetches it (`<host>:<pid>:<random>`), when known.
    pub owner: Option<String>,
    pub state: MailboxState,
    /// Since when the worker is in `state`.
    pub state_since: DateTime<Utc>,
    /// Whether the server offers IDLE (known after the first login).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_supported: Option<bool>,
    /// When the last fetch completed without error.
    pub last_fetch_at: Option<DateTime<Utc>>,
    /// Mails stored since the start (new contacts, and mail that joined a contact).
    pub fetched: u64,
    /// Mails quarantined since the start (too large, unparsable, automated without a contact, over the sender
    /// limit) and moved to the quarantine folder.
    pub quarantined: u64,
    /// Logins since the start (a session is renewed before its token expires).
    pub connects: u64,
    /// Failed attempts since the start.
    pub failures: u64,
    /// Failed attempts since the start by error class (`token`, `auth`, `connect`, …; see [`MailboxError`]).
    pub failures_by_class: BTreeMap<String, u64>,
    /// The folder's UIDVALIDITY and the last UID stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uidvalidity: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_uid: Option<u32>,
    /// The current error (cleared by the next fetch that succeeds).
    pub error: Option<MailboxError>,
    /// When the access token of the current session expires.
    pub token_expires_at: Option<DateTime<Utc>>,
    /// The last moment the folder was known to be fully stored (a fetch pass completed, or IDLE was left), for
    /// [`MailboxStatus::lag`].
    #[serde(skip)]
    pub current_at: DateTime<Utc>,
    /// When the next attempt is due (`backing_off`).
    pub next_retry_at: Option<DateTime<Utc>>,
}

impl MailboxStatus {
    /// A mailbox that has not connected yet.
    pub fn new(
        address: &str,
        queue: &str,
        server: &str,
        auth: &str,
        login: &str,
        folder: &str,
    ) -> Self {
        Self {
            address: address.to_owned(),
            queue: queue.to_owned(),
            server: server.to_owned(),
            auth: auth.to_owned(),
            login: login.to_owned(),
            folder: folder.to_owned(),
            owner: None,
            state: MailboxState::Connecting,
            state_since: Utc::now(),
            idle_supported: None,
            last_fetch_at: None,
            fetched: 0,
            quarantined: 0,
            connects: 0,
            failures: 0,
            failures_by_class: BTreeMap::new(),
            uidvalidity: None,
            last_uid: None,
            error: None,
            token_expires_at: None,
            current_at: Utc::now(),
            next_retry_at: None,
        }
    }

    /// How far behind the folder may be at `now`: zero while IDLE (the server pushes new mail at once), else the
    /// time since the folder was last known to be fully stored. `None` when this instance does not fetch it.
    pub fn lag(&self, now: DateTime<Utc>) -> Option<chrono::Duration> {
        match self.state {
            MailboxState::Idle => Some(chrono::Duration::zero()),
            MailboxState::Standby | MailboxState::Stopped => None,
            _ => Some((now - self.current_at).max(chrono::Duration::zero())),
        }
    }

    /// Leaving IDLE for `next`: up to now the folder was current.
    fn leave_idle(&mut self, next: MailboxState) {
        if self.state == MailboxState::Idle && next != MailboxState::Idle {
            self.current_at = Utc::now();
        }
    }
}

/// The statuses of all mailbox workers. Cheap to clone; clones share the entries.
#[derive(Clone, Default)]
pub struct StatusBoard {
    entries: Arc<Mutex<Vec<Arc<Mutex<MailboxStatus>>>>>,
}

impl std::fmt::Debug for StatusBoard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusBoard")
            .field("mailboxes", &lock(&self.entries).len())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl StatusBoard {
    /// Adds a mailbox (or takes over the entry of the same address, e.g. after a restart of the supervisor) and
    /// returns the handle its worker updates it through.
    pub fn register(&self, status: MailboxStatus) -> StatusHandle {
        let mut entries = lock(&self.entries);
        if let Some(slot) = entries
            .iter()
            .find(|e| lock(e).address.eq_ignore_ascii_case(&status.address))
        {
            *lock(slot) = status;
            return StatusHandle { slot: slot.clone() };
        }
        let slot = Arc::new(Mutex::new(status));
        entries.push(slot.clone());
        StatusHandle { slot }
    }

    /// Every mailbox, by queue then address.
    pub fn snapshot(&self) -> Vec<MailboxStatus> {
        let slots: Vec<_> = lock(&self.entries).clone();
        let mut all: Vec<MailboxStatus> = slots.iter().map(|s| lock(s).clone()).collect();
        all.sort_by(|a, b| {
            (a.queue.as_str(), a.address.to_ascii_lowercase())
                .cmp(&(b.queue.as_str(), b.address.to_ascii_lowercase()))
        });
        all
    }

    /// The mailbox with this queue address.
    pub fn get(&self, address: &str) -> Option<MailboxStatus> {
        let slots: Vec<_> = lock(&self.entries).clone();
        slots
            .iter()
            .map(|s| lock(s).clone())
            .find(|s| s.address.eq_ignore_ascii_case(address))
    }

    pub fn len(&self) -> usize {
        lock(&self.entries).len()
    }

    /// Drops the entries of mailboxes for which `keep(address)` is false (no longer configured).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        lock(&self.entries).retain(|e| keep(&lock(e).address));
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A worker's write access to its own entry; every method logs what an operator should know.
#[derive(Clone)]
pub struct StatusHandle {
    slot: Arc<Mutex<MailboxStatus>>,
}

impl StatusHandle {
    /// A copy of the entry.
    pub fn get(&self) -> MailboxStatus {
        lock(&self.slot).clone()
    }

    fn with<R>(&self, f: impl FnOnce(&mut MailboxStatus) -> R) -> R {
        f(&mut lock(&self.slot))
    }

    /// Moves to `state` (connecting, fetching, idle, polling); logged at debug level.
    pub fn set_state(&self, state: MailboxState) {
        let changed = self.with(|s| {
            let changed = s.state != state;
            s.leave_idle(state);
            if changed {
                s.state = state;
                s.state_since = Utc::now();
            }
            if state != MailboxState::BackingOff {
                s.next_retry_at = None;
            }
            changed
        });
        if changed {
            tracing::debug!(state = state.as_str(), "mailbox state");
        }
    }

    /// Logged in and the folder is selected. The first login is logged at info level, later ones (a session is
    /// renewed before its token expires) at debug level.
    pub fn connected(
        &self,
        token_expires_at: DateTime<Utc>,
        idle_supported: bool,
        uidvalidity: u32,
    ) {
        let connects = self.with(|s| {
            s.connects += 1;
            s.token_expires_at = Some(token_expires_at);
            s.idle_supported = Some(idle_supported);
            s.uidvalidity = Some(uidvalidity);
            s.next_retry_at = None;
            s.connects
        });
        if connects == 1 {
            tracing::info!(
                idle = idle_supported,
                uidvalidity,
                %token_expires_at,
                "mailbox connected"
            );
        } else {
            tracing::debug!(
                idle = idle_supported,
                uidvalidity,
                %token_expires_at,
                connects,
                "mailbox session renewed"
            );
        }
    }

    /// A batch was stored and acted on: `stored` new messages, `quarantined` quarantined, up to `last_uid`.
    pub fn stored(&self, stored: u64, quarantined: u64, last_uid: u32) {
        self.with(|s| {
            s.fetched += stored;
            s.quarantined += quarantined;
            s.last_uid = Some(s.last_uid.map_or(last_uid, |l| l.max(last_uid)));
        });
    }

    /// Where the folder was read up to (after a resynchronisation, or the cursor as loaded).
    pub fn position(&self, uidvalidity: u32, last_uid: u32) {
        self.with(|s| {
            s.uidvalidity = Some(uidvalidity);
            s.last_uid = Some(last_uid);
        });
    }

    /// A fetch pass completed without error: clears the error (a recovery is logged at info level).
    pub fn fetch_completed(&self) {
        let recovered = self.with(|s| {
            s.last_fetch_at = Some(Utc::now());
            s.current_at = Utc::now();
            s.error.take()
        });
        if let Some(e) = recovered {
            tracing::info!(
                previous_error = e.class.as_str(),
                attempts = e.attempts,
                "mailbox fetching again after {} failed attempt(s)",
                e.attempts
            );
        }
    }

    /// An attempt failed; the worker waits until `next_retry_at`. Logged at warn level with class, cause and fix
    /// (the same error again keeps its `since` and counts `attempts`).
    pub fn failed(&self, mut error: MailboxError, next_retry_at: DateTime<Utc>) {
        let attempts = self.with(|s| {
            if let Some(previous) = &s.error
                && previous.class == error.class
                && previous.cause == error.cause
            {
                error.since = previous.since;
                error.attempts = previous.attempts.saturating_add(1);
            }
            s.failures += 1;
            *s.failures_by_class.entry(error.class.clone()).or_default() += 1;
            s.leave_idle(MailboxState::BackingOff);
            if s.state != MailboxState::BackingOff {
                s.state = MailboxState::BackingOff;
                s.state_since = Utc::now();
            }
            s.next_retry_at = Some(next_retry_at);
            s.error = Some(error.clone());
            error.attempts
        });
        tracing::warn!(
            class = error.class.as_str(),
            code = error.code.as_deref().unwrap_or("-"),
            cause = error.cause.as_str(),
            fix = error.fix.as_str(),
            temporary = error.temporary,
            attempts,
            %next_retry_at,
            "mailbox fetch failed: {}. Fix: {}",
            error.cause,
            error.fix
        );
    }

    /// Not fetched here: another instance holds the lease (`owner`), or none does yet. Counters stay.
    pub fn standby(&self, owner: Option<String>) {
        self.with(|s| {
            if s.state != MailboxState::Standby {
                s.state = MailboxState::Standby;
                s.state_since = Utc::now();
            }
            s.owner = owner;
            s.next_retry_at = None;
        });
    }

    /// This instance holds the lease as `owner` and starts fetching.
    pub fn leased(&self, owner: &str) {
        self.with(|s| {
            s.owner = Some(owner.to_owned());
            s.current_at = Utc::now();
            s.state = MailboxState::Connecting;
            s.state_since = Utc::now();
        });
    }

    /// The worker stopped (shutdown).
    pub fn stopped(&self) {
        self.with(|s| {
            s.state = MailboxState::Stopped;
            s.state_since = Utc::now();
            s.next_retry_at = None;
        });
        tracing::info!("mailbox worker stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(address: &str, queue: &str) -> MailboxStatus {
        MailboxStatus::new(address, queue, "m365", "oauth_service", address, "INBOX")
    }

    #[test]
    fn board_lists_by_queue_and_address_and_handles_update_their_entry() {
        let board = StatusBoard::default();
        let b = board.register(status("b@x.com", "sales"));
        let a = board.register(status("a@x.com", "support"));
        let c = board.register(status("c@x.com", "sales"));
        assert_eq!(board.len(), 3);
        let order: Vec<String> = board.snapshot().into_iter().map(|s| s.address).collect();
        assert_eq!(order, ["b@x.com", "c@x.com", "a@x.com"]);

        a.connected(Utc::now(), true, 7);
        a.set_state(MailboxState::Fetching);
        a.stored(3, 1, 42);
        a.stored(2, 0, 40);
        a.fetch_completed();
        a.set_state(MailboxState::Idle);
        let s = board.get("A@x.com").unwrap();
        assert_eq!(s.state, MailboxState::Idle);
        assert_eq!((s.fetched, s.quarantined, s.connects), (5, 1, 1));
        assert_eq!((s.uidvalidity, s.last_uid), (Some(7), Some(42)));
        assert_eq!(s.idle_supported, Some(true));
        assert!(s.last_fetch_at.is_some() && s.error.is_none());
        // The others are untouched.
        assert_eq!(board.get("b@x.com").unwrap().fetched, 0);
        drop((b, c));

        // Registering the same address again takes the entry over.
        let again = board.register(status("a@x.com", "support"));
        assert_eq!(board.len(), 3);
        assert_eq!(again.get().fetched, 0);
    }

    #[test]
    fn failures_count_attempts_and_a_successful_fetch_clears_them() {
        let board = StatusBoard::default();
        let h = board.register(status("a@x.com", "support"));
        let error = || {
            MailboxError::new(
                "token",
                Explanation::new("the client secret is wrong", "copy the Value"),
                "token request failed",
                false,
            )
            .with_code("AADSTS7000215")
        };
        let retry = Utc::now() + chrono::Duration::seconds(1);
        h.failed(error(), retry);
        let first = h.get().error.unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        h.failed(error(), retry + chrono::Duration::seconds(1));
        let s = h.get();
        assert_eq!(s.state, MailboxState::BackingOff);
        assert_eq!(s.failures, 2);
        let e = s.error.unwrap();
        assert_eq!(e.attempts, 2);
        assert_eq!(e.since, first.since, "the same error keeps its start");
        assert_eq!(e.code.as_deref(), Some("AADSTS7000215"));
        assert!(s.next_retry_at.is_some());

        // Another error starts over.
        h.failed(MailboxError::internal("boom"), retry);
        assert_eq!(h.get().error.unwrap().attempts, 1);

        h.set_state(MailboxState::Connecting);
        assert_eq!(h.get().next_retry_at, None);
        h.connected(Utc::now(), false, 1);
        assert!(h.get().error.is_some(), "kept until a fetch succeeds");
        h.fetch_completed();
        let s = h.get();
        assert!(s.error.is_none());
        assert_eq!(s.failures, 3, "failures are a running total");
        h.stopped();
        assert_eq!(h.get().state, MailboxState::Stopped);
    }

    #[test]
    fn states_serialize_in_snake_case() {
        let json = serde_json::to_value(status("a@x.com", "q")).unwrap();
        assert_eq!(json["state"], "connecting");
        assert_eq!(
            serde_json::to_value(MailboxState::BackingOff).unwrap(),
            "backing_off"
        );
        assert_eq!(MailboxState::BackingOff.as_str(), "backing_off");
        assert!(json["error"].is_null() && json.get("uidvalidity").is_none());
    }

    #[test]
    fn imap_errors_keep_their_class() {
        let e = ImapError::NoSuchFolder {
            folder: "Orders".into(),
            server_text: "Mailbox doesn't exist".into(),
        };
        let m = MailboxError::imap(&e);
        assert_eq!(m.class, "no_such_folder");
        assert!(m.cause.contains("Orders") && m.fix.contains("folder"));
        assert!(!m.temporary);
    }

    #[test]
    fn failures_count_by_class_and_lag_is_zero_while_idle() {
        let board = StatusBoard::default();
        let h = board.register(status("a@x.com", "support"));
        let retry = Utc::now();
        h.failed(MailboxError::internal("boom"), retry);
        h.failed(MailboxError::internal("boom"), retry);
        h.failed(MailboxError::config("no secret", "set it"), retry);
        let s = h.get();
        assert_eq!(s.failures_by_class.get("internal"), Some(&2));
        assert_eq!(s.failures_by_class.get("config"), Some(&1));

        let later = Utc::now() + chrono::Duration::seconds(60);
        assert!(
            s.lag(later).unwrap() >= chrono::Duration::seconds(60),
            "never fetched yet"
        );
        h.set_state(MailboxState::Fetching);
        h.fetch_completed();
        h.set_state(MailboxState::Idle);
        assert_eq!(h.get().lag(later), Some(chrono::Duration::zero()));
        // Leaving IDLE (a session renewal) starts the lag from that moment, not from the last fetch.
        h.set_state(MailboxState::Connecting);
        let lag = h.get().lag(Utc::now()).unwrap();
        assert!(lag < chrono::Duration::seconds(5), "lag {lag}");
        h.standby(None);
        assert_eq!(h.get().lag(later), None);
    }
}
