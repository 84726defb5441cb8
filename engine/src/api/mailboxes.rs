//! `GET /v1/mailboxes`: what each mailbox worker is doing (router and admin only).

use axum::{Json, extract::State};
use mailqueue_config::Role;

use super::{AppState, auth::Caller, error::ApiError};
use crate::mailboxes::MailboxStatus;

/// Every fetched mailbox (queue address) with its state (`connecting`, `fetching`, `idle`, `polling`,
/// `backing_off`, `stopped`), the last successful fetch, counters, the current error with its class, cause and fix,
/// when the session's token expires and when the next attempt is due. Servers with `enabled: false` are not listed.
/// Never contains a secret or a token.
#[utoipa::path(
    get,
    path = "/v1/mailboxes",
    tag = "mailboxes",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Mailboxes by queue, then address", body = Vec<MailboxStatus>),
        (status = 401, description = "Missing or unknown token", body = super::error::ErrorBody),
        (status = 403, description = "Agent tokens may not read the mailbox status", body = super::error::ErrorBody),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<MailboxStatus>>, ApiError> {
    caller.require(&[Role::Router, Role::Admin], "read the mailbox status")?;
    Ok(Json(state.engine.mailboxes().snapshot()))
}
