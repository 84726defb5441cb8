//! The HTTP queue API (axum, JSON, OpenAPI at `/openapi.json`, Swagger UI at `/docs`).

use axum::Router;

use crate::engine::Engine;

/// The API router over `engine`.
pub fn router(engine: Engine) -> Router {
    let _ = engine;
    Router::new()
}
