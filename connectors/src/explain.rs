//! Plain-words explanations of the failures an operator meets when connecting to Microsoft 365: what went wrong
//! (the *cause*) and what to change (the *fix*).
//!
//! One table per source of failure: Entra ID `AADSTS` codes from the token endpoint, and transport failures on the
//! way to it. SMTP replies (`535 5.7.3`, `535 5.7.139`, …) and IMAP answers get their tables here too, so that
//! `mailqueue doctor` and the logs word the same failure the same way.
//!
//! Texts never contain secrets: they are static, and the few values filled in are host names and status codes.

use std::{fmt, time::Duration};

/// Why something failed and how to fix it, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// What went wrong, e.g. "the client secret is wrong".
    pub cause: String,
    /// What to change, e.g. "copy the secret's Value, not its Secret ID, …".
    pub fix: String,
}

impl Explanation {
    pub fn new(cause: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            cause: cause.into(),
            fix: fix.into(),
        }
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}. Fix: {}.", self.cause, self.fix)
    }
}

/// One row of the AADSTS table: the codes it covers, the cause and the fix.
struct Row {
    codes: &'static [u32],
    cause: &'static str,
    fix: &'static str,
}

const FOR_SERVICE_SCOPES: &str = "for OAuth Service use `<resource>/.default`: https://outlook.office365.com/.default \
     (IMAP) or https://outlook.office.com/.default (SMTP); for OAuth User use delegated scopes such as \
     `https://outlook.office365.com/IMAP.AccessAsUser.All offline_access`";

/// Entra ID errors operators meet with mailbox access over IMAP/SMTP and OAuth2.
const AADSTS: &[Row] = &[
    Row {
        codes: &[7000215],
        cause: "the client secret is wrong",
        fix: "copy the secret's *Value*, not its *Secret ID*, from Certificates & secrets (Entra ID → App \
              registrations → the app) into `client_secret`; the Value is shown only right after the secret is \
              created, so create a new one if it is gone",
    },
    Row {
        codes: &[7000222],
        cause: "the client secret has expired",
        fix: "create a new one in Certificates & secrets (Entra ID → App registrations → the app) and update \
              `client_secret` with its Value",
    },
    Row {
        codes: &[700016],
        cause: "the application (client_id) is unknown in this tenant",
        fix: "check `client_id` against the app registration's Application (client) ID, and that `login_address` \
              names the tenant the app is registered in (the app may be in another tenant)",
    },
    Row {
        codes: &[90002],
        cause: "the tenant in `login_address` does not exist",
        fix: "check the tenant id or name in `login_address` (https://login.microsoftonline.com/<tenant id or \
              name.onmicrosoft.com>); the Directory (tenant) ID is on the app registration's Overview page",
    },
    Row {
        codes: &[50126],
        cause: "wrong user name or password (OAuth User)",
        fix: "check the mailbox's login (`account`, else `address`) and its `password`; update the configuration \
              after a password change",
    },
    Row {
        codes: &[50076, 50079],
        cause: "MFA is required for this user; ROPC (the password grant of OAuth User) cannot do MFA",
        fix: "exclude the mailbox from MFA via Conditional Access (or security defaults) for this app, or use \
              OAuth Service (`auth: oauth_service`) instead",
    },
    Row {
        codes: &[65001],
        cause: "admin consent has not been granted for the app's permissions",
        fix: "in Entra ID → Enterprise applications → the app → Permissions, click Grant admin consent \
              (IMAP.AccessAsApp / SMTP.SendAsApp for OAuth Service, IMAP.AccessAsUser.All / SMTP.Send for OAuth \
              User)",
    },
    Row {
        codes: &[70011, 1002012],
        cause: "the requested scope is invalid",
        fix: FOR_SERVICE_SCOPES,
    },
    Row {
        codes: &[7000218],
        cause: "no client secret was sent, but the app is a confidential client",
        fix: "for OAuth Service set `client_secret`; for OAuth User enable \"Allow public client flows\" on the \
              app registration's Authentication page",
    },
    Row {
        codes: &[700025],
        cause: "a client secret was sent, but the app is a public client",
        fix: "remove `client_secret` from the OAuth User server, or turn off \"Allow public client flows\" on the \
              app registration's Authentication page",
    },
    Row {
        codes: &[50034],
        cause: "the user does not exist in this tenant",
        fix: "check the mailbox's login (`account`, else `address`: its user principal name) and that \
              `login_address` names the mailbox's tenant",
    },
    Row {
        codes: &[53003],
        cause: "the sign-in was blocked by Conditional Access",
        fix: "ask the Entra ID admin to exclude this app or mailbox from the blocking policy; the sign-in logs \
              show which policy, found by the correlation id",
    },
    Row {
        codes: &[50055],
        cause: "the user's password has expired",
        fix: "set a new password for the mailbox, update `password`, and consider a non-expiring password for \
              mailboxes used by mailqueue",
    },
    Row {
        codes: &[50057],
        cause: "the user account is disabled",
        fix: "enable the account (Entra ID → Users → the user → Account enabled), or use OAuth Service for \
              shared mailboxes whose sign-in is blocked",
    },
    Row {
        codes: &[50053],
        cause: "the account is locked after too many failed sign-ins",
        fix: "wait for the lock to expire and correct the password in the configuration first, or it locks again",
    },
    Row {
        codes: &[70000, 50173],
        cause: "the refresh token is invalid or was revoked",
        fix: "nothing, if the password is still right: mailqueue signs in again with the password; otherwise \
              update `password`",
    },
    Row {
        codes: &[700082],
        cause: "the refresh token has expired",
        fix: "nothing, if the password is still right: mailqueue signs in again with the password; otherwise \
              update `password`",
    },
    Row {
        codes: &[7000112],
        cause: "the application is disabled in this tenant",
        fix: "enable it: Entra ID → Enterprise applications → the app → Properties → Enabled for users to sign in",
    },
    Row {
        codes: &[500011],
        cause: "the resource named in the scope does not exist in this tenant",
        fix: "check the scope URL (https://outlook.office365.com for IMAP, https://outlook.office.com for SMTP) \
              and that the tenant has Exchange Online",
    },
    Row {
        codes: &[900144],
        cause: "the token request lacks a required parameter",
        fix: "check that `client_id`, `client_secret` (OAuth Service) or the mailbox `password` (OAuth User) and \
              the scopes are set",
    },
    Row {
        codes: &[50196, 90033],
        cause: "Entra ID is throttling or temporarily unavailable",
        fix: "nothing to change if it passes; mailqueue retries with backoff. If it persists, check that nothing \
              else requests tokens in a loop with this app",
    },
];

/// The explanation of an Entra ID `AADSTS` code, if it is one operators are known to meet.
pub fn aadsts(code: u32) -> Option<Explanation> {
    AADSTS
        .iter()
        .find(|row| row.codes.contains(&code))
        .map(|row| Explanation::new(row.cause, row.fix))
}

/// Every AADSTS code [`aadsts`] explains.
pub fn aadsts_codes() -> impl Iterator<Item = u32> {
    AADSTS.iter().flat_map(|row| row.codes.iter().copied())
}

/// An AADSTS code the table does not know: Microsoft's own words, and where Microsoft documents it.
pub fn unknown_aadsts(code: u32, description: Option<&str>) -> Explanation {
    Explanation::new(
        description
            .map(str::to_owned)
            .unwrap_or_else(|| format!("Entra ID refused the token request (AADSTS{code})")),
        format!("look the code up at https://login.microsoftonline.com/error?code={code}"),
    )
}

/// How the token endpoint could not be spoken to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// DNS, connection refused, no route, proxy refused…
    Unreachable,
    /// The TLS handshake or certificate check failed.
    Tls,
    /// No answer in time.
    Timeout,
}

/// A transport failure on the way to `host`.
pub fn transport(kind: Transport, host: &str, detail: Option<&str>) -> Explanation {
    let detail = detail.map(|d| format!(" ({d})")).unwrap_or_default();
    match kind {
        Transport::Unreachable => Explanation::new(
            format!("the token endpoint {host} could not be reached{detail}"),
            format!(
                "check `login_address` / `token_endpoint`, DNS, and that outbound HTTPS to {host} is allowed \
                 (firewall, proxy: HTTPS_PROXY / NO_PROXY)"
            ),
        ),
        Transport::Tls => Explanation::new(
            format!("the TLS connection to {host} failed{detail}"),
            format!(
                "if a proxy inspects TLS, trust its CA or exempt {host}; check the system clock; for a local \
                 endpoint, use its CA (`ca_file`)"
            ),
        ),
        Transport::Timeout => Explanation::new(
            format!("the token endpoint {host} did not answer in time"),
            "check the network path and any proxy to it; mailqueue retries on its own",
        ),
    }
}

/// Still throttled (HTTP 429) after every retry.
pub fn throttled(host: &str, retry_after: Option<Duration>) -> Explanation {
    let wait = retry_after
        .map(|d| format!(" (it asks to wait {} s)", d.as_secs()))
        .unwrap_or_default();
    Explanation::new(
        format!("{host} kept throttling the token requests{wait}"),
        "wait and let mailqueue retry; tokens are cached, so many requests mean something else uses the same app \
         in a loop",
    )
}

/// A server error (5xx) that outlasted the retries, without an AADSTS code.
pub fn server_error(host: &str, status: u16) -> Explanation {
    Explanation::new(
        format!("{host} answered with a server error (HTTP {status})"),
        "usually transient: mailqueue retries; if it persists, check the Microsoft 365 service health",
    )
}

/// An HTTP error without Microsoft's JSON body, or a success whose body is not a token.
pub fn unparsable(host: &str, status: u16) -> Explanation {
    Explanation::new(
        format!("{host} answered HTTP {status} with a body that is not a Microsoft token response"),
        "check that `login_address` is https://login.microsoftonline.com/<tenant> (or `token_endpoint` is \
         <that>/oauth2/v2.0/token), and that no proxy or captive portal answers in its place",
    )
}

/// Who an IMAP XOAUTH2 login spoke for, to explain a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImapLogin<'a> {
    /// *OAuth Service*: an app token (client credentials) of the app `client_id`.
    App { client_id: &'a str },
    /// *OAuth User*: a delegated token (password grant) of the mailbox's own user.
    User,
}

/// The IMAP server refused an XOAUTH2 login to `mailbox` with a token that was just issued (so it is neither
/// expired nor revoked): what Exchange Online checks, as a checklist. Only the mailbox and the client id are named,
/// never a secret.
pub fn imap_auth_refused(login: ImapLogin<'_>, mailbox: &str) -> Explanation {
    match login {
        ImapLogin::App { client_id } => Explanation::new(
            format!(
                "Exchange Online refused the app token of app {client_id} for the mailbox {mailbox}: the app \
                 is not allowed to open this mailbox over IMAP"
            ),
            format!(
                "check three things: (1) in Entra ID the app has the application permission IMAP.AccessAsApp \
                 (Office 365 Exchange Online) with admin consent granted; (2) its service principal is registered in \
                 Exchange Online: `New-ServicePrincipal -AppId {client_id} -ObjectId <object id of the app's \
                 Enterprise application>`; (3) that service principal has FullAccess on this mailbox: \
                 `Add-MailboxPermission -Identity {mailbox} -User <service principal id> -AccessRights FullAccess` \
                 (changes can take up to an hour to apply)"
            ),
        ),
        ImapLogin::User => Explanation::new(
            format!(
                "Exchange Online refused the delegated (OAuth User) token for the mailbox {mailbox}"
            ),
            format!(
                "check that the mailbox's `password` is still the user's password (update it after a change), that \
                 IMAP is enabled for the mailbox (`Set-CASMailbox -Identity {mailbox} -ImapEnabled $true`), that the \
                 token is for this mailbox's own user (`account`), and that the app has the delegated permission \
                 IMAP.AccessAsUser.All with consent granted"
            ),
        ),
    }
}

/// The IMAP server could not check the token just now (`[UNAVAILABLE]`): transient.
pub fn imap_auth_unavailable(host: &str) -> Explanation {
    Explanation::new(
        format!("the IMAP server {host} could not check the access token just now (temporary)"),
        "nothing to change if it passes; mailqueue retries with backoff",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_required_code_is_explained() {
        for code in [
            7000215, 7000222, 700016, 90002, 50126, 50076, 50079, 65001, 70011, 7000218, 50034,
            53003, 50055, 50057, 70000, 700082,
        ] {
            let e = aadsts(code).unwrap_or_else(|| panic!("AADSTS{code} not explained"));
            assert!(!e.cause.is_empty() && !e.fix.is_empty());
            assert!(
                !e.cause.ends_with('.') && !e.fix.ends_with('.'),
                "{code}: {e}"
            );
        }
        assert_eq!(aadsts(1), None);
    }

    #[test]
    fn codes_are_unique() {
        let mut codes: Vec<u32> = aadsts_codes().collect();
        let n = codes.len();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), n);
    }

    #[test]
    fn key_texts() {
        let e = aadsts(7000215).unwrap();
        assert_eq!(e.cause, "the client secret is wrong");
        assert!(
            e.fix.contains("*Value*")
                && e.fix.contains("*Secret ID*")
                && e.fix.contains("Certificates & secrets")
        );
        assert!(aadsts(7000222).unwrap().cause.contains("expired"));
        assert!(aadsts(7000222).unwrap().fix.contains("client_secret"));
        assert!(aadsts(700016).unwrap().fix.contains("client_id"));
        assert!(aadsts(90002).unwrap().fix.contains("login_address"));
        assert!(aadsts(50126).unwrap().cause.contains("password"));
        for code in [50076, 50079] {
            let e = aadsts(code).unwrap();
            assert!(e.cause.contains("MFA") && e.cause.contains("ROPC"));
            assert!(e.fix.contains("Conditional Access") && e.fix.contains("OAuth Service"));
        }
        assert!(aadsts(65001).unwrap().fix.contains("Grant admin consent"));
        assert!(aadsts(70011).unwrap().fix.contains("/.default"));
        assert_eq!(aadsts(1002012), aadsts(70011));
        assert!(aadsts(7000218).unwrap().fix.contains("public client flows"));
        assert!(aadsts(53003).unwrap().cause.contains("Conditional Access"));
        assert!(aadsts(700082).unwrap().cause.contains("refresh token"));
    }

    #[test]
    fn imap_auth_checklists() {
        let app = imap_auth_refused(
            ImapLogin::App {
                client_id: "6e1f0c2d",
            },
            "support@contoso.com",
        );
        for needle in [
            "IMAP.AccessAsApp",
            "admin consent",
            "New-ServicePrincipal -AppId 6e1f0c2d",
            "Add-MailboxPermission -Identity support@contoso.com",
            "FullAccess",
        ] {
            assert!(app.fix.contains(needle), "{needle}: {app}");
        }
        assert!(app.cause.contains("support@contoso.com"));
        let user = imap_auth_refused(ImapLogin::User, "anna@contoso.com");
        for needle in [
            "password",
            "ImapEnabled",
            "IMAP.AccessAsUser.All",
            "consent",
        ] {
            assert!(user.fix.contains(needle), "{needle}: {user}");
        }
        for e in [app, user, imap_auth_unavailable("h")] {
            assert!(!e.cause.ends_with('.') && !e.fix.ends_with('.'), "{e}");
        }
    }

    #[test]
    fn transport_texts_name_the_host() {
        for kind in [Transport::Unreachable, Transport::Tls, Transport::Timeout] {
            let e = transport(kind, "login.example", Some("connection refused"));
            assert!(e.cause.contains("login.example"), "{e}");
        }
        assert!(
            transport(Transport::Unreachable, "h", Some("connection refused"))
                .cause
                .contains("(connection refused)")
        );
        assert!(
            throttled("h", Some(Duration::from_secs(7)))
                .cause
                .contains("7 s")
        );
        assert!(server_error("h", 503).cause.contains("503"));
        assert!(unparsable("h", 200).cause.contains("HTTP 200"));
        assert!(unknown_aadsts(123, None).fix.contains("code=123"));
    }
}
