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
}

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
        Self { url: "sqlite://data/mailqueue.db".into() }
    }
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Api {
    /// Address the HTTP API listens on.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Bearer tokens accepted by the API.
    #[serde(default)]
    pub tokens: Vec<ApiToken>,
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}

impl Default for Api {
    fn default() -> Self {
        Self { listen: default_listen(), tokens: Vec::new() }
    }
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiToken {
    /// Who uses the token (agent id, service name); shown in events and logs.
    pub name: String,
    pub role: Role,
    /// The bearer token value.
    pub secret: Secret,
    /// Agent tokens: the queues this agent serves. Empty means none (agents) or all (router, admin).
    #[serde(default)]
    pub queues: Vec<String>,
    /// Agent tokens: the languages this agent handles. Empty means any.
    #[serde(default)]
    pub languages: Vec<LanguageTag>,
}

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
    pub max_email_size_mb: u32,
    /// How long a claim lasts without a heartbeat before the contact returns to its queue.
    #[serde(default = "default_claim_lease")]
    pub claim_lease: Interval,
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

impl Default for Defaults {
    fn default() -> Self {
        Self {
            language: default_language(),
            poll_interval: default_poll_interval(),
            max_email_size_mb: default_max_size(),
            claim_lease: default_claim_lease(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AuthType {
    /// OAuth User: resource-owner password grant; each address carries its mailbox password; no client secret.
    OauthUser,
    /// OAuth Service: client-credentials grant with a client secret; no passwords (shared mailboxes).
    OauthService,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
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
    pub auth: AuthType,
    pub client_id: String,
    /// Required for `oauth_service`; not used by `oauth_user`.
    #[serde(default)]
    pub client_secret: Option<Secret>,
    /// OAuth scopes; default depends on `auth`.
    #[serde(default)]
    pub scopes: Vec<String>,
    pub imap: ImapEndpoint,
    /// Extra CA certificate (PEM) to trust, e.g. the local sandbox's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImapEndpoint {
    pub host: String,
    #[serde(default = "default_imap_port")]
    pub port: u16,
    #[serde(default)]
    pub tls: ImapTls,
}

fn default_imap_port() -> u16 {
    993
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImapTls {
    /// TLS from the first byte (port 993).
    #[default]
    Implicit,
    /// Plain connection upgraded with STARTTLS (port 143).
    Starttls,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OutgoingServer {
    pub host: String,
    #[serde(default = "default_smtp_port")]
    pub port: u16,
    /// STARTTLS on a plain connection (587); `false` means implicit TLS (465).
    #[serde(default = "default_true")]
    pub starttls: bool,
    #[serde(default)]
    pub login_address: Option<String>,
    #[serde(default)]
    pub token_endpoint: Option<String>,
    pub auth: AuthType,
    pub client_id: String,
    #[serde(default)]
    pub client_secret: Option<Secret>,
    /// The mailbox that authenticates (SASL user).
    pub username: EmailAddress,
    /// Password of `username`; `oauth_user` only.
    #[serde(default)]
    pub password: Option<Secret>,
    #[serde(default = "default_smtp_scopes")]
    pub scopes: Vec<String>,
    /// Largest outgoing mail in MB (1..=40).
    #[serde(default = "default_outgoing_max")]
    pub max_email_size_mb: u32,
    /// Who operators' alerting reaches when sending keeps failing.
    #[serde(default)]
    pub contact_information: Option<String>,
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

#[derive(Debug, Clone, Deserialize, JsonSchema)]
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
    /// The mailboxes that feed this queue.
    pub addresses: Vec<Address>,
}

fn default_priority() -> i32 {
    5
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
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

/// An email address, parsed (RFC 5321 mailbox, lower-cased domain).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, JsonSchema)]
#[serde(transparent)]
#[schemars(transparent)]
pub struct EmailAddress(#[schemars(with = "String")] String);

impl EmailAddress {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if !email_address::EmailAddress::is_valid(s) {
            return Err(format!("`{s}` is not a valid email address (expected local@domain)"));
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
        let s = String::deserialize(d)?;
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
        let tag = language_tags::LanguageTag::parse(s.trim())
            .map_err(|e| format!("`{s}` is not a BCP 47 language tag ({e}); expected e.g. `en`, `de-CH`"))?;
        tag.validate()
            .map_err(|e| format!("`{s}` is not a valid BCP 47 language tag ({e}); expected e.g. `en`, `de-CH`"))?;
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
        let s = String::deserialize(d)?;
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
        let s = String::deserialize(d)?;
        if s.trim_start().starts_with('-') {
            return Err(serde::de::Error::custom(format!("`{s}` is negative; expected a positive duration such as `30s`")));
        }
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Where a secret comes from.
#[derive(Clone, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum SecretSource {
    /// `{ env: NAME }`: read from an environment variable.
    Env {
        env: String,
    },
    /// `{ file: PATH }`: read from a file (trailing newline trimmed); relative to the config file.
    File {
        file: PathBuf,
    },
    /// A plain string in the file (allowed, but `check-config` warns).
    Inline(String),
}

/// A secret (client secret, password, API token). Never printed: Debug and Display show only where it comes from.
#[derive(Clone, JsonSchema)]
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

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // serde's untagged error says only "did not match any variant"; say what is accepted instead
        // (and never echo the value).
        let source = SecretSource::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected a secret: `{ env: NAME }`, `{ file: PATH }` or a quoted string")
        })?;
        match &source {
            SecretSource::Env { env } if env.trim().is_empty() => {
                return Err(serde::de::Error::custom("`env` must name an environment variable"));
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
