//! The token endpoint's decisions: client credentials, ROPC (`password`) and `refresh_token`, checked in Entra's
//! order (tenant → app → credentials → consent → scope) against the world.

use chrono::{Duration, Utc};
use serde::Serialize;

use super::error::AadError;
use crate::{
    tokens::{RefreshGrant, TokenKind, TokenStore},
    world::{App, Tenant, World},
};

/// Exchange Online's resource application id (named in AADSTS50076 and friends).
pub const EXCHANGE_APP_ID: &str = "00000002-0000-0ff1-ce00-000000000000";
/// Microsoft Graph's resource application id.
pub const GRAPH_APP_ID: &str = "00000003-0000-0000-c000-000000000000";

const GRAPH: &str = "https://graph.microsoft.com";

/// Delegated permissions each resource exposes (besides whatever an app lists in `delegated_scopes`).
const EXCHANGE_SCOPES: &[&str] = &[
    "IMAP.AccessAsUser.All",
    "POP.AccessAsUser.All",
    "SMTP.Send",
    "EWS.AccessAsUser.All",
    "EAS.AccessAsUser.All",
    "full_access_as_user",
    "Mail.Read",
    "Mail.ReadWrite",
    "Mail.Send",
    "User.Read",
];
const GRAPH_SCOPES: &[&str] = &[
    "User.Read",
    "Mail.Read",
    "Mail.ReadWrite",
    "Mail.Send",
    "Mail.Read.Shared",
    "Mail.Send.Shared",
    "IMAP.AccessAsUser.All",
    "POP.AccessAsUser.All",
    "SMTP.Send",
];
/// OpenID Connect scopes: always allowed, never in `scp`.
const OIDC_SCOPES: &[&str] = &["openid", "profile", "email", "offline_access"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResourceKind {
    Exchange,
    Graph,
}

/// A resource a token can be asked for: its URI (the token's `aud`) and kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Resource {
    uri: &'static str,
    kind: ResourceKind,
}

const RESOURCES: &[Resource] = &[
    Resource {
        uri: "https://outlook.office365.com",
        kind: ResourceKind::Exchange,
    },
    Resource {
        uri: "https://outlook.office.com",
        kind: ResourceKind::Exchange,
    },
    Resource {
        uri: GRAPH,
        kind: ResourceKind::Graph,
    },
];

impl Resource {
    fn find(uri: &str) -> Option<Self> {
        let uri = uri.trim_end_matches('/');
        RESOURCES
            .iter()
            .copied()
            .find(|r| r.uri.eq_ignore_ascii_case(uri))
    }

    fn graph() -> Self {
        RESOURCES[2]
    }

    fn app_id(self) -> &'static str {
        match self.kind {
            ResourceKind::Exchange => EXCHANGE_APP_ID,
            ResourceKind::Graph => GRAPH_APP_ID,
        }
    }

    fn known_scopes(self) -> &'static [&'static str] {
        match self.kind {
            ResourceKind::Exchange => EXCHANGE_SCOPES,
            ResourceKind::Graph => GRAPH_SCOPES,
        }
    }

    /// Whether an application role belongs to this resource (Exchange's are IMAP./POP./SMTP./EWS./full_access_as_app).
    fn owns_role(self, role: &str) -> bool {
        let exchange = ["IMAP.", "POP.", "SMTP.", "EWS.", "Exchange."]
            .iter()
            .any(|p| role.starts_with(p))
            || role == "full_access_as_app";
        exchange == (self.kind == ResourceKind::Exchange)
    }
}

/// The request's form parameters (first occurrence wins; empty values count as absent, as at Entra).
pub struct Params(pub Vec<(String, String)>);

impl Params {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    }

    fn require(&self, name: &str) -> Result<&str, AadError> {
        self.get(name)
            .ok_or_else(|| AadError::missing_parameter(name))
    }
}

/// A tenant by id, initial domain name or one of its mail domains (the token URL may use any).
pub fn find_tenant<'w>(world: &'w World, id_or_name: &str) -> Option<&'w Tenant> {
    world.tenant(id_or_name).or_else(|| {
        world
            .tenants
            .iter()
            .find(|t| t.domains.iter().any(|d| d.eq_ignore_ascii_case(id_or_name)))
    })
}

/// The body of a successful token answer, in Entra's field order.
#[derive(Debug, Serialize)]
pub struct Issued {
    token_type: &'static str,
    /// Delegated grants only (client credentials answers have no `scope`).
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
    expires_in: i64,
    ext_expires_in: i64,
    access_token: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
}

/// Handles one token request for the tenant segment `tenant_in` of the URL.
pub fn issue(
    world: &World,
    tokens: &TokenStore,
    lifetime_secs: i64,
    tenant_in: &str,
    p: &Params,
) -> Result<Issued, AadError> {
    let tenant =
        find_tenant(world, tenant_in).ok_or_else(|| AadError::tenant_not_found(tenant_in))?;
    let grant_type = p.require("grant_type")?;
    if !matches!(
        grant_type,
        "client_credentials" | "password" | "refresh_token"
    ) {
        return Err(AadError::unsupported_grant_type(grant_type));
    }
    let client_id = p.require("client_id")?;
    let app = world
        .app(client_id)
        .filter(|a| world.app_in_tenant(a, tenant))
        .ok_or_else(|| AadError::app_not_found(client_id, &tenant.name))?;
    let cx = Cx {
        tokens,
        lifetime: Duration::seconds(lifetime_secs),
        tenant,
        app,
    };
    match grant_type {
        "client_credentials" => client_credentials(&cx, p),
        "password" => password(world, &cx, p),
        _ => refresh(world, &cx, p),
    }
}

/// One request's resolved tenant and app, and where and for how long to issue tokens.
struct Cx<'a> {
    tokens: &'a TokenStore,
    lifetime: Duration,
    tenant: &'a Tenant,
    app: &'a App,
}

/// Client authentication with a secret. `required`: a confidential client must present one.
fn authenticate_client(app: &App, secret: Option<&str>, required: bool) -> Result<(), AadError> {
    let Some(secret) = secret else {
        return if required {
            Err(AadError::missing_client_secret())
        } else {
            Ok(())
        };
    };
    if app.public_client && app.secrets.is_empty() {
        return Err(AadError::public_client_with_secret());
    }
    match app.secrets.iter().find(|s| s.value == secret) {
        Some(s) if s.expires <= Utc::now() => Err(AadError::expired_client_secret(&app.client_id)),
        Some(_) => Ok(()),
        None => Err(AadError::invalid_client_secret(&app.client_id)),
    }
}

fn client_credentials(cx: &Cx<'_>, p: &Params) -> Result<Issued, AadError> {
    let (tenant, app) = (cx.tenant, cx.app);
    let scope = p.require("scope")?;
    authenticate_client(app, p.get("client_secret"), true)?;
    if !app.admin_consent {
        return Err(AadError::consent_required(&app.client_id, &app.name));
    }
    let items: Vec<&str> = scope.split_whitespace().collect();
    let resource_uri = match items.as_slice() {
        [one] if one.ends_with("/.default") => one.trim_end_matches("/.default"),
        many if many.iter().any(|s| s.ends_with("/.default")) => {
            return Err(AadError::invalid_scope(
                scope,
                ".default scope can't be combined with resource-specific scopes.",
            ));
        }
        _ => return Err(AadError::client_credentials_scope(scope)),
    };
    let resource = Resource::find(resource_uri)
        .ok_or_else(|| AadError::resource_not_found(resource_uri, &tenant.name))?;
    let roles: Vec<String> = app
        .roles
        .iter()
        .filter(|r| resource.owns_role(r))
        .cloned()
        .collect();
    let kind = TokenKind::App {
        client_id: app.client_id.clone(),
        roles,
    };
    let (token, _) = cx.tokens.mint(&tenant.id, resource.uri, kind, cx.lifetime);
    let expires_in = cx.lifetime.num_seconds();
    Ok(Issued {
        token_type: "Bearer",
        scope: None,
        expires_in,
        ext_expires_in: expires_in,
        access_token: token,
        refresh_token: None,
    })
}

/// A parsed delegated scope request: one resource, the permission names asked for (or `.default`), and OIDC extras.
struct Delegated {
    resource: Resource,
    names: Vec<String>,
    default: bool,
    offline_access: bool,
}

fn parse_delegated(scope: &str) -> Result<Delegated, (String, &'static str)> {
    let mut resource: Option<Resource> = None;
    let mut names = Vec::new();
    let mut default = false;
    let mut offline_access = false;
    for item in scope.split_whitespace() {
        if let Some(oidc) = OIDC_SCOPES.iter().find(|s| s.eq_ignore_ascii_case(item)) {
            offline_access |= *oidc == "offline_access";
            continue;
        }
        let (res, name) = match item.rsplit_once('/') {
            Some((res, name)) if res.contains("://") => (
                Resource::find(res).ok_or_else(|| (res.to_owned(), "resource"))?,
                name,
            ),
            Some(_) => return Err((item.to_owned(), "")),
            None => (Resource::graph(), item),
        };
        match resource {
            Some(r) if r != res => {
                return Err((
                    scope.to_owned(),
                    "The scope contains more than one resource.",
                ));
            }
            _ => resource = Some(res),
        }
        if name == ".default" {
            default = true;
        } else {
            names.push(name.to_owned());
        }
    }
    if default && !names.is_empty() {
        return Err((
            scope.to_owned(),
            ".default scope can't be combined with resource-specific scopes.",
        ));
    }
    Ok(Delegated {
        resource: resource.unwrap_or_else(Resource::graph),
        names,
        default,
        offline_access,
    })
}

/// Resolves a delegated request against the app: the granted permission names (canonical spelling) or the error.
fn grant_delegated(
    tenant: &Tenant,
    app: &App,
    scope: &str,
    parsed: Result<Delegated, (String, &'static str)>,
) -> Result<(Delegated, Vec<String>), AadError> {
    let d = match parsed {
        Ok(d) => d,
        Err((res, "resource")) => return Err(AadError::resource_not_found(&res, &tenant.name)),
        Err((bad, why)) => return Err(AadError::invalid_scope(&bad, why)),
    };
    let known = d.resource.known_scopes();
    let granted = if d.default {
        app.delegated_scopes
            .iter()
            .filter(|s| known.iter().any(|k| k.eq_ignore_ascii_case(s)))
            .cloned()
            .collect()
    } else {
        let mut granted: Vec<String> = Vec::new();
        for name in &d.names {
            let in_app = app
                .delegated_scopes
                .iter()
                .find(|s| s.eq_ignore_ascii_case(name));
            let in_resource = known.iter().find(|s| s.eq_ignore_ascii_case(name));
            match (in_app, in_resource) {
                (None, None) => return Err(AadError::invalid_scope(scope, "")),
                (None, Some(_)) => {
                    return Err(AadError::consent_required(&app.client_id, &app.name));
                }
                (Some(s), _) => {
                    if !granted.contains(s) {
                        granted.push(s.clone());
                    }
                }
            }
        }
        granted
    };
    Ok((d, granted))
}

/// The `scope` field of a delegated answer: Exchange permissions with their resource prefix, Graph's without.
fn response_scope(resource: Resource, granted: &[String]) -> String {
    granted
        .iter()
        .map(|s| match resource.kind {
            ResourceKind::Graph => s.clone(),
            ResourceKind::Exchange => format!("{}/{s}", resource.uri),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn delegated_answer(
    cx: &Cx<'_>,
    upn: &str,
    d: &Delegated,
    granted: Vec<String>,
    refresh_scope: Option<String>,
) -> Issued {
    let (tenant, app) = (cx.tenant, cx.app);
    let scope = response_scope(d.resource, &granted);
    let kind = TokenKind::User {
        client_id: app.client_id.clone(),
        upn: upn.to_owned(),
        scopes: granted,
    };
    let (token, _) = cx
        .tokens
        .mint(&tenant.id, d.resource.uri, kind, cx.lifetime);
    let expires_in = cx.lifetime.num_seconds();
    let refresh_token = refresh_scope.map(|scope| {
        cx.tokens.mint_refresh(RefreshGrant {
            tenant_id: tenant.id.clone(),
            client_id: app.client_id.clone(),
            upn: upn.to_owned(),
            scope,
        })
    });
    Issued {
        token_type: "Bearer",
        scope: Some(scope),
        expires_in,
        ext_expires_in: expires_in,
        access_token: token,
        refresh_token,
    }
}

fn password(world: &World, cx: &Cx<'_>, p: &Params) -> Result<Issued, AadError> {
    let (tenant, app) = (cx.tenant, cx.app);
    let username = p.require("username")?;
    let password = p.require("password")?;
    let scope = p.require("scope")?;
    authenticate_client(app, p.get("client_secret"), !app.public_client)?;
    let user = world
        .user(username)
        .filter(|u| world.tenant(&u.tenant).is_some_and(|t| t.id == tenant.id))
        .ok_or_else(|| AadError::user_not_found(&tenant.id))?;
    if user.password != password {
        return Err(AadError::bad_password());
    }
    let parsed = parse_delegated(scope);
    if user.mfa {
        let resource = parsed
            .as_ref()
            .map(|d| d.resource)
            .unwrap_or_else(|_| Resource::graph());
        return Err(AadError::mfa_required(resource.app_id()));
    }
    if !app.admin_consent {
        return Err(AadError::consent_required(&app.client_id, &app.name));
    }
    let (d, granted) = grant_delegated(tenant, app, scope, parsed)?;
    let refresh = d.offline_access.then(|| scope.to_owned());
    Ok(delegated_answer(cx, &user.upn, &d, granted, refresh))
}

fn refresh(world: &World, cx: &Cx<'_>, p: &Params) -> Result<Issued, AadError> {
    let (tenant, app) = (cx.tenant, cx.app);
    let refresh_token = p.require("refresh_token")?;
    authenticate_client(app, p.get("client_secret"), !app.public_client)?;
    let grant = cx
        .tokens
        .refresh_grant(refresh_token)
        .filter(|g| g.tenant_id == tenant.id && g.client_id.eq_ignore_ascii_case(&app.client_id))
        .ok_or_else(AadError::bad_refresh_token)?;
    let user = world
        .user(&grant.upn)
        .ok_or_else(|| AadError::user_not_found(&tenant.id))?;
    if !app.admin_consent {
        return Err(AadError::consent_required(&app.client_id, &app.name));
    }
    let scope = p.get("scope").unwrap_or(&grant.scope);
    let (d, granted) = grant_delegated(tenant, app, scope, parse_delegated(scope))?;
    // Entra rotates refresh tokens on every redemption; the new one keeps the original grant's scope.
    Ok(delegated_answer(
        cx,
        &user.upn,
        &d,
        granted,
        Some(grant.scope.clone()),
    ))
}
