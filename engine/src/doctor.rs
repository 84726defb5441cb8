//! `mailqueue doctor`: walks the whole chain from the configuration to a working mailbox, step by step, and says
//! which step fails, why, and what to change.
//!
//! One chain per queue address of every enabled incoming server (configuration → token endpoint → token →
//! token contents → IMAP connect → TLS → XOAUTH2 → SELECT) and one for the outgoing server (configuration → token
//! endpoint → token → token contents → SMTP connect → STARTTLS/TLS → AUTH → optionally a test message). Each chain
//! stops at its first failure. Nothing here ever prints a secret or an access token: details are host names,
//! client ids, addresses, claims by name, and server replies.

use std::{
    fmt::Write as _,
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use mailqueue_config::{
    Address, AuthType, Config, IncomingServer, OutgoingServer, model::EmailAddress,
};
use mailqueue_connectors::{
    explain::{self, ImapLogin},
    imap::{self, ConnectFailure, ImapError, ImapTls},
    oauth::{
        AccessToken, Explanation, OAuthError, OAuthErrorKind, RetryPolicy, TokenCache, TokenRequest,
    },
    smtp::{Envelope, SenderOptions, SmtpError, SmtpFailure, SmtpSender},
};
use serde::Serialize;

/// Audience of tokens for IMAP (Exchange Online).
pub const IMAP_AUDIENCE: &str = "https://outlook.office365.com";
/// Audience of tokens for SMTP submission.
pub const SMTP_AUDIENCE: &str = "https://outlook.office.com";

/// What to check besides the chains themselves.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Send a short real test message from the outgoing username to this address.
    pub send_test: Option<EmailAddress>,
}

/// The outcome of every chain.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub ok: bool,
    pub chains: Vec<Chain>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChainKind {
    Incoming,
    Outgoing,
}

/// One chain: an incoming server and one of its queue addresses, or the outgoing server.
#[derive(Debug, Clone, Serialize)]
pub struct Chain {
    pub name: String,
    pub kind: ChainKind,
    pub ok: bool,
    pub steps: Vec<Step>,
}

/// One step of a chain.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub step: String,
    pub ok: bool,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Step {
    fn ok(step: &str, detail: impl Into<String>) -> Self {
        Self {
            step: step.to_owned(),
            ok: true,
            detail: detail.into(),
            cause: None,
            fix: None,
        }
    }

    fn failed(step: &str, detail: impl Into<String>, why: Explanation) -> Self {
        Self {
            step: step.to_owned(),
            ok: false,
            detail: detail.into(),
            cause: Some(why.cause),
            fix: Some(why.fix),
        }
    }
}

impl Chain {
    fn new(name: String, kind: ChainKind) -> Self {
        Self {
            name,
            kind,
            ok: true,
            steps: Vec::new(),
        }
    }

    /// Records a step; `false` when it failed (the chain stops there).
    fn push(&mut self, step: Step) -> bool {
        let ok = step.ok;
        self.ok &= ok;
        self.steps.push(step);
        ok
    }
}

/// Step names, as printed and in the JSON.
pub mod steps {
    pub const CONFIGURATION: &str = "configuration";
    pub const TOKEN_ENDPOINT: &str = "token endpoint";
    pub const TOKEN: &str = "token";
    pub const TOKEN_CONTENTS: &str = "token contents";
    pub const IMAP_CONNECT: &str = "imap connect";
    pub const IMAP_TLS: &str = "imap tls";
    pub const IMAP_AUTH: &str = "imap auth";
    pub const IMAP_SELECT: &str = "imap select";
    pub const SMTP_CONNECT: &str = "smtp connect";
    pub const SMTP_TLS: &str = "smtp tls";
    pub const SMTP_AUTH: &str = "smtp auth";
    pub const SEND_TEST: &str = "send test";
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const TIMEOUT: Duration = Duration::from_secs(30);

/// Runs every chain of `config`.
pub async fn run(config: &Config, options: &Options) -> Report {
    let cache = token_cache(config);
    let mut chains = Vec::new();
    for server in config.incoming_servers.iter().filter(|s| s.enabled) {
        for address in config
            .queues
            .iter()
            .flat_map(|q| q.addresses.iter())
            .filter(|a| a.server == server.name)
        {
            chains.push(incoming(&cache, server, address).await);
        }
    }
    if let Some(server) = &config.outgoing_server {
        chains.push(outgoing(&cache, server, options).await);
    }
    Report {
        ok: chains.iter().all(|c| c.ok),
        chains,
    }
}

/// One token cache trusting every configured `ca_file` (a private CA in front of the token endpoint).
fn token_cache(config: &Config) -> TokenCache {
    let mut builder = TokenCache::builder()
        .retry(RetryPolicy::none())
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(TIMEOUT);
    let ca_files: Vec<&PathBuf> = config
        .incoming_servers
        .iter()
        .filter_map(|s| s.ca_file.as_ref())
        .chain(
            config
                .outgoing_server
                .iter()
                .filter_map(|s| s.ca_file.as_ref()),
        )
        .collect();
    for path in ca_files {
        if let Ok(pem) = std::fs::read(path) {
            builder = builder.add_root_certificate_pem(pem);
        }
    }
    builder.build().unwrap_or_else(|_| TokenCache::new())
}

fn config_failure(detail: String, fix: &str) -> Step {
    Step::failed(
        steps::CONFIGURATION,
        detail.clone(),
        Explanation::new(detail, fix),
    )
}

async fn incoming(cache: &TokenCache, server: &IncomingServer, address: &Address) -> Chain {
    let login = address.login().as_str();
    let mut chain = Chain::new(
        format!("incoming {} / {}", server.name, address.address),
        ChainKind::Incoming,
    );
    // Configuration and secrets.
    let request = match TokenRequest::for_mailbox(server, address) {
        Ok(r) => r,
        Err(e) => {
            chain.push(config_failure(
                e.to_string(),
                "complete the incoming server's (or the address's) OAuth settings and secrets in the configuration",
            ));
            return chain;
        }
    };
    let tls = match ImapTls::new(server.ca_file.as_deref())
        .map(|t| t.with_timeouts(CONNECT_TIMEOUT, CONNECT_TIMEOUT))
    {
        Ok(t) => t,
        Err(e) => {
            chain.push(config_failure(
                e.to_string(),
                "point `ca_file` at a readable PEM file with the server's CA certificate",
            ));
            return chain;
        }
    };
    chain.push(Step::ok(
        steps::CONFIGURATION,
        format!(
            "{}, client_id {}, login {login}, token endpoint {}, IMAP {}:{} ({}), folder {}",
            auth_name(server.auth),
            server.client_id,
            request.endpoint(),
            server.imap.host,
            server.imap.port,
            tls_name(&server.imap.tls),
            address.folder
        ),
    ));
    let Some(token) = token_steps(&mut chain, cache, &request, Purpose::Imap).await else {
        return chain;
    };

    // IMAP: connect + TLS.
    let endpoint = &server.imap;
    let client = match imap::connect(endpoint, &tls).await {
        Ok(c) => c,
        Err(e) => {
            let (step, why) = match &e {
                ImapError::Tls { .. } => {
                    chain.push(Step::ok(
                        steps::IMAP_CONNECT,
                        format!("TCP connection to {}:{}", endpoint.host, endpoint.port),
                    ));
                    (
                        steps::IMAP_TLS,
                        Explanation::new(
                            e.to_string(),
                            "check `imap.tls` (implicit on 993, starttls on 143) and `ca_file` for a private CA",
                        ),
                    )
                }
                ImapError::Connect { failure, .. } => (
                    steps::IMAP_CONNECT,
                    Explanation::new(
                        e.to_string(),
                        match failure {
                            ConnectFailure::Dns => "check `imap.host` and DNS",
                            ConnectFailure::Refused => {
                                "check `imap.port` (993 for Exchange Online) and that the server is running"
                            }
                            _ => {
                                "check `imap.host`, `imap.port` and the network path and firewalls to the server"
                            }
                        },
                    ),
                ),
                _ => (
                    steps::IMAP_CONNECT,
                    Explanation::new(
                        e.to_string(),
                        "check `imap.host`, `imap.port` and `imap.tls`",
                    ),
                ),
            };
            chain.push(Step::failed(
                step,
                match &e {
                    ImapError::Connect {
                        host, port, detail, ..
                    } if detail.starts_with(host.as_str()) => format!("cannot connect: {detail}"),
                    ImapError::Connect {
                        host, port, detail, ..
                    } => format!("cannot connect to {host}:{port}: {detail}"),
                    ImapError::Tls {
                        problem, detail, ..
                    } => {
                        format!(
                            "TLS to {}:{} failed ({problem:?}): {detail}",
                            endpoint.host, endpoint.port
                        )
                    }
                    _ => format!(
                        "{} failure with {}:{}",
                        e.class(),
                        endpoint.host,
                        endpoint.port
                    ),
                },
                why,
            ));
            return chain;
        }
    };
    chain.push(Step::ok(
        steps::IMAP_CONNECT,
        format!("TCP connection to {}:{}", endpoint.host, endpoint.port),
    ));
    chain.push(Step::ok(
        steps::IMAP_TLS,
        format!(
            "{:?} TLS, certificate valid for {}",
            endpoint.tls, endpoint.host
        ),
    ));

    // XOAUTH2.
    let mut session = match imap::authenticate_xoauth2(client, login, token.secret()).await {
        Ok(s) => s,
        Err(e) => {
            let why = match &e {
                ImapError::AuthFailed { .. } if e.is_temporary() => {
                    explain::imap_auth_unavailable(&endpoint.host)
                }
                ImapError::AuthFailed { .. } => {
                    let who = match server.auth {
                        AuthType::OauthService => ImapLogin::App {
                            client_id: &server.client_id,
                        },
                        AuthType::OauthUser => ImapLogin::User,
                    };
                    explain::imap_auth_refused(who, login)
                }
                _ => Explanation::new(
                    e.to_string(),
                    "check the IMAP server and that it offers AUTH=XOAUTH2",
                ),
            };
            chain.push(Step::failed(steps::IMAP_AUTH, e.to_string(), why));
            return chain;
        }
    };
    chain.push(Step::ok(
        steps::IMAP_AUTH,
        format!("XOAUTH2 login as {login}"),
    ));

    // SELECT.
    let step = match session.select(&address.folder).await {
        Ok(state) => Step::ok(
            steps::IMAP_SELECT,
            format!(
                "folder {} selected (UIDVALIDITY {})",
                address.folder, state.uid_validity
            ),
        ),
        Err(e) => {
            let fix = match &e {
                ImapError::NoSuchFolder { .. } => format!(
                    "create the folder `{}` in the mailbox {}, or correct the address's `folder`",
                    address.folder, address.address
                ),
                _ => "check that the mailbox's folder can be opened over IMAP".to_owned(),
            };
            Step::failed(
                steps::IMAP_SELECT,
                e.to_string(),
                Explanation::new(e.to_string(), fix),
            )
        }
    };
    chain.push(step);
    let _ = session.logout().await;
    chain
}

async fn outgoing(cache: &TokenCache, server: &OutgoingServer, options: &Options) -> Chain {
    let mut chain = Chain::new(
        format!(
            "outgoing {}:{} as {}",
            server.host, server.port, server.username
        ),
        ChainKind::Outgoing,
    );
    let request = match TokenRequest::for_outgoing(server) {
        Ok(r) => r,
        Err(e) => {
            chain.push(config_failure(
                e.to_string(),
                "complete the outgoing server's OAuth settings and secrets in the configuration",
            ));
            return chain;
        }
    };
    let sender = match SmtpSender::with_options(
        server,
        cache.clone(),
        SenderOptions {
            timeout: TIMEOUT,
            connect_timeout: CONNECT_TIMEOUT,
            ..SenderOptions::default()
        },
    ) {
        Ok(s) => s,
        Err(e) => {
            let why = e.explain();
            chain.push(Step::failed(steps::CONFIGURATION, e.to_string(), why));
            return chain;
        }
    };
    chain.push(Step::ok(
        steps::CONFIGURATION,
        format!(
            "{}, client_id {}, username {}, token endpoint {}, SMTP {}:{} ({})",
            auth_name(server.auth),
            server.client_id,
            server.username,
            request.endpoint(),
            server.host,
            server.port,
            if server.starttls {
                "STARTTLS"
            } else {
                "implicit TLS"
            }
        ),
    ));
    if token_steps(&mut chain, cache, &request, Purpose::Smtp)
        .await
        .is_none()
    {
        return chain;
    }

    let address = format!("{}:{}", server.host, server.port);
    let tls_detail = if server.starttls {
        "STARTTLS, certificate valid"
    } else {
        "implicit TLS, certificate valid"
    };
    match sender.check().await {
        Ok(()) => {
            chain.push(Step::ok(
                steps::SMTP_CONNECT,
                format!("connected to {address}"),
            ));
            chain.push(Step::ok(steps::SMTP_TLS, tls_detail));
            chain.push(Step::ok(
                steps::SMTP_AUTH,
                format!("AUTH XOAUTH2 accepted for {}", server.username),
            ));
        }
        Err(e) => {
            let at = smtp_step(&e);
            if at != steps::SMTP_CONNECT && at != steps::TOKEN {
                chain.push(Step::ok(
                    steps::SMTP_CONNECT,
                    format!("connected to {address}"),
                ));
            }
            if at == steps::SMTP_AUTH {
                chain.push(Step::ok(steps::SMTP_TLS, tls_detail));
            }
            chain.push(smtp_failed(at, &e));
            return chain;
        }
    }

    if let Some(to) = &options.send_test {
        let raw = test_message(&server.username, to);
        let envelope = Envelope::new(server.username.clone(), vec![to.clone()]);
        let step = match sender.send(&envelope, raw.as_bytes()).await {
            Ok(accepted) => Step::ok(
                steps::SEND_TEST,
                format!(
                    "test message from {} to {to} accepted: {}",
                    server.username, accepted.reply
                ),
            ),
            Err(e) => smtp_failed(steps::SEND_TEST, &e),
        };
        chain.push(step);
    }
    chain
}

fn smtp_step(e: &SmtpError) -> &'static str {
    match e.failure() {
        SmtpFailure::Token(_) => steps::TOKEN,
        SmtpFailure::Connect { .. } | SmtpFailure::Timeout { .. } => steps::SMTP_CONNECT,
        SmtpFailure::Tls { .. } | SmtpFailure::NoStarttls => steps::SMTP_TLS,
        _ => steps::SMTP_AUTH,
    }
}

fn smtp_failed(step: &str, e: &SmtpError) -> Step {
    let detail = match e.reply() {
        Some(reply) => reply.to_string(),
        None => e.to_string(),
    };
    Step::failed(step, detail, e.explain())
}

fn test_message(from: &EmailAddress, to: &EmailAddress) -> String {
    let now = chrono::Utc::now();
    let domain = from
        .as_str()
        .rsplit_once('@')
        .map(|(_, d)| d)
        .unwrap_or("localhost");
    let id = format!(
        "doctor.{}.{:08x}@{domain}",
        now.timestamp_millis(),
        rand::random::<u32>()
    );
    format!(
        "From: {from}\r\nTo: {to}\r\nSubject: mailqueue doctor test message\r\nDate: {}\r\nMessage-ID: <{id}>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nAuto-Submitted: auto-generated\r\n\r\n\
         This is a test message sent by `mailqueue doctor --send-test`. It can be deleted.\r\n",
        now.to_rfc2822()
    )
}

fn tls_name(tls: &mailqueue_config::model::ImapTls) -> &'static str {
    match tls {
        mailqueue_config::model::ImapTls::Implicit => "implicit TLS",
        mailqueue_config::model::ImapTls::Starttls => "STARTTLS",
    }
}

fn auth_name(auth: AuthType) -> &'static str {
    match auth {
        AuthType::OauthService => "OAuth Service (client credentials)",
        AuthType::OauthUser => "OAuth User (password grant)",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Imap,
    Smtp,
}

impl Purpose {
    fn audience(self) -> &'static str {
        match self {
            Purpose::Imap => IMAP_AUDIENCE,
            Purpose::Smtp => SMTP_AUDIENCE,
        }
    }

    fn app_role(self) -> &'static str {
        match self {
            Purpose::Imap => "IMAP.AccessAsApp",
            Purpose::Smtp => "SMTP.SendAsApp",
        }
    }

    fn delegated_scope(self) -> &'static str {
        match self {
            Purpose::Imap => "IMAP.AccessAsUser.All",
            Purpose::Smtp => "SMTP.Send",
        }
    }
}

/// Token endpoint reachable → token granted → token contents. The token, or `None` after a failure.
async fn token_steps(
    chain: &mut Chain,
    cache: &TokenCache,
    request: &TokenRequest,
    purpose: Purpose,
) -> Option<AccessToken> {
    let host = request.endpoint().host();
    let token = match cache.token(request).await {
        Ok(token) => {
            chain.push(Step::ok(
                steps::TOKEN_ENDPOINT,
                format!("{host} answered over HTTP"),
            ));
            token
        }
        Err(e) => {
            match e.kind() {
                OAuthErrorKind::Unreachable { .. }
                | OAuthErrorKind::Tls { .. }
                | OAuthErrorKind::Timeout => {
                    chain.push(Step::failed(
                        steps::TOKEN_ENDPOINT,
                        token_label(&e),
                        e.explain(),
                    ));
                }
                _ => {
                    chain.push(Step::ok(
                        steps::TOKEN_ENDPOINT,
                        format!("{host} answered over HTTP"),
                    ));
                    chain.push(Step::failed(steps::TOKEN, token_label(&e), e.explain()));
                }
            }
            return None;
        }
    };
    chain.push(Step::ok(
        steps::TOKEN,
        format!(
            "granted for scope {} ({}), expires {}",
            request.scope(),
            request.grant(),
            token.expires_at().format("%Y-%m-%d %H:%M:%S UTC")
        ),
    ));
    let contents = token_contents(&token, request, purpose);
    chain.push(contents).then_some(token)
}

fn token_label(e: &OAuthError) -> String {
    let host = e.host();
    match (e.aadsts(), e.kind()) {
        (Some(code), _) => format!(
            "{host} refused: AADSTS{code} {}",
            e.error_code().unwrap_or_default()
        ),
        (None, OAuthErrorKind::Unreachable { detail }) => {
            format!("{host} unreachable: {detail}")
        }
        (None, OAuthErrorKind::Tls { detail }) => format!("TLS to {host} failed: {detail}"),
        (None, OAuthErrorKind::Timeout) => format!("{host} did not answer in time"),
        (None, _) => match e.status() {
            Some(status) => format!(
                "{host} answered HTTP {status} {}",
                e.error_code().unwrap_or_default()
            ),
            None => format!("{host} failed"),
        },
    }
}

/// Checks the JWT's payload without trusting it (no signature check: only the claims that explain a refusal).
fn token_contents(token: &AccessToken, request: &TokenRequest, purpose: Purpose) -> Step {
    const STEP: &str = steps::TOKEN_CONTENTS;
    let Some(claims) = jwt_claims(token.secret()) else {
        return Step::ok(
            STEP,
            "not a JWT (opaque token); its contents cannot be checked here",
        );
    };
    let client_id = request.client_id();
    let aud = claims
        .get("aud")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    let mut notes = Vec::new();
    if aud.trim_end_matches('/') != purpose.audience() {
        return Step::failed(
            STEP,
            format!("audience `{aud}`, expected `{}`", purpose.audience()),
            Explanation::new(
                format!(
                    "the token is for the audience `{aud}`, not {}",
                    purpose.audience()
                ),
                format!(
                    "set `scopes` to `{}/.default` (OAuth Service) or the delegated scopes of {} (OAuth User), or \
                     remove `scopes` to use the defaults",
                    purpose.audience(),
                    purpose.audience()
                ),
            ),
        );
    }
    notes.push(format!("aud {aud}"));
    match request.user() {
        None => {
            let roles: Vec<&str> = claims
                .get("roles")
                .and_then(|v| v.as_array())
                .map(|a| a.iter().filter_map(|r| r.as_str()).collect())
                .unwrap_or_default();
            if !roles.contains(&purpose.app_role()) {
                let role = purpose.app_role();
                return Step::failed(
                    STEP,
                    format!(
                        "app token without the role {role} (roles: {})",
                        if roles.is_empty() {
                            "none".to_owned()
                        } else {
                            roles.join(", ")
                        }
                    ),
                    Explanation::new(
                        format!(
                            "the app {client_id} does not have the application permission {role}"
                        ),
                        format!(
                            "add the Application permission {role} (APIs my organization uses → Office 365 Exchange \
                             Online) to the app {client_id} in Entra ID → App registrations → API permissions, and \
                             grant admin consent"
                        ),
                    ),
                );
            }
            notes.push(format!("roles {}", roles.join(" ")));
        }
        Some(user) => {
            let scp = claims
                .get("scp")
                .and_then(|v| v.as_str())
                .unwrap_or_default();
            let scope = purpose.delegated_scope();
            if !scp.split_whitespace().any(|s| s == scope) {
                return Step::failed(
                    STEP,
                    format!("delegated token for {user} without the scope {scope} (scp: `{scp}`)"),
                    Explanation::new(
                        format!("the delegated token of app {client_id} does not carry {scope}"),
                        format!(
                            "add the Delegated permission {scope} (Office 365 Exchange Online) to the app \
                             {client_id} in Entra ID → App registrations → API permissions, and grant consent"
                        ),
                    ),
                );
            }
            notes.push(format!("scp {scp}"));
        }
    }
    if let Some(exp) = claims.get("exp").and_then(|v| v.as_i64()) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default();
        if exp <= now {
            return Step::failed(
                STEP,
                format!("expired {} s ago", now - exp),
                Explanation::new(
                    "the token endpoint issued a token that has already expired",
                    "check this machine's clock (NTP)",
                ),
            );
        }
        notes.push(format!("valid for {} min", (exp - now) / 60));
    }
    Step::ok(STEP, notes.join(", "))
}

/// The payload of a JWT (`header.payload.signature`), decoded but not verified.
fn jwt_claims(token: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    let mut parts = token.split('.');
    let (_header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    let bytes = base64url(payload)?;
    match serde_json::from_slice(&bytes).ok()? {
        serde_json::Value::Object(map) => Some(map),
        _ => None,
    }
}

fn base64url(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// The report for people: one line per step, grouped per chain; colour when `colour`.
pub fn render_text(report: &Report, colour: bool) -> String {
    let paint = |ok: bool| -> String {
        let word = if ok { "ok    " } else { "failed" };
        match (colour, ok) {
            (false, _) => word.to_owned(),
            (true, true) => format!("\x1b[32m{word}\x1b[0m"),
            (true, false) => format!("\x1b[31m{word}\x1b[0m"),
        }
    };
    let mut out = String::new();
    for chain in &report.chains {
        let _ = writeln!(out, "{}", chain.name);
        for step in &chain.steps {
            let _ = write!(out, "  {} {}: {}", paint(step.ok), step.step, step.detail);
            if let (Some(cause), Some(fix)) = (&step.cause, &step.fix) {
                let _ = write!(out, " — cause: {cause}. Fix: {fix}.");
            }
            out.push('\n');
        }
    }
    let failed = report.chains.iter().filter(|c| !c.ok).count();
    if report.chains.is_empty() {
        out.push_str(
            "nothing to check: no enabled incoming server with addresses and no outgoing server\n",
        );
    } else if failed == 0 {
        let _ = writeln!(out, "all {} chain(s) passed", report.chains.len());
    } else {
        let _ = writeln!(out, "{failed} of {} chain(s) failed", report.chains.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_jwt_payloads() {
        // {"aud":"https://outlook.office365.com","roles":["IMAP.AccessAsApp"]}
        let payload = "eyJhdWQiOiJodHRwczovL291dGxvb2sub2ZmaWNlMzY1LmNvbSIsInJvbGVzIjpbIklNQVAuQWNjZXNzQXNBcHAiXX0";
        let claims = jwt_claims(&format!("eyJhbGciOiJub25lIn0.{payload}.sig")).unwrap();
        assert_eq!(claims["aud"], IMAP_AUDIENCE);
        assert_eq!(claims["roles"][0], "IMAP.AccessAsApp");
        assert!(jwt_claims("opaque-token").is_none());
        assert_eq!(base64url("aGk").unwrap(), b"hi");
    }
}
