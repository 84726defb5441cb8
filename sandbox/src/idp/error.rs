//! Microsoft-shaped token endpoint errors: `{"error", "error_description": "AADSTS<code>: …\r\nTrace ID: …",
//! "error_codes", "timestamp", "trace_id", "correlation_id", "error_uri"}` with the status Entra answers.

use axum::{
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use chrono::Utc;
use serde::Serialize;

/// The error body in Entra's field order.
#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'static str,
    error_description: String,
    error_codes: [u32; 1],
    timestamp: &'a str,
    trace_id: &'a str,
    correlation_id: &'a str,
    error_uri: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    suberror: Option<&'static str>,
}

/// One AADSTS error before it is rendered (trace and correlation ids are added per request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AadError {
    pub status: StatusCode,
    /// OAuth 2.0 `error`, e.g. `invalid_client`.
    pub error: &'static str,
    /// The AADSTS number, e.g. 7000215.
    pub code: u32,
    /// Microsoft's text after `AADSTS<code>: `.
    pub message: String,
    /// Entra's `suberror` (e.g. `basic_action` with 50076, `consent_required` with 65001).
    pub suberror: Option<&'static str>,
    /// Seconds for a `Retry-After` header (throttling and outages).
    pub retry_after: Option<u64>,
}

impl AadError {
    fn new(status: StatusCode, error: &'static str, code: u32, message: impl Into<String>) -> Self {
        Self {
            status,
            error,
            code,
            message: message.into(),
            suberror: None,
            retry_after: None,
        }
    }

    fn with_suberror(mut self, suberror: &'static str) -> Self {
        self.suberror = Some(suberror);
        self
    }

    pub fn tenant_not_found(tenant: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            90002,
            format!(
                "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into \
                 the correct cloud. Check with your subscription administrator, this may happen if there are no active \
                 subscriptions for the tenant."
            ),
        )
    }

    pub fn missing_parameter(name: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            format!("The request body must contain the following parameter: '{name}'."),
        )
    }

    pub fn post_only(method: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900561,
            format!(
                "The endpoint only accepts POST, OPTIONS requests. Received a {method} request."
            ),
        )
    }

    pub fn unsupported_grant_type(grant_type: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            format!("The app requested an unsupported grant type '{grant_type}'."),
        )
    }

    pub fn app_not_found(client_id: &str, directory: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            format!(
                "Application with identifier '{client_id}' was not found in the directory '{directory}'. This can \
                 happen if the application has not been installed by the administrator of the tenant or consented to \
                 by any user in the tenant. You may have sent your authentication request to the wrong tenant."
            ),
        )
    }

    pub fn missing_client_secret() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
        )
    }

    pub fn public_client_with_secret() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            700025,
            "Client is public so neither 'client_assertion' nor 'client_secret' should be presented.",
        )
    }

    pub fn invalid_client_secret(client_id: &str) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000215,
            format!(
                "Invalid client secret provided. Ensure the secret being sent in the request is the client secret \
                 value, not the client secret ID, for a secret added to app '{client_id}'."
            ),
        )
    }

    pub fn expired_client_secret(client_id: &str) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000222,
            format!(
                "The provided client secret keys for app '{client_id}' are expired. Visit the Azure portal to create \
                 new keys for your app: https://aka.ms/NewClientSecret, or consider using certificate credentials for \
                 added security: https://aka.ms/certCreds."
            ),
        )
    }

    pub fn user_not_found(tenant_id: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            50034,
            format!(
                "The user account {{EUII Hidden}} does not exist in the {tenant_id} directory. To sign into this \
                 application, the account must be added to the directory."
            ),
        )
    }

    pub fn bad_password() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            50126,
            "Error validating credentials due to invalid username or password.",
        )
    }

    /// `resource` is the resource's application id, as Entra names it in this message.
    pub fn mfa_required(resource: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            50076,
            format!(
                "Due to a configuration change made by your administrator, or because you moved to a new location, \
                 you must use multi-factor authentication to access '{resource}'."
            ),
        )
        .with_suberror("basic_action")
    }

    pub fn consent_required(client_id: &str, app_name: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            65001,
            format!(
                "The user or administrator has not consented to use the application with ID '{client_id}' named \
                 '{app_name}'. Send an interactive authorization request for this user and resource."
            ),
        )
        .with_suberror("consent_required")
    }

    pub fn invalid_scope(scope: &str, why: &str) -> Self {
        let why = if why.is_empty() {
            String::new()
        } else {
            format!(" {why}")
        };
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            70011,
            format!(
                "The provided request must include a 'scope' input parameter. The provided value for the input \
                 parameter 'scope' is not valid. The scope {scope} is not valid.{why}"
            ),
        )
    }

    /// Client credentials with a scope that is not `<resource>/.default`.
    pub fn client_credentials_scope(scope: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            1002012,
            format!(
                "The provided value for scope {scope} is not valid. Client credential flows must have a scope value \
                 with /.default suffixed to the resource identifier (application ID URI)."
            ),
        )
    }

    pub fn resource_not_found(resource: &str, tenant_name: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_resource",
            500011,
            format!(
                "The resource principal named {resource} was not found in the tenant named {tenant_name}. This can \
                 happen if the application has not been installed by the administrator of the tenant or consented to \
                 by any user in the tenant. You might have sent your authentication request to the wrong tenant."
            ),
        )
    }

    pub fn bad_refresh_token() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            70000,
            "Provided grant is invalid or malformed.",
        )
    }

    pub fn throttled(retry_after: u64) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "temporarily_unavailable",
            50196,
            "The server terminated an operation because it encountered a client request loop. Please contact your \
             app vendor.",
        );
        e.retry_after = Some(retry_after);
        e
    }

    pub fn unavailable(retry_after: Option<u64>) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            90033,
            "A transient error has occurred. Please try again.",
        );
        e.retry_after = retry_after;
        e
    }

    /// The response, with a fresh trace id and the given correlation id.
    pub fn into_response_with(self, correlation_id: &str) -> Response {
        let trace_id = uuid::Uuid::new_v4().to_string();
        let timestamp = Utc::now().format("%Y-%m-%d %H:%M:%SZ").to_string();
        let code = self.code;
        let body = ErrorBody {
            error: self.error,
            error_description: format!(
                "AADSTS{code}: {}\r\nTrace ID: {trace_id}\r\nCorrelation ID: {correlation_id}\r\nTimestamp: {timestamp}",
                self.message
            ),
            error_codes: [code],
            timestamp: &timestamp,
            trace_id: &trace_id,
            correlation_id,
            error_uri: format!("https://login.microsoftonline.com/error?code={code}"),
            suberror: self.suberror,
        };
        let body = serde_json::to_string(&body).expect("error body serializes");
        let mut headers = entra_headers(&trace_id);
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        (self.status, headers, body).into_response()
    }
}

/// The headers Entra puts on every token endpoint answer.
pub fn entra_headers(trace_id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-store, no-cache"),
    );
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(trace_id) {
        headers.insert("x-ms-request-id", v);
    }
    headers
}
