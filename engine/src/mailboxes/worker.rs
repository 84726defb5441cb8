//! One mailbox worker: a task per queue address that logs into its mailbox and brings every new mail into the
//! queue, exactly once.
//!
//! **A session** gets a token from the shared cache, connects, logs in with XOAUTH2 (a refused token is dropped
//! from the cache and the login retried once with a new one), selects the folder, and then loops: fetch what is new,
//! wait (IDLE when the server offers it, re-issued before its timeout and at least every `poll_interval` as a safety
//! poll; else a plain poll every `poll_interval`), fetch again. A session ends before its token reaches the cache's
//! refresh point and a new one starts with a fresh token, so no command ever runs on an expired token (Exchange ends
//! sessions whose token expired). Failures end the session; the worker waits with exponential backoff and jitter
//! (1 s → 5 min) and starts another. Shutdown cancels IDLE and the waits; a batch being stored finishes first.
//!
//! **A fetch** reads the folder's `(UIDVALIDITY, last UID)` cursor and asks for the sizes of the newer UIDs, then
//! works in batches (at most 256 mails and 2 MiB, taken from the process's byte budget before the download and
//! given back once stored, see [`super::budget`]): mail over `defaults.max_email_size_mb` is never downloaded —
//! it is quarantined from its headers with a reason naming its size; the rest is downloaded whole. The batch is
//! stored with [`Engine::ingest_batch`] together with the cursor at the batch's last UID, in one transaction, and
//! only then acted on at the server: quarantined mail is moved to `ingest.quarantine_folder` (created if missing),
//! the rest marked `\Seen`, moved or deleted as the address's `after_fetch` says. The next batch is downloaded
//! while one is stored (two batches in flight per worker at most; the session runs one command at a time), so the
//! download and the transaction overlap; a batch that fails to store is not acted on and the next one is dropped.
//! The source key of a mail is `imap:<address>:<uidvalidity>:<uid>`: a batch stored again (a crash between the
//! commit and the server actions) changes nothing.
//!
//! **Finishing interrupted batches.** When a worker starts, and after a failed session, mail at or below the
//! cursor that the server still shows as not acted on (unseen for `seen`, still in the folder for `move` and
//! `delete`) and whose source key is stored, gets its server action now.
//!
//! **UIDVALIDITY.** When the folder has no cursor yet, or its UIDVALIDITY changed (the folder was rebuilt and its
//! UIDs start over), the worker resynchronises: it considers only unseen mail when `after_fetch` is `seen` (the rest
//! was processed), and all mail in the folder otherwise; it skips (but acts on) mail whose Message-ID is already
//! stored as inbound from this address; and it stores the new cursor with the last batch.

use std::{
    collections::HashSet,
    sync::{Arc, OnceLock},
    time::Duration,
};

use chrono::Utc;
use mailqueue_config::{AfterFetch, AuthType, Config, IncomingServer};
use mailqueue_connectors::{
    explain::{self, ImapLogin},
    imap::{self, FetchedHeader, FetchedMail, IdleOutcome, ImapError, ImapTls, MailboxSession},
    oauth::{AccessToken, Attempt, OAuthConfigError, TokenCache, TokenRequest, WithTokenError},
};
use serde_json::json;
use tokio::time::Instant;
use tokio_util::{sync::CancellationToken, task::AbortOnDropHandle};
use tracing::Instrument as _;

use super::{
    budget::{ByteBudget, Taken},
    leases::LeaseGuard,
    status::{MailboxError, MailboxState, StatusHandle},
};
use crate::{
    engine::Engine,
    ingest::{Cursor, Incoming, Outcome, parse_mail},
    store::{self, events::NewEvent, quarantine::NewQuarantine},
};

/// IDLE is re-issued at least this often (servers drop idle connections after about 30 minutes; RFC 2177).
pub const IDLE_LIMIT: Duration = Duration::from_secs(25 * 60);
/// At most this many mails per batch: a power of two, so that a batch of new mail is one multi-row insert per
/// table (`store::pow2_chunks` splits other counts into several statements).
pub const BATCH_MAILS: usize = 256;
/// At most this many bytes of mail per batch (a single larger mail still makes a batch of its own): room for a
/// full batch of ordinary mail (256 × 6 KB), within the process's [`budget`](super::budget).
pub const BATCH_BYTES: u64 = 2 * 1024 * 1024;
/// First wait after a failure; doubled per failure in a row.
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest wait after failures.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// A session lasts at least this long, even with a token close to its refresh point.
const MIN_SESSION: Duration = Duration::from_secs(1);
/// Reconciled UIDs are looked up this many at a time.
const RECONCILE_CHUNK: usize = 1000;
/// The environment variable that arms failpoints (tests): `after_ingest_commit` aborts the process right after
/// the first commit of fetched mail, before anything is done at the server.
pub const FAILPOINT_ENV: &str = "MAILQUEUE_FAILPOINT";

/// Exponential backoff with jitter: 1 s, 2 s, 4 s … up to 5 min, each ±20 %, never outside [min, max].
#[derive(Debug, Clone)]
pub struct Backoff {
    failures: u32,
    min: Duration,
    max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(BACKOFF_MIN, BACKOFF_MAX)
    }
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            failures: 0,
            min,
            max: max.max(min),
        }
    }

    /// The nominal wait after `failures` failures in a row, before jitter.
    pub fn nominal(&self, failures: u32) -> Duration {
        let factor = 2f64.powi(failures.saturating_sub(1).min(30) as i32);
        self.min.mul_f64(factor).min(self.max)
    }

    /// Counts a failure and returns how long to wait.
    pub fn next_delay(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let nominal = self.nominal(self.failures);
        nominal
            .mul_f64(rand::random_range(0.8..=1.2))
            .clamp(self.min, self.max)
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// After a success: the next failure waits `min` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// What every worker takes from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Safety poll with IDLE; the poll interval without it.
    pub poll_interval: Duration,
    /// IDLE is re-issued at least this often.
    pub idle_limit: Duration,
    /// Mail larger than this is not downloaded.
    pub max_bytes: u64,
    pub max_email_size_mb: u32,
    pub quarantine_folder: String,
    pub batch_mails: usize,
    pub batch_bytes: u64,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Settings {
    pub fn from_config(config: &Config) -> Self {
        let mb = config.defaults.max_email_size_mb;
        Self {
            poll_interval: config.defaults.poll_interval.0,
            idle_limit: IDLE_LIMIT,
            max_bytes: u64::from(mb) * 1024 * 1024,
            max_email_size_mb: mb,
            quarantine_folder: config.ingest.quarantine_folder.trim().to_owned(),
            batch_mails: BATCH_MAILS,
            batch_bytes: BATCH_BYTES,
            backoff_min: BACKOFF_MIN,
            backoff_max: BACKOFF_MAX,
        }
    }

    /// How long one IDLE may last: under the server's limit, no longer than the safety poll, and ending before the
    /// session must be renewed.
    pub fn idle_wait(&self, until_renewal: Duration) -> Duration {
        self.idle_limit
            .min(self.poll_interval)
            .min(until_renewal)
            .max(Duration::from_millis(100))
    }
}

/// An incoming server as the workers use it.
pub struct Server {
    pub config: IncomingServer,
    /// Built once; rebuilt on each attempt while it fails (e.g. a CA file that is not there yet).
    tls: Result<ImapTls, ImapError>,
}

impl Server {
    pub fn new(config: IncomingServer) -> Self {
        let tls = ImapTls::new(config.ca_file.as_deref());
        Self { config, tls }
    }

    fn tls(&self) -> Result<ImapTls, ImapError> {
        match &self.tls {
            Ok(tls) => Ok(tls.clone()),
            Err(_) => ImapTls::new(self.config.ca_file.as_deref()),
        }
    }

    pub fn auth_name(&self) -> &'static str {
        match self.config.auth {
            AuthType::OauthService => "oauth_service",
            AuthType::OauthUser => "oauth_user",
        }
    }
}

/// One queue address to fetch.
pub struct Mailbox {
    /// The queue address: names the cursor, the source keys and the route.
    pub address: String,
    pub queue: String,
    /// The IMAP login.
    pub login: String,
    pub folder: String,
    pub after_fetch: AfterFetch,
    pub server: Arc<Server>,
    pub request: Result<TokenRequest, OAuthConfigError>,
}

/// The source key of a mail fetched over IMAP.
pub fn source_key(address: &str, uidvalidity: u32, uid: u32) -> String {
    format!("imap:{address}:{uidvalidity}:{uid}")
}

/// Splits `(uid, size)` pairs (sorted by UID) into batches of at most `max_mails` mails and `max_bytes` bytes
/// (a mail larger than `max_bytes` alone, or one that is not downloaded at all, counts as `counted(size)`).
pub fn batches(
    sizes: &[(u32, u32)],
    max_mails: usize,
    max_bytes: u64,
    counted: impl Fn(u32) -> u64,
) -> Vec<&[(u32, u32)]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (i, &(_, size)) in sizes.iter().enumerate() {
        let size = counted(size);
        let len = i - start;
        if len > 0 && (len >= max_mails.max(1) || bytes + size > max_bytes) {
            out.push(&sizes[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < sizes.len() {
        out.push(&sizes[start..]);
    }
    out
}

/// Whether the failpoint `name` is armed in `value` (comma-separated names).
pub fn failpoint_armed(value: Option<&str>, name: &str) -> bool {
    value.is_some_and(|v| v.split(',').any(|p| p.trim() == name))
}

/// `MAILQUEUE_FAILPOINT=after_ingest_commit`: abort right after the first commit of fetched mail.
fn failpoint_after_ingest_commit() {
    static ARMED: OnceLock<bool> = OnceLock::new();
    let armed = *ARMED.get_or_init(|| {
        failpoint_armed(
            std::env::var(FAILPOINT_ENV).ok().as_deref(),
            "after_ingest_commit",
        )
    });
    if armed {
        tracing::error!("failpoint after_ingest_commit: aborting right after the commit");
        std::process::abort();
    }
}

/// The Message-ID of a mail or header block, as ingest stores it (without angle brackets).
fn message_id_of(raw: &[u8]) -> Option<String> {
    parse_mail(raw).ok()?.message_id
}

/// How a session ended without error.
enum End {
    Stopped,
    /// The token reaches its refresh point: log in again with a new one.
    Renew,
}

/// What a session knows about its folder.
struct Live {
    uidvalidity: u32,
    /// The stored cursor as `(uidvalidity, last_uid)`, kept up to date after each batch.
    cursor: Option<(u32, u32)>,
    /// Folders known to exist (quarantine, move target).
    folders: HashSet<String>,
}

/// A batch downloaded and not yet stored. Its bytes count against the process's budget until it is dropped.
struct Downloaded {
    uidvalidity: u32,
    /// How many mails the batch has, and the last UID (for the status).
    mails: usize,
    last_uid: Option<u32>,
    /// `(uid, size)` of the mail over the size limit: only its headers are downloaded.
    big: Vec<(u32, u32)>,
    bodies: Vec<FetchedMail>,
    headers: Vec<FetchedHeader>,
    _in_flight: Taken,
}

/// A stored batch: what is left to do at the server, and the figures to report.
struct Stored {
    mails: usize,
    last_uid: Option<u32>,
    stored: u64,
    quarantined: u64,
    /// Mail to act on as `after_fetch` says.
    done: Vec<u32>,
    /// Mail to move to the quarantine folder.
    to_quarantine: Vec<u32>,
}

/// One mailbox's worker. Cheap to clone (the supervisor restarts a worker from a clone).
#[derive(Clone)]
pub struct Worker {
    pub engine: Engine,
    pub mailbox: Arc<Mailbox>,
    pub tokens: TokenCache,
    pub settings: Arc<Settings>,
    pub status: StatusHandle,
    /// This worker's own stop token (shutdown, the mailbox removed from the configuration, its lease lost).
    pub stop: CancellationToken,
    /// The mailbox's lease: checked before each batch is stored.
    pub lease: LeaseGuard,
}

impl Worker {
    /// Runs until `stop` is cancelled.
    pub async fn run(self) {
        let span = tracing::info_span!(
            "mailbox",
            address = %self.mailbox.address,
            queue = %self.mailbox.queue,
            server = %self.mailbox.server.config.name,
        );
        self.run_inner().instrument(span).await
    }

    async fn run_inner(self) {
        let mut backoff = Backoff::new(self.settings.backoff_min, self.settings.backoff_max);
        let mut reconcile = true;
        while !self.stop.is_cancelled() {
            self.status.set_state(MailboxState::Connecting);
            match self.session(&mut backoff, &mut reconcile).await {
                Ok(End::Stopped) => break,
                Ok(End::Renew) => {
                    tracing::debug!("renewing the session before its token expires");
                }
                Err(error) => {
                    reconcile = true;
                    let delay = backoff.next_delay();
                    let next = Utc::now()
                        + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::zero());
                    self.status.failed(error, next);
                    tokio::select! {
                        biased;
                        _ = self.stop.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        self.status.stopped();
    }

    /// Logs in with a token from the cache; a refused token is dropped and the login retried once.
    async fn login(&self) -> Result<(MailboxSession, AccessToken), MailboxError> {
        let mailbox = &*self.mailbox;
        let request = mailbox.request.as_ref().map_err(|e| {
            MailboxError::config(
                e.to_string(),
                "complete the incoming server's (or the address's) OAuth settings in the configuration",
            )
        })?;
        let tls = mailbox.server.tls().map_err(|e| MailboxError::imap(&e))?;
        let endpoint = &mailbox.server.config.imap;
        let login = mailbox.login.as_str();
        let tls = &tls;
        let result = self
            .tokens
            .with_token(request, |token: AccessToken| async move {
                let client = imap::connect(endpoint, tls)
                    .await
                    .map_err(Attempt::Failed)?;
                match imap::authenticate_xoauth2(client, login, token.secret()).await {
                    Ok(session) => Ok((session, token)),
                    Err(e @ ImapError::AuthFailed { .. }) if !e.is_temporary() => {
                        Err(Attempt::Rejected(e))
                    }
                    Err(e) => Err(Attempt::Failed(e)),
                }
            })
            .await;
        result.map_err(|e| match e {
            WithTokenError::Token(e) => MailboxError::token(&e),
            WithTokenError::Rejected(e) => {
                let who = match mailbox.server.config.auth {
                    AuthType::OauthService => ImapLogin::App {
                        client_id: &mailbox.server.config.client_id,
                    },
                    AuthType::OauthUser => ImapLogin::User,
                };
                MailboxError::auth(&e, explain::imap_auth_refused(who, login))
            }
            WithTokenError::Failed(e @ ImapError::AuthFailed { .. }) => {
                MailboxError::auth(&e, explain::imap_auth_unavailable(&endpoint.host))
            }
            WithTokenError::Failed(e) => MailboxError::imap(&e),
        })
    }

    async fn session(
        &self,
        backoff: &mut Backoff,
        reconcile: &mut bool,
    ) -> Result<End, MailboxError> {
        let login = tokio::select! {
            biased;
            _ = self.stop.cancelled() => return Ok(End::Stopped),
            login = self.login() => login?,
        };
        let (mut imap, token) = login;
        let folder = match imap.select(&self.mailbox.folder).await {
            Ok(folder) => folder,
            Err(e) => {
                let _ = imap.logout().await;
                return Err(MailboxError::imap(&e));
            }
        };
        let renew_at = renewal_deadline(&token);
        self.status.connected(
            token.expires_at(),
            imap.supports_idle(),
            folder.uid_validity,
        );
        let cursor = self
            .engine
            .cursor(&self.mailbox.address, &self.mailbox.folder)
            .await
            .map_err(|e| MailboxError::store(&e))?;
        let mut live = Live {
            uidvalidity: folder.uid_validity,
            cursor: cursor.map(|c| (c.uidvalidity as u32, c.last_uid as u32)),
            folders: HashSet::new(),
        };
        if let Some((uv, last)) = live.cursor {
            self.status.position(uv, last);
        }
        if *reconcile {
            self.reconcile(&mut imap, &mut live).await?;
            *reconcile = false;
        }
        loop {
            self.status.set_state(MailboxState::Fetching);
            if !self.fetch(&mut imap, &mut live).await? {
                let _ = imap.logout().await;
                return Ok(End::Stopped);
            }
            backoff.reset();
            self.status.fetch_completed();
            ByteBudget::shared().release_memory_if_idle();
            if self.stop.is_cancelled() {
                let _ = imap.logout().await;
                return Ok(End::Stopped);
            }
            let until_renewal = renew_at.saturating_duration_since(Instant::now());
            if until_renewal.is_zero() {
                let _ = imap.logout().await;
                return Ok(End::Renew);
            }
            if imap.supports_idle() {
                self.status.set_state(MailboxState::Idle);
                let wait = self.settings.idle_wait(until_renewal);
                let (session, outcome) = imap
                    .idle(wait, &self.stop)
                    .await
                    .map_err(|e| MailboxError::imap(&e))?;
                imap = session;
                if outcome == IdleOutcome::Cancelled {
                    let _ = imap.logout().await;
                    return Ok(End::Stopped);
                }
            } else {
                self.status.set_state(MailboxState::Polling);
                let wait = self.settings.poll_interval.min(until_renewal);
                tokio::select! {
                    biased;
                    _ = self.stop.cancelled() => {
                        let _ = imap.logout().await;
                        return Ok(End::Stopped);
                    }
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }

    /// Fetches and stores everything new. `false` when it stopped early for shutdown (between batches).
    async fn fetch(
        &self,
        imap: &mut MailboxSession,
        live: &mut Live,
    ) -> Result<bool, MailboxError> {
        let uv = live.uidvalidity;
        let last = match live.cursor {
            Some((cursor_uv, last)) if cursor_uv == uv => last,
            previous => return self.resync(imap, live, previous).await,
        };
        let new = imap
            .fetch_sizes(last)
            .await
            .map_err(|e| MailboxError::imap(&e))?;
        let max = self.settings.max_bytes;
        // One batch is stored (in a task of its own, so that parsing runs beside the download) while the next is
        // downloaded: the session runs one command at a time, and acts on a batch only once it is stored.
        let mut pending: Option<(Downloaded, Cursor)> = None;
        for batch in batches(
            &new,
            self.settings.batch_mails,
            self.settings.batch_bytes,
            |size| oversize_weight(size, max),
        ) {
            let cursor = self.cursor(uv, batch.last().map_or(last, |b| b.0));
            let downloaded = match pending.take() {
                None => self.download(imap, uv, batch).await?,
                Some((previous, previous_cursor)) => {
                    let storing = self.spawn_store(previous, previous_cursor.clone());
                    let (stored, next) = tokio::join!(storing, self.download(imap, uv, batch));
                    // A failed store acts on nothing and drops the next batch (the cursor did not move).
                    let stored = stored?;
                    let next = next?;
                    self.finish(imap, live, stored).await?;
                    live.cursor = Some((uv, previous_cursor.last_uid as u32));
                    if self.stop.is_cancelled() {
                        return Ok(false);
                    }
                    next
                }
            };
            pending = Some((downloaded, cursor));
        }
        if let Some((downloaded, cursor)) = pending {
            let last_uid = cursor.last_uid as u32;
            let stored = self.store(downloaded, Some(cursor), false).await?;
            self.finish(imap, live, stored).await?;
            live.cursor = Some((uv, last_uid));
        }
        Ok(true)
    }

    /// Stores a batch in a task of its own (aborted, rolling back, if the worker is dropped meanwhile).
    async fn spawn_store(
        &self,
        downloaded: Downloaded,
        cursor: Cursor,
    ) -> Result<Stored, MailboxError> {
        let worker = self.clone();
        let task = AbortOnDropHandle::new(tokio::spawn(
            async move { worker.store(downloaded, Some(cursor), false).await }
                .instrument(tracing::Span::current()),
        ));
        task.await.map_err(|e| {
            MailboxError::store(&anyhow::anyhow!("storing the batch failed: {e}").into())
        })?
    }

    fn cursor(&self, uidvalidity: u32, last_uid: u32) -> Cursor {
        Cursor {
            mailbox: self.mailbox.address.clone(),
            folder: self.mailbox.folder.clone(),
            uidvalidity: i64::from(uidvalidity),
            last_uid: i64::from(last_uid),
        }
    }

    /// First fetch of the folder, or its UIDVALIDITY changed: see the module doc.
    async fn resync(
        &self,
        imap: &mut MailboxSession,
        live: &mut Live,
        previous: Option<(u32, u32)>,
    ) -> Result<bool, MailboxError> {
        let uv = live.uidvalidity;
        let all = imap
            .fetch_sizes(0)
            .await
            .map_err(|e| MailboxError::imap(&e))?;
        let max_uid = all.last().map_or(0, |a| a.0);
        let candidates: Vec<(u32, u32)> = if self.mailbox.after_fetch == AfterFetch::Seen {
            let unseen: HashSet<u32> = imap
                .uid_search("UNSEEN")
                .await
                .map_err(|e| MailboxError::imap(&e))?
                .into_iter()
                .collect();
            all.into_iter()
                .filter(|(uid, _)| unseen.contains(uid))
                .collect()
        } else {
            all
        };
        match previous {
            Some((old, _)) => tracing::warn!(
                old_uidvalidity = old,
                uidvalidity = uv,
                candidates = candidates.len(),
                "the folder's UIDVALIDITY changed (it was rebuilt); resynchronising without storing anything twice"
            ),
            None => tracing::info!(
                uidvalidity = uv,
                candidates = candidates.len(),
                "first fetch of this folder"
            ),
        }
        let max = self.settings.max_bytes;
        let batches = batches(
            &candidates,
            self.settings.batch_mails,
            self.settings.batch_bytes,
            |size| oversize_weight(size, max),
        );
        let final_cursor = self.cursor(uv, max_uid);
        if batches.is_empty() {
            if !self.lease.is_held() {
                return Err(lease_lost());
            }
            self.engine
                .ingest_batch(Vec::new(), Some(final_cursor.clone()))
                .await
                .map_err(|e| MailboxError::store(&e))?;
        }
        let n = batches.len();
        for (i, batch) in batches.into_iter().enumerate() {
            // The new cursor is stored with the last batch only: stopped earlier, the next start resynchronises
            // again (and finds the stored mail by its source key or Message-ID).
            let cursor = (i + 1 == n).then(|| final_cursor.clone());
            self.batch(imap, live, batch, cursor, true).await?;
            if i + 1 < n && self.stop.is_cancelled() {
                return Ok(false);
            }
        }
        live.cursor = Some((uv, max_uid));
        self.status.position(uv, max_uid);
        Ok(true)
    }

    /// Downloads, stores and then acts on one batch, one step after the other (resynchronisation).
    async fn batch(
        &self,
        imap: &mut MailboxSession,
        live: &mut Live,
        batch: &[(u32, u32)],
        cursor: Option<Cursor>,
        resync: bool,
    ) -> Result<(), MailboxError> {
        let downloaded = self.download(imap, live.uidvalidity, batch).await?;
        let stored = self.store(downloaded, cursor, resync).await?;
        self.finish(imap, live, stored).await
    }

    /// Takes the batch's bytes from the process's budget, then downloads its mail (only the headers of mail over
    /// the size limit).
    async fn download(
        &self,
        imap: &mut MailboxSession,
        uidvalidity: u32,
        batch: &[(u32, u32)],
    ) -> Result<Downloaded, MailboxError> {
        let max = self.settings.max_bytes;
        let (big, small): (Vec<_>, Vec<_>) = batch
            .iter()
            .copied()
            .partition(|(_, size)| u64::from(*size) > max);
        let small_uids: Vec<u32> = small.iter().map(|s| s.0).collect();
        let big_uids: Vec<u32> = big.iter().map(|b| b.0).collect();
        // Downloaded mail counts against the process's budget until this batch is stored.
        let bytes: u64 = small.iter().map(|(_, size)| u64::from(*size)).sum();
        let in_flight = ByteBudget::shared().take(bytes).await;
        let bodies = if small_uids.is_empty() {
            Vec::new()
        } else {
            imap.fetch_bodies(&small_uids)
                .await
                .map_err(|e| MailboxError::imap(&e))?
        };
        let headers = if big_uids.is_empty() {
            Vec::new()
        } else {
            imap.fetch_headers(&big_uids)
                .await
                .map_err(|e| MailboxError::imap(&e))?
        };
        Ok(Downloaded {
            uidvalidity,
            mails: batch.len(),
            last_uid: batch.last().map(|b| b.0),
            big,
            bodies,
            headers,
            _in_flight: in_flight,
        })
    }

    /// Stores a downloaded batch (with `cursor`, in one transaction) and gives its bytes back to the budget.
    /// Touches only the database: what is left to do at the server is in the returned [`Stored`].
    async fn store(
        &self,
        downloaded: Downloaded,
        cursor: Option<Cursor>,
        resync: bool,
    ) -> Result<Stored, MailboxError> {
        let mailbox = &*self.mailbox;
        let uv = downloaded.uidvalidity;
        let (bodies, headers, big) = (&downloaded.bodies, &downloaded.headers, &downloaded.big);

        // Mail to act on as `after_fetch` says, and mail to move to the quarantine folder.
        let mut done: Vec<u32> = Vec::new();
        let mut to_quarantine: Vec<u32> = Vec::new();
        let mut skip: HashSet<u32> = HashSet::new();
        if resync {
            skip = self.stored_by_message_id(bodies, headers).await?;
            done.extend(skip.iter().copied());
        }

        let oversize: Vec<(&FetchedHeader, u32)> = headers
            .iter()
            .filter(|h| !skip.contains(&h.uid))
            .map(|h| {
                let size = big
                    .iter()
                    .find(|b| b.0 == h.uid)
                    .map_or(h.size.unwrap_or(0), |b| b.1);
                (h, size)
            })
            .collect();
        let mut quarantined = 0;
        if !oversize.is_empty() {
            quarantined += self.quarantine_oversize(uv, &oversize).await?;
            to_quarantine.extend(oversize.iter().map(|(h, _)| h.uid));
        }

        let keep: Vec<&FetchedMail> = bodies.iter().filter(|m| !skip.contains(&m.uid)).collect();
        let mails: Vec<Incoming<'_>> = keep
            .iter()
            .map(|m| Incoming {
                raw: &m.raw,
                address: &mailbox.address,
                source_key: Some(source_key(&mailbox.address, uv, m.uid)),
            })
            .collect();
        let outcomes = if mails.is_empty() && cursor.is_none() {
            Vec::new()
        } else {
            if !self.lease.is_held() {
                return Err(lease_lost());
            }
            self.engine
                .ingest_batch(mails, cursor)
                .await
                .map_err(|e| MailboxError::store(&e))?
        };
        if !keep.is_empty() || !oversize.is_empty() {
            failpoint_after_ingest_commit();
        }
        let mut stored = 0;
        for (mail, outcome) in keep.iter().zip(&outcomes) {
            match outcome {
                Outcome::Quarantined { .. } => {
                    quarantined += 1;
                    to_quarantine.push(mail.uid);
                }
                // Stored before: a batch stored again after an interruption. Finish what it did not.
                Outcome::Duplicate => {
                    let key = source_key(&mailbox.address, uv, mail.uid);
                    let in_quarantine = store::quarantine::source_key_exists(&self.engine.db, &key)
                        .await
                        .map_err(|e| MailboxError::store(&e.into()))?;
                    if in_quarantine {
                        to_quarantine.push(mail.uid);
                    } else {
                        done.push(mail.uid);
                    }
                }
                _ => {
                    stored += 1;
                    done.push(mail.uid);
                }
            }
        }
        Ok(Stored {
            mails: downloaded.mails,
            last_uid: downloaded.last_uid,
            stored,
            quarantined,
            done,
            to_quarantine,
        })
    }

    /// Acts on a stored batch at the server, and reports it.
    async fn finish(
        &self,
        imap: &mut MailboxSession,
        live: &mut Live,
        mut batch: Stored,
    ) -> Result<(), MailboxError> {
        self.act(imap, live, &mut batch.done, &mut batch.to_quarantine)
            .await?;
        let Stored {
            mails,
            stored,
            quarantined,
            ..
        } = batch;
        if let Some(last_uid) = batch.last_uid {
            self.status.stored(stored, quarantined, last_uid);
        }
        if stored + quarantined > 0 {
            tracing::info!(
                mails,
                stored,
                quarantined,
                "fetched {stored} new mail(s), quarantined {quarantined}"
            );
        } else {
            tracing::debug!(mails, "batch already stored; acted on");
        }
        Ok(())
    }

    /// Mail of this batch whose Message-ID is already stored as inbound from this address (resynchronisation).
    async fn stored_by_message_id(
        &self,
        bodies: &[FetchedMail],
        headers: &[FetchedHeader],
    ) -> Result<HashSet<u32>, MailboxError> {
        let ids: Vec<(u32, String)> = bodies
            .iter()
            .map(|m| (m.uid, &m.raw[..]))
            .chain(headers.iter().map(|h| (h.uid, &h.header[..])))
            .filter_map(|(uid, raw)| message_id_of(raw).map(|id| (uid, id)))
            .collect();
        if ids.is_empty() {
            return Ok(HashSet::new());
        }
        let mut wanted: Vec<String> = ids.iter().map(|(_, id)| id.clone()).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let known = store::messages::inbound_message_ids_from(
            &self.engine.db,
            &self.mailbox.address,
            &wanted,
        )
        .await
        .map_err(|e| MailboxError::store(&e.into()))?;
        let skip: HashSet<u32> = ids
            .into_iter()
            .filter(|(_, id)| known.contains(id))
            .map(|(uid, _)| uid)
            .collect();
        if !skip.is_empty() {
            tracing::info!(
                count = skip.len(),
                "mail already stored under the folder's previous UIDVALIDITY (same Message-ID); not stored again"
            );
        }
        Ok(skip)
    }

    /// Quarantines mail that is too large from its headers (never downloaded), in a transaction of its own (the
    /// source key makes it idempotent). Returns how many were new.
    async fn quarantine_oversize(
        &self,
        uidvalidity: u32,
        oversize: &[(&FetchedHeader, u32)],
    ) -> Result<u64, MailboxError> {
        let address = &self.mailbox.address;
        let route = self.engine.route(address).await.ok_or_else(|| {
            MailboxError::config(
                format!("`{address}` is not a configured queue address"),
                "restart after changing the configuration",
            )
        })?;
        let limit = self.settings.max_email_size_mb;
        let store_err = |e: sea_orm::DbErr| MailboxError::store(&e.into());
        if !self.lease.is_held() {
            return Err(lease_lost());
        }
        let txn = store::begin_write(&self.engine.db)
            .await
            .map_err(store_err)?;
        let mut data = Vec::new();
        for (header, size) in oversize {
            let reason = format!(
                "too large: {size} bytes, limit {limit} MB; not downloaded, only its headers are kept"
            );
            let row = NewQuarantine {
                source_key: Some(source_key(address, uidvalidity, header.uid)),
                mailbox: Some(route.address.clone()),
                queue: Some(route.queue.clone()),
                reason: reason.clone(),
                raw: header.header.clone(),
            };
            if let Some(id) = store::quarantine::insert_new(&txn, row)
                .await
                .map_err(store_err)?
            {
                tracing::warn!(quarantine_id = id, size, %reason, "mail quarantined");
                data.push(json!({
                    "quarantine_id": id,
                    "reason": reason,
                    "address": route.address,
                    "queue": route.queue,
                    "size": size,
                    "headers_only": true,
                }));
            }
        }
        let events: Vec<NewEvent<'_>> = data
            .iter()
            .map(|d| NewEvent {
                kind: "message.quarantined",
                contact_id: None,
                queue: Some(&route.queue),
                actor: Some("ingest"),
                data: d.clone(),
            })
            .collect();
        store::events::insert_many(&txn, &events)
            .await
            .map_err(store_err)?;
        txn.commit().await.map_err(store_err)?;
        if !events.is_empty() {
            self.engine.events_appended();
        }
        Ok(events.len() as u64)
    }

    /// The server side, once the mail is stored: quarantined mail to the quarantine folder, the rest as
    /// `after_fetch` says.
    async fn act(
        &self,
        imap: &mut MailboxSession,
        live: &mut Live,
        done: &mut Vec<u32>,
        to_quarantine: &mut Vec<u32>,
    ) -> Result<(), MailboxError> {
        let imap_err = |e: ImapError| MailboxError::imap(&e);
        if !to_quarantine.is_empty() {
            to_quarantine.sort_unstable();
            to_quarantine.dedup();
            let folder = &self.settings.quarantine_folder;
            self.ensure_folder(imap, live, folder).await?;
            imap.move_to(to_quarantine, folder)
                .await
                .map_err(imap_err)?;
        }
        if !done.is_empty() {
            done.sort_unstable();
            done.dedup();
            match &self.mailbox.after_fetch {
                AfterFetch::Seen => imap.mark_seen(done).await.map_err(imap_err)?,
                AfterFetch::Delete => imap.delete(done).await.map_err(imap_err)?,
                AfterFetch::Move(folder) => {
                    self.ensure_folder(imap, live, folder).await?;
                    imap.move_to(done, folder).await.map_err(imap_err)?;
                }
            }
        }
        Ok(())
    }

    async fn ensure_folder(
        &self,
        imap: &mut MailboxSession,
        live: &mut Live,
        folder: &str,
    ) -> Result<(), MailboxError> {
        if live.folders.contains(folder) {
            return Ok(());
        }
        if imap
            .create_folder_if_missing(folder)
            .await
            .map_err(|e| MailboxError::imap(&e))?
        {
            tracing::info!(folder, "created the folder");
        }
        live.folders.insert(folder.to_owned());
        Ok(())
    }

    /// Finishes batches interrupted between their commit and the server actions: mail at or below the cursor that
    /// the server still shows as not acted on, and whose source key is stored.
    async fn reconcile(
        &self,
        imap: &mut MailboxSession,
        live: &mut Live,
    ) -> Result<(), MailboxError> {
        let uv = live.uidvalidity;
        let last = match live.cursor {
            Some((cursor_uv, last)) if cursor_uv == uv && last > 0 => last,
            _ => return Ok(()),
        };
        let criteria = match self.mailbox.after_fetch {
            AfterFetch::Seen => format!("UNSEEN UID 1:{last}"),
            AfterFetch::Delete | AfterFetch::Move(_) => format!("UID 1:{last}"),
        };
        let pending: Vec<u32> = imap
            .uid_search(&criteria)
            .await
            .map_err(|e| MailboxError::imap(&e))?
            .into_iter()
            .filter(|&uid| uid <= last)
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        let address = &self.mailbox.address;
        let store_err = |e: sea_orm::DbErr| MailboxError::store(&e.into());
        let (mut done, mut to_quarantine) = (Vec::new(), Vec::new());
        for chunk in pending.chunks(RECONCILE_CHUNK) {
            let keys: Vec<String> = chunk.iter().map(|&u| source_key(address, uv, u)).collect();
            let known = store::messages::known_source_keys(&self.engine.db, &keys)
                .await
                .map_err(store_err)?;
            for (&uid, key) in chunk.iter().zip(&keys) {
                if !known.contains(key) {
                    continue;
                }
                if store::quarantine::source_key_exists(&self.engine.db, key)
                    .await
                    .map_err(store_err)?
                {
                    to_quarantine.push(uid);
                } else {
                    done.push(uid);
                }
            }
        }
        if done.is_empty() && to_quarantine.is_empty() {
            return Ok(());
        }
        tracing::info!(
            after_fetch = done.len(),
            quarantine = to_quarantine.len(),
            "finishing the server actions of stored mail (an earlier run stopped between storing and acting)"
        );
        self.act(imap, live, &mut done, &mut to_quarantine).await
    }
}

/// This instance no longer holds the mailbox's lease: nothing more is stored (another instance may fetch the mailbox
/// now; what the batch fetched stays on the server for it). See `leases` for the remaining window.
fn lease_lost() -> MailboxError {
    MailboxError::new(
        "lease",
        mailqueue_connectors::explain::Explanation::new(
            "this instance no longer holds the mailbox's lease; the batch was not stored",
            "nothing to do: the instance that holds the lease fetches the mailbox (check the database connection \
             if this repeats)",
        ),
        "mailbox lease lost",
        true,
    )
}

/// Mail that is not downloaded weighs only its headers in a batch.
fn oversize_weight(size: u32, max_bytes: u64) -> u64 {
    let size = u64::from(size);
    if size > max_bytes { 64 * 1024 } else { size }
}

/// When a session must end so that the next one logs in with a new token: the token's refresh point (the cache
/// hands out a new token from then on), at least [`MIN_SESSION`] from now.
fn renewal_deadline(token: &AccessToken) -> Instant {
    let until = (token.renews_at() - Utc::now())
        .to_std()
        .unwrap_or(Duration::ZERO);
    Instant::now() + until.max(MIN_SESSION)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_to_five_minutes_with_jitter() {
        let b = Backoff::default();
        assert_eq!(b.nominal(1), Duration::from_secs(1));
        assert_eq!(b.nominal(2), Duration::from_secs(2));
        assert_eq!(b.nominal(5), Duration::from_secs(16));
        assert_eq!(b.nominal(9), Duration::from_secs(256));
        assert_eq!(b.nominal(10), Duration::from_secs(300));
        assert_eq!(b.nominal(1000), Duration::from_secs(300));

        let mut b = Backoff::default();
        let mut seen = HashSet::new();
        for n in 1..=20u32 {
            let d = b.next_delay();
            let nominal = b.nominal(n);
            assert!(d >= BACKOFF_MIN && d <= BACKOFF_MAX, "{d:?}");
            assert!(
                d.as_secs_f64() >= nominal.as_secs_f64() * 0.8 - 1e-9
                    && d.as_secs_f64() <= nominal.as_secs_f64() * 1.2 + 1e-9,
                "{n}: {d:?} vs {nominal:?}"
            );
            seen.insert(d.as_millis());
        }
        assert!(seen.len() > 5, "jitter varies the delays: {seen:?}");
        assert_eq!(b.failures(), 20);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(1200));
    }

    #[test]
    fn batches_respect_count_and_bytes() {
        let sizes: Vec<(u32, u32)> = (1..=10).map(|u| (u, 100)).collect();
        let split = batches(&sizes, 4, 1_000_000, u64::from);
        assert_eq!(split.iter().map(|b| b.len()).collect::<Vec<_>>(), [4, 4, 2]);
        let split = batches(&sizes, 100, 250, u64::from);
        assert_eq!(
            split.iter().map(|b| b.len()).collect::<Vec<_>>(),
            [2, 2, 2, 2, 2]
        );
        // A mail larger than the byte budget makes a batch of its own; nothing is lost or repeated.
        let sizes = [(1, 10), (2, 5000), (3, 10), (4, 10)];
        let split = batches(&sizes, 100, 100, u64::from);
        assert_eq!(split, [&sizes[0..1], &sizes[1..2], &sizes[2..4]]);
        assert!(batches(&[], 10, 10, u64::from).is_empty());
        // Oversize mail is not downloaded, so it weighs little.
        let sizes = [(1, 10), (2, u32::MAX), (3, 10)];
        let split = batches(&sizes, 100, 1_000_000, |s| oversize_weight(s, 1_000));
        assert_eq!(split.len(), 1);
    }

    #[test]
    fn source_keys_name_address_uidvalidity_and_uid() {
        assert_eq!(
            source_key("support@contoso.com", 1763290000, 42),
            "imap:support@contoso.com:1763290000:42"
        );
    }

    #[test]
    fn failpoints_are_named_in_a_list() {
        assert!(failpoint_armed(
            Some("after_ingest_commit"),
            "after_ingest_commit"
        ));
        assert!(failpoint_armed(
            Some("x, after_ingest_commit"),
            "after_ingest_commit"
        ));
        assert!(!failpoint_armed(
            Some("after_ingest"),
            "after_ingest_commit"
        ));
        assert!(!failpoint_armed(None, "after_ingest_commit"));
    }

    #[test]
    fn idle_waits_stay_under_every_limit() {
        let mut s = Settings::from_config(
            &mailqueue_config::load_str(
                std::path::Path::new("t.yaml"),
                "defaults: { poll_interval: 30s, max_email_size_mb: 2 }\n",
            )
            .unwrap()
            .config,
        );
        assert_eq!(s.max_bytes, 2 * 1024 * 1024);
        assert_eq!(s.quarantine_folder, "Quarantine");
        assert_eq!(
            s.idle_wait(Duration::from_secs(3600)),
            Duration::from_secs(30)
        );
        assert_eq!(s.idle_wait(Duration::from_secs(4)), Duration::from_secs(4));
        s.poll_interval = Duration::from_secs(7200);
        assert_eq!(s.idle_wait(Duration::from_secs(7200)), IDLE_LIMIT);
    }

    #[test]
    fn a_session_ends_at_the_tokens_refresh_point() {
        // 5 s token: renewed at 4 s (80 %).
        let token = AccessToken::new("t", Duration::from_secs(5), Vec::new());
        let left = renewal_deadline(&token).saturating_duration_since(Instant::now());
        assert!(
            left > Duration::from_millis(3500) && left <= Duration::from_secs(4),
            "{left:?}"
        );
        // A token at (or past) its refresh point still gets a minimal session.
        let token = AccessToken::new("t", Duration::from_millis(500), Vec::new());
        let left = renewal_deadline(&token).saturating_duration_since(Instant::now());
        assert!(left > Duration::from_millis(900), "{left:?}");
    }
}
