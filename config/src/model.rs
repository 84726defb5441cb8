//! The configuration model: what an admin writes in YAML, after parsing.
//!
//! Types here *parse, don't validate*: a value of `EmailAddress`, `LanguageTag`, `Interval` or `Secret` is known good.
//! Cross-field rules (unknown server, duplicate address, …) live in `validate`.

use std::{fmt, path::PathBuf, time::Duration};

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where contacts are stored. Defaults to the embedded SQLite file `data/mailqueue.db`.
    #[serde(default)]
    pub database: Database,
    /// The HTTP queue API.
    #[serde(default)]
    pub api: Api,
    /// System-wide defaults that queues and addresses override.
    #[serde(default)]
    pub defaults: Defaults,
    /// Mail servers that queue addresses are fetched from (IMAP with OAuth2).
    #[serde(default)]
    pub incoming_servers: Vec<IncomingServer>,
    /// The server replies are sent through (SMTP with OAuth2).
    #[serde(default)]
    pub outgoing_server: Option<OutgoingServer>,
    /// Queues and the mailboxes (addresses) that feed them.
    #[serde(default)]
    pub queues: Vec<Queue>,
    /// How ingest treats automated mail (auto-replies, bounces, bulk mail, loops), senders that flood the queues,
    /// and mail it cannot store.
    #[serde(default)]
    pub ingest: Ingest,
    /// How long closed contacts, their raw mail and events are kept. Off by default: everything is kept forever.
    #[serde(default)]
    pub retention: Retention,
}

/// The database contacts, mails and events are stored in.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Database {
    /// `sqlite://PATH` (embedded default) or `postgres://user@host/db` (production).
    pub url: String,
}

/// Which database engine a [`Database::url`] selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseKind {
    Sqlite,
    Postgres,
}

impl Database {
    /// The engine from the URL scheme; `None` if the scheme is not supported (`load` rejects those).
    pub fn kind(&self) -> Option<DatabaseKind> {
        let url = self.url.trim();
        if url.starts_with("sqlite:") {
            Some(DatabaseKind::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(DatabaseKind::Postgres)
        } else {
            None
        }
    }
}

impl Default for Database {
    fn default() -> Self {
        Self {
            url: "sqlite://data/mailqueue.db".into(),
        }
    }
}

/// The HTTP queue API used by agents, the router and admins.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Api {
    /// Socket address (IP:PORT) the HTTP API listens on. Default `127.0.0.1:8080`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Bearer tokens accepted by the API.
    #[serde(default)]
    pub tokens: Vec<ApiToken>,
    /// Who may read `GET /metrics` (Prometheus): `token` (a router or admin bearer token; Prometheus sends it with
    /// `authorization: { credentials_file: … }`) or `public` (no token, like `/healthz`). Default `token`: the
    /// figures name queues, mailbox addresses and the outgoing server's contact.
    #[serde(default)]
    pub metrics: MetricsAccess,
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}

impl Default for Api {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            tokens: Vec::new(),
            metrics: MetricsAccess::default(),
        }
    }
}

/// Who may read `GET /metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MetricsAccess {
    /// A bearer token with role `router` or `admin`.
    #[default]
    Token,
    /// Anyone who reaches the listen address.
    Public,
}

/// A bearer token accepted by the API, and what its holder may do.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiToken {
    /// Who uses the token (agent id, service name); shown in events and logs.
    pub name: String,
    /// What the holder may do.
    pub role: Role,
    /// The bearer token value; unique per token.
    pub secret: Secret,
    /// Agent tokens: the queues this agent serves. Empty means none (agents) or all (router, admin).
    #[serde(default)]
    pub queues: Vec<String>,
    /// Agent tokens: the languages this agent handles. Empty means any.
    #[serde(default)]
    pub languages: Vec<LanguageTag>,
}

/// What an API token's holder may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Claims and works contacts of its own queues and languages.
    Agent,
    /// Reads every queue and event, and assigns contacts to agents.
    Router,
    /// Everything.
    Admin,
}

/// System-wide defaults.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// System language; a queue's `language` overrides it.
    #[serde(default = "default_language")]
    pub language: LanguageTag,
    /// How often mailboxes are polled (safety poll when IDLE is used).
    #[serde(default = "default_poll_interval")]
    pub poll_interval: Interval,
    /// Largest mail accepted, in MB (1..=40); larger mail goes to quarantine.
    #[serde(default = "default_max_size")]
    #[schemars(range(min = 1, max = 40))]
    pub max_email_size_mb: u32,
    /// How long a claim lasts without a heartbeat before the contact returns to its queue.
    #[serde(default = "default_claim_lease")]
    pub claim_lease: Interval,
    /// With several instances on one PostgreSQL, how long an instance holds a mailbox without renewing its lease
    /// (renewed every third of it); a dead instance's mailboxes move to another after at most this. Default `15s`.
    #[serde(default = "default_mailbox_lease")]
    pub mailbox_lease: Interval,
}

fn default_language() -> LanguageTag {
    LanguageTag("en".into())
}
fn default_poll_interval() -> Interval {
    Interval(Duration::from_secs(30))
}
fn default_max_size() -> u32 {
    25
}
fn default_claim_lease() -> Interval {
    Interval(Duration::from_secs(300))
}
fn default_mailbox_lease() -> Interval {
    Interval(Duration::from_secs(15))
}

impl Default for Defaults {
    fn default() -> Self {
        Self {
            language: default_language(),
            poll_interval: default_poll_interval(),
            max_email_size_mb: default_max_size(),
            claim_lease: default_claim_lease(),
            mailbox_lease: default_mailbox_lease(),
        }
    }
}

/// Ingest policies: what happens to mail that should not open a contact.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Ingest {
    /// What to do with automated mail: auto-replies (`Auto-Submitted`, `X-Autoreply`, `X-Autorespond`,
    /// `X-Auto-Response-Suppress`), bulk mail (`Precedence: bulk|junk|list`), bounces (delivery status
    /// notifications, mailer-daemon / postmaster senders) and loops (From is one of our queue addresses).
    /// Automated mail never opens a contact. Default `attach`.
    #[serde(default)]
    pub automated_mail: AutomatedMail,
    /// A per-sender rate breaker shared by all instances: once a sender address has this many inbound mails stored
    /// within the window, its further mail goes to quarantine. `null` turns it off. Default `{ max: 30, per: 10m }`.
    #[serde(default = "default_sender_limit")]
    pub sender_limit: Option<SenderLimit>,
    /// The IMAP folder mail is moved to when it is quarantined (too large, unparsable, automated without a
    /// contact, over the sender limit). It must not be a folder that an address fetches from. Default `Quarantine`.
    #[serde(default = "default_quarantine_folder")]
    pub quarantine_folder: String,
}

fn default_sender_limit() -> Option<SenderLimit> {
    Some(SenderLimit::default())
}
fn default_quarantine_folder() -> String {
    "Quarantine".into()
}

impl Default for Ingest {
    fn default() -> Self {
        Self {
            automated_mail: AutomatedMail::default(),
            sender_limit: default_sender_limit(),
            quarantine_folder: default_quarantine_folder(),
        }
    }
}

/// What ingest does with automated mail.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AutomatedMail {
    /// Attach it to the contact it belongs to (a reply to one of our mails, a bounce of one of our replies)
    /// without re-opening that contact; quarantine it when it belongs to none.
    #[default]
    Attach,
    /// Always quarantine it.
    Quarantine,
}

/// At most `max` inbound mails per sender address within `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SenderLimit {
    /// Mails a sender may have stored within the window (at least 1). Default 30.
    #[serde(default = "default_sender_max")]
    #[schemars(range(min = 1))]
    pub max: u32,
    /// The window, e.g. `10m`. Default 10m.
    #[serde(default = "default_sender_per")]
    pub per: Interval,
}

fn default_sender_max() -> u32 {
    30
}
fn default_sender_per() -> Interval {
    Interval(Duration::from_secs(600))
}

impl Default for SenderLimit {
    fn default() -> Self {
        Self {
            max: default_sender_max(),
            per: default_sender_per(),
        }
    }
}

/// The retention job: what is deleted once it is older than an age. Each age is optional; an absent age keeps that
/// data forever, so the job does nothing unless at least one age is set. Every instance may run it at once.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Closed contacts are deleted, with their messages, attachments and replies, once they have been closed this
    /// long (e.g. `365d`). Contacts with a reply still waiting to be sent are kept until it is sent or failed.
    #[serde(default)]
    pub closed_contacts: Option<Interval>,
    /// The raw RFC 822 bytes of the messages of contacts closed this long ago are dropped (e.g. `30d`); the parsed
    /// text, headers and attachments stay, and `GET …/raw` answers 410 Gone.
    #[serde(default)]
    pub raw_messages: Option<Interval>,
    /// Events older than this are deleted (e.g. `30d`). An event stream client that stays away longer than this
    /// misses the deleted events; the newest event is always kept so sequence numbers continue.
    #[serde(default)]
    pub events: Option<Interval>,
    /// How often the job runs. Default `1h`.
    #[serde(default = "default_retention_interval")]
    pub interval: Interval,
    /// Rows deleted per transaction, so no lock is held long (1..=10000). Default 1000.
    #[serde(default = "default_retention_batch")]
    #[schemars(range(min = 1, max = 10000))]
    pub batch_size: u32,
}

fn default_retention_interval() -> Interval {
    Interval(Duration::from_secs(3600))
}
fn default_retention_batch() -> u32 {
    1000
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            closed_contacts: None,
            raw_messages: None,
            events: None,
            interval: default_retention_interval(),
            batch_size: default_retention_batch(),
        }
    }
}

impl Retention {
    /// An age as written in the file when it is whole days (`90d`; humantime would say `2months 29days 2h 52m
    /// 48s`), else like [`Interval`]'s `Display`.
    pub fn age_text(age: Interval) -> String {
        const DAY: u64 = 24 * 3600;
        let secs = age.0.as_secs();
        if secs.is_multiple_of(DAY) && age.0.subsec_nanos() == 0 {
            format!("{}d", secs / DAY)
        } else {
            age.to_string()
        }
    }

    /// Whether the job has anything to do.
    pub fn is_enabled(&self) -> bool {
        self.closed_contacts.is_some() || self.raw_messages.is_some() || self.events.is_some()
    }
}

/// How a server obtains OAuth2 access tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AuthType {
    /// OAuth User: resource-owner password grant; each address carries its mailbox password; no client secret.
    OauthUser,
    /// OAuth Service: client-credentials grant with a client secret; no passwords (shared mailboxes).
    OauthService,
}

/// An IMAP server with OAuth2 that queue addresses are fetched from.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IncomingServer {
    /// Name that queue addresses refer to.
    pub name: String,
    /// `https://login.microsoftonline.com/<tenant>`; the token endpoint is `<login_address>/oauth2/v2.0/token`.
    #[serde(default)]
    pub login_address: Option<String>,
    /// The whole token endpoint URL (alternative to `login_address`).
    #[serde(default)]
    pub token_endpoint: Option<String>,
    /// How access tokens are obtained.
    pub auth: AuthType,
    /// The OAuth2 client (application) id.
    pub client_id: String,
    /// Required for `oauth_service`; not used by `oauth_user`.
    #[serde(default)]
    pub client_secret: Option<Secret>,
    /// OAuth scopes; default depends on `auth`.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Where the IMAP server is.
    pub imap: ImapEndpoint,
    /// Extra CA certificate (PEM) to trust, e.g. the local sandbox's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Whether mail is fetched from this server; `false` keeps its addresses configured (as queues and senders)
    /// without ever connecting to it. Default `true`.
    #[serde(default = "default_true")]
    pub enabled: bool,
}

/// An IMAP server's address and TLS mode.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImapEndpoint {
    /// Host name.
    pub host: String,
    /// Port; default 993.
    #[serde(default = "default_imap_port")]
    pub port: u16,
    /// TLS mode; default `implicit`.
    #[serde(default)]
    pub tls: ImapTls,
}

fn default_imap_port() -> u16 {
    993
}

/// How an IMAP connection is secured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImapTls {
    /// TLS from the first byte (port 993).
    #[default]
    Implicit,
    /// Plain connection upgraded with STARTTLS (port 143).
    Starttls,
}

/// The SMTP server with OAuth2 that replies are sent through.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OutgoingServer {
    /// Host name.
    pub host: String,
    /// Port; default 587.
    #[serde(default = "default_smtp_port")]
    pub port: u16,
    /// STARTTLS on a plain connection (587); `false` means implicit TLS (465).
    #[serde(default = "default_true")]
    pub starttls: bool,
    /// `https://login.microsoftonline.com/<tenant>`; the token endpoint is `<login_address>/oauth2/v2.0/token`.
    #[serde(default)]
    pub login_address: Option<String>,
    /// The whole token endpoint URL (alternative to `login_address`).
    #[serde(default)]
    pub token_endpoint: Option<String>,
    /// How access tokens are obtained.
    pub auth: AuthType,
    /// The OAuth2 client (application) id.
    pub client_id: String,
    /// Required for `oauth_service`; not used by `oauth_user`.
    #[serde(default)]
    pub client_secret: Option<Secret>,
    /// The mailbox that authenticates (SASL user).
    pub username: EmailAddress,
    /// Password of `username`; `oauth_user` only.
    #[serde(default)]
    pub password: Option<Secret>,
    /// OAuth scopes; default `["https://outlook.office.com/.default"]`.
    #[serde(default = "default_smtp_scopes")]
    pub scopes: Vec<String>,
    /// Largest outgoing mail in MB (1..=40).
    #[serde(default = "default_outgoing_max")]
    #[schemars(range(min = 1, max = 40))]
    pub max_email_size_mb: u32,
    /// Replies sent at once, each on its own connection (1..=32, per engine instance). Default 3: Exchange Online
    /// accepts at most three concurrent SMTP submissions per mailbox and answers more with `432 4.3.2`.
    #[serde(default = "default_smtp_connections")]
    #[schemars(range(min = 1, max = 32))]
    pub connections: u32,
    /// Who operators' alerting reaches when sending keeps failing.
    #[serde(default)]
    pub contact_information: Option<String>,
    /// Extra CA certificate (PEM) to trust, e.g. the local sandbox's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_smtp_port() -> u16 {
    587
}
fn default_true() -> bool {
    true
}
fn default_smtp_scopes() -> Vec<String> {
    vec!["https://outlook.office.com/.default".into()]
}
fn default_outgoing_max() -> u32 {
    25
}
fn default_smtp_connections() -> u32 {
    3
}

/// A queue of contacts and the mailboxes that feed it.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Queue {
    /// Unique queue name used by the API and by agents' tokens.
    pub name: String,
    /// Contact-management priority; the lowest value is served first.
    #[serde(default = "default_priority")]
    pub priority: i32,
    /// Queue language; overrides `defaults.language`.
    #[serde(default)]
    pub language: Option<LanguageTag>,
    /// The mailboxes that feed this queue (at least one).
    pub addresses: Vec<Address>,
}

fn default_priority() -> i32 {
    5
}

/// A mailbox that feeds a queue.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Address {
    /// The queue's email address (what customers write to).
    pub address: EmailAddress,
    /// Overrides the queue's priority for mail arriving on this address.
    #[serde(default)]
    pub priority: Option<i32>,
    /// Extension language; overrides the queue's language.
    #[serde(default)]
    pub language: Option<LanguageTag>,
    /// Name of an `incoming_servers` entry.
    pub server: String,
    /// Mailbox login; defaults to `address`.
    #[serde(default)]
    pub account: Option<EmailAddress>,
    /// Mailbox password: `oauth_user` servers only.
    #[serde(default)]
    pub password: Option<Secret>,
    /// Whether this address may be used as the sender of replies.
    #[serde(default)]
    pub sender: bool,
    /// IMAP folder to fetch from.
    #[serde(default = "default_folder")]
    pub folder: String,
    /// What to do on the server once a mail is stored.
    #[serde(default)]
    pub after_fetch: AfterFetch,
}

fn default_folder() -> String {
    "INBOX".into()
}

impl Address {
    /// The mailbox login: `account`, else the address itself.
    pub fn login(&self) -> &EmailAddress {
        self.account.as_ref().unwrap_or(&self.address)
    }
}

/// What to do with a mail on the server once it is stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AfterFetch {
    /// Mark the mail `\Seen`.
    #[default]
    Seen,
    /// Delete (expunge) the mail.
    Delete,
    /// Move the mail to a folder: `{ move: "Processed" }`.
    Move(String),
}

/// A string, with `expecting` in the type error ("expected a duration", not "expected a string").
fn string_for<'de, D: Deserializer<'de>>(
    d: D,
    expecting: &'static str,
) -> Result<String, D::Error> {
    struct V(&'static str);
    impl serde::de::Visitor<'_> for V {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(self.0)
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
    }
    d.deserialize_str(V(expecting))
}

/// An email address, parsed (RFC 5321 mailbox, lower-cased domain).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, JsonSchema)]
#[serde(transparent)]
#[schemars(transparent)]
pub struct EmailAddress(#[schemars(with = "String")] String);

impl EmailAddress {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        // A bare mailbox: no display name (`Name <a@b>`), no domain literal (`a@[1.2.3.4]`).
        let options = email_address::Options::default()
            .without_display_text()
            .without_domain_literal();
        if let Err(e) = email_address::EmailAddress::parse_with_options(s, options) {
            return Err(format!(
                "`{s}` is not a valid email address ({e}); expected local@domain"
            ));
        }
        let (local, domain) = s.rsplit_once('@').expect("valid address has @");
        Ok(Self(format!("{local}@{}", domain.to_ascii_lowercase())))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for EmailAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}
impl fmt::Display for EmailAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for EmailAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = string_for(d, "an email address (local@domain)")?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A BCP 47 language tag such as `en`, `de-CH`.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, JsonSchema)]
#[serde(transparent)]
pub struct LanguageTag(String);

impl LanguageTag {
    pub fn parse(s: &str) -> Result<Self, String> {
        // `validate` checks the subtags against the IANA registry, so `english` or `xx` are rejected too.
        let tag = language_tags::LanguageTag::parse(s.trim()).map_err(|e| {
            format!("`{s}` is not a BCP 47 language tag ({e}); expected e.g. `en`, `de-CH`")
        })?;
        tag.validate().map_err(|e| {
            format!("`{s}` is not a valid BCP 47 language tag ({e}); expected e.g. `en`, `de-CH`")
        })?;
        Ok(Self(tag.to_string()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for LanguageTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}
impl fmt::Display for LanguageTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for LanguageTag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = string_for(d, "a BCP 47 language tag such as `en` or `de-CH`")?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A positive duration written like `30s`, `5m`, `1h 30m`.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
pub struct Interval(#[schemars(with = "String")] pub Duration);

impl Interval {
    pub fn parse(s: &str) -> Result<Self, String> {
        let d = humantime::parse_duration(s.trim())
            .map_err(|e| format!("`{s}` is not a duration ({e}); expected e.g. `30s`, `5m`"))?;
        if d.is_zero() {
            return Err(format!("`{s}` must be greater than zero"));
        }
        Ok(Self(d))
    }
}

impl fmt::Debug for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}
impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for Interval {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = string_for(d, "a duration such as `30s` or `5m`")?;
        if s.trim_start().starts_with('-') {
            return Err(serde::de::Error::custom(format!(
                "`{s}` is negative; expected a positive duration such as `30s`"
            )));
        }
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Where a secret comes from.
#[derive(Clone, PartialEq, Eq, JsonSchema)]
#[serde(untagged, deny_unknown_fields)]
pub enum SecretSource {
    /// `{ env: NAME }`: read from an environment variable.
    Env { env: String },
    /// `{ file: PATH }`: read from a file (trailing newline trimmed); relative to the config file.
    File { file: PathBuf },
    /// A plain string in the file (allowed, but `check-config` warns).
    Inline(String),
}

/// A secret (client secret, password, API token). Never printed: Debug and Display show only where it comes from.
/// Equal when both the source and the resolved value are (reload compares configurations).
#[derive(Clone, PartialEq, Eq, JsonSchema)]
#[schemars(with = "SecretSource")]
pub struct Secret {
    source: SecretSource,
    value: Option<String>,
}

impl Secret {
    pub fn new(source: SecretSource, value: Option<String>) -> Self {
        Self { source, value }
    }
    pub fn source(&self) -> &SecretSource {
        &self.source
    }
    /// The secret's value, once `load` has resolved it.
    pub fn expose(&self) -> &str {
        self.value.as_deref().unwrap_or("")
    }
    pub fn is_resolved(&self) -> bool {
        self.value.is_some()
    }
    pub fn set_value(&mut self, value: String) {
        self.value = Some(value);
    }
    /// Where the value comes from, safe to print: `env MQ_TOKEN`, `file /run/secrets/x`, `inline`.
    pub fn origin(&self) -> String {
        match &self.source {
            SecretSource::Env { env } => format!("env {env}"),
            SecretSource::File { file } => format!("file {}", file.display()),
            SecretSource::Inline(_) => "inline".into(),
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({}, ***)", self.origin())
    }
}
impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

const SECRET_EXPECTED: &str = "a secret: `{ env: NAME }`, `{ file: PATH }` or a quoted string";

/// Hand-written rather than `untagged`: precise errors (unknown key, two keys), a missing field stays a
/// missing field, and no error message ever contains the value.
impl<'de> Deserialize<'de> for SecretSource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SecretSourceVisitor)
    }
}

struct SecretSourceVisitor;

impl SecretSourceVisitor {
    /// For scalars that are not strings; says nothing about the value itself.
    fn not_a_string<E: serde::de::Error>() -> E {
        E::custom(format!(
            "expected {SECRET_EXPECTED} (write an inline secret in quotes)"
        ))
    }
}

impl<'de> serde::de::Visitor<'de> for SecretSourceVisitor {
    type Value = SecretSource;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(SECRET_EXPECTED)
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SecretSource, E> {
        Ok(SecretSource::Inline(v.to_owned()))
    }
    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<SecretSource, E> {
        Ok(SecretSource::Inline(v))
    }
    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<SecretSource, E> {
        Err(Self::not_a_string())
    }
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<SecretSource, E> {
        Err(Self::not_a_string())
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<SecretSource, E> {
        Err(Self::not_a_string())
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<SecretSource, E> {
        Err(Self::not_a_string())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<SecretSource, A::Error> {
        use serde::de::Error;
        let Some(key) = map.next_key::<String>()? else {
            return Err(A::Error::custom(format!(
                "empty mapping; expected {SECRET_EXPECTED}"
            )));
        };
        let source = match key.as_str() {
            "env" => SecretSource::Env {
                env: map.next_value()?,
            },
            "file" => SecretSource::File {
                file: map.next_value()?,
            },
            // Keys are not echoed: `{ s3cr3t }` is a mapping whose key is the secret.
            _ => {
                return Err(A::Error::custom(format!(
                    "unknown key; expected {SECRET_EXPECTED}"
                )));
            }
        };
        if map.next_key::<serde::de::IgnoredAny>()?.is_some() {
            return Err(A::Error::custom(
                "a secret takes exactly one key, `env` or `file`",
            ));
        }
        Ok(source)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let source = SecretSource::deserialize(d)?;
        match &source {
            SecretSource::Env { env } if env.trim().is_empty() => {
                return Err(serde::de::Error::custom(
                    "`env` must name an environment variable",
                ));
            }
            SecretSource::File { file } if file.as_os_str().is_empty() => {
                return Err(serde::de::Error::custom("`file` must name a file"));
            }
            _ => {}
        }
        let value = match &source {
            SecretSource::Inline(v) => Some(v.clone()),
            _ => None,
        };
        Ok(Self { source, value })
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

impl Config {
    /// The queue with this name.
    pub fn queue(&self, name: &str) -> Option<&Queue> {
        self.queues.iter().find(|q| q.name == name)
    }
    /// The queue and address entry for a queue address.
    pub fn address(&self, address: &str) -> Option<(&Queue, &Address)> {
        self.queues
            .iter()
            .flat_map(|q| q.addresses.iter().map(move |a| (q, a)))
            .find(|(_, a)| a.address.as_str().eq_ignore_ascii_case(address))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_address_parses_and_lowercases_the_domain() {
        assert_eq!(
            EmailAddress::parse(" Support@Contoso.COM ")
                .unwrap()
                .as_str(),
            "Support@contoso.com"
        );
        for bad in [
            "",
            "support",
            "support@",
            "@contoso.com",
            "a b@contoso.com",
            "Name <a@b.com>",
        ] {
            assert!(EmailAddress::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn language_tags_must_be_registered_bcp47() {
        for good in ["en", "de-CH", "no", "zh-Hant-TW", "gsw"] {
            assert!(LanguageTag::parse(good).is_ok(), "{good} rejected");
        }
        for bad in ["", "english", "xx", "de_CH", "en-", "12"] {
            let err = LanguageTag::parse(bad).unwrap_err();
            assert!(err.contains("BCP 47"), "{err}");
        }
    }

    #[test]
    fn intervals_are_positive_durations() {
        assert_eq!(Interval::parse("30s").unwrap().0, Duration::from_secs(30));
        assert_eq!(
            Interval::parse("1h 30m").unwrap().0,
            Duration::from_secs(5400)
        );
        assert!(
            Interval::parse("0s")
                .unwrap_err()
                .contains("greater than zero")
        );
        assert!(Interval::parse("30").is_err());
        assert!(Interval::parse("soon").is_err());
        assert_eq!(Interval::parse("5m").unwrap().to_string(), "5m");
    }

    #[test]
    fn secrets_never_show_their_value() {
        let value = "s3cr3t-value";
        let secrets = [
            Secret::new(SecretSource::Inline(value.into()), Some(value.into())),
            Secret::new(SecretSource::Env { env: "MQ_X".into() }, Some(value.into())),
            Secret::new(
                SecretSource::File {
                    file: "/run/x".into(),
                },
                Some(value.into()),
            ),
        ];
        for s in &secrets {
            let shown = format!(
                "{s:?} {s} {} {}",
                s.origin(),
                serde_json::to_string(s).unwrap()
            );
            assert!(!shown.contains(value), "{shown}");
            assert_eq!(s.expose(), value);
        }
        assert_eq!(format!("{:?}", secrets[1]), "Secret(env MQ_X, ***)");
    }

    #[test]
    fn database_kind_from_scheme() {
        let kind = |url: &str| Database { url: url.into() }.kind();
        assert_eq!(kind("sqlite://data/mq.db"), Some(DatabaseKind::Sqlite));
        assert_eq!(kind("sqlite::memory:"), Some(DatabaseKind::Sqlite));
        assert_eq!(kind("postgres://mq@db/mq"), Some(DatabaseKind::Postgres));
        assert_eq!(kind("postgresql://mq@db/mq"), Some(DatabaseKind::Postgres));
        assert_eq!(kind("mysql://db"), None);
    }
}
