//! Plain-words explanations of SMTP submission failures against Microsoft 365 (`smtp.office365.com:587`, STARTTLS,
//! SASL XOAUTH2), worded after Microsoft's and Genesys' checklists: what went wrong (the *cause*) and what to
//! change (the *fix*).
//!
//! Texts never contain secrets: the values filled in are host names, ports, the mailbox, the client id, the scope,
//! paths and the server's own reply text.

use std::{path::PathBuf, time::Duration};

use mailqueue_config::model::{AuthType, OutgoingServer};

pub use crate::explain::Explanation;
use crate::oauth::{SMTP_SERVICE_SCOPE, TokenRequest};

use super::error::{SmtpFailure, SmtpReply, TlsProblem};

/// Microsoft's list of Exchange Online NDR / enhanced status codes.
const NDR_CODES: &str = "https://learn.microsoft.com/exchange/mail-flow-best-practices/non-delivery-reports-in-exchange-online/non-delivery-reports-in-exchange-online";

/// What an explanation may name about the configured outgoing server (nothing secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerContext {
    pub host: String,
    pub port: u16,
    /// STARTTLS (587) rather than implicit TLS (465).
    pub starttls: bool,
    /// The mailbox that authenticates (SASL user).
    pub username: String,
    pub client_id: String,
    pub auth: AuthType,
    /// The scope tokens are requested for (space-separated).
    pub scope: String,
    pub ca_file: Option<PathBuf>,
    pub max_email_size_mb: u32,
}

impl ServerContext {
    /// The context of a configured outgoing server. The scope is the one actually requested
    /// ([`TokenRequest::for_outgoing`]), else the configured one.
    pub fn from_config(server: &OutgoingServer) -> Self {
        let scope = TokenRequest::for_outgoing(server)
            .map(|r| r.scope().to_owned())
            .unwrap_or_else(|_| server.scopes.join(" "));
        Self {
            host: server.host.trim().to_owned(),
            port: server.port,
            starttls: server.starttls,
            username: server.username.as_str().to_owned(),
            client_id: server.client_id.clone(),
            auth: server.auth,
            scope,
            ca_file: server.ca_file.clone(),
            max_email_size_mb: server.max_email_size_mb,
        }
    }

    /// `host:port` (`[v6]:port` for IPv6 literals).
    pub fn address(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    fn mode(&self) -> &'static str {
        if self.starttls {
            "STARTTLS (`starttls: true`, usually port 587)"
        } else {
            "implicit TLS (`starttls: false`, usually port 465)"
        }
    }
}

/// The explanation of a failure, given the server it happened on. `from` is the envelope sender of the message (for
/// Send As problems), `size` its size in bytes.
pub fn failure(
    failure: &SmtpFailure,
    ctx: &ServerContext,
    from: Option<&str>,
    size: Option<usize>,
) -> Explanation {
    let hp = ctx.address();
    match failure {
        SmtpFailure::Reply(reply) => smtp_reply(reply, ctx, from, size),
        SmtpFailure::TokenExpired(_) => Explanation::new(
            format!("{hp} refused the access token, which had expired when it was used"),
            "nothing to change: mailqueue fetches a new token and tries again",
        ),
        SmtpFailure::Token(e) => e.explain(),
        SmtpFailure::TooLarge { size, limit } => too_large_locally(ctx, *size, *limit),
        SmtpFailure::Tls { problem, detail } => tls(ctx, *problem, detail),
        SmtpFailure::Connect { detail } => Explanation::new(
            format!("cannot connect to {hp} ({detail})"),
            format!(
                "check `host` and `port` (Microsoft 365: smtp.office365.com, 587 with STARTTLS) and that outbound \
                 TCP to port {} is allowed (firewalls often block 587 and 465); mailqueue retries on its own",
                ctx.port
            ),
        ),
        SmtpFailure::Closed { detail } => Explanation::new(
            format!("the connection to {hp} broke ({detail})"),
            "usually transient: mailqueue retries; if it broke after the whole message had been sent, the server \
             may have accepted it",
        ),
        SmtpFailure::Timeout { after } => Explanation::new(
            format!("{hp} did not answer within {}", secs(*after)),
            format!(
                "check the network path and firewalls to {hp}, and that it speaks {}; mailqueue retries on its own",
                ctx.mode()
            ),
        ),
        SmtpFailure::NoXoauth2 => Explanation::new(
            format!("{hp} does not offer AUTH XOAUTH2 after TLS"),
            "send through smtp.office365.com (port 587, `starttls: true`): relay and MX endpoints \
             (…mail.protection.outlook.com, port 25) do not take OAuth2",
        ),
        SmtpFailure::NoStarttls => Explanation::new(
            format!("{hp} does not offer STARTTLS"),
            format!(
                "use port 587 with `starttls: true`, or the implicit-TLS port 465 with `starttls: false`; mailqueue \
                 never sends a token over a plaintext connection (port {} may be a relay port)",
                ctx.port
            ),
        ),
        SmtpFailure::Protocol { detail } => Explanation::new(
            format!("unexpected answer from {hp} ({detail})"),
            "check that `host` and `port` point at an SMTP submission server (smtp.office365.com:587)",
        ),
        SmtpFailure::Config { detail } => Explanation::new(
            detail.clone(),
            "correct the outgoing server's configuration (or the message's addresses) and try again",
        ),
    }
}

/// The explanation of a negative SMTP reply from Exchange Online (or another submission server).
pub fn smtp_reply(
    reply: &SmtpReply,
    ctx: &ServerContext,
    from: Option<&str>,
    size: Option<usize>,
) -> Explanation {
    let hp = ctx.address();
    let enhanced = reply.enhanced.as_deref().unwrap_or("");
    let lower = reply.text.to_ascii_lowercase();
    let said = format!("{} {}", reply.code, reply.text);

    if lower.contains("sendasdenied")
        || enhanced == "5.2.252"
        || (enhanced == "5.7.60" && lower.contains("send as"))
    {
        return send_as_denied(ctx, sender_in_text(&reply.text).or(from));
    }
    if enhanced == "5.3.4"
        || enhanced == "5.2.3"
        || (reply.code == 552 && (lower.contains("size") || enhanced.is_empty()))
    {
        return too_large_remotely(ctx, size);
    }
    match (reply.code, enhanced) {
        (535, "5.7.139") => return auth_disabled(ctx, &lower, &said),
        (535, _) => return token_refused(ctx),
        (530, _) | (_, "5.7.57") => {
            return Explanation::new(
                format!(
                    "{hp} did not consider the client authenticated ({said}): STARTTLS and AUTH did not both \
                     happen on this connection"
                ),
                "send through smtp.office365.com port 587 with `starttls: true` (or 465 with `starttls: false`); an \
                 MX endpoint (…mail.protection.outlook.com) or a port-25 relay does not take AUTH",
            );
        }
        _ => {}
    }
    if reply.code == 421 {
        return Explanation::new(
            format!(
                "{hp} closed the connection ({said}): it is busy, restarting or throttling this client"
            ),
            "nothing to change if it passes: mailqueue retries later; if it persists, check the Microsoft 365 \
             service health and the sending limits (30 messages a minute and 10,000 recipients a day per mailbox)",
        );
    }
    if enhanced == "4.5.3" || enhanced == "5.5.3" {
        return Explanation::new(
            format!("the message has more recipients than {hp} takes at once ({said})"),
            "send to fewer recipients per message (Exchange Online takes at most 500)",
        );
    }
    if (400..500).contains(&reply.code) {
        return Explanation::new(
            format!("{hp} could not take the message just now ({said})"),
            "nothing to change if it passes: mailqueue retries later; if it persists, check the Microsoft 365 \
             service health and the sending limits (30 messages a minute, 10,000 recipients a day per mailbox)",
        );
    }
    if enhanced.starts_with("5.1.") {
        return Explanation::new(
            format!("{hp} refused an address of the message ({said})"),
            format!(
                "check the recipient addresses and the sender (it must be {} or an address it may send as)",
                ctx.username
            ),
        );
    }
    Explanation::new(
        format!("{hp} refused the message ({said})"),
        format!(
            "look up {} in Microsoft's list of Exchange Online status codes: {NDR_CODES}",
            if enhanced.is_empty() {
                reply.code.to_string()
            } else {
                enhanced.to_owned()
            }
        ),
    )
}

/// `535 5.7.3` (and other 535s that are not 5.7.139): the token was not accepted for this mailbox.
fn token_refused(ctx: &ServerContext) -> Explanation {
    let user = &ctx.username;
    let client = &ctx.client_id;
    match ctx.auth {
        AuthType::OauthService => {
            let scope_note = if ctx.scope == SMTP_SERVICE_SCOPE {
                String::new()
            } else {
                format!(" — it is `{}` now", ctx.scope)
            };
            Explanation::new(
                format!(
                    "Exchange Online refused the app's access token for the mailbox {user} (535 5.7.3): the app \
                     (client_id {client}) may not send as this mailbox"
                ),
                format!(
                    "check, in order: (1) the app registration has the *Application* permission Office 365 \
                     Exchange Online → SMTP.SendAsApp, and admin consent was granted (Entra ID → App registrations \
                     → the app → API permissions → Grant admin consent); (2) the app's service principal is \
                     registered in Exchange Online: `New-ServicePrincipal -AppId {client} -ObjectId <Object ID of \
                     the app's Enterprise application, not of the app registration>`; (3) that service principal \
                     has FullAccess on the sending mailbox: `Add-MailboxPermission -Identity {user} -User <its \
                     service principal id> -AccessRights FullAccess`; (4) `scopes` is {SMTP_SERVICE_SCOPE}{scope_note}. \
                     Changes can take up to an hour to reach Exchange Online"
                ),
            )
        }
        AuthType::OauthUser => Explanation::new(
            format!("Exchange Online refused the user's access token for {user} (535 5.7.3)"),
            format!(
                "check: (1) the app registration (client_id {client}) has the *Delegated* permission Office 365 \
                 Exchange Online → SMTP.Send, with admin consent; (2) `username` ({user}) is the account whose \
                 `password` is configured (a user's token opens only its own mailbox); (3) `scopes` include \
                 https://outlook.office.com/SMTP.Send (it is `{}` now)",
                ctx.scope
            ),
        ),
    }
}

/// `535 5.7.139`: SMTP AUTH is off for the tenant or the mailbox (or blocked by security defaults).
fn auth_disabled(ctx: &ServerContext, lower: &str, said: &str) -> Explanation {
    let user = &ctx.username;
    let mailbox_switch = format!(
        "Microsoft 365 admin center → Users → Active users → {user} → Mail → Manage email apps → tick Authenticated \
         SMTP (or `Set-CASMailbox -Identity {user} -SmtpClientAuthenticationDisabled $false`)"
    );
    if lower.contains("tenant") || lower.contains("organization's smtp") {
        return Explanation::new(
            "SMTP AUTH is turned off for the whole Microsoft 365 tenant (535 5.7.139, SmtpClientAuthentication is \
             disabled for the Tenant)",
            format!(
                "an Exchange admin turns it on for the organisation: `Set-TransportConfig \
                 -SmtpClientAuthenticationDisabled $false` (Exchange Online PowerShell), or for this mailbox only: \
                 {mailbox_switch}, which takes precedence over the tenant setting; see https://aka.ms/smtp_auth_disabled"
            ),
        );
    }
    if lower.contains("security defaults") {
        return Explanation::new(
            "the tenant's security defaults block SMTP AUTH (535 5.7.139)",
            "turn security defaults off (Entra ID → Overview → Properties → Manage security defaults) and protect \
             the tenant with Conditional Access policies instead, which can allow SMTP AUTH for this mailbox",
        );
    }
    if lower.contains("user")
        || lower.contains("mailbox")
        || lower.contains("did not meet the criteria")
    {
        return Explanation::new(
            format!("Authenticated SMTP is turned off for the mailbox {user} (535 5.7.139)"),
            format!(
                "{mailbox_switch}; if it is on already, a tenant-wide setting or policy may override it: check \
                 `Get-TransportConfig | Format-List SmtpClientAuthenticationDisabled` and authentication policies \
                 that block SMTP AUTH; see https://aka.ms/smtp_auth_disabled"
            ),
        );
    }
    Explanation::new(
        format!("Exchange Online refused SMTP AUTH for {user} ({said})"),
        format!(
            "check that Authenticated SMTP is on for the mailbox ({mailbox_switch}) and that SMTP AUTH is not \
             disabled for the tenant (`Set-TransportConfig -SmtpClientAuthenticationDisabled $false`); see \
             https://aka.ms/smtp_auth_disabled"
        ),
    )
}

fn send_as_denied(ctx: &ServerContext, from: Option<&str>) -> Explanation {
    let user = &ctx.username;
    let from = from.unwrap_or("<the From address>");
    Explanation::new(
        format!("the mailbox {user} may not send as {from} (554 5.2.252 SendAsDenied)"),
        format!(
            "either stop replying from that address — turn the `sender` flag of {from} off in the queue \
             configuration, so replies go out as {user} — or grant Send As: `Add-RecipientPermission {from} -Trustee \
             {user} -AccessRights SendAs` (Exchange Online PowerShell; it can take up to an hour to apply)"
        ),
    )
}

/// The address Exchange names in `… not allowed to send as <address>; …`.
fn sender_in_text(text: &str) -> Option<&str> {
    let start = text.find("send as ")? + "send as ".len();
    let rest = &text[start..];
    let end = rest
        .find(|c: char| c == ';' || c.is_whitespace())
        .unwrap_or(rest.len());
    let address = rest[..end].trim_matches(|c| c == '<' || c == '>');
    address.contains('@').then_some(address)
}

fn too_large_remotely(ctx: &ServerContext, size: Option<usize>) -> Explanation {
    let size = size
        .map(|s| format!(" ({})", megabytes(s)))
        .unwrap_or_default();
    Explanation::new(
        format!(
            "the message{size} is larger than {} accepts (552 5.3.4)",
            ctx.address()
        ),
        format!(
            "send smaller attachments (they grow by about a third when encoded), and lower `max_email_size_mb` \
             (now {} MB) below the server's limit so that such replies are stopped before sending; Exchange Online \
             accepts 35 MB by default (`Set-Mailbox {} -MaxSendSize`)",
            ctx.max_email_size_mb, ctx.username
        ),
    )
}

fn too_large_locally(ctx: &ServerContext, size: usize, limit: usize) -> Explanation {
    Explanation::new(
        format!(
            "the message is {} ({size} bytes), more than `max_email_size_mb` allows ({}, {limit} bytes); it was not \
             sent",
            megabytes(size),
            megabytes(limit)
        ),
        format!(
            "send smaller attachments (or links to them), or raise `max_email_size_mb` (at most 40, and not above \
             the mailbox's MaxSendSize: Exchange Online allows 35 MB by default) — it is {} now",
            ctx.max_email_size_mb
        ),
    )
}

fn tls(ctx: &ServerContext, problem: TlsProblem, detail: &str) -> Explanation {
    let hp = ctx.address();
    let host = &ctx.host;
    let ca_note = match &ctx.ca_file {
        Some(path) => format!(
            " (`ca_file` is {} now, and it does not hold the CA that issued this certificate)",
            path.display()
        ),
        None => String::new(),
    };
    match problem {
        TlsProblem::UnknownIssuer => Explanation::new(
            format!(
                "the TLS certificate of {hp} was issued by a CA this client does not trust ({detail})"
            ),
            format!(
                "if {host} is a local or test server with a private CA (like the mailqueue sandbox), or a \
                 TLS-inspecting proxy sits in between, set `ca_file` to that CA's certificate (PEM){ca_note}; \
                 smtp.office365.com needs no `ca_file`"
            ),
        ),
        TlsProblem::Expired => Explanation::new(
            format!("the TLS certificate of {hp} has expired or is not valid yet ({detail})"),
            "renew the server's certificate, or correct this machine's clock",
        ),
        TlsProblem::NameMismatch => Explanation::new(
            format!("the TLS certificate of {hp} is not valid for `{host}` ({detail})"),
            "set `host` to a name the certificate was issued for (smtp.office365.com for Microsoft 365)",
        ),
        TlsProblem::Certificate => Explanation::new(
            format!("the TLS certificate of {hp} was rejected ({detail})"),
            format!(
                "check the server's certificate chain; for a private CA set `ca_file` to its certificate (PEM){ca_note}"
            ),
        ),
        TlsProblem::NotTls => Explanation::new(
            format!("{hp} did not answer with TLS ({detail})"),
            if ctx.starttls {
                "the server's answer after STARTTLS was not TLS; check `host` and `port`".to_owned()
            } else {
                format!(
                    "port {} expects STARTTLS: set `starttls: true` (port 587), or use the implicit-TLS port 465",
                    ctx.port
                )
            },
        ),
        TlsProblem::Incompatible => Explanation::new(
            format!("TLS with {hp} failed: no common protocol version or cipher ({detail})"),
            "the server needs TLS 1.2 or 1.3 with current ciphers; check `host` and `port`",
        ),
        TlsProblem::Interrupted => Explanation::new(
            format!("the connection to {hp} was closed during the TLS handshake ({detail})"),
            format!(
                "usually transient: mailqueue retries; if it persists, check that port {} speaks {} and that no \
                 firewall or proxy interferes",
                ctx.port,
                ctx.mode()
            ),
        ),
        TlsProblem::CaFile => Explanation::new(
            format!("the CA file (`ca_file`) cannot be used ({detail})"),
            "point `ca_file` at a readable PEM file holding one or more CERTIFICATE blocks, or remove it",
        ),
    }
}

fn megabytes(bytes: usize) -> String {
    format!("{:.1} MB", bytes as f64 / (1024.0 * 1024.0))
}

fn secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> ServerContext {
        ServerContext {
            host: "smtp.office365.com".into(),
            port: 587,
            starttls: true,
            username: "support@contoso.com".into(),
            client_id: "6e1f0c2d-3b4a-4c5d-9e8f-a0b1c2d3e4f5".into(),
            auth: AuthType::OauthService,
            scope: SMTP_SERVICE_SCOPE.into(),
            ca_file: None,
            max_email_size_mb: 25,
        }
    }

    fn reply(code: u16, text: &str) -> SmtpReply {
        SmtpReply::new(code, text)
    }

    #[test]
    fn the_5_7_3_checklist() {
        let e = smtp_reply(
            &reply(535, "5.7.3 Authentication unsuccessful [SN4PR0501CA0123]"),
            &ctx(),
            None,
            None,
        );
        for needle in [
            "SMTP.SendAsApp",
            "admin consent",
            "New-ServicePrincipal -AppId 6e1f0c2d-3b4a-4c5d-9e8f-a0b1c2d3e4f5",
            "Add-MailboxPermission -Identity support@contoso.com",
            "FullAccess",
            "https://outlook.office.com/.default",
        ] {
            assert!(e.fix.contains(needle), "{needle}: {e}");
        }
        let mut other = ctx();
        other.scope = "https://outlook.office365.com/.default".into();
        let e = smtp_reply(
            &reply(535, "5.7.3 Authentication unsuccessful"),
            &other,
            None,
            None,
        );
        assert!(
            e.fix
                .contains("it is `https://outlook.office365.com/.default` now")
        );
    }

    #[test]
    fn the_5_7_139_tenant_and_user_texts_differ() {
        let tenant = smtp_reply(
            &reply(
                535,
                "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit \
                 https://aka.ms/smtp_auth_disabled for more information. [HOST]",
            ),
            &ctx(),
            None,
            None,
        );
        assert!(
            tenant.cause.contains("whole Microsoft 365 tenant"),
            "{tenant}"
        );
        assert!(
            tenant
                .fix
                .contains("Set-TransportConfig -SmtpClientAuthenticationDisabled $false")
        );
        for text in [
            "5.7.139 Authentication unsuccessful, the user's SmtpClientAuthentication is disabled. [HOST]",
            "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. [HOST]",
            "5.7.139 Authentication unsuccessful, the request did not meet the criteria to be authenticated \
             successfully. [HOST]",
        ] {
            let user = smtp_reply(&reply(535, text), &ctx(), None, None);
            assert!(
                user.cause
                    .contains("turned off for the mailbox support@contoso.com"),
                "{user}"
            );
            assert!(
                user.fix.contains("Manage email apps") && user.fix.contains("Authenticated SMTP")
            );
            assert!(user.fix.contains("tenant-wide"));
        }
        let sd = smtp_reply(
            &reply(
                535,
                "5.7.139 Authentication unsuccessful, user is locked by your organization's security defaults \
                 policy. Contact your administrator.",
            ),
            &ctx(),
            None,
            None,
        );
        assert!(sd.cause.contains("security defaults"));
    }

    #[test]
    fn send_as_names_the_address_and_both_fixes() {
        let e = smtp_reply(
            &reply(
                554,
                "5.2.252 SendAsDenied; support@contoso.com not allowed to send as help@contoso.com; \
                 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied",
            ),
            &ctx(),
            Some("other@contoso.com"),
            None,
        );
        assert!(e.cause.contains("may not send as help@contoso.com"), "{e}");
        assert!(e.fix.contains("`sender` flag of help@contoso.com off"));
        assert!(
            e.fix.contains(
                "Add-RecipientPermission help@contoso.com -Trustee support@contoso.com -AccessRights SendAs"
            )
        );
        assert_eq!(
            sender_in_text("x not allowed to send as <a@b.c>; y"),
            Some("a@b.c")
        );
        assert_eq!(sender_in_text("no address here"), None);
    }

    #[test]
    fn other_replies() {
        let c = ctx();
        let e = smtp_reply(
            &reply(530, "5.7.57 Client not authenticated to send mail. [HOST]"),
            &c,
            None,
            None,
        );
        assert!(e.fix.contains("587") && e.fix.contains("starttls: true"));
        let e = smtp_reply(
            &reply(552, "5.3.4 Message size exceeds fixed maximum message size"),
            &c,
            None,
            Some(3 * 1024 * 1024),
        );
        assert!(
            e.cause.contains("3.0 MB") && e.fix.contains("max_email_size_mb"),
            "{e}"
        );
        let e = smtp_reply(
            &reply(
                421,
                "4.3.2 Service not available, closing transmission channel",
            ),
            &c,
            None,
            None,
        );
        assert!(e.fix.contains("retries"));
        let e = smtp_reply(
            &reply(451, "4.7.0 Temporary server error. Please try again later."),
            &c,
            None,
            None,
        );
        assert!(e.cause.contains("just now") && e.fix.contains("retries"));
        let e = smtp_reply(
            &reply(550, "5.7.708 Service unavailable. Access denied"),
            &c,
            None,
            None,
        );
        assert!(e.fix.contains("5.7.708") && e.fix.contains(NDR_CODES));
    }

    #[test]
    fn tls_texts_point_at_ca_file() {
        let mut c = ctx();
        let e = tls(
            &c,
            TlsProblem::UnknownIssuer,
            "invalid peer certificate: UnknownIssuer",
        );
        assert!(e.fix.contains("`ca_file`") && e.cause.contains("smtp.office365.com:587"));
        c.ca_file = Some("/etc/mq/ca.pem".into());
        let e = tls(&c, TlsProblem::UnknownIssuer, "x");
        assert!(e.fix.contains("/etc/mq/ca.pem"));
        c.starttls = false;
        assert!(
            tls(&c, TlsProblem::NotTls, "x")
                .fix
                .contains("starttls: true")
        );
    }

    #[test]
    fn texts_follow_the_explanation_convention() {
        let c = ctx();
        let replies = [
            (535, "5.7.3 Authentication unsuccessful"),
            (
                535,
                "5.7.139 Authentication unsuccessful, the user's SmtpClientAuthentication is disabled.",
            ),
            (
                535,
                "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.",
            ),
            (530, "5.7.57 Client not authenticated"),
            (
                554,
                "5.2.252 SendAsDenied; a@b not allowed to send as c@d; x",
            ),
            (552, "5.3.4 too big"),
            (421, "4.3.2 bye"),
            (452, "4.5.3 Too many recipients"),
            (550, "5.1.10 RESOLVER.ADR.RecipientNotFound"),
        ];
        for (code, text) in replies {
            let e = smtp_reply(&reply(code, text), &c, Some("c@d"), Some(10));
            assert!(!e.cause.is_empty() && !e.fix.is_empty());
            assert!(
                !e.cause.ends_with('.') && !e.fix.ends_with('.'),
                "{code} {text}: {e}"
            );
        }
    }
}
