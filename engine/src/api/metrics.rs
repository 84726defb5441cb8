//! `GET /metrics` (Prometheus, OpenMetrics text; see [`crate::metrics`]) and the middleware that times every
//! HTTP request for it.

use std::{sync::Arc, time::Instant};

use axum::{
    Extension,
    extract::{MatchedPath, Request, State},
    http::header,
    middleware::Next,
    response::{IntoResponse, Response},
};
use mailqueue_config::{MetricsAccess, Role};

use super::{AppState, auth, auth::Principal, error::ApiError};
use crate::metrics::{self, Metrics};

/// The exposition, as OpenMetrics text.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The figures in the OpenMetrics text format (Prometheus scrapes it)",
         content_type = "application/openmetrics-text", body = String),
        (status = 401, description = "`api.metrics: token` and the token is missing or unknown",
         body = super::error::ErrorBody),
        (status = 403, description = "An agent token (router or admin only)", body = super::error::ErrorBody),
    )
)]
pub async fn metrics(
    State(state): State<AppState>,
    caller: Option<Extension<Arc<Principal>>>,
) -> Result<Response, ApiError> {
    if let Some(Extension(caller)) = caller {
        caller.require(&[Role::Router, Role::Admin], "read the metrics")?;
    }
    let body = metrics::render(&state.engine).await;
    Ok(([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], body).into_response())
}

/// Middleware of `/metrics`: open with `api.metrics: public`, else a bearer token as for `/v1` (the handler then
/// requires router or admin). Read per request, so a configuration reload applies at once.
pub async fn access(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if state.engine.config().await.api.metrics == MetricsAccess::Public {
        return Ok(next.run(req).await);
    }
    auth::require_token(State(state), req, next).await
}

/// Middleware of every route: counts and times each request by method, matched route pattern and status class.
pub async fn observe(State(metrics): State<Metrics>, req: Request, next: Next) -> Response {
    let method = req.method().as_str().to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let start = Instant::now();
    let response = next.run(req).await;
    metrics.http_request(
        &method,
        route.as_deref(),
        response.status().as_u16(),
        start.elapsed().as_secs_f64(),
    );
    response
}
