//! An Exchange Online–like SMTP submission server (`smtp.office365.com:587`): STARTTLS required, `AUTH XOAUTH2`
//! with bearer tokens from the sandbox's identity emulator, Exchange's reply codes and texts, byte-exact storage of
//! every accepted message under `sent/` with an append-only `sent/index.jsonl`, and delivery into the Maildir of every
//! recipient that is a sandbox mailbox (so Dovecot serves it over IMAP). An implicit-TLS listener (465 style) is
//! available too. Fault injection (421 / 451 / dropped connection at a chosen step) is driven from [`SmtpHandle`].
//!
//! Behaviour worth knowing:
//! - Before TLS, EHLO offers `STARTTLS` and no `AUTH`; `AUTH` gets `504 5.7.4`, `MAIL` gets `530 5.7.57`.
//!   After TLS, EHLO offers `AUTH LOGIN XOAUTH2`. No `CHUNKING`/`BDAT`/`BINARYMIME` (clients use DATA).
//! - `AUTH XOAUTH2` takes the initial response on the command line (lines up to 16 KiB) or after `334 `.
//!   A bad encoding, an unknown/expired/revoked token → `535 5.7.3`; the authority's rules give `535 5.7.3` or
//!   the `535 5.7.139` tenant/user texts. `AUTH LOGIN` runs its two `334` steps and always ends with
//!   `535 5.7.139 Authentication unsuccessful, basic authentication is disabled.` (what Exchange Online answers
//!   since basic auth was turned off).
//! - Send As is checked, as Exchange does, when the message is submitted (the reply to the final `.`): the envelope
//!   sender and every `From:` header address must be the authenticated mailbox or one it may send as, else
//!   `554 5.2.252 SendAsDenied; …`.
//! - `SIZE=` above the limit → `552 5.3.4` at MAIL; a larger message is drained to the final `.` and then gets
//!   the same `552 5.3.4`.
//! - Bytes pipelined after `STARTTLS` (plaintext injection) close the connection after the `220`.

use std::{
    collections::HashSet,
    fs,
    io::{self, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use smtp_proto::{
    AUTH_LOGIN, AUTH_XOAUTH2, Error as ProtoError, Request, request::receiver::DataReceiver,
};
use tokio::{
    io::{
        AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _,
        BufReader,
    },
    net::{TcpListener, TcpStream},
};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use crate::{
    maildir::Maildir,
    tokens::{TokenError, TokenInfo, TokenStore},
    world::{SmtpDenial, World},
};

/// A host name shaped like an Exchange Online frontend.
pub const DEFAULT_HOSTNAME: &str = "SN4PR0501CA0123.outlook.office365.com";
/// Exchange Online's advertised `SIZE` (35 MiB).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 36_700_160;
/// Longest command line accepted (RFC 4954 wants at least 12,288 octets for AUTH); longer ones get `500 5.5.2`.
pub const MAX_LINE_LENGTH: usize = 16 * 1024;

const REPLY_421: &str = "421 4.3.2 Service not available, closing transmission channel";
const REPLY_451: &str = "451 4.7.0 Temporary server error. Please try again later.";
const REPLY_552: &str = "552 5.3.4 Message size exceeds fixed maximum message size";

/// The decisions the SMTP server delegates to the identity emulator and the world (the sandbox glues this to its
/// `Idp`; [`SmtpAuthority`] is implemented for `(TokenStore, Arc<RwLock<World>>)`).
pub trait SmtpAuthority: Send + Sync + 'static {
    /// Checks a bearer token presented in XOAUTH2.
    fn validate_token(&self, token: &str) -> Result<TokenInfo, TokenError>;
    /// Whether the token may authenticate as mailbox `user` over SMTP; the error carries Exchange's full reply,
    /// which may mention `host`.
    fn authorize(&self, info: &TokenInfo, user: &str, host: &str) -> Result<(), SmtpDenial>;
    /// Whether mailbox `user` may send with sender address `from`; the error carries Exchange's full reply.
    fn send_as(&self, user: &str, from: &str) -> Result<(), SmtpDenial>;
    /// Whether mail to `address` is delivered into a sandbox Maildir.
    fn is_local_mailbox(&self, address: &str) -> bool;
}

impl SmtpAuthority for (TokenStore, Arc<RwLock<World>>) {
    fn validate_token(&self, token: &str) -> Result<TokenInfo, TokenError> {
        self.0.validate(token)
    }

    fn authorize(&self, info: &TokenInfo, user: &str, host: &str) -> Result<(), SmtpDenial> {
        self.1
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .authorize_smtp(info, user, host)
    }

    fn send_as(&self, user: &str, from: &str) -> Result<(), SmtpDenial> {
        self.1
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .authorize_send_as(user, from)
    }

    fn is_local_mailbox(&self, address: &str) -> bool {
        self.1
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .mailbox(address)
            .is_some()
    }
}

/// How the server is set up.
#[derive(Debug, Clone)]
pub struct SmtpOptions {
    /// The name in the greeting, EHLO and replies (`[HOST]`).
    pub hostname: String,
    /// Server TLS configuration (see `tls::Certificates::server_config`).
    pub tls: Arc<rustls::ServerConfig>,
    /// TLS from the first byte (465 style) instead of STARTTLS, for the listener given to [`SmtpServer::start`].
    pub implicit_tls: bool,
    /// Largest message accepted, advertised as `SIZE`.
    pub max_message_size: usize,
    /// More recipients than this in one transaction get `452 4.5.3 Too many recipients`.
    pub max_recipients: usize,
    /// Where accepted messages and `index.jsonl` go (created if needed).
    pub sent_dir: PathBuf,
    /// Root of the Maildir store (`<mail_root>/<mailbox>/Maildir`); `None`: no local delivery.
    pub mail_root: Option<PathBuf>,
    /// uid/gid to chown delivered files to (Dovecot's run user) when running as root.
    pub mail_owner: Option<(u32, u32)>,
    /// Also file a seen copy in this Maildir++ folder of the authenticated mailbox (Exchange saves SMTP
    /// submissions to "Sent Items"); `None` (the default): do not.
    pub sent_items_folder: Option<String>,
    /// A connection idle this long gets `421 4.4.2` and is closed.
    pub idle_timeout: Duration,
}

impl SmtpOptions {
    /// Defaults: [`DEFAULT_HOSTNAME`], STARTTLS, [`DEFAULT_MAX_MESSAGE_SIZE`], 500 recipients, no local delivery,
    /// 10 minutes idle timeout.
    pub fn new(tls: Arc<rustls::ServerConfig>, sent_dir: impl Into<PathBuf>) -> Self {
        Self {
            hostname: DEFAULT_HOSTNAME.to_owned(),
            tls,
            implicit_tls: false,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_recipients: 500,
            sent_dir: sent_dir.into(),
            mail_root: None,
            mail_owner: None,
            sent_items_folder: None,
            idle_timeout: Duration::from_secs(600),
        }
    }
}

/// Where in a session an injected fault fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultPoint {
    /// On connect (after the TLS handshake for implicit TLS), instead of the `220` greeting.
    Greeting,
    /// EHLO or HELO.
    Ehlo,
    #[serde(alias = "start_tls")]
    Starttls,
    Auth,
    Mail,
    Rcpt,
    /// The DATA command (instead of `354`).
    Data,
    /// The final `.` of the message (instead of the `250 2.6.0` / error reply).
    DataEnd,
    Quit,
}

/// What an injected fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultAction {
    /// `421 4.3.2 Service not available, closing transmission channel`, then close. The command has no effect.
    #[serde(rename = "421", alias = "reply_421")]
    Reply421,
    /// `451 4.7.0 Temporary server error. Please try again later.`; the command has no effect (the message is
    /// discarded at `data_end`); the session goes on (at `greeting` the connection is closed).
    #[serde(rename = "451", alias = "reply_451")]
    Reply451,
    /// Close the connection without a reply; the command has no effect.
    Drop,
    /// Carry out the command (at `data_end`: accept, store and deliver the message), then close the connection
    /// instead of sending the final reply: the client cannot know it succeeded.
    DropAfter,
}

/// An injected fault: the next `count` occurrences of `point` (on any connection) get `action`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmtpFault {
    pub point: FaultPoint,
    pub action: FaultAction,
    #[serde(default = "one")]
    pub count: u32,
}

fn one() -> u32 {
    1
}

/// One accepted message, as a line of `sent/index.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentEntry {
    /// Unique id; the message is `sent/<file>`.
    pub id: String,
    pub time: DateTime<Utc>,
    /// The mailbox that authenticated (XOAUTH2 `user=`).
    pub user: String,
    /// The envelope sender (MAIL FROM), `""` for the null sender.
    pub mail_from: String,
    /// The envelope recipients (RCPT TO), in order.
    pub rcpt_to: Vec<String>,
    /// Size in bytes of the stored message (after dot-unstuffing).
    pub size: usize,
    /// File name under the sent directory.
    pub file: String,
    /// The message's `Message-ID` header, without angle brackets, if it had one.
    pub message_id: Option<String>,
    /// The id in the `250 2.6.0 <…>` reply: the Message-ID, or the one the server assigned.
    pub queued_id: String,
    /// Exchange-style numeric InternalId from the reply.
    pub internal_id: u64,
    /// Recipients the message was delivered to in a local Maildir.
    pub delivered_to: Vec<String>,
}

impl SentEntry {
    /// The stored message's path.
    pub fn path(&self, sent_dir: &Path) -> PathBuf {
        sent_dir.join(&self.file)
    }
}

/// Reads `sent_dir/index.jsonl` (missing → empty; unreadable lines are skipped).
pub fn read_sent_index(sent_dir: &Path) -> Vec<SentEntry> {
    let Ok(text) = fs::read_to_string(sent_dir.join("index.jsonl")) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// The SMTP submission server.
pub struct SmtpServer;

impl SmtpServer {
    /// Starts serving `listener` (STARTTLS, or implicit TLS if `opts.implicit_tls`) until `stop` is cancelled.
    /// Must be called inside a Tokio runtime. Fails only if the sent directory cannot be created.
    pub fn start(
        listener: TcpListener,
        opts: SmtpOptions,
        authority: Arc<dyn SmtpAuthority>,
        stop: CancellationToken,
    ) -> io::Result<SmtpHandle> {
        fs::create_dir_all(&opts.sent_dir)?;
        let implicit_tls = opts.implicit_tls;
        let seed = u64::try_from(Utc::now().timestamp_millis()).unwrap_or_default() * 1000;
        let shared = Arc::new(Shared {
            acceptor: TlsAcceptor::from(opts.tls.clone()),
            opts,
            authority,
            faults: Mutex::new(Vec::new()),
            index_lock: Mutex::new(()),
            next_internal_id: AtomicU64::new(seed),
            tracker: TaskTracker::new(),
            stop,
        });
        SmtpHandle::serve(shared, listener, implicit_tls)
    }
}

/// A running server. Clones share state; a handle made by [`SmtpHandle::serve_also`] shares faults and storage.
#[derive(Clone)]
pub struct SmtpHandle {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    implicit_tls: bool,
}

impl SmtpHandle {
    fn serve(shared: Arc<Shared>, listener: TcpListener, implicit_tls: bool) -> io::Result<Self> {
        let local_addr = listener.local_addr()?;
        info!(%local_addr, implicit_tls, host = %shared.opts.hostname, "SMTP submission server listening");
        let task_shared = shared.clone();
        shared
            .tracker
            .spawn(accept_loop(task_shared, listener, implicit_tls));
        Ok(Self {
            shared,
            local_addr,
            implicit_tls,
        })
    }

    /// Serves a second listener with the same state (e.g. a 465-style implicit-TLS port next to STARTTLS).
    pub fn serve_also(&self, listener: TcpListener, implicit_tls: bool) -> io::Result<SmtpHandle> {
        Self::serve(self.shared.clone(), listener, implicit_tls)
    }

    /// The address this handle's listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Whether this handle's listener speaks TLS from the first byte.
    pub fn implicit_tls(&self) -> bool {
        self.implicit_tls
    }

    pub fn hostname(&self) -> &str {
        &self.shared.opts.hostname
    }

    pub fn sent_dir(&self) -> &Path {
        &self.shared.opts.sent_dir
    }

    /// The accepted messages so far ([`read_sent_index`] of the sent directory).
    pub fn sent(&self) -> Vec<SentEntry> {
        read_sent_index(&self.shared.opts.sent_dir)
    }

    /// Arms a fault for the next `fault.count` occurrences of `fault.point` (faults fire in the order armed).
    pub fn inject_fault(&self, fault: SmtpFault) {
        if fault.count > 0 {
            info!(?fault, "SMTP fault armed");
            self.shared
                .faults
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(fault);
        }
    }

    /// Disarms every fault.
    pub fn clear_faults(&self) {
        self.shared
            .faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Faults still armed, with their remaining counts.
    pub fn pending_faults(&self) -> Vec<SmtpFault> {
        self.shared
            .faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until the stop token is cancelled and every listener and connection has ended.
    pub async fn wait(&self) {
        self.shared.stop.cancelled().await;
        self.shared.tracker.close();
        self.shared.tracker.wait().await;
    }
}

struct Shared {
    opts: SmtpOptions,
    acceptor: TlsAcceptor,
    authority: Arc<dyn SmtpAuthority>,
    faults: Mutex<Vec<SmtpFault>>,
    index_lock: Mutex<()>,
    next_internal_id: AtomicU64,
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Shared {
    fn take_fault(&self, point: FaultPoint) -> Option<FaultAction> {
        let mut faults = self.faults.lock().unwrap_or_else(PoisonError::into_inner);
        let index = faults
            .iter()
            .position(|f| f.point == point && f.count > 0)?;
        let action = faults[index].action;
        faults[index].count -= 1;
        if faults[index].count == 0 {
            faults.remove(index);
        }
        info!(?point, ?action, "SMTP fault fires");
        Some(action)
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, implicit_tls: bool) {
    loop {
        let accepted = tokio::select! {
            _ = shared.stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let conn_shared = shared.clone();
                shared
                    .tracker
                    .spawn(connection(conn_shared, tcp, peer, implicit_tls));
            }
            Err(e) => {
                warn!(error = %e, "SMTP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    debug!("SMTP listener stopped");
}

async fn connection(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr, implicit_tls: bool) {
    let _ = tcp.set_nodelay(true);
    debug!(%peer, implicit_tls, "SMTP connection");
    let mut session = Session::new(shared, peer);
    let result = if implicit_tls {
        match session.tls_accept(tcp).await {
            Some(tls) => {
                session.secure = true;
                session.greet_and_run(&mut BufReader::new(tls)).await
            }
            None => return,
        }
    } else {
        let mut io = BufReader::new(tcp);
        match session.greet_and_run(&mut io).await {
            Ok(End::StartTls) => {
                if !io.buffer().is_empty() {
                    warn!(%peer, "SMTP client sent commands after STARTTLS before the handshake: closing");
                    return;
                }
                let Some(tls) = session.tls_accept(io.into_inner()).await else {
                    return;
                };
                session.start_secure();
                session.run(&mut BufReader::new(tls)).await
            }
            other => other,
        }
    };
    match result {
        Ok(_) => debug!(%peer, "SMTP connection closed"),
        Err(Halt::Io(e)) => debug!(%peer, error = %e, "SMTP connection ended"),
        Err(halt) => debug!(%peer, ?halt, "SMTP connection ended"),
    }
}

/// How a session's command loop ended normally.
#[derive(Debug)]
enum End {
    Quit,
    StartTls,
}

/// Why a session stops early.
#[derive(Debug)]
enum Halt {
    Io(io::Error),
    /// The client went away.
    Eof,
    /// The server closes (fault, timeout, shutdown, protocol abuse); any last reply is already written.
    Closed,
}

impl From<io::Error> for Halt {
    fn from(e: io::Error) -> Self {
        Halt::Io(e)
    }
}

enum LineRead {
    Line,
    TooLong,
}

/// The envelope and identity of a message being submitted.
struct Submission {
    user: String,
    mail_from: String,
    rcpt_to: Vec<String>,
    helo: String,
    peer: SocketAddr,
}

struct Session {
    shared: Arc<Shared>,
    peer: SocketAddr,
    secure: bool,
    helo: Option<String>,
    user: Option<String>,
    mail_from: Option<String>,
    rcpt_to: Vec<String>,
    /// A `drop_after` fault: the next final (non-3xx) reply is replaced by closing the connection.
    drop_before_reply: bool,
}

impl Session {
    fn new(shared: Arc<Shared>, peer: SocketAddr) -> Self {
        Self {
            shared,
            peer,
            secure: false,
            helo: None,
            user: None,
            mail_from: None,
            rcpt_to: Vec::new(),
            drop_before_reply: false,
        }
    }

    fn host(&self) -> &str {
        &self.shared.opts.hostname
    }

    /// RFC 3207: after the handshake the client starts over (EHLO, AUTH, envelope).
    fn start_secure(&mut self) {
        self.secure = true;
        self.helo = None;
        self.user = None;
        self.reset();
    }

    fn reset(&mut self) {
        self.mail_from = None;
        self.rcpt_to.clear();
    }

    async fn tls_accept(
        &self,
        tcp: TcpStream,
    ) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
        let handshake =
            tokio::time::timeout(Duration::from_secs(30), self.shared.acceptor.accept(tcp));
        let result = tokio::select! {
            _ = self.shared.stop.cancelled() => return None,
            result = handshake => result,
        };
        match result {
            Ok(Ok(tls)) => Some(tls),
            Ok(Err(e)) => {
                debug!(peer = %self.peer, error = %e, "SMTP TLS handshake failed");
                None
            }
            Err(_) => {
                debug!(peer = %self.peer, "SMTP TLS handshake timed out");
                None
            }
        }
    }

    async fn greet_and_run<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut BufReader<S>,
    ) -> Result<End, Halt> {
        match self.shared.take_fault(FaultPoint::Greeting) {
            Some(FaultAction::Reply421) => {
                self.write(io, REPLY_421).await?;
                return Err(Halt::Closed);
            }
            Some(FaultAction::Reply451) => {
                self.write(io, REPLY_451).await?;
                return Err(Halt::Closed);
            }
            Some(FaultAction::Drop | FaultAction::DropAfter) => return Err(Halt::Closed),
            None => {}
        }
        let greeting = format!(
            "220 {} Microsoft ESMTP MAIL Service ready at {}",
            self.host(),
            Utc::now().to_rfc2822()
        );
        self.write(io, &greeting).await?;
        self.run(io).await
    }

    async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut BufReader<S>,
    ) -> Result<End, Halt> {
        let mut line = Vec::with_capacity(1024);
        loop {
            if let LineRead::TooLong = self.read_line(io, &mut line).await? {
                self.reply(io, "500 5.5.2 Line too long").await?;
                continue;
            }
            let request = match Request::parse(&mut line.iter()) {
                Ok(request) => request.into_owned(),
                Err(e) => {
                    let reply = self.parse_error_reply(&line, e);
                    self.reply(io, &reply).await?;
                    continue;
                }
            };
            debug!(peer = %self.peer, command = request.name(), "SMTP command");
            if let Some(point) = fault_point(&request)
                && let Some(action) = self.shared.take_fault(point)
            {
                match action {
                    FaultAction::Reply421 => {
                        self.write(io, REPLY_421).await?;
                        return Err(Halt::Closed);
                    }
                    FaultAction::Reply451 => {
                        self.write(io, REPLY_451).await?;
                        continue;
                    }
                    FaultAction::Drop => return Err(Halt::Closed),
                    FaultAction::DropAfter => self.drop_before_reply = true,
                }
            }
            match request {
                Request::Ehlo { host } => self.ehlo(io, host, true).await?,
                Request::Helo { host } => self.ehlo(io, host, false).await?,
                Request::StartTls => {
                    if self.secure {
                        self.reply(io, "503 5.5.1 Bad sequence of commands").await?;
                    } else {
                        self.reply(io, "220 2.0.0 SMTP server ready").await?;
                        return Ok(End::StartTls);
                    }
                }
                Request::Auth {
                    mechanism,
                    initial_response,
                } => self.auth(io, mechanism, initial_response).await?,
                Request::Mail { from } => {
                    let reply = self.mail(from.address, from.size);
                    self.reply(io, &reply).await?;
                }
                Request::Rcpt { to } => {
                    let reply = self.rcpt(to.address);
                    self.reply(io, &reply).await?;
                }
                Request::Data => self.data(io).await?,
                Request::Rset => {
                    self.reset();
                    self.reply(io, "250 2.0.0 Resetting").await?;
                }
                Request::Noop { .. } => self.reply(io, "250 2.0.0 OK").await?,
                Request::Vrfy { .. } => self.reply(io, "252 2.1.5 Cannot VRFY user").await?,
                Request::Help { .. } => {
                    self.reply(
                        io,
                        "214-This server supports the following commands:\r\n\
                         214 HELO EHLO STARTTLS RCPT DATA RSET MAIL QUIT HELP AUTH",
                    )
                    .await?
                }
                Request::Quit => {
                    self.reply(io, "221 2.0.0 Service closing transmission channel")
                        .await?;
                    let _ = io.shutdown().await;
                    return Ok(End::Quit);
                }
                // BDAT (no CHUNKING offered), LHLO, EXPN, ETRN, ATRN, BURL.
                _ => self.reply(io, "500 5.3.3 Unrecognized command").await?,
            }
        }
    }

    fn parse_error_reply(&self, line: &[u8], error: ProtoError) -> String {
        let is_auth = line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"AUTH");
        match error {
            ProtoError::UnknownCommand => "500 5.3.3 Unrecognized command".to_owned(),
            ProtoError::SyntaxError { .. } if is_auth => {
                format!(
                    "504 5.7.4 Unrecognized authentication type [{}]",
                    self.host()
                )
            }
            ProtoError::InvalidSenderAddress => "501 5.1.7 Invalid address".to_owned(),
            ProtoError::InvalidRecipientAddress => "501 5.1.3 Invalid address".to_owned(),
            ProtoError::UnsupportedParameter { .. } => "555 5.5.4 Unsupported parameter".to_owned(),
            _ => "501 5.5.4 Invalid arguments".to_owned(),
        }
    }

    async fn ehlo<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut BufReader<S>,
        client: String,
        extended: bool,
    ) -> Result<(), Halt> {
        self.reset();
        let first = format!("{} Hello [{}]", self.host(), self.peer.ip());
        self.helo = Some(client);
        if !extended {
            return self.reply(io, &format!("250 {first}")).await;
        }
        let size = format!("SIZE {}", self.shared.opts.max_message_size);
        let security = if self.secure {
            "AUTH LOGIN XOAUTH2"
        } else {
            "STARTTLS"
        };
        let lines = [
            first.as_str(),
            &size,
            "PIPELINING",
            "DSN",
            "ENHANCEDSTATUSCODES",
            security,
            "8BITMIME",
            "SMTPUTF8",
        ];
        let mut text = String::new();
        for (i, line) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            if i > 0 {
                text.push_str("\r\n");
            }
            text.push_str(&format!("250{sep}{line}"));
        }
        self.reply(io, &text).await
    }

    async fn auth<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut BufReader<S>,
        mechanism: u64,
        initial: String,
    ) -> Result<(), Halt> {
        let host = self.host().to_owned();
        if !self.secure {
            return self
                .reply(
                    io,
                    &format!("504 5.7.4 Unrecognized authentication type [{host}]"),
                )
                .await;
        }
        if self.helo.is_none() {
            return self.reply(io, "503 5.5.2 Send hello first").await;
        }
        if self.user.is_some() {
            return self.reply(io, "503 5.5.1 Already authenticated").await;
        }
        if self.mail_from.is_some() {
            return self.reply(io, "503 5.5.1 Bad sequence of commands").await;
        }
        let unsuccessful = format!("535 5.7.3 Authentication unsuccessful [{host}]");
        match mechanism {
            AUTH_XOAUTH2 => {
                let response = if initial.is_empty() {
                    match self.continuation(io, "334 ").await? {
                        Some(response) => response,
                        None => return Ok(()),
                    }
                } else if initial == "*" {
                    return self.reply(io, "501 5.7.0 Authentication cancelled").await;
                } else {
                    initial
                };
                let response = if response == "=" {
                    String::new()
                } else {
                    response
                };
                let Some((user, token)) = decode_xoauth2(&response) else {
                    info!(peer = %self.peer, "SMTP AUTH XOAUTH2: malformed response");
                    return self.reply(io, &unsuccessful).await;
                };
                let info = match self.shared.authority.validate_token(&token) {
                    Ok(info) => info,
                    Err(e) => {
                        info!(peer = %self.peer, %user, reason = %e, "SMTP AUTH XOAUTH2 refused");
                        return self.reply(io, &unsuccessful).await;
                    }
                };
                if let Err(denial) = self.shared.authority.authorize(&info, &user, &host) {
                    info!(peer = %self.peer, %user, reply = %denial.reply, "SMTP AUTH XOAUTH2 refused");
                    return self.reply(io, &denial.reply).await;
                }
                info!(peer = %self.peer, %user, "SMTP AUTH XOAUTH2 succeeded");
                self.user = Some(user);
                self.reply(io, "235 2.7.0 Authentication successful").await
            }
            AUTH_LOGIN => {
                // Basic authentication is off in Exchange Online: run the exchange, then refuse.
                if initial == "*" {
                    return self.reply(io, "501 5.7.0 Authentication cancelled").await;
                }
                if initial.is_empty() && self.continuation(io, "334 VXNlcm5hbWU6").await?.is_none()
                {
                    return Ok(());
                }
                if self.continuation(io, "334 UGFzc3dvcmQ6").await?.is_none() {
                    return Ok(());
                }
                info!(peer = %self.peer, "SMTP AUTH LOGIN refused: basic authentication is disabled");
                self.reply(io, &format!("535 5.7.139 Authentication unsuccessful, basic authentication is disabled. [{host}]"))
                    .await
            }
            _ => {
                self.reply(
                    io,
                    &format!("504 5.7.4 Unrecognized authentication type [{host}]"),
                )
                .await
            }
        }
    }

    /// Sends a `334` challenge and reads the client's line; `None` when the exchange ended (cancelled with `*` or
    /// an over-long line, already answered).
    async fn continuation<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut BufReader<S>,
        challenge: &str,
    ) -> Result<Option<String>, Halt> {
        self.reply(io, challenge).await?;
        let mut line = Vec::new();
        if let LineRead::TooLong = self.read_line(io, &mut line).await? {
            self.reply(io, "500 5.5.6 Authentication exchange line is too long")
                .await?;
            return Ok(None);
        }
        let response = String::from_utf8_lossy(&line).trim().to_owned();
        if response == "*" {
            self.reply(io, "501 5.7.0 Authentication cancelled").await?;
            return Ok(None);
        }
        Ok(Some(response))
    }

    fn mail(&mut self, from: String, size: usize) -> String {
        if self.helo.is_none() {
            return "503 5.5.2 Send hello first".to_owned();
        }
        if self.user.is_none() {
            return format!(
                "530 5.7.57 Client not authenticated to send mail. [{}]",
                self.host()
            );
        }
        if self.mail_from.is_some() {
            return "503 5.5.2 Sender already specified".to_owned();
        }
        if size > self.shared.opts.max_message_size {
            return REPLY_552.to_owned();
        }
        self.mail_from = Some(from);
        "250 2.1.0 Sender OK".to_owned()
    }

    fn rcpt(&mut self, to: String) -> String {
        if self.mail_from.is_none() {
            return "503 5.5.2 Need mail command".to_owned();
        }
        if self.rcpt_to.len() >= self.shared.opts.max_recipients {
            return "452 4.5.3 Too many recipients".to_owned();
        }
        self.rcpt_to.push(to);
        "250 2.1.5 Recipient OK".to_owned()
    }

    async fn data<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut BufReader<S>,
    ) -> Result<(), Halt> {
        let Some(user) = self.user.clone() else {
            let reply = format!(
                "530 5.7.57 Client not authenticated to send mail. [{}]",
                self.host()
            );
            return self.reply(io, &reply).await;
        };
        if self.mail_from.is_none() {
            return self.reply(io, "503 5.5.2 Need mail command").await;
        }
        if self.rcpt_to.is_empty() {
            return self.reply(io, "503 5.5.2 Need rcpt command").await;
        }
        self.reply(io, "354 Start mail input; end with <CRLF>.<CRLF>")
            .await?;
        let (data, size) = self.read_data(io).await?;
        let submission = Submission {
            user,
            mail_from: self.mail_from.take().unwrap_or_default(),
            rcpt_to: std::mem::take(&mut self.rcpt_to),
            helo: self.helo.clone().unwrap_or_default(),
            peer: self.peer,
        };
        match self.shared.take_fault(FaultPoint::DataEnd) {
            Some(FaultAction::Reply421) => {
                self.write(io, REPLY_421).await?;
                return Err(Halt::Closed);
            }
            Some(FaultAction::Reply451) => return self.write(io, REPLY_451).await,
            Some(FaultAction::Drop) => return Err(Halt::Closed),
            Some(FaultAction::DropAfter) => self.drop_before_reply = true,
            None => {}
        }
        let Some(data) = data else {
            info!(peer = %self.peer, size, "SMTP message over the size limit");
            return self.reply(io, REPLY_552).await;
        };
        if let Err(denial) = self.check_send_as(&submission, &data) {
            info!(peer = %self.peer, reply = %denial.reply, "SMTP Send As denied");
            return self.reply(io, &denial.reply).await;
        }
        let shared = self.shared.clone();
        let stored = tokio::task::spawn_blocking(move || store(&shared, &submission, &data)).await;
        match stored {
            Ok(Ok(entry)) => {
                info!(
                    peer = %self.peer, id = %entry.id, user = %entry.user, from = %entry.mail_from,
                    rcpts = entry.rcpt_to.len(), size = entry.size, delivered = entry.delivered_to.len(),
                    "SMTP message accepted"
                );
                let reply = format!(
                    "250 2.6.0 <{}> [InternalId={}, Hostname={}] Queued mail for delivery",
                    entry.queued_id,
                    entry.internal_id,
                    self.host()
                );
                self.reply(io, &reply).await
            }
            Ok(Err(e)) => {
                warn!(peer = %self.peer, error = %e, "SMTP could not store a message");
                self.reply(io, REPLY_451).await
            }
            Err(e) => {
                warn!(peer = %self.peer, error = %e, "SMTP store task failed");
                self.reply(io, REPLY_451).await
            }
        }
    }

    /// Reads the message up to `CRLF.CRLF`, unstuffing dots. Returns the data (`None` if over the size limit; the
    /// rest is drained) and its size. Bytes after the final dot stay in the reader (pipelining).
    async fn read_data<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut BufReader<S>,
    ) -> Result<(Option<Vec<u8>>, usize), Halt> {
        let max = self.shared.opts.max_message_size;
        let mut receiver = DataReceiver::new();
        // DataReceiver starts as if in the middle of a line: seed it so a `.` on the first line is seen.
        let mut seed = Vec::new();
        receiver.ingest(&mut b"\r\n".iter(), &mut seed);
        let mut data = Vec::new();
        let mut drained = 0usize;
        let mut oversize = false;
        loop {
            self.fill(io).await?;
            let buffer = io.buffer();
            let mut bytes = buffer.iter();
            let done = receiver.ingest(&mut bytes, &mut data);
            let used = buffer.len() - bytes.as_slice().len();
            io.consume(used);
            if oversize || data.len() > max {
                oversize = true;
                drained += data.len();
                data.clear();
            }
            if done {
                if oversize {
                    return Ok((None, drained + data.len()));
                }
                let size = data.len();
                return Ok((Some(data), size));
            }
        }
    }

    fn check_send_as(&self, submission: &Submission, data: &[u8]) -> Result<(), SmtpDenial> {
        let authority = &self.shared.authority;
        authority.send_as(&submission.user, &submission.mail_from)?;
        if let Some(headers) = mail_parser::MessageParser::new().parse_headers(data)
            && let Some(from) = headers.from()
        {
            for address in from.iter().filter_map(|a| a.address()) {
                authority.send_as(&submission.user, address)?;
            }
        }
        Ok(())
    }

    /// Waits for buffered input (EOF → [`Halt::Eof`]), honouring the idle timeout and the stop token.
    async fn fill<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut BufReader<S>,
    ) -> Result<(), Halt> {
        let idle = self.shared.opts.idle_timeout;
        let stop = self.shared.stop.clone();
        let outcome = tokio::select! {
            _ = stop.cancelled() => None,
            read = tokio::time::timeout(idle, io.fill_buf()) => Some(read.map(|r| r.map(|b| b.is_empty()))),
        };
        match outcome {
            None => self.closing(io, REPLY_421).await,
            Some(Err(_)) => self.timed_out(io).await,
            Some(Ok(Ok(true))) => Err(Halt::Eof),
            Some(Ok(Ok(false))) => Ok(()),
            Some(Ok(Err(e))) => Err(e.into()),
        }
    }

    /// Reads one line (with its CRLF) of at most [`MAX_LINE_LENGTH`] bytes; a longer one is skipped to its end.
    async fn read_line<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut BufReader<S>,
        line: &mut Vec<u8>,
    ) -> Result<LineRead, Halt> {
        line.clear();
        let idle = self.shared.opts.idle_timeout;
        let stop = self.shared.stop.clone();
        let read = async {
            let limit = MAX_LINE_LENGTH as u64;
            if (&mut *io).take(limit).read_until(b'\n', line).await? == 0 {
                return Err(Halt::Eof);
            }
            if line.ends_with(b"\n") {
                return Ok(LineRead::Line);
            }
            if line.len() < MAX_LINE_LENGTH {
                return Err(Halt::Eof);
            }
            loop {
                line.clear();
                if (&mut *io).take(limit).read_until(b'\n', line).await? == 0 {
                    return Err(Halt::Eof);
                }
                if line.ends_with(b"\n") {
                    line.clear();
                    return Ok(LineRead::TooLong);
                }
            }
        };
        let outcome = tokio::select! {
            _ = stop.cancelled() => None,
            read = tokio::time::timeout(idle, read) => Some(read),
        };
        match outcome {
            None => self.closing(io, REPLY_421).await,
            Some(Err(_)) => self.timed_out(io).await,
            Some(Ok(result)) => result,
        }
    }

    async fn timed_out<S: AsyncRead + AsyncWrite + Unpin, T>(
        &mut self,
        io: &mut BufReader<S>,
    ) -> Result<T, Halt> {
        debug!(peer = %self.peer, "SMTP idle timeout");
        let reply = format!(
            "421 4.4.2 {} Connection dropped due to timeout",
            self.host()
        );
        self.closing(io, &reply).await
    }

    /// Writes a last reply and ends the session.
    async fn closing<S: AsyncRead + AsyncWrite + Unpin, T>(
        &mut self,
        io: &mut BufReader<S>,
        reply: &str,
    ) -> Result<T, Halt> {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.write(io, reply)).await;
        Err(Halt::Closed)
    }

    /// Writes a reply, unless a `drop_after` fault is pending and this is a final reply: then the connection is
    /// closed instead.
    async fn reply<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut BufReader<S>,
        text: &str,
    ) -> Result<(), Halt> {
        if self.drop_before_reply && !text.starts_with('3') {
            self.drop_before_reply = false;
            debug!(peer = %self.peer, "SMTP fault: dropping the connection instead of replying");
            return Err(Halt::Closed);
        }
        self.write(io, text).await
    }

    async fn write<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut BufReader<S>,
        text: &str,
    ) -> Result<(), Halt> {
        let mut out = Vec::with_capacity(text.len() + 2);
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\n");
        io.write_all(&out).await?;
        io.flush().await?;
        Ok(())
    }
}

fn fault_point<T>(request: &Request<T>) -> Option<FaultPoint> {
    Some(match request {
        Request::Ehlo { .. } | Request::Helo { .. } => FaultPoint::Ehlo,
        Request::StartTls => FaultPoint::Starttls,
        Request::Auth { .. } => FaultPoint::Auth,
        Request::Mail { .. } => FaultPoint::Mail,
        Request::Rcpt { .. } => FaultPoint::Rcpt,
        Request::Data => FaultPoint::Data,
        Request::Quit => FaultPoint::Quit,
        _ => return None,
    })
}

/// Decodes an XOAUTH2 response: base64 of `user=<mailbox>\x01auth=Bearer <token>\x01\x01`.
fn decode_xoauth2(response: &str) -> Option<(String, String)> {
    let raw = STANDARD.decode(response.trim()).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let mut user = None;
    let mut token = None;
    for part in text.split('\x01') {
        if let Some(value) = part.strip_prefix("user=") {
            user = Some(value.trim());
        } else if let Some(value) = part.strip_prefix("auth=") {
            let value = value.trim();
            if value.len() > 7 && value[..7].eq_ignore_ascii_case("bearer ") {
                token = Some(value[7..].trim());
            }
        }
    }
    match (user, token) {
        (Some(user), Some(token)) if !user.is_empty() && !token.is_empty() => {
            Some((user.to_owned(), token.to_owned()))
        }
        _ => None,
    }
}

/// Stores an accepted message: the byte-exact file under `sent/`, local deliveries (with a `Received:` header and,
/// if missing, a `Message-ID:`), then the index line (so an index line means everything else is done).
fn store(shared: &Shared, submission: &Submission, data: &[u8]) -> io::Result<SentEntry> {
    let opts = &shared.opts;
    let now = Utc::now();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let internal_id = shared.next_internal_id.fetch_add(1, Ordering::Relaxed);
    let file = format!("{}-{}.eml", now.format("%Y%m%dT%H%M%S%.3fZ"), &id[..12]);

    let tmp = opts.sent_dir.join(format!(".{id}.tmp"));
    fs::write(&tmp, data)?;
    fs::rename(&tmp, opts.sent_dir.join(&file))?;

    let message_id = mail_parser::MessageParser::new()
        .parse_headers(data)
        .and_then(|m| m.message_id().map(str::to_owned));
    let queued_id = message_id.clone().unwrap_or_else(|| {
        format!(
            "{}@{}",
            uuid::Uuid::new_v4().simple().to_string().to_uppercase(),
            opts.hostname
        )
    });

    let mut delivered_to = Vec::new();
    if let Some(mail_root) = &opts.mail_root {
        let mut copy = Vec::with_capacity(data.len() + 512);
        if message_id.is_none() {
            copy.extend_from_slice(format!("Message-ID: <{queued_id}>\r\n").as_bytes());
        }
        copy.extend_from_slice(data);
        let received = format!(
            "Received: from {} ([{}]) by {} with Microsoft SMTP Server (TLS) id {}; {}\r\n",
            submission.helo,
            submission.peer.ip(),
            opts.hostname,
            internal_id,
            now.to_rfc2822()
        );
        let mut delivered = Vec::with_capacity(copy.len() + received.len());
        delivered.extend_from_slice(received.as_bytes());
        delivered.extend_from_slice(&copy);

        let mut seen = HashSet::new();
        for rcpt in &submission.rcpt_to {
            if !seen.insert(rcpt.to_ascii_lowercase()) || !shared.authority.is_local_mailbox(rcpt) {
                continue;
            }
            match Maildir::open(mail_root, rcpt, opts.mail_owner)
                .and_then(|m| m.deliver(&delivered))
            {
                Ok(path) => {
                    debug!(%rcpt, path = %path.display(), "SMTP delivered locally");
                    delivered_to.push(rcpt.clone());
                }
                Err(e) => warn!(%rcpt, error = %e, "SMTP local delivery failed"),
            }
        }
        if let Some(folder) = &opts.sent_items_folder {
            let filed = Maildir::open(mail_root, &submission.user, opts.mail_owner)
                .and_then(|m| m.folder(folder))
                .and_then(|f| f.deliver_seen(&copy));
            if let Err(e) = filed {
                warn!(user = %submission.user, error = %e, "SMTP could not file the sent copy");
            }
        }
    }

    let entry = SentEntry {
        id,
        time: now,
        user: submission.user.clone(),
        mail_from: submission.mail_from.clone(),
        rcpt_to: submission.rcpt_to.clone(),
        size: data.len(),
        file,
        message_id,
        queued_id,
        internal_id,
        delivered_to,
    };
    let mut line = serde_json::to_string(&entry).map_err(io::Error::other)?;
    line.push('\n');
    let _guard = shared
        .index_lock
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let mut index = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(opts.sent_dir.join("index.jsonl"))?;
    index.write_all(line.as_bytes())?;
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xoauth2_responses_decode() {
        let b64 = STANDARD.encode("user=Support@contoso.com\x01auth=Bearer abc.def.ghi\x01\x01");
        assert_eq!(
            decode_xoauth2(&b64),
            Some(("Support@contoso.com".into(), "abc.def.ghi".into()))
        );
        assert_eq!(decode_xoauth2("not base64!"), None);
        assert_eq!(
            decode_xoauth2(&STANDARD.encode("user=a\x01auth=Basic x\x01\x01")),
            None
        );
        assert_eq!(
            decode_xoauth2(&STANDARD.encode("auth=Bearer x\x01\x01")),
            None
        );
        assert_eq!(decode_xoauth2(""), None);
    }

    #[test]
    fn fault_json_shapes() {
        let fault: SmtpFault =
            serde_json::from_str(r#"{"point":"data_end","action":"drop_after"}"#).unwrap();
        assert_eq!(
            fault,
            SmtpFault {
                point: FaultPoint::DataEnd,
                action: FaultAction::DropAfter,
                count: 1
            }
        );
        let fault: SmtpFault =
            serde_json::from_str(r#"{"point":"greeting","action":"421","count":3}"#).unwrap();
        assert_eq!(fault.action, FaultAction::Reply421);
        assert_eq!(
            serde_json::to_string(&FaultPoint::Starttls).unwrap(),
            r#""starttls""#
        );
    }
}
