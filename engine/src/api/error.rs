//! API errors: every failure is a JSON body `{ "error": code, "message": text }` with the matching status, including
//! axum's own rejections (bad JSON, bad path or query parameters, too large bodies).

use axum::{
    Json,
    extract::{FromRequest, FromRequestParts, Request, rejection::JsonRejection},
    http::{HeaderValue, StatusCode, header, request::Parts},
    response::{IntoResponse, Response},
};
use serde::{Serialize, de::DeserializeOwned};
use utoipa::ToSchema;

use crate::error::Error;

/// The body of every error response.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Machine-readable code: `bad_request`, `unauthorized`, `forbidden`, `not_found`, `method_not_allowed`,
    /// `conflict`, `gone`, `too_large`, `unsupported_media_type`, `invalid`, `unavailable` or `internal`.
    #[schema(example = "conflict")]
    pub error: String,
    /// What went wrong, for humans.
    #[schema(example = "contact 42 is not claimed by alice: it is claimed by bob")]
    pub message: String,
}

/// An error response.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message)
    }
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server log",
        )
    }

    /// The code for a status that an axum rejection or layer produced.
    fn code_for(status: StatusCode) -> &'static str {
        match status {
            StatusCode::BAD_REQUEST => "bad_request",
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::FORBIDDEN => "forbidden",
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            StatusCode::CONFLICT => "conflict",
            StatusCode::PAYLOAD_TOO_LARGE => "too_large",
            StatusCode::GONE => "gone",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            StatusCode::UNPROCESSABLE_ENTITY => "invalid",
            StatusCode::SERVICE_UNAVAILABLE => "unavailable",
            s if s.is_client_error() => "bad_request",
            _ => "internal",
        }
    }

    fn from_status(status: StatusCode, message: String) -> Self {
        if status.is_server_error() {
            tracing::error!(%status, error = %message, "request failed");
            return Self::internal();
        }
        Self::new(status, Self::code_for(status), message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code.to_owned(),
            message: self.message,
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::NotFound(m) => Self::not_found(m),
            Error::Conflict(m) => Self::new(StatusCode::CONFLICT, "conflict", m),
            Error::Forbidden(m) => Self::forbidden(m),
            Error::Invalid(m) => Self::invalid(m),
            Error::TooLarge(m) => Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", m),
            Error::Gone(m) => Self::new(StatusCode::GONE, "gone", m),
            Error::Db(e) => {
                tracing::error!(error = %e, "database error");
                Self::internal()
            }
            Error::Other(e) => {
                tracing::error!(error = format!("{e:#}"), "internal error");
                Self::internal()
            }
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let status = match &r {
            // axum answers data errors (wrong type, missing or unknown field) with 422; for the API a body that
            // does not fit the schema is a bad request, and 422 is kept for well-formed requests that are wrong.
            JsonRejection::JsonDataError(_) | JsonRejection::JsonSyntaxError(_) => {
                StatusCode::BAD_REQUEST
            }
            other => other.status(),
        };
        Self::from_status(status, r.body_text())
    }
}

/// JSON body extractor whose rejections are [`ApiError`]s.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(value) = Json::<T>::from_request(req, state).await?;
        Ok(Self(value))
    }
}

/// Path parameters extractor whose rejections are [`ApiError`]s.
#[derive(Debug, Clone, Copy)]
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Self(v)),
            Err(r) => Err(ApiError::from_status(r.status(), r.body_text())),
        }
    }
}

/// Query string extractor whose rejections are [`ApiError`]s.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Self(v)),
            Err(r) => Err(ApiError::from_status(r.status(), r.body_text())),
        }
    }
}

/// JSON 404 for paths no route matches.
pub async fn no_route() -> ApiError {
    ApiError::not_found("no such route")
}

/// JSON 405 for a known path with another method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this method is not allowed on this route",
    )
}
