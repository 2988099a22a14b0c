//! The admin web page: plain HTML, CSS and one script, embedded in the binary (no build step,
//! no CDN). `GET /admin` with `Accept: text/html` serves it; its assets live under
//! `/admin/ui/`. The page asks for an admin key once, keeps it in the tab's session storage,
//! and does everything through the `/admin` JSON API.
//!
//! Invariants:
//! - The page and its assets hold no data and no secret, so they are served without a key
//!   (the API calls they make are checked as any other).
//! - A strict Content-Security-Policy: only this server's own script, styles and API; no
//!   inline script, no frames.

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use super::AppState;
use super::error::ApiError;
use super::extract::Path;

const INDEX: &str = include_str!("admin_ui/index.html");
const CSS: &str = include_str!("admin_ui/admin.css");
const JS: &str = include_str!("admin_ui/admin.js");
const HANDOFF_JS: &str = include_str!("admin_ui/handoff.js");

/// Only this server's own resources; images may be the screenshots the page fetches (blobs).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; \
                   connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin", get(index))
        .route("/admin/ui/{file}", get(asset))
}

/// Whether `method path` is the page or one of its assets, which need no key.
pub fn is_public(method: &axum::http::Method, path: &str, headers: &HeaderMap) -> bool {
    if method != axum::http::Method::GET {
        return false;
    }
    path == "/admin" && wants_html(headers)
        || path.starts_with("/admin/ui/")
        || super::sessions::is_handoff_page(path, headers)
}

pub fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"))
}

/// A page response with the headers every admin page carries.
pub fn page(html: String) -> Response {
    with_page_headers(([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response())
}

fn with_page_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The page for a browser; for a program, where the API is.
async fn index(headers: HeaderMap) -> Response {
    if wants_html(&headers) {
        return page(INDEX.to_owned());
    }
    axum::Json(json!({
        "object": "admin",
        "page": "open /admin in a browser",
        "endpoints": [
            "/admin/overview", "/admin/accounts", "/admin/flows", "/admin/traffic",
            "/admin/events", "/admin/decisions", "/admin/sessions", "/admin/jobs",
            "/admin/stream",
        ],
    }))
    .into_response()
}

async fn asset(Path(file): Path<String>) -> Result<Response, ApiError> {
    let (body, kind) = match file.as_str() {
        "admin.css" => (CSS, "text/css; charset=utf-8"),
        "admin.js" => (JS, "text/javascript; charset=utf-8"),
        "handoff.js" => (HANDOFF_JS, "text/javascript; charset=utf-8"),
        _ => return Err(ApiError::not_found("Unknown admin page asset.")),
    };
    Ok(with_page_headers(
        ([(header::CONTENT_TYPE, kind)], body).into_response(),
    ))
}
