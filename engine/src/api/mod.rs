//! The HTTP queue API (axum, JSON, OpenAPI at `/openapi.json`, Swagger UI at `/docs`).
//!
//! Routes (all under `/v1` need `Authorization: Bearer <token>`; see [`auth`] for the roles):
//!
//! | method and path | what |
//! |---|---|
//! | `GET /v1/queues` | live figures of the queues the caller sees |
//! | `GET /v1/mailboxes` | what each mailbox worker is doing (router, admin) |
//! | `POST /v1/contacts/claim` | claim the next waiting contact (200) or nothing (204) |
//! | `GET /v1/contacts/{id}` | a contact with its messages and replies |
//! | `GET /v1/contacts/{id}/messages/{mid}/raw` | a message's RFC 822 bytes (`message/rfc822`) |
//! | `GET /v1/contacts/{id}/attachments/{aid}` | an attachment's content |
//! | `POST /v1/contacts/{id}/heartbeat\|release\|transfer\|close\|reopen` | lifecycle |
//! | `POST /v1/contacts/{id}/assign` | give a waiting contact to an agent (router, admin) |
//! | `POST /v1/contacts/{id}/replies` | store a reply for sending (201) |
//! | `GET /v1/events` | long poll of the event log |
//! | `GET /v1/events/stream` | the event log as Server-Sent Events |
//! | `POST /v1/admin/reload` | re-read the configuration file, like SIGHUP (admin) |
//! | `GET /healthz`, `GET /readyz` | liveness, readiness (no token) |
//! | `GET /metrics` | Prometheus figures, OpenMetrics text (router or admin token; none with `api.metrics: public`) |

pub mod admin;
pub mod auth;
pub mod contacts;
pub mod error;
pub mod events;
pub mod health;
pub mod mailboxes;
pub mod metrics;
pub mod openapi;
pub mod queues;

use std::{sync::Arc, time::Instant};

use axum::{
    Router,
    extract::{DefaultBodyLimit, MatchedPath, Request},
    middleware::{self, Next},
    response::Response,
    routing::{get, post},
};
use mailqueue_config::Config;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, field};
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

use crate::engine::Engine;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    /// Swapped by configuration reload (`reloader`).
    pub tokens: Arc<auth::Tokens>,
    /// Re-reads the configuration file (`POST /v1/admin/reload`, like SIGHUP).
    pub reloader: crate::reload::Reloader,
    /// Cancelled when the server shuts down: ends event streams and long polls so graceful shutdown completes.
    pub shutdown: CancellationToken,
}

/// The API router over `engine`, authenticating against the tokens of `reloader` (those of `config.api.tokens`
/// until a reload); `shutdown` ends open event streams and long polls.
pub fn router(
    engine: Engine,
    config: &Config,
    reloader: crate::reload::Reloader,
    shutdown: CancellationToken,
) -> Router {
    let state = AppState {
        engine,
        tokens: reloader.tokens(),
        reloader,
        shutdown,
    };
    let reply_limit = reply_body_limit(config.defaults.max_email_size_mb);

    let v1 = Router::new()
        .route("/v1/queues", get(queues::list))
        .route("/v1/mailboxes", get(mailboxes::list))
        .route("/v1/contacts/claim", post(contacts::claim))
        .route("/v1/contacts/{id}", get(contacts::detail))
        .route(
            "/v1/contacts/{id}/messages/{mid}/raw",
            get(contacts::raw_message),
        )
        .route(
            "/v1/contacts/{id}/attachments/{aid}",
            get(contacts::attachment),
        )
        .route("/v1/contacts/{id}/heartbeat", post(contacts::heartbeat))
        .route("/v1/contacts/{id}/release", post(contacts::release))
        .route("/v1/contacts/{id}/transfer", post(contacts::transfer))
        .route("/v1/contacts/{id}/close", post(contacts::close))
        .route("/v1/contacts/{id}/reopen", post(contacts::reopen))
        .route("/v1/contacts/{id}/assign", post(contacts::assign))
        .route(
            "/v1/contacts/{id}/replies",
            post(contacts::reply).layer(DefaultBodyLimit::max(reply_limit)),
        )
        .route("/v1/events", get(events::poll))
        .route("/v1/events/stream", get(events::stream))
        .route("/v1/admin/reload", post(admin::reload))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));

    let http_metrics = state.engine.metrics().clone();
    let scrape = Router::new()
        .route("/metrics", get(metrics::metrics))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            metrics::access,
        ));

    Router::new()
        .merge(v1)
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .merge(scrape)
        .with_state(state)
        .merge(SwaggerUi::new("/docs").url("/openapi.json", openapi::ApiDoc::openapi()))
        .fallback(error::no_route)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(middleware::from_fn_with_state(
            http_metrics,
            metrics::observe,
        ))
        .layer(middleware::from_fn(trace_request))
}

/// Largest reply body accepted: a reply may carry up to `max_email_size_mb` of content, JSON-escaped (×1.4), plus
/// 1 MB for the rest.
pub fn reply_body_limit(max_email_size_mb: u32) -> usize {
    ((f64::from(max_email_size_mb) * 1.4 + 1.0) * 1024.0 * 1024.0) as usize
}

/// One span per request with method, route, token name (set by the auth middleware), status and latency; one
/// line at the end of each request. Never the Authorization header.
async fn trace_request(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        route = route.as_deref().unwrap_or("(no route)"),
        token = field::Empty,
        status = field::Empty,
        latency_ms = field::Empty,
    );
    let start = Instant::now();
    let response = next.run(req).instrument(span.clone()).await;
    let status = response.status().as_u16();
    let latency_ms = start.elapsed().as_secs_f64() * 1000.0;
    span.record("status", status);
    span.record("latency_ms", latency_ms);
    span.in_scope(|| {
        if response.status().is_server_error() {
            tracing::warn!(status, latency_ms, "request failed");
        } else if matches!(route.as_deref(), Some("/healthz" | "/readyz")) {
            tracing::debug!(status, latency_ms, "request");
        } else {
            tracing::info!(status, latency_ms, "request");
        }
    });
    response
}
