//! `/v1/admin/…`: operations for admin tokens.

use axum::{
    Json,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use mailqueue_config::Role;
use serde::Serialize;
use utoipa::ToSchema;

use super::{AppState, auth::Caller, error::ApiError};
use crate::reload::{ConfigProblem, ReloadError, ReloadReport};

/// A refused reload: the file has errors, and the engine keeps running on its previous configuration.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ReloadRefused {
    /// `invalid`.
    #[schema(example = "invalid")]
    pub error: String,
    pub message: String,
    /// Every problem found, each with file, line and column.
    pub errors: Vec<ConfigProblem>,
}

/// Re-reads the configuration file the engine was started with and applies it if it is valid (the same as
/// `SIGHUP`). Queues and incoming/outgoing servers are added, changed and disabled without a restart, and the API
/// tokens are swapped; `database.url` and `api.listen` keep their values until a restart (`needs_restart`).
#[utoipa::path(
    post,
    path = "/v1/admin/reload",
    tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Applied; what changed", body = ReloadReport),
        (status = 401, description = "Missing or unknown token", body = super::error::ErrorBody),
        (status = 403, description = "Not an admin token", body = super::error::ErrorBody),
        (status = 409, description = "The engine was not started from a configuration file", body = super::error::ErrorBody),
        (status = 422, description = "The file is invalid; nothing changed", body = ReloadRefused),
    )
)]
pub async fn reload(State(state): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    caller.require(&[Role::Admin], "reload the configuration")?;
    match state.reloader.reload().await {
        Ok(report) => Ok(Json(report).into_response()),
        Err(e @ ReloadError::Invalid { .. }) => {
            let body = ReloadRefused {
                error: "invalid".into(),
                message: e.to_string(),
                errors: e.problems().to_vec(),
            };
            Ok((StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response())
        }
        Err(e @ ReloadError::NoFile) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            e.to_string(),
        )),
        Err(ReloadError::Apply(e)) => Err(e.into()),
    }
}
