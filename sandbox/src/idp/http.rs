//! HTTP handlers of the identity provider.

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use chrono::Utc;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    Fault, Idp, MintRequest,
    error::{AadError, entra_headers},
    grant::{self, Params},
};
use crate::tokens::{TokenInfo, TokenKind};

pub fn router(idp: Idp) -> Router {
    Router::new()
        .route(
            "/{tenant}/oauth2/v2.0/token",
            post(token).get(token_wrong_method),
        )
        .route(
            "/{tenant}/v2.0/.well-known/openid-configuration",
            get(openid_configuration),
        )
        .route("/introspect", post(introspect).get(introspect))
        .route("/dovecot/grant", post(dovecot_grant))
        .route("/_sandbox/token", post(hook_mint))
        .route("/_sandbox/revoke", post(hook_revoke))
        .route("/_sandbox/lifetime", post(hook_lifetime))
        .route(
            "/_sandbox/faults",
            post(hook_faults).delete(hook_clear_faults),
        )
        .route("/_sandbox/world", get(hook_world))
        .with_state(idp)
}

fn form(body: &[u8]) -> Params {
    Params(serde_urlencoded::from_bytes(body).unwrap_or_default())
}

/// The `client-request-id` a client sent (echoed as the correlation id), else a fresh one.
fn correlation_id(headers: &HeaderMap) -> String {
    headers
        .get("client-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= 100)
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
}

async fn token(
    State(idp): State<Idp>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let correlation = correlation_id(&headers);
    match idp.take_fault() {
        Some(Fault::Delay(d)) => {
            tracing::debug!(
                delay_ms = d.as_millis() as u64,
                "token request delayed by an injected fault"
            );
            tokio::time::sleep(d).await;
        }
        Some(Fault::Throttle {
            retry_after_seconds,
        }) => {
            tracing::debug!("token request throttled by an injected fault");
            return AadError::throttled(retry_after_seconds).into_response_with(&correlation);
        }
        Some(Fault::Unavailable {
            retry_after_seconds,
        }) => {
            tracing::debug!("token request unavailable by an injected fault");
            return AadError::unavailable(retry_after_seconds).into_response_with(&correlation);
        }
        None => {}
    }
    let params = form(&body);
    let result = {
        let world = idp.world();
        grant::issue(&world, idp.tokens(), idp.lifetime(), &tenant, &params)
    };
    let grant_type = params.get("grant_type").unwrap_or("");
    let client_id = params.get("client_id").unwrap_or("");
    match result {
        Ok(issued) => {
            tracing::debug!(tenant, grant_type, client_id, "token issued");
            let trace_id = uuid::Uuid::new_v4().to_string();
            let mut headers_out = entra_headers(&trace_id);
            if let Ok(v) = HeaderValue::from_str(&correlation) {
                headers_out.insert("client-request-id", v);
            }
            let body = serde_json::to_string(&issued).expect("token body serializes");
            (StatusCode::OK, headers_out, body).into_response()
        }
        Err(e) => {
            tracing::debug!(
                tenant,
                grant_type,
                client_id,
                code = e.code,
                error = e.error,
                "token request refused"
            );
            e.into_response_with(&correlation)
        }
    }
}

async fn token_wrong_method(method: Method, headers: HeaderMap) -> Response {
    AadError::post_only(method.as_str()).into_response_with(&correlation_id(&headers))
}

async fn openid_configuration(
    State(idp): State<Idp>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
) -> Response {
    let tid = {
        let world = idp.world();
        grant::find_tenant(&world, &tenant).map(|t| t.id.clone())
    };
    let Some(tid) = tid else {
        let e = AadError::tenant_not_found(&tenant);
        let body = json!({ "error": "invalid_tenant", "error_description": format!("AADSTS{}: {}", e.code, e.message) });
        return (StatusCode::BAD_REQUEST, Json(body)).into_response();
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    let base = format!("http://{host}/{tid}");
    Json(json!({
        "token_endpoint": format!("{base}/oauth2/v2.0/token"),
        "token_endpoint_auth_methods_supported": ["client_secret_post"],
        "grant_types_supported": ["client_credentials", "password", "refresh_token"],
        "issuer": format!("https://login.microsoftonline.com/{tid}/v2.0"),
        "jwks_uri": format!("https://login.microsoftonline.com/{tid}/discovery/v2.0/keys"),
        "authorization_endpoint": format!("{base}/oauth2/v2.0/authorize"),
        "introspection_endpoint": format!("http://{host}/introspect"),
        "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
        "scopes_supported": ["openid", "profile", "email", "offline_access"],
        "tenant_region_scope": "EU",
        "cloud_instance_name": "microsoftonline.com",
    }))
    .into_response()
}

/// Space-separated roles or scopes of a token, for introspection (Dovecot's JSON reader drops arrays).
fn claims_of(info: &TokenInfo) -> (&str, &str, String, String) {
    match &info.kind {
        TokenKind::App { client_id, roles } => (client_id, "", roles.join(" "), String::new()),
        TokenKind::User {
            client_id,
            upn,
            scopes,
        } => (client_id, upn, String::new(), scopes.join(" ")),
    }
}

async fn introspect(
    State(idp): State<Idp>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    body: Bytes,
) -> Response {
    let from_header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::to_owned);
    let token = form(&body)
        .get("token")
        .map(str::to_owned)
        .or_else(|| {
            uri.query()
                .and_then(|q| form(q.as_bytes()).get("token").map(str::to_owned))
        })
        .or(from_header);
    let Some(token) = token else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": "invalid_request" })),
        )
            .into_response();
    };
    let info = match idp.tokens().validate(&token) {
        Ok(info) => info,
        Err(reason) => {
            tracing::debug!(%reason, "introspection: inactive token");
            return Json(json!({ "active": false })).into_response();
        }
    };
    let (client_id, upn, roles, scope) = claims_of(&info);
    let mailboxes = match &info.kind {
        TokenKind::App { .. } => {
            let world = idp.world();
            let list = world
                .app(client_id)
                .map(|a| a.full_access.clone())
                .unwrap_or_default();
            list.iter()
                .map(|m| m.to_ascii_lowercase())
                .collect::<Vec<_>>()
        }
        TokenKind::User { upn, .. } => vec![upn.to_ascii_lowercase()],
    };
    Json(json!({
        "active": true,
        "token_type": "Bearer",
        "sub": if upn.is_empty() { client_id } else { upn },
        "client_id": client_id,
        "appid": client_id,
        "tid": info.tenant_id,
        "aud": info.audience,
        "iat": info.issued_at.timestamp(),
        "exp": info.expires_at.timestamp(),
        "username": upn.to_ascii_lowercase(),
        "roles": roles,
        "scope": scope,
        "mailboxes": format!(",{},", mailboxes.join(",")),
    }))
    .into_response()
}

async fn dovecot_grant(State(idp): State<Idp>, body: Bytes) -> Response {
    let params = form(&body);
    let deny = |reason: String| {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": "invalid_grant", "error_description": reason })),
        )
            .into_response()
    };
    let (Some(username), Some(token)) = (params.get("username"), params.get("password")) else {
        tracing::debug!("dovecot grant: username or token missing");
        return deny("username and password (the bearer token) are required".to_owned());
    };
    let info = match idp.tokens().validate(token) {
        Ok(info) => info,
        Err(reason) => {
            tracing::debug!(username, %reason, "dovecot grant: denied");
            return deny(reason.to_string());
        }
    };
    let decision = idp.world().authorize_imap(&info, username);
    match decision {
        Ok(()) => {
            tracing::debug!(username, "dovecot grant: allowed");
            let expires_in = (info.expires_at - Utc::now()).num_seconds().max(1);
            Json(json!({
                "access_token": "ok",
                "token_type": "Bearer",
                "expires_in": expires_in,
                "username": username.to_ascii_lowercase(),
                "active": true,
            }))
            .into_response()
        }
        Err(reason) => {
            tracing::debug!(username, %reason, "dovecot grant: denied");
            deny(reason.to_string())
        }
    }
}

fn bad_hook_request(message: impl std::fmt::Display) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({ "error": message.to_string() })),
    )
        .into_response()
}

/// Parses a hook's JSON body (the caller answers 400 with the reason when it does not fit).
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, serde_json::Error> {
    serde_json::from_slice(body)
}

async fn hook_mint(State(idp): State<Idp>, body: Bytes) -> Response {
    let req: MintRequest = match json_body(&body) {
        Ok(r) => r,
        Err(e) => return bad_hook_request(e),
    };
    match idp.mint(&req) {
        Ok((token, info)) => Json(json!({
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": (info.expires_at - info.issued_at).num_seconds(),
        }))
        .into_response(),
        Err(e) => bad_hook_request(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    token: String,
}

async fn hook_revoke(State(idp): State<Idp>, body: Bytes) -> Response {
    match json_body::<RevokeBody>(&body) {
        Ok(b) => Json(json!({ "revoked": idp.revoke(&b.token) })).into_response(),
        Err(e) => bad_hook_request(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LifetimeBody {
    seconds: i64,
}

async fn hook_lifetime(State(idp): State<Idp>, body: Bytes) -> Response {
    match json_body::<LifetimeBody>(&body) {
        Ok(b) => {
            idp.set_lifetime(b.seconds);
            Json(json!({ "lifetime_seconds": b.seconds })).into_response()
        }
        Err(e) => bad_hook_request(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultBody {
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    delay_ms: Option<u64>,
    #[serde(default)]
    retry_after_seconds: Option<u64>,
    #[serde(default = "one")]
    count: u32,
}

fn one() -> u32 {
    1
}

async fn hook_faults(State(idp): State<Idp>, body: Bytes) -> Response {
    let b: FaultBody = match json_body(&body) {
        Ok(b) => b,
        Err(e) => return bad_hook_request(e),
    };
    let fault = match (b.status, b.delay_ms) {
        (Some(429), None) => Fault::Throttle {
            retry_after_seconds: b.retry_after_seconds.unwrap_or(1),
        },
        (Some(503), None) => Fault::Unavailable {
            retry_after_seconds: b.retry_after_seconds,
        },
        (None, Some(ms)) => Fault::Delay(std::time::Duration::from_millis(ms)),
        _ => return bad_hook_request("give either `status` (429 or 503) or `delay_ms`"),
    };
    idp.inject_fault(fault, b.count);
    Json(json!({ "queued": b.count })).into_response()
}

async fn hook_clear_faults(State(idp): State<Idp>) -> Response {
    idp.clear_faults();
    Json(json!({ "cleared": true })).into_response()
}

async fn hook_world(State(idp): State<Idp>) -> Json<Value> {
    let world = idp.world();
    let now = Utc::now();
    Json(json!({
        "tenants": world.tenants.iter().map(|t| json!({
            "id": t.id, "name": t.name, "domains": t.domains, "smtp_auth_enabled": t.smtp_auth_enabled,
        })).collect::<Vec<_>>(),
        "apps": world.apps.iter().map(|a| json!({
            "client_id": a.client_id, "tenant": a.tenant, "name": a.name, "public_client": a.public_client,
            "roles": a.roles, "delegated_scopes": a.delegated_scopes, "admin_consent": a.admin_consent,
            "full_access": a.full_access,
            "secrets": a.secrets.iter().map(|s| json!({
                "id": s.id, "expires": s.expires, "expired": s.expires <= now,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "users": world.users.iter().map(|u| json!({ "upn": u.upn, "tenant": u.tenant, "mfa": u.mfa }))
            .collect::<Vec<_>>(),
        "mailboxes": world.mailboxes.iter().map(|m| json!({
            "address": m.address, "smtp_auth": m.smtp_auth, "send_as": m.send_as,
        })).collect::<Vec<_>>(),
        "token_lifetime_seconds": idp.lifetime(),
    }))
}
