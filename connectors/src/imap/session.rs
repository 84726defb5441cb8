//! A logged-in IMAP session on one mailbox: a thin, typed layer over the commands the engine needs. Every command
//! is run and read here (async-imap supplies the framing and the parser), so that a tagged `NO`/`BAD`, a `BYE` or a
//! lost connection is never mistaken for "no more data", and `EXISTS`/`EXPUNGE` are tracked for IDLE.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use async_imap::imap_proto::{
    AttributeValue, Capability, MailboxDatum, MessageSection, RequestId, Response, ResponseCode,
    SectionPath, Status,
};
use tokio::{io::AsyncWriteExt as _, time::timeout};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::{
    connect::Stream,
    error::ImapError,
    wire::{folder_arg, outcome_text, uid_chunks, uid_set},
};

/// At most this many UIDs go into one command (the caller's batches are usually smaller).
const MAX_UIDS_PER_COMMAND: usize = 500;

/// What `SELECT` reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FolderState {
    /// UIDs are only comparable while this stays the same; when it changes, forget the last seen UID.
    pub uid_validity: u32,
    /// The UID the next message will get, if the server said.
    pub uid_next: Option<u32>,
    /// Number of messages in the folder.
    pub exists: u32,
}

/// A whole message, byte-exact as the server stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedMail {
    pub uid: u32,
    pub raw: Vec<u8>,
}

/// The header block of a message (for mail too large to download), with its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedHeader {
    pub uid: u32,
    /// `RFC822.SIZE` of the whole message.
    pub size: Option<u32>,
    /// The raw header, including the empty line that ends it.
    pub header: Vec<u8>,
}

/// How an [`MailboxSession::idle`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleOutcome {
    /// New mail arrived (an `EXISTS` beyond the known count); fetch after the last UID.
    NewData,
    /// The time ran out without new mail; IDLE again (or poll).
    Timeout,
    /// The cancellation token fired (shutdown); the session is intact and can log out.
    Cancelled,
}

/// A logged-in session on one mailbox (see [`authenticate_xoauth2`](super::authenticate_xoauth2)).
///
/// After a connection failure or a timeout the session is unusable: every further call fails with
/// [`ImapError::Io`] at once; drop it and connect again.
pub struct MailboxSession {
    session: async_imap::Session<Stream>,
    mailbox: String,
    host: String,
    capabilities: Vec<String>,
    selected: Option<String>,
    /// `EXISTS` of the selected folder as last reported (minus expunges since).
    exists: u32,
    /// An `EXISTS` increase was seen since the last [`MailboxSession::fetch_sizes`] / select.
    pending_new: bool,
    timeout: Duration,
    broken: Option<String>,
    span: tracing::Span,
}

impl std::fmt::Debug for MailboxSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailboxSession")
            .field("mailbox", &self.mailbox)
            .field("host", &self.host)
            .field("selected", &self.selected)
            .field("exists", &self.exists)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

/// How a tagged command ended, when the connection is still fine.
enum Failure {
    /// A tagged `NO`, with the server's text.
    No(String),
    /// Anything else: `BAD`, connection lost, timeout.
    Fatal(ImapError),
}

impl Failure {
    fn or_protocol(self, during: &str) -> ImapError {
        match self {
            Self::No(text) => ImapError::protocol(during, format!("NO {text}")),
            Self::Fatal(e) => e,
        }
    }

    /// `NO [TRYCREATE]` / `[NONEXISTENT]` name a missing folder; other refusals are protocol errors.
    fn or_folder(self, during: &str, folder: &str) -> ImapError {
        match self {
            Self::No(text) if text.contains("[TRYCREATE]") || text.contains("[NONEXISTENT]") => {
                ImapError::NoSuchFolder {
                    folder: folder.to_owned(),
                    server_text: text,
                }
            }
            other => other.or_protocol(during),
        }
    }
}

impl From<ImapError> for Failure {
    fn from(e: ImapError) -> Self {
        Self::Fatal(e)
    }
}

/// What a response means to a command that waits for its tagged end.
enum Step {
    Done(Result<String, Failure>),
    Bye(String),
    Continue,
    Data,
    /// [`Wait::Until`]: the token fired before anything arrived.
    Stopped,
    /// [`Wait::Until`]: the deadline passed before anything arrived.
    Deadline,
}

/// How long to wait for the next response.
#[derive(Clone, Copy)]
enum Wait<'a> {
    /// At most this long; then the session is broken.
    Limit(Duration),
    /// Until the token fires or the deadline passes (IDLE).
    Until(&'a CancellationToken, tokio::time::Instant),
}

impl MailboxSession {
    /// Default time allowed for each server response during a command.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

    pub(crate) fn new(
        session: async_imap::Session<Stream>,
        mailbox: &str,
        host: &str,
        span: tracing::Span,
    ) -> Self {
        Self {
            session,
            mailbox: mailbox.to_owned(),
            host: host.to_owned(),
            capabilities: Vec::new(),
            selected: None,
            exists: 0,
            pending_new: false,
            timeout: Self::DEFAULT_TIMEOUT,
            broken: None,
            span,
        }
    }

    /// The mailbox (login name) of this session.
    pub fn mailbox(&self) -> &str {
        &self.mailbox
    }

    /// The server's host.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The selected folder, if any.
    pub fn selected_folder(&self) -> Option<&str> {
        self.selected.as_deref()
    }

    /// Time allowed for each server response (not for a whole batch; a large FETCH may take longer in total).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Whether the session can still be used (no connection failure or timeout so far).
    pub fn is_usable(&self) -> bool {
        self.broken.is_none()
    }

    /// Whether the server announced new mail (`EXISTS` grew) since the last [`MailboxSession::fetch_sizes`] or
    /// [`MailboxSession::select`], e.g. during a `NOOP` or another command. [`MailboxSession::idle`] returns at
    /// once in that case.
    pub fn new_data_pending(&self) -> bool {
        self.pending_new
    }

    /// The server's capabilities (upper case, e.g. `IMAP4REV1`, `IDLE`, `MOVE`, `UIDPLUS`, `AUTH=XOAUTH2`), as
    /// read right after login.
    pub fn capabilities(&self) -> &[String] {
        &self.capabilities
    }

    /// Whether the server has a capability (case-insensitive).
    pub fn has_capability(&self, name: &str) -> bool {
        self.capabilities
            .iter()
            .any(|c| c.eq_ignore_ascii_case(name))
    }

    /// RFC 2177 IDLE.
    pub fn supports_idle(&self) -> bool {
        self.has_capability("IDLE")
    }

    /// RFC 6851 MOVE.
    pub fn supports_move(&self) -> bool {
        self.has_capability("MOVE")
    }

    /// RFC 4315 UIDPLUS (`UID EXPUNGE`).
    pub fn supports_uidplus(&self) -> bool {
        self.has_capability("UIDPLUS")
    }

    /// Asks the server for its capabilities again (`CAPABILITY`).
    pub async fn refresh_capabilities(&mut self) -> Result<&[String], ImapError> {
        let span = self.span.clone();
        let mut caps = Vec::new();
        self.run("CAPABILITY", "CAPABILITY", |r| {
            if let Response::Capabilities(list) = r {
                caps.extend(list.iter().map(|c| match c {
                    Capability::Imap4rev1 => "IMAP4REV1".to_owned(),
                    Capability::Auth(a) => format!("AUTH={}", a.to_ascii_uppercase()),
                    Capability::Atom(a) => a.to_ascii_uppercase(),
                }));
            }
        })
        .instrument(span)
        .await
        .map_err(|f| f.or_protocol("CAPABILITY"))?;
        self.capabilities = caps;
        Ok(&self.capabilities)
    }

    /// `SELECT folder`. A refusal is [`ImapError::NoSuchFolder`]; a folder without UIDVALIDITY is refused too
    /// (UIDs would mean nothing across sessions).
    pub async fn select(&mut self, folder: &str) -> Result<FolderState, ImapError> {
        let span = self.span.clone();
        span.record("folder", folder);
        async move {
            let during = format!("SELECT \"{folder}\"");
            let arg = folder_arg(folder).ok_or_else(|| invalid_folder(folder))?;
            self.selected = None;
            let (mut uid_validity, mut uid_next, mut exists) = (None, None, 0);
            let result = self
                .run(&format!("SELECT {arg}"), &during, |r| match r {
                    Response::Data {
                        status: Status::Ok,
                        outcome,
                    } => match outcome.code {
                        Some(ResponseCode::UidValidity(n)) => uid_validity = Some(n),
                        Some(ResponseCode::UidNext(n)) => uid_next = Some(n),
                        _ => {}
                    },
                    Response::MailboxData(MailboxDatum::Exists(n)) => exists = *n,
                    _ => {}
                })
                .await;
            match result {
                Ok(_) => {}
                Err(Failure::No(text)) => {
                    return Err(ImapError::NoSuchFolder {
                        folder: folder.to_owned(),
                        server_text: text,
                    });
                }
                Err(Failure::Fatal(e)) => return Err(e),
            }
            let uid_validity = uid_validity.ok_or_else(|| {
                ImapError::protocol(
                    &during,
                    "the server sent no UIDVALIDITY, so message UIDs cannot be relied on",
                )
            })?;
            self.selected = Some(folder.to_owned());
            self.exists = exists;
            self.pending_new = false;
            tracing::debug!(uid_validity, ?uid_next, exists, "folder selected");
            Ok(FolderState {
                uid_validity,
                uid_next,
                exists,
            })
        }
        .instrument(span)
        .await
    }

    /// `(uid, RFC822.SIZE)` of every message with a UID above `after_uid`, sorted by UID
    /// (`UID FETCH <after+1>:* (UID RFC822.SIZE)`; the server's "highest message even when below" answer is
    /// filtered out).
    pub async fn fetch_sizes(&mut self, after_uid: u32) -> Result<Vec<(u32, u32)>, ImapError> {
        let span = self.span.clone();
        async move {
            let during = "UID FETCH (sizes)";
            self.require_selected(during)?;
            if after_uid == u32::MAX {
                return Ok(Vec::new());
            }
            self.pending_new = false;
            // An empty folder: ask the server for news first (NOOP), since some servers answer `BAD` to a FETCH
            // on an empty folder.
            if self.exists == 0 {
                self.run("NOOP", "NOOP", |_| {})
                    .await
                    .map_err(|f| f.or_protocol("NOOP"))?;
                self.pending_new = false;
                if self.exists == 0 {
                    return Ok(Vec::new());
                }
            }
            let mut sizes = BTreeMap::new();
            self.run(
                &format!("UID FETCH {}:* (UID RFC822.SIZE)", after_uid + 1),
                during,
                |r| {
                    if let Response::Fetch(_, attrs) = r {
                        let (mut uid, mut size) = (None, None);
                        for a in attrs {
                            match a {
                                AttributeValue::Uid(u) => uid = Some(*u),
                                AttributeValue::Rfc822Size(s) => size = Some(*s),
                                _ => {}
                            }
                        }
                        if let (Some(uid), Some(size)) = (uid, size)
                            && uid > after_uid
                        {
                            sizes.insert(uid, size);
                        }
                    }
                },
            )
            .await
            .map_err(|f| f.or_protocol(during))?;
            tracing::debug!(after_uid, new = sizes.len(), "sizes fetched");
            Ok(sizes.into_iter().collect())
        }
        .instrument(span)
        .await
    }

    /// The whole messages `uids` (`UID FETCH <set> (UID BODY.PEEK[])`; does not set `\Seen`), in UID order.
    /// UIDs that no longer exist are missing from the result.
    pub async fn fetch_bodies(&mut self, uids: &[u32]) -> Result<Vec<FetchedMail>, ImapError> {
        let span = self.span.clone();
        async move {
            let during = "UID FETCH (bodies)";
            self.require_selected(during)?;
            let started = Instant::now();
            let mut mails = BTreeMap::new();
            for chunk in uid_chunks(uids, MAX_UIDS_PER_COMMAND) {
                let command = format!("UID FETCH {} (UID BODY.PEEK[])", uid_set(&chunk));
                self.run(&command, during, |r| {
                    if let Response::Fetch(_, attrs) = r {
                        let (mut uid, mut raw) = (None, None);
                        for a in attrs {
                            match a {
                                AttributeValue::Uid(u) => uid = Some(*u),
                                AttributeValue::BodySection {
                                    section: None,
                                    index: None,
                                    data: Some(data),
                                }
                                | AttributeValue::Rfc822(Some(data)) => raw = Some(data),
                                _ => {}
                            }
                        }
                        if let (Some(uid), Some(raw)) = (uid, raw)
                            && chunk.binary_search(&uid).is_ok()
                        {
                            mails.insert(uid, raw.to_vec());
                        }
                    }
                })
                .await
                .map_err(|f| f.or_protocol(during))?;
            }
            let bytes: usize = mails.values().map(Vec::len).sum();
            tracing::debug!(
                requested = uids.len(),
                fetched = mails.len(),
                bytes,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "bodies fetched"
            );
            Ok(mails
                .into_iter()
                .map(|(uid, raw)| FetchedMail { uid, raw })
                .collect())
        }
        .instrument(span)
        .await
    }

    /// The header blocks and sizes of `uids` (`UID FETCH <set> (UID RFC822.SIZE BODY.PEEK[HEADER])`), in UID
    /// order: for mail that is too large to download.
    pub async fn fetch_headers(&mut self, uids: &[u32]) -> Result<Vec<FetchedHeader>, ImapError> {
        let span = self.span.clone();
        async move {
            let during = "UID FETCH (headers)";
            self.require_selected(during)?;
            let mut headers = BTreeMap::new();
            for chunk in uid_chunks(uids, MAX_UIDS_PER_COMMAND) {
                let command = format!(
                    "UID FETCH {} (UID RFC822.SIZE BODY.PEEK[HEADER])",
                    uid_set(&chunk)
                );
                self.run(&command, during, |r| {
                    if let Response::Fetch(_, attrs) = r {
                        let (mut uid, mut size, mut header) = (None, None, None);
                        for a in attrs {
                            match a {
                                AttributeValue::Uid(u) => uid = Some(*u),
                                AttributeValue::Rfc822Size(s) => size = Some(*s),
                                AttributeValue::BodySection {
                                    section: Some(SectionPath::Full(MessageSection::Header)),
                                    data,
                                    ..
                                }
                                | AttributeValue::Rfc822Header(data) => {
                                    header = Some(data.as_deref().unwrap_or_default())
                                }
                                _ => {}
                            }
                        }
                        if let (Some(uid), Some(header)) = (uid, header)
                            && chunk.binary_search(&uid).is_ok()
                        {
                            headers.insert(
                                uid,
                                FetchedHeader {
                                    uid,
                                    size,
                                    header: header.to_vec(),
                                },
                            );
                        }
                    }
                })
                .await
                .map_err(|f| f.or_protocol(during))?;
            }
            Ok(headers.into_values().collect())
        }
        .instrument(span)
        .await
    }

    /// UIDs matching an IMAP search (`UID SEARCH <criteria>`, e.g. `UNSEEN`, `ALL`, `DELETED`), sorted. The
    /// criteria are sent as they are: do not put untrusted text in them.
    pub async fn uid_search(&mut self, criteria: &str) -> Result<Vec<u32>, ImapError> {
        let span = self.span.clone();
        async move {
            let during = "UID SEARCH";
            self.require_selected(during)?;
            if criteria.contains(['\r', '\n']) {
                return Err(ImapError::protocol(
                    during,
                    "search criteria must be one line",
                ));
            }
            let mut found = Vec::new();
            self.run(&format!("UID SEARCH {criteria}"), during, |r| {
                if let Response::MailboxData(MailboxDatum::Search(uids)) = r {
                    found.extend_from_slice(uids);
                }
            })
            .await
            .map_err(|f| f.or_protocol(during))?;
            found.sort_unstable();
            found.dedup();
            Ok(found)
        }
        .instrument(span)
        .await
    }

    /// Sets `\Seen` on `uids` (`UID STORE <set> +FLAGS.SILENT (\Seen)`).
    pub async fn mark_seen(&mut self, uids: &[u32]) -> Result<(), ImapError> {
        let span = self.span.clone();
        async move {
            self.store_flag(uids, "\\Seen").await?;
            tracing::debug!(count = uids.len(), "marked seen");
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Moves `uids` to `folder`: `UID MOVE` when the server has MOVE, else `UID COPY`, `\Deleted` and `UID EXPUNGE`
    /// (UIDPLUS) or `EXPUNGE` (which also removes other messages already marked `\Deleted`). A missing target
    /// folder is [`ImapError::NoSuchFolder`].
    pub async fn move_to(&mut self, uids: &[u32], folder: &str) -> Result<(), ImapError> {
        let span = self.span.clone();
        async move {
            let during = format!("UID MOVE to \"{folder}\"");
            self.require_selected(&during)?;
            let arg = folder_arg(folder).ok_or_else(|| invalid_folder(folder))?;
            for chunk in uid_chunks(uids, MAX_UIDS_PER_COMMAND) {
                let set = uid_set(&chunk);
                if self.supports_move() {
                    self.run(&format!("UID MOVE {set} {arg}"), &during, |_| {})
                        .await
                        .map_err(|f| f.or_folder(&during, folder))?;
                } else {
                    let copy = format!("UID COPY to \"{folder}\"");
                    self.run(&format!("UID COPY {set} {arg}"), &copy, |_| {})
                        .await
                        .map_err(|f| f.or_folder(&copy, folder))?;
                    self.store_flag(&chunk, "\\Deleted").await?;
                    self.expunge(&set).await?;
                }
            }
            tracing::debug!(count = uids.len(), to = folder, "moved");
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Deletes `uids`: `UID STORE +FLAGS.SILENT (\Deleted)`, then `UID EXPUNGE` (UIDPLUS) or `EXPUNGE` (which also
    /// removes other messages already marked `\Deleted`).
    pub async fn delete(&mut self, uids: &[u32]) -> Result<(), ImapError> {
        let span = self.span.clone();
        async move {
            for chunk in uid_chunks(uids, MAX_UIDS_PER_COMMAND) {
                self.store_flag(&chunk, "\\Deleted").await?;
                self.expunge(&uid_set(&chunk)).await?;
            }
            tracing::debug!(count = uids.len(), "deleted");
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Creates `folder` unless it exists (`LIST`, then `CREATE`). Returns whether it was created.
    pub async fn create_folder_if_missing(&mut self, folder: &str) -> Result<bool, ImapError> {
        let span = self.span.clone();
        async move {
            let during = format!("CREATE \"{folder}\"");
            let arg = folder_arg(folder).ok_or_else(|| invalid_folder(folder))?;
            if self.folder_exists(folder, &arg).await? {
                return Ok(false);
            }
            match self.run(&format!("CREATE {arg}"), &during, |_| {}).await {
                Ok(_) => {
                    tracing::info!(folder, "folder created");
                    Ok(true)
                }
                // Someone else may have created it meanwhile.
                Err(Failure::No(text)) => {
                    if self.folder_exists(folder, &arg).await? {
                        Ok(false)
                    } else {
                        Err(ImapError::protocol(during, format!("NO {text}")))
                    }
                }
                Err(Failure::Fatal(e)) => Err(e),
            }
        }
        .instrument(span)
        .await
    }

    /// `NOOP`: keeps the connection alive and lets the server report changes (see
    /// [`MailboxSession::new_data_pending`]).
    pub async fn noop(&mut self) -> Result<(), ImapError> {
        let span = self.span.clone();
        self.run("NOOP", "NOOP", |_| {})
            .instrument(span)
            .await
            .map(drop)
            .map_err(|f| f.or_protocol("NOOP"))
    }

    /// `IDLE` until new mail arrives (an `EXISTS` beyond the known count), `wait` passes, or `stop` fires; then
    /// `DONE`, and the session is handed back for the next command. Other changes (flags, expunges) do not end
    /// it. Returns [`IdleOutcome::NewData`] at once if new mail was already announced (see
    /// [`MailboxSession::new_data_pending`]). Needs a selected folder and the IDLE capability. Re-issuing IDLE is
    /// the caller's job (keep `wait` under the server's idle limit: Exchange drops idle connections after
    /// about 30 minutes; 10–25 minutes is safe).
    pub async fn idle(
        mut self,
        wait: Duration,
        stop: &CancellationToken,
    ) -> Result<(Self, IdleOutcome), ImapError> {
        let span = self.span.clone();
        async move {
            let during = "IDLE";
            self.require_selected(during)?;
            if !self.supports_idle() {
                return Err(ImapError::protocol(
                    during,
                    "the server does not support IDLE (no IDLE capability); poll instead",
                ));
            }
            if self.pending_new {
                return Ok((self, IdleOutcome::NewData));
            }
            if stop.is_cancelled() {
                return Ok((self, IdleOutcome::Cancelled));
            }
            let limit = self.timeout;
            let id = self.send("IDLE", during).await?;
            loop {
                match self.next_step(&id, during, limit).await? {
                    Step::Continue => break,
                    Step::Data | Step::Stopped | Step::Deadline => {}
                    Step::Done(Ok(text)) => {
                        return Err(ImapError::protocol(
                            during,
                            format!("the server ended IDLE at once: OK {text}"),
                        ));
                    }
                    Step::Done(Err(f)) => return Err(f.or_protocol(during)),
                    Step::Bye(text) => return Err(self.bye(during, &text)),
                }
            }
            tracing::debug!(wait_s = wait.as_secs(), "idling");
            let deadline = tokio::time::Instant::now() + wait;
            let outcome = loop {
                if self.pending_new {
                    break IdleOutcome::NewData;
                }
                let until = Wait::Until(stop, deadline);
                match self.next_step_with(&id, during, until, &mut |_| {}).await? {
                    Step::Stopped => break IdleOutcome::Cancelled,
                    Step::Deadline => break IdleOutcome::Timeout,
                    Step::Continue | Step::Data => {}
                    // The server ended IDLE by itself; no DONE needed.
                    Step::Done(Ok(_)) => return Ok((self, IdleOutcome::Timeout)),
                    Step::Done(Err(f)) => return Err(f.or_protocol(during)),
                    Step::Bye(text) => return Err(self.bye(during, &text)),
                }
            };
            let sent = timeout(limit, self.session.run_command_untagged("DONE")).await;
            match sent {
                Err(_) => return Err(self.break_with(ImapError::timeout("IDLE DONE", limit))),
                Ok(Err(e)) => {
                    return Err(self
                        .break_with(ImapError::io("IDLE DONE", super::wire::async_imap_text(&e))));
                }
                Ok(Ok(())) => {}
            }
            loop {
                match self.next_step(&id, "IDLE DONE", limit).await? {
                    Step::Continue | Step::Data | Step::Stopped | Step::Deadline => {}
                    Step::Done(Ok(_)) => break,
                    Step::Done(Err(f)) => return Err(f.or_protocol("IDLE DONE")),
                    Step::Bye(text) => return Err(self.bye("IDLE DONE", &text)),
                }
            }
            // New mail announced while ending IDLE also counts.
            let outcome = if self.pending_new {
                IdleOutcome::NewData
            } else {
                outcome
            };
            tracing::debug!(?outcome, "idle ended");
            Ok((self, outcome))
        }
        .instrument(span)
        .await
    }

    /// `LOGOUT` and TLS close. Failures are ignored: the connection is gone either way.
    pub async fn logout(mut self) -> Result<(), ImapError> {
        let span = self.span.clone();
        async move {
            if self.broken.is_some() {
                return Ok(());
            }
            let limit = self.timeout.min(Duration::from_secs(10));
            if let Ok(id) = self.send("LOGOUT", "LOGOUT").await {
                // `* BYE` then the tagged OK; stop at either end.
                while let Ok(step) = self.next_step(&id, "LOGOUT", limit).await {
                    if matches!(step, Step::Done(_)) {
                        break;
                    }
                }
            }
            let _ = timeout(limit, self.session.get_mut().shutdown()).await;
            tracing::debug!("logged out");
            Ok(())
        }
        .instrument(span)
        .await
    }

    // ---- internals ----

    async fn store_flag(&mut self, uids: &[u32], flag: &str) -> Result<(), ImapError> {
        let during = format!("UID STORE +FLAGS ({flag})");
        self.require_selected(&during)?;
        for chunk in uid_chunks(uids, MAX_UIDS_PER_COMMAND) {
            let command = format!("UID STORE {} +FLAGS.SILENT ({flag})", uid_set(&chunk));
            self.run(&command, &during, |_| {})
                .await
                .map_err(|f| f.or_protocol(&during))?;
        }
        Ok(())
    }

    async fn expunge(&mut self, set: &str) -> Result<(), ImapError> {
        let (command, during) = if self.supports_uidplus() {
            (format!("UID EXPUNGE {set}"), "UID EXPUNGE")
        } else {
            ("EXPUNGE".to_owned(), "EXPUNGE")
        };
        self.run(&command, during, |_| {})
            .await
            .map(drop)
            .map_err(|f| f.or_protocol(during))
    }

    async fn folder_exists(&mut self, folder: &str, arg: &str) -> Result<bool, ImapError> {
        let during = format!("LIST \"{folder}\"");
        let wanted = super::wire::encode_folder(folder);
        let mut found = false;
        self.run(&format!("LIST \"\" {arg}"), &during, |r| {
            if let Response::MailboxData(MailboxDatum::List(list)) = r {
                let name = list.name.as_ref();
                if name == wanted
                    || (name.eq_ignore_ascii_case("INBOX") && wanted.eq_ignore_ascii_case("INBOX"))
                {
                    found = true;
                }
            }
        })
        .await
        .map_err(|f| f.or_protocol(&during))?;
        Ok(found)
    }

    fn require_selected(&self, during: &str) -> Result<(), ImapError> {
        self.check_usable(during)?;
        if self.selected.is_none() {
            return Err(ImapError::protocol(
                during,
                "no folder is selected (call select first)",
            ));
        }
        Ok(())
    }

    fn check_usable(&self, during: &str) -> Result<(), ImapError> {
        match &self.broken {
            Some(reason) => Err(ImapError::io(
                during,
                format!("the session is unusable after an earlier failure: {reason}"),
            )),
            None => Ok(()),
        }
    }

    fn break_with(&mut self, e: ImapError) -> ImapError {
        tracing::warn!(error = %e, "IMAP session broken");
        self.broken = Some(e.to_string());
        e
    }

    fn bye(&mut self, during: &str, text: &str) -> ImapError {
        self.break_with(ImapError::io(
            during,
            format!("the server ended the session: BYE {text}"),
        ))
    }

    /// Follows `EXISTS`/`EXPUNGE` of the selected folder.
    fn track(&mut self, response: &Response<'_>) {
        match response {
            Response::MailboxData(MailboxDatum::Exists(n)) => {
                if *n > self.exists {
                    self.pending_new = true;
                }
                self.exists = *n;
            }
            Response::Expunge(_) => self.exists = self.exists.saturating_sub(1),
            _ => {}
        }
    }

    /// Sends a tagged command.
    async fn send(&mut self, command: &str, during: &str) -> Result<RequestId, ImapError> {
        self.check_usable(during)?;
        let limit = self.timeout;
        match timeout(limit, self.session.run_command(command)).await {
            Err(_) => Err(self.break_with(ImapError::timeout(during, limit))),
            Ok(Err(e)) => {
                Err(self.break_with(ImapError::io(during, super::wire::async_imap_text(&e))))
            }
            Ok(Ok(id)) => Ok(id),
        }
    }

    /// Reads one response (tracking `EXISTS`/`EXPUNGE`), hands untagged data to `on_data`, and says what it was.
    async fn next_step_with(
        &mut self,
        id: &RequestId,
        during: &str,
        wait: Wait<'_>,
        on_data: &mut (dyn FnMut(&Response<'_>) + Send),
    ) -> Result<Step, ImapError> {
        let read = match wait {
            Wait::Limit(limit) => match timeout(limit, self.session.read_response()).await {
                Ok(read) => read,
                Err(_) => return Err(self.break_with(ImapError::timeout(during, limit))),
            },
            // `read_response` is cancel-safe: a partly read response stays in the stream's buffer.
            Wait::Until(stop, deadline) => tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(Step::Stopped),
                _ = tokio::time::sleep_until(deadline) => return Ok(Step::Deadline),
                read = self.session.read_response() => read,
            },
        };
        let response = match read {
            Ok(Some(response)) => response,
            Ok(None) => {
                return Err(
                    self.break_with(ImapError::io(during, "the server closed the connection"))
                );
            }
            Err(e) => return Err(self.break_with(ImapError::io(during, e.to_string()))),
        };
        let parsed = response.parsed();
        self.track(parsed);
        Ok(match parsed {
            Response::Done {
                tag,
                status,
                outcome,
            } if tag == id => {
                let text = outcome_text(outcome);
                Step::Done(match status {
                    Status::Ok => Ok(text),
                    Status::No => Err(Failure::No(text)),
                    other => Err(Failure::Fatal(ImapError::protocol(
                        during,
                        format!("{} {text}", format!("{other:?}").to_ascii_uppercase()),
                    ))),
                })
            }
            Response::Data {
                status: Status::Bye,
                outcome,
            } => Step::Bye(outcome_text(outcome)),
            Response::Continue(_) => Step::Continue,
            other => {
                on_data(other);
                Step::Data
            }
        })
    }

    async fn next_step(
        &mut self,
        id: &RequestId,
        during: &str,
        limit: Duration,
    ) -> Result<Step, ImapError> {
        self.next_step_with(id, during, Wait::Limit(limit), &mut |_| {})
            .await
    }

    /// Runs a command to its tagged end; untagged data goes to `on_data`. Returns the tagged OK's text.
    async fn run<F>(
        &mut self,
        command: &str,
        during: &str,
        mut on_data: F,
    ) -> Result<String, Failure>
    where
        F: FnMut(&Response<'_>) + Send,
    {
        let id = self.send(command, during).await?;
        let limit = Wait::Limit(self.timeout);
        loop {
            match self
                .next_step_with(&id, during, limit, &mut on_data)
                .await?
            {
                Step::Done(result) => return result,
                Step::Bye(text) => return Err(Failure::Fatal(self.bye(during, &text))),
                Step::Data | Step::Stopped | Step::Deadline => {}
                Step::Continue => {
                    return Err(Failure::Fatal(self.break_with(ImapError::protocol(
                        during,
                        "the server asked for a continuation this command does not have",
                    ))));
                }
            }
        }
    }
}

fn invalid_folder(folder: &str) -> ImapError {
    ImapError::NoSuchFolder {
        folder: folder.to_owned(),
        server_text: "not a valid folder name (empty, or contains control characters)".into(),
    }
}
