//! `/v1/contacts/…`: claim, read, lifecycle, assignment and replies.

use axum::{
    Json,
    body::Bytes,
    extract::{State, rejection::BytesRejection},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use mailqueue_config::Role;
use serde::Deserialize;
use utoipa::ToSchema;

use super::{
    AppState,
    auth::Caller,
    error::{ApiError, ApiJson, ApiPath, ErrorBody},
};
use crate::{
    contacts::Contact,
    messages::ContactDetail,
    outbox::{Reply, ReplyRequest},
};

/// Narrows a claim to some of the caller's queues and languages. Both lists are optional; empty or absent means
/// no narrowing (an agent's own queues and languages, every enabled queue and any language for router and admin).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    /// Queue names; each must be one the caller serves (else 403).
    #[serde(default)]
    pub queues: Vec<String>,
    /// Language tags; each must be one the caller handles (else 403).
    #[serde(default)]
    pub languages: Vec<String>,
}

/// Where to move a contact.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferRequest {
    /// Name of an enabled queue.
    pub queue: String,
}

/// Whom to give a contact to.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AssignRequest {
    /// Name of a configured agent token that serves the contact's queue and language.
    pub agent: String,
}

/// The contact if it exists (404) and the caller may see it (403).
async fn visible_contact(state: &AppState, caller: &Caller, id: i64) -> Result<Contact, ApiError> {
    let contact = state.engine.contact(id).await?;
    caller.check_contact(&contact)?;
    Ok(contact)
}

/// Claims the next waiting contact: lowest priority value first, then the oldest, among the caller's queues (an
/// agent's own; every enabled queue for router and admin) and languages, optionally narrowed by the body.
#[utoipa::path(
    post,
    path = "/v1/contacts/claim",
    tag = "contacts",
    security(("bearer" = [])),
    request_body(content = Option<ClaimRequest>, description = "Optional narrowing", content_type = "application/json"),
    responses(
        (status = 200, description = "The claimed contact", body = Contact),
        (status = 204, description = "Nothing waits that the caller may claim"),
        (status = 400, description = "Malformed body", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "A queue or language the caller does not serve", body = ErrorBody),
        (status = 422, description = "Unknown queue", body = ErrorBody),
    )
)]
pub async fn claim(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| ApiError::new(r.status(), "bad_request", r.body_text()))?;
    let req: ClaimRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ClaimRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("invalid claim request: {e}")))?
    };

    let dir = state.engine.queues().await;
    let names: Vec<&str> = if req.queues.is_empty() {
        if caller.is_agent() {
            caller.queues.iter().map(String::as_str).collect()
        } else {
            dir.by_name.keys().map(String::as_str).collect()
        }
    } else {
        for q in &req.queues {
            if !dir.by_name.contains_key(q) {
                return Err(ApiError::invalid(format!("there is no queue named `{q}`")));
            }
            if !caller.sees_queue(q) {
                return Err(ApiError::forbidden(format!("you do not serve queue `{q}`")));
            }
        }
        req.queues.iter().map(String::as_str).collect()
    };
    let queue_ids: Vec<i64> = names
        .iter()
        .filter_map(|n| dir.by_name.get(*n))
        .filter(|q| q.enabled)
        .map(|q| q.id)
        .collect();

    let languages: Vec<String> = if req.languages.is_empty() {
        caller.languages.clone()
    } else {
        if let Some(l) = req.languages.iter().find(|l| !caller.handles_language(l)) {
            return Err(ApiError::forbidden(format!(
                "you do not handle language `{l}`"
            )));
        }
        req.languages
    };

    match state
        .engine
        .claim_next(&caller.name, &queue_ids, &languages)
        .await?
    {
        Some(contact) => Ok(Json(contact).into_response()),
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

/// A contact with its messages (oldest first) and replies.
#[utoipa::path(
    get,
    path = "/v1/contacts/{id}",
    tag = "contacts",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Contact id")),
    responses(
        (status = 200, description = "The contact", body = ContactDetail),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "Not in the caller's queues or languages", body = ErrorBody),
        (status = 404, description = "No such contact", body = ErrorBody),
    )
)]
pub async fn detail(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<ContactDetail>, ApiError> {
    visible_contact(&state, &caller, id).await?;
    Ok(Json(state.engine.contact_detail(id).await?))
}

/// The raw RFC 822 bytes of one message of the contact.
#[utoipa::path(
    get,
    path = "/v1/contacts/{id}/messages/{mid}/raw",
    tag = "contacts",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Contact id"), ("mid" = i64, Path, description = "Message id")),
    responses(
        (status = 200, description = "The message as stored", body = Vec<u8>, content_type = "message/rfc822"),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "Not in the caller's queues or languages", body = ErrorBody),
        (status = 404, description = "No such contact or message", body = ErrorBody),
        (status = 410, description = "The raw bytes were deleted by the retention job (`retention.raw_messages`); the parsed message stays", body = ErrorBody),
    )
)]
pub async fn raw_message(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, mid)): ApiPath<(i64, i64)>,
) -> Result<Response, ApiError> {
    visible_contact(&state, &caller, id).await?;
    let raw = state.engine.raw_message(id, mid).await?;
    let disposition = format!("attachment; filename=\"message-{mid}.eml\"");
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("message/rfc822"),
            ),
            (
                header::CONTENT_DISPOSITION,
                HeaderValue::from_str(&disposition).expect("ASCII header"),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        raw,
    )
        .into_response())
}

/// An attachment's content, with its content type and file name.
#[utoipa::path(
    get,
    path = "/v1/contacts/{id}/attachments/{aid}",
    tag = "contacts",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Contact id"), ("aid" = i64, Path, description = "Attachment id")),
    responses(
        (status = 200, description = "The content, with `Content-Disposition: attachment; filename=…`",
            body = Vec<u8>, content_type = "application/octet-stream"),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "Not in the caller's queues or languages", body = ErrorBody),
        (status = 404, description = "No such contact or attachment", body = ErrorBody),
    )
)]
pub async fn attachment(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, aid)): ApiPath<(i64, i64)>,
) -> Result<Response, ApiError> {
    visible_contact(&state, &caller, id).await?;
    let content = state.engine.attachment(id, aid).await?;
    let content_type = HeaderValue::from_str(&content.content_type)
        .ok()
        .filter(|v| !content.content_type.is_empty() && !v.is_empty())
        .unwrap_or_else(|| HeaderValue::from_static("application/octet-stream"));
    let filename = content
        .filename
        .as_deref()
        .filter(|f| !f.trim().is_empty())
        .unwrap_or("attachment");
    Ok((
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_DISPOSITION, content_disposition(filename)),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            // Customer content: never let a browser run it in the API's origin.
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static("default-src 'none'; sandbox"),
            ),
        ],
        content.data,
    )
        .into_response())
}

/// `attachment; filename="<ASCII fallback>"; filename*=UTF-8''<percent-encoded>` (RFC 6266).
pub fn content_disposition(filename: &str) -> HeaderValue {
    let fallback: String = filename
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut encoded = String::new();
    for b in filename.bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_str(&format!(
        "attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("attachment"))
}

/// Extends the claim lease of a contact the caller holds.
#[utoipa::path(
    post,
    path = "/v1/contacts/{id}/heartbeat",
    tag = "contacts",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Contact id")),
    responses(
        (status = 200, description = "The contact with its new lease", body = Contact),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "Not in the caller's queues or languages", body = ErrorBody),
        (status = 404, description = "No such contact", body = ErrorBody),
        (status = 409, description = "The caller does not hold the contact", body = ErrorBody),
    )
)]
pub async fn heartbeat(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<Contact>, ApiError> {
    visible_contact(&state, &caller, id).await?;
    Ok(Json(state.engine.heartbeat(id, &caller.name).await?))
}

/// Returns a claimed contact to its queue, keeping its age. Agents must hold it; router and admin may release any.
#[utoipa::path(
    post,
    path = "/v1/contacts/{id}/release",
    tag = "contacts",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Contact id")),
    responses(
        (status = 200, description = "The contact, waiting again", body = Contact),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "Not in the caller's queues or languages", body = ErrorBody),
        (status = 404, description = "No such contact", body = ErrorBody),
        (status = 409, description = "Not claimed (by the caller, for agents)", body = ErrorBody),
    )
)]
pub async fn release(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<Contact>, ApiError> {
    visible_contact(&state, &caller, id).await?;
    Ok(Json(state.engine.release(id, caller.actor()).await?))
}

/// Moves an open contact to another enabled queue, where it waits with that queue's priority and language.
/// Agents must hold the claim; router and admin may move any open contact.
#[utoipa::path(
    post,
    path = "/v1/contacts/{id}/transfer",
    tag = "contacts",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Contact id")),
    request_body = TransferRequest,
    responses(
        (status = 200, description = "The contact in its new queue", body = Contact),
        (status = 400, description = "Malformed body", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "Not in the caller's queues or languages", body = ErrorBody),
        (status = 404, description = "No such contact", body = ErrorBody),
        (status = 409, description = "Closed, or not claimed by the calling agent", body = ErrorBody),
        (status = 422, description = "No enabled queue of that name", body = ErrorBody),
    )
)]
pub async fn transfer(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<i64>,
    body: Result<ApiJson<TransferRequest>, ApiError>,
) -> Result<Json<Contact>, ApiError> {
    visible_contact(&state, &caller, id).await?;
    let ApiJson(req) = body?;
    Ok(Json(
        state
            .engine
            .transfer(id, caller.actor(), &req.queue)
            .await?,
    ))
}

/// Closes an open contact. Agents must hold the claim; admin may close any open contact; router may not.
#[utoipa::path(
    post,
    path = "/v1/contacts/{id}/close",
    tag = "contacts",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Contact id")),
    responses(
        (status = 200, description = "The closed contact", body = Contact),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "Router token, or not in the caller's queues or languages", body = ErrorBody),
        (status = 404, description = "No such contact", body = ErrorBody),
        (status = 409, description = "Closed already, or not claimed by the calling agent", body = ErrorBody),
    )
)]
pub async fn close(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<Contact>, ApiError> {
    caller.require(&[Role::Agent, Role::Admin], "close contacts")?;
    visible_contact(&state, &caller, id).await?;
    Ok(Json(state.engine.close(id, caller.actor()).await?))
}

/// Re-opens a closed contact: it waits in its queue again, from now. Agents of its queue and admin; not router.
#[utoipa::path(
    post,
    path = "/v1/contacts/{id}/reopen",
    tag = "contacts",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Contact id")),
    responses(
        (status = 200, description = "The contact, waiting again", body = Contact),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "Router token, or not in the caller's queues or languages", body = ErrorBody),
        (status = 404, description = "No such contact", body = ErrorBody),
        (status = 409, description = "The contact is not closed", body = ErrorBody),
    )
)]
pub async fn reopen(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<Contact>, ApiError> {
    caller.require(&[Role::Agent, Role::Admin], "re-open contacts")?;
    visible_contact(&state, &caller, id).await?;
    Ok(Json(state.engine.reopen(id, &caller.name).await?))
}

/// Gives a waiting contact to an agent (router and admin only). The agent must be a configured agent token that
/// serves the contact's queue and language.
#[utoipa::path(
    post,
    path = "/v1/contacts/{id}/assign",
    tag = "contacts",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Contact id")),
    request_body = AssignRequest,
    responses(
        (status = 200, description = "The contact, claimed by the agent", body = Contact),
        (status = 400, description = "Malformed body", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "Not a router or admin token", body = ErrorBody),
        (status = 404, description = "No such contact", body = ErrorBody),
        (status = 409, description = "The contact is not waiting", body = ErrorBody),
        (status = 422, description = "No such agent, or it does not serve the contact", body = ErrorBody),
    )
)]
pub async fn assign(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<i64>,
    body: Result<ApiJson<AssignRequest>, ApiError>,
) -> Result<Json<Contact>, ApiError> {
    caller.require(&[Role::Router, Role::Admin], "assign contacts")?;
    let ApiJson(req) = body?;
    let contact = state.engine.contact(id).await?;
    let agent = state.tokens.agent(&req.agent).ok_or_else(|| {
        ApiError::invalid(format!("there is no agent token named `{}`", req.agent))
    })?;
    if agent.check_contact(&contact).is_err() {
        return Err(ApiError::invalid(format!(
            "agent `{}` does not serve queue `{}` in language `{}`",
            req.agent, contact.queue, contact.language
        )));
    }
    Ok(Json(
        state.engine.assign(id, &caller.name, &agent.name).await?,
    ))
}

/// Stores a reply on the contact for sending: an outbound message plus an outbox entry. Agents of its queue and
/// admin; not router.
#[utoipa::path(
    post,
    path = "/v1/contacts/{id}/replies",
    tag = "contacts",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Contact id")),
    request_body = ReplyRequest,
    responses(
        (status = 201, description = "The stored reply, waiting to be sent", body = Reply),
        (status = 400, description = "Malformed body", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "Router token, or not in the caller's queues or languages", body = ErrorBody),
        (status = 404, description = "No such contact", body = ErrorBody),
        (status = 409, description = "The contact is not open for the caller", body = ErrorBody),
        (status = 413, description = "The reply is too large", body = ErrorBody),
        (status = 422, description = "Invalid recipients, sender or content", body = ErrorBody),
    )
)]
pub async fn reply(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<i64>,
    body: Result<ApiJson<ReplyRequest>, ApiError>,
) -> Result<(StatusCode, Json<Reply>), ApiError> {
    caller.require(&[Role::Agent, Role::Admin], "reply")?;
    visible_contact(&state, &caller, id).await?;
    let ApiJson(req) = body?;
    Ok((
        StatusCode::CREATED,
        Json(state.engine.submit_reply(id, caller.actor(), req).await?),
    ))
}
