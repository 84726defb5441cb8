//! The sandbox's world: tenants, app registrations, users and mailboxes, and the rules Microsoft 365 applies to
//! them (who may get a token, which mailbox a token opens over IMAP, who may send over SMTP and as whom).
//! Loaded from a YAML fixture; `World::default()` is `fixtures/world.yaml`.

use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::tokens::{TokenInfo, TokenKind};

pub const DEFAULT_WORLD: &str = include_str!("../fixtures/world.yaml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct World {
    pub tenants: Vec<Tenant>,
    #[serde(default)]
    pub apps: Vec<App>,
    #[serde(default)]
    pub users: Vec<User>,
    #[serde(default)]
    pub mailboxes: Vec<Mailbox>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    /// Directory (tenant) id, a GUID.
    pub id: String,
    /// Initial domain, e.g. `contoso.onmicrosoft.com`; also accepted in token URLs.
    pub name: String,
    /// Mail domains of the tenant.
    #[serde(default)]
    pub domains: Vec<String>,
    /// Tenant-wide SMTP AUTH (off: every mailbox gets `535 5.7.139`).
    #[serde(default = "yes")]
    pub smtp_auth_enabled: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct App {
    pub client_id: String,
    /// Tenant id or name the app is registered in.
    pub tenant: String,
    pub name: String,
    #[serde(default)]
    pub secrets: Vec<ClientSecret>,
    /// A public client (ROPC without secret).
    #[serde(default)]
    pub public_client: bool,
    /// Application permissions, e.g. `IMAP.AccessAsApp`, `SMTP.SendAsApp`.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Delegated permissions, e.g. `IMAP.AccessAsUser.All`.
    #[serde(default)]
    pub delegated_scopes: Vec<String>,
    /// Whether an admin granted consent (else AADSTS65001).
    #[serde(default = "yes")]
    pub admin_consent: bool,
    /// Mailboxes the app's service principal has FullAccess on (`Add-MailboxPermission`).
    #[serde(default)]
    pub full_access: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSecret {
    /// The secret's ID (what admins wrongly copy instead of the value).
    pub id: String,
    pub value: String,
    pub expires: DateTime<Utc>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub upn: String,
    pub password: String,
    pub tenant: String,
    /// MFA required: ROPC fails with AADSTS50076.
    #[serde(default)]
    pub mfa: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mailbox {
    pub address: String,
    /// Authenticated SMTP enabled for this mailbox.
    #[serde(default = "yes")]
    pub smtp_auth: bool,
    /// Other addresses this mailbox may send as (besides its own).
    #[serde(default)]
    pub send_as: Vec<String>,
}

fn yes() -> bool {
    true
}

impl Default for World {
    fn default() -> Self {
        Self::parse(DEFAULT_WORLD).expect("the built-in world fixture is valid")
    }
}

/// Why the IMAP server refuses a login (all answered `NO [AUTHENTICATIONFAILED]`, as Exchange does).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImapDenial {
    #[error("no such mailbox")]
    NoMailbox,
    #[error("token audience is not https://outlook.office365.com")]
    WrongAudience,
    #[error("token lacks IMAP.AccessAsApp / IMAP.AccessAsUser.All")]
    MissingPermission,
    #[error("the app has no FullAccess on the mailbox")]
    NoFullAccess,
    #[error("a delegated token opens only its own mailbox")]
    OtherUser,
    #[error("token from another tenant")]
    OtherTenant,
}

/// Why the SMTP server refuses AUTH or a sender, with Exchange's reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpDenial {
    pub reply: String,
}

impl World {
    pub fn parse(yaml: &str) -> Result<Self, String> {
        serde_saphyr::from_str(yaml).map_err(|e| e.to_string())
    }

    /// A tenant by id or by initial domain name (case-insensitive), as the token URL may use either.
    pub fn tenant(&self, id_or_name: &str) -> Option<&Tenant> {
        self.tenants.iter().find(|t| {
            t.id.eq_ignore_ascii_case(id_or_name) || t.name.eq_ignore_ascii_case(id_or_name)
        })
    }

    pub fn app(&self, client_id: &str) -> Option<&App> {
        self.apps
            .iter()
            .find(|a| a.client_id.eq_ignore_ascii_case(client_id))
    }

    pub fn user(&self, upn: &str) -> Option<&User> {
        self.users.iter().find(|u| u.upn.eq_ignore_ascii_case(upn))
    }

    pub fn mailbox(&self, address: &str) -> Option<&Mailbox> {
        self.mailboxes
            .iter()
            .find(|m| m.address.eq_ignore_ascii_case(address))
    }

    /// The tenant owning a mail address, by its domain.
    pub fn tenant_of_address(&self, address: &str) -> Option<&Tenant> {
        let domain = address.rsplit_once('@')?.1;
        self.tenants
            .iter()
            .find(|t| t.domains.iter().any(|d| d.eq_ignore_ascii_case(domain)))
    }

    /// Whether `app` is registered in `tenant` (by id or name).
    pub fn app_in_tenant(&self, app: &App, tenant: &Tenant) -> bool {
        self.tenant(&app.tenant).is_some_and(|t| t.id == tenant.id)
    }

    /// Exchange's IMAP rule: an app token opens a mailbox of its tenant on which the app has FullAccess and holds
    /// `IMAP.AccessAsApp`; a delegated token opens only its own mailbox and needs `IMAP.AccessAsUser.All`.
    pub fn authorize_imap(&self, token: &TokenInfo, mailbox: &str) -> Result<(), ImapDenial> {
        self.mailbox(mailbox).ok_or(ImapDenial::NoMailbox)?;
        if !token
            .audience
            .eq_ignore_ascii_case("https://outlook.office365.com")
        {
            return Err(ImapDenial::WrongAudience);
        }
        if self.tenant_of_address(mailbox).map(|t| t.id.as_str()) != Some(token.tenant_id.as_str())
        {
            return Err(ImapDenial::OtherTenant);
        }
        match &token.kind {
            TokenKind::App { client_id, roles } => {
                if !roles.iter().any(|r| r == "IMAP.AccessAsApp") {
                    return Err(ImapDenial::MissingPermission);
                }
                let app = self.app(client_id).ok_or(ImapDenial::NoFullAccess)?;
                if !app
                    .full_access
                    .iter()
                    .any(|m| m.eq_ignore_ascii_case(mailbox))
                {
                    return Err(ImapDenial::NoFullAccess);
                }
                Ok(())
            }
            TokenKind::User { upn, scopes, .. } => {
                if !scopes.iter().any(|s| s == "IMAP.AccessAsUser.All") {
                    return Err(ImapDenial::MissingPermission);
                }
                if !upn.eq_ignore_ascii_case(mailbox) {
                    return Err(ImapDenial::OtherUser);
                }
                Ok(())
            }
        }
    }

    /// Exchange's SMTP AUTH rule for `user` (the SASL user) with `token`: tenant SMTP AUTH on (else 5.7.139 tenant),
    /// the mailbox's Authenticated SMTP on (else 5.7.139 user), and for app tokens the `SMTP.SendAsApp` role, the
    /// `https://outlook.office.com` audience and FullAccess on the mailbox (else 5.7.3).
    pub fn authorize_smtp(
        &self,
        token: &TokenInfo,
        user: &str,
        host: &str,
    ) -> Result<(), SmtpDenial> {
        let unsuccessful = || SmtpDenial {
            reply: format!("535 5.7.3 Authentication unsuccessful [{host}]"),
        };
        let mailbox = self.mailbox(user).ok_or_else(unsuccessful)?;
        let tenant = self.tenant_of_address(user).ok_or_else(unsuccessful)?;
        if tenant.id != token.tenant_id {
            return Err(unsuccessful());
        }
        if !tenant.smtp_auth_enabled {
            return Err(SmtpDenial {
                reply: format!(
                    "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. \
                     Visit https://aka.ms/smtp_auth_disabled for more information. [{host}]"
                ),
            });
        }
        if !mailbox.smtp_auth {
            return Err(SmtpDenial {
                reply: format!(
                    "535 5.7.139 Authentication unsuccessful, the user's SmtpClientAuthentication is disabled. \
                     Visit https://aka.ms/smtp_auth_disabled for more information. [{host}]"
                ),
            });
        }
        let audience_ok = [
            "https://outlook.office.com",
            "https://outlook.office365.com",
        ]
        .iter()
        .any(|a| token.audience.eq_ignore_ascii_case(a));
        match &token.kind {
            TokenKind::App { client_id, roles } => {
                let app = self.app(client_id).ok_or_else(unsuccessful)?;
                let permitted = roles.iter().any(|r| r == "SMTP.SendAsApp")
                    && app.full_access.iter().any(|m| m.eq_ignore_ascii_case(user));
                if !permitted
                    || !token
                        .audience
                        .eq_ignore_ascii_case("https://outlook.office.com")
                {
                    return Err(unsuccessful());
                }
            }
            TokenKind::User { upn, scopes, .. } => {
                if !audience_ok
                    || !upn.eq_ignore_ascii_case(user)
                    || !scopes.iter().any(|s| s == "SMTP.Send")
                {
                    return Err(unsuccessful());
                }
            }
        }
        Ok(())
    }

    /// Whether mailbox `user` may send with `from` as the sender (itself or a Send As grant); else
    /// `554 5.2.252 SendAsDenied`.
    pub fn authorize_send_as(&self, user: &str, from: &str) -> Result<(), SmtpDenial> {
        let allowed = user.eq_ignore_ascii_case(from)
            || self
                .mailbox(user)
                .is_some_and(|m| m.send_as.iter().any(|a| a.eq_ignore_ascii_case(from)));
        if allowed {
            Ok(())
        } else {
            Err(SmtpDenial {
                reply: format!(
                    "554 5.2.252 SendAsDenied; {user} not allowed to send as {from}; STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied"
                ),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_world_parses_and_resolves_tenants_by_id_and_name() {
        let w = World::default();
        let by_name = w.tenant("contoso.onmicrosoft.com").unwrap();
        assert_eq!(w.tenant(&by_name.id).unwrap().name, by_name.name);
        assert_eq!(
            w.tenant_of_address("Support@Contoso.com").unwrap().id,
            by_name.id
        );
        assert!(w.app("6e1f0c2d-3b4a-4c5d-9e8f-a0b1c2d3e4f5").is_some());
    }
}
