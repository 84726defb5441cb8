//! `GET /v1/queues`: live figures of the queues the caller sees.

use axum::{Json, extract::State};

use super::{AppState, auth::Caller, error::ApiError};
use crate::queues::{self, QueueStats};

/// Waiting and claimed counts and the oldest waiting age of each queue, by language. Agents see only the queues
/// they serve; router and admin see every queue, disabled ones included (`enabled: false`).
#[utoipa::path(
    get,
    path = "/v1/queues",
    tag = "queues",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Queues, lowest priority value first", body = Vec<QueueStats>),
        (status = 401, description = "Missing or unknown token", body = super::error::ErrorBody),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<QueueStats>>, ApiError> {
    let dir = state.engine.queues().await;
    let ids: Vec<i64> = dir
        .by_name
        .values()
        .filter(|q| caller.sees_queue(&q.name))
        .map(|q| q.id)
        .collect();
    Ok(Json(queues::stats(&state.engine.db, &dir, &ids).await?))
}
