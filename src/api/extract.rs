//! Reading what a request carries, with rejections that are API errors (axum's own extractors
//! answer a malformed query string or path in plain text, and every error here must have the
//! API's error shape): the body within its limit, JSON naming the field at fault, the
//! forced-tier header, the query and the path.

use axum::body::{Body, Bytes};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// Request header that forces a tier (`1`, `2` or `3`, no fallback); the response header of
/// the same name says which tier served the reply.
pub const TIER_HEADER: &str = "x-computetower-tier";

/// Reads a request body within the size limit.
pub async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::too_large(limit));
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            ApiError::too_large(limit)
        } else {
            ApiError::bad_request("The request body could not be read.")
        }
    })
}

/// Parses JSON, naming the field at fault.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut de).map_err(json_error)
}

/// A front door's request: as [`parse_json`], and each field nothing reads is logged once as
/// accepted and ignored (clients such as LibreChat send fields of their own).
pub fn parse_request<T: DeserializeOwned>(bytes: &[u8], door: &str) -> Result<T, ApiError> {
    let mut ignored = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let mut collect =
        |path: serde_ignored::Path<'_>| ignored.push(crate::chat::ignored::path_name(&path));
    let parsed =
        serde_path_to_error::deserialize(serde_ignored::Deserializer::new(&mut de, &mut collect))
            .map_err(json_error)?;
    for field in ignored {
        crate::chat::ignored::note(door, &field);
    }
    Ok(parsed)
}

fn json_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    if inner.is_syntax() || inner.is_eof() {
        ApiError::bad_request(format!(
            "We could not parse the JSON body of your request: {inner}."
        ))
        .code("invalid_json")
    } else if path == "." || path.is_empty() {
        ApiError::bad_request(format!("Invalid request body: {inner}."))
    } else {
        ApiError::bad_request(format!("Invalid value for `{path}`: {inner}.")).param(path)
    }
}

/// The tier the request forces, if any. Checked before the body is read, so a bad value
/// costs nothing.
pub fn forced_tier(headers: &HeaderMap) -> Result<Option<u8>, ApiError> {
    let Some(value) = headers.get(TIER_HEADER) else {
        return Ok(None);
    };
    match value.to_str().map(str::trim) {
        Ok("1") => Ok(Some(1)),
        Ok("2") => Ok(Some(2)),
        Ok("3") => Ok(Some(3)),
        _ => Err(ApiError::bad_request(format!(
            "Invalid `{TIER_HEADER}` header: it must be 1 (direct replay), 2 (fetch() in the \
             site's page) or 3 (the site's own chat UI)."
        ))
        .param(TIER_HEADER)
        .code("invalid_tier")),
    }
}

/// `axum::extract::Query`, rejecting with an [`ApiError`].
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Query(value)),
            Err(rejection) => Err(ApiError::bad_request(format!(
                "Invalid query string: {}.",
                rejection.body_text()
            ))
            .code("invalid_query")),
        }
    }
}

/// `axum::extract::Path`, rejecting with an [`ApiError`].
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            Err(rejection) => Err(ApiError::bad_request(format!(
                "Invalid path: {}.",
                rejection.body_text()
            ))
            .code("invalid_path")),
        }
    }
}
