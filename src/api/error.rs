//! The one place errors become HTTP: status and OpenAI's error body
//! `{"error":{"message","type","param","code"}}`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::gateway::GatewayError;
use crate::replay::failure::FailureKind;
use crate::store::StoreError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<String>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            code: None,
            param: None,
            retry_after: None,
        }
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
            .code("invalid_api_key")
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message).code("not_found")
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "invalid_request_error", message)
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("The request body is larger than the limit of {limit} bytes."),
        )
        .code("request_too_large")
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "This method is not allowed on this path.",
        )
    }

    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "upstream_error", message)
    }

    /// The API key used up its requests per minute.
    pub fn key_rate_limited(retry_after: u64) -> Self {
        let mut error = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!("This API key is over its request rate; retry in {retry_after} s."),
        )
        .code("rate_limit_exceeded");
        error.retry_after = Some(retry_after);
        error
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// Anthropic's error type for this status.
    pub fn anthropic_type(&self) -> &'static str {
        match self.status.as_u16() {
            400 | 405 | 422 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 | 529 => "overloaded_error",
            _ => "api_error",
        }
    }

    /// Anthropic's error body, `{"type":"error","error":{"type","message"}}`.
    pub fn anthropic_body(&self) -> Value {
        json!({
            "type": "error",
            "error": { "type": self.anthropic_type(), "message": self.message },
        })
    }

    pub fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(value) = self
            .retry_after
            .and_then(|secs| HeaderValue::from_str(&secs.to_string()).ok())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        // Kept so a front door with another error shape can re-render it (`api::error_shape`).
        response.extensions_mut().insert(self);
        response
    }
}

/// Renders errors on Anthropic's paths (`/v1/messages…`) in Anthropic's shape, whoever made
/// them (auth, limits, routing, panics, the handler).
pub async fn anthropic_shape(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let anthropic = request.uri().path().starts_with("/v1/messages");
    let response = next.run(request).await;
    if !anthropic {
        return response;
    }
    let Some(error) = response.extensions().get::<ApiError>().cloned() else {
        return response;
    };
    let (mut parts, _) = response.into_parts();
    let body = axum::Json(error.anthropic_body()).into_response();
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, body.into_body())
}

impl From<GatewayError> for ApiError {
    fn from(e: GatewayError) -> Self {
        let message = e.to_string();
        match e {
            GatewayError::UnknownModel { .. } => ApiError::not_found(message)
                .code("model_not_found")
                .param("model"),
            GatewayError::NoFlow(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                message,
            )
            .code("no_flow"),
            GatewayError::NoUsableAccount { .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                message,
            )
            .code("no_usable_account"),
            GatewayError::NeedsBrowser { .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                message,
            )
            .code("needs_browser"),
            GatewayError::RateLimited { retry_after, .. } => {
                let mut error =
                    Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
                        .code("rate_limit_exceeded");
                error.retry_after = Some(retry_after.unwrap_or(30));
                error
            }
            GatewayError::Upstream { ref source, .. } => {
                let code = match source.kind() {
                    FailureKind::AntiBot => "upstream_challenge",
                    FailureKind::FormatDrift => "upstream_format_changed",
                    FailureKind::Network => "upstream_unreachable",
                    FailureKind::Flow => "flow_invalid",
                    _ => "upstream_error",
                };
                Self::new(StatusCode::BAD_GATEWAY, "upstream_error", message).code(code)
            }
            GatewayError::Attachment { at, code, .. } => {
                ApiError::bad_request(message).param(at).code(code)
            }
            GatewayError::Store(e) => e.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => ApiError::not_found(format!("{what} not found")),
            StoreError::Invalid(message) => ApiError::bad_request(message),
            other => {
                tracing::error!(error = %other, "store failure");
                ApiError::internal("The server could not read or write its store.")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_the_openai_shape() {
        let e = ApiError::bad_request("nope").param("messages");
        let body = e.body();
        assert_eq!(body["error"]["message"], "nope");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["param"], "messages");
        assert!(body["error"]["code"].is_null());
    }

    #[test]
    fn anthropic_bodies_name_anthropic_types() {
        let body = ApiError::unauthorized("no key").anthropic_body();
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], "authentication_error");
        assert_eq!(body["error"]["message"], "no key");
        let e: ApiError = GatewayError::NoFlow("s".into()).into();
        assert_eq!(e.anthropic_type(), "overloaded_error");
    }

    #[test]
    fn rate_limits_carry_retry_after() {
        let e: ApiError = GatewayError::RateLimited {
            service: "s".into(),
            message: "m".into(),
            retry_after: Some(7),
        }
        .into();
        let response = e.into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "7");
    }
}
