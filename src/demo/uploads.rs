//! The attach control's server side ([`DemoConfig::uploads`](super::DemoConfig::uploads)):
//! files uploaded before the chat call in one of two [`UploadShape`]s, held in a bounded
//! in-memory store until a chat call names them; the reply then describes what is held.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::UploadShape;
use super::site::{Refusal, Shared, api_error, authorize};
use super::state::{Session, random_token};

/// The largest file the site accepts (1 MiB); a larger one gets 413 `file_too_large`.
pub const MAX_UPLOAD_BYTES: usize = 1024 * 1024;
/// Files held at most; the oldest go first.
const MAX_FILES: usize = 256;
/// Bytes held at most over all files (the oldest go first), so a long test run stays small.
const MAX_HELD_BYTES: usize = 64 * 1024 * 1024;
/// Upload slots kept at most; the oldest go first.
const MAX_SLOTS: usize = 256;
/// Room in a multipart body for its boundaries, part headers and the `purpose` field.
const MULTIPART_OVERHEAD: usize = 64 * 1024;
/// A refused body is still read (and dropped) up to this much, so that the client finishes
/// sending and reads the refusal rather than a reset connection.
const DRAIN_LIMIT: usize = 16 * 1024 * 1024;

/// The reply's line about an uploaded file: `Received NAME (TYPE, N bytes, sha256 H).`, `H`
/// the first 16 hex digits of the SHA-256 of the bytes. Control characters in the name
/// become spaces, so that the line stays one line.
pub fn describe_file(name: &str, mime_type: &str, bytes: &[u8]) -> String {
    let name: String = name
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let digest = hex::encode(Sha256::digest(bytes));
    let short = digest.get(..16).unwrap_or(&digest);
    format!(
        "Received {name} ({mime_type}, {} bytes, sha256 {short}).",
        bytes.len()
    )
}

// ---------------------------------------------------------------------------------------------
// The store

/// A file as the site holds it.
#[derive(Debug, Clone)]
pub(crate) struct StoredFile {
    pub name: String,
    pub mime_type: String,
    pub bytes: Bytes,
}

struct Held {
    /// The uploader's email, lower case: only that account's chat calls may name the file.
    owner: String,
    file: StoredFile,
    /// False while a slot's bytes wait for its confirm call.
    ready: bool,
}

/// An upload slot (slot shape), from `POST /api/uploads` to its confirm call.
struct Slot {
    owner: String,
    /// The secret in the upload URL's path: the PUT's only authority.
    token: String,
    name: String,
    mime_type: String,
    size: usize,
    /// The file the PUT made (not ready until confirmed).
    file_id: Option<String>,
}

/// Uploaded files and open upload slots, both bounded.
#[derive(Default)]
pub(crate) struct Store {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    files: HashMap<String, Held>,
    /// File ids, oldest first.
    order: VecDeque<String>,
    held_bytes: usize,
    /// Upload id → slot.
    slots: HashMap<String, Slot>,
    /// Upload ids, oldest first.
    slot_order: VecDeque<String>,
}

impl Inner {
    fn insert_file(&mut self, owner: &str, file: StoredFile, ready: bool) -> String {
        let size = file.bytes.len();
        while self.files.len() >= MAX_FILES || self.held_bytes + size > MAX_HELD_BYTES {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(gone) = self.files.remove(&oldest) {
                self.held_bytes = self.held_bytes.saturating_sub(gone.file.bytes.len());
            }
        }
        let id = format!("file-{}", random_token(8));
        self.held_bytes += size;
        self.files.insert(
            id.clone(),
            Held {
                owner: owner.to_owned(),
                file,
                ready,
            },
        );
        self.order.push_back(id.clone());
        id
    }

    fn slot_by_token(&mut self, token: &str) -> Option<&mut Slot> {
        self.slots.values_mut().find(|slot| slot.token == token)
    }
}

const NO_UPLOAD: Refusal = Refusal::new(StatusCode::NOT_FOUND, "not_found", "No such upload.");

impl Store {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps a file of `owner`'s, usable at once; returns its id.
    fn add_file(&self, owner: &str, file: StoredFile) -> String {
        self.lock().insert_file(owner, file, true)
    }

    /// Opens a slot for a file of `size` bytes; returns its upload id and URL token.
    fn open_slot(&self, owner: &str, name: &str, mime_type: &str, size: usize) -> (String, String) {
        let id = format!("up_{}", random_token(8));
        let token = random_token(16);
        let mut inner = self.lock();
        while inner.slots.len() >= MAX_SLOTS {
            let Some(oldest) = inner.slot_order.pop_front() else {
                break;
            };
            inner.slots.remove(&oldest);
        }
        inner.slots.insert(
            id.clone(),
            Slot {
                owner: owner.to_owned(),
                token: token.clone(),
                name: name.to_owned(),
                mime_type: mime_type.to_owned(),
                size,
                file_id: None,
            },
        );
        inner.slot_order.push_back(id.clone());
        (id, token)
    }

    /// The declared size of the slot behind `token`, if it still waits for its bytes.
    fn slot_size(&self, token: &str) -> Result<usize, Refusal> {
        let mut inner = self.lock();
        let slot = inner.slot_by_token(token).ok_or(NO_UPLOAD)?;
        match slot.file_id {
            Some(_) => Err(USED),
            None => Ok(slot.size),
        }
    }

    /// Stores the PUT's bytes for the slot behind `token` (checked again: two PUTs may race).
    fn fill(&self, token: &str, bytes: Bytes) -> Result<(), Refusal> {
        let mut inner = self.lock();
        let slot = inner.slot_by_token(token).ok_or(NO_UPLOAD)?;
        if slot.file_id.is_some() {
            return Err(USED);
        }
        let owner = slot.owner.clone();
        let file = StoredFile {
            name: slot.name.clone(),
            mime_type: slot.mime_type.clone(),
            bytes,
        };
        let id = inner.insert_file(&owner, file, false);
        if let Some(slot) = inner.slot_by_token(token) {
            slot.file_id = Some(id);
        }
        Ok(())
    }

    /// Makes the file of `owner`'s slot `upload_id` usable; returns its id. A second confirm
    /// answers the same id.
    fn confirm(&self, owner: &str, upload_id: &str) -> Result<String, Refusal> {
        let mut inner = self.lock();
        let slot = inner
            .slots
            .get(upload_id)
            .filter(|slot| slot.owner == owner)
            .ok_or(NO_UPLOAD)?;
        let Some(file_id) = slot.file_id.clone() else {
            return Err(Refusal::new(
                StatusCode::CONFLICT,
                "not_uploaded",
                "The file's bytes have not been uploaded yet.",
            ));
        };
        let held = inner.files.get_mut(&file_id).ok_or(Refusal::new(
            StatusCode::GONE,
            "upload_expired",
            "The uploaded file is no longer held.",
        ))?;
        held.ready = true;
        Ok(file_id)
    }

    /// The ready files of `owner`'s named by `ids`, in that order; `Err(id)` names the first
    /// one that is unknown, someone else's or not confirmed.
    pub(crate) fn for_chat(&self, owner: &str, ids: &[String]) -> Result<Vec<StoredFile>, String> {
        let inner = self.lock();
        ids.iter()
            .map(|id| {
                inner
                    .files
                    .get(id)
                    .filter(|held| held.ready && held.owner == owner)
                    .map(|held| held.file.clone())
                    .ok_or_else(|| id.clone())
            })
            .collect()
    }
}

const USED: Refusal = Refusal::new(
    StatusCode::CONFLICT,
    "already_uploaded",
    "This upload URL has been used already.",
);

/// Whose files a session's are: its email, lower case.
pub(crate) fn owner(session: &Session) -> String {
    session.email.to_ascii_lowercase()
}

/// The file ids a chat body names: `files` (a list of ids, multipart shape) then
/// `attachments` (a list of `{"id", …}`, slot shape); absent or `null` lists name none.
pub(crate) fn named_files(json: &Value) -> Result<Vec<String>, String> {
    let present = |key: &str| json.get(key).filter(|v| !v.is_null());
    let mut ids = Vec::new();
    if let Some(files) = present("files") {
        let bad = "`files` must be a list of file ids.";
        for id in files.as_array().ok_or(bad)? {
            ids.push(id.as_str().ok_or(bad)?.to_owned());
        }
    }
    if let Some(attachments) = present("attachments") {
        let bad = "`attachments` must be a list of {\"id\", …} objects.";
        for attachment in attachments.as_array().ok_or(bad)? {
            let id = attachment.get("id").and_then(Value::as_str).ok_or(bad)?;
            ids.push(id.to_owned());
        }
    }
    Ok(ids)
}

// ---------------------------------------------------------------------------------------------
// Checks shared by both shapes

fn too_large() -> Response {
    api_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "file_too_large",
        "Files may be at most 1 MiB.",
    )
}

fn unsupported() -> Response {
    api_error(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_type",
        "Only images and plain text files can be attached.",
    )
}

fn bad_request(message: &str) -> Response {
    api_error(StatusCode::BAD_REQUEST, "bad_request", message)
}

/// A media type without its parameters, lower case (`Text/Plain; charset=x` → `text/plain`).
fn essence(mime_type: &str) -> String {
    mime_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// Whether the site takes files of (essence) `mime_type`: `image/*` and `text/plain`.
fn accepted(mime_type: &str) -> bool {
    mime_type == "text/plain"
        || mime_type
            .strip_prefix("image/")
            .is_some_and(|sub| !sub.is_empty() && !sub.contains('/'))
}

enum ReadError {
    TooLong,
    Failed,
}

/// The request body, if at most `limit` bytes. A longer one is read on (and dropped) up to
/// [`DRAIN_LIMIT`] so the client can finish sending, and never kept past `limit`.
async fn read_limited(body: Body, limit: usize) -> Result<Bytes, ReadError> {
    let mut stream = body.into_data_stream();
    let mut kept = Vec::new();
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| ReadError::Failed)?;
        total = total.saturating_add(chunk.len());
        if total <= limit {
            kept.extend_from_slice(&chunk);
        } else if total > DRAIN_LIMIT {
            break;
        }
    }
    if total > limit {
        return Err(ReadError::TooLong);
    }
    Ok(Bytes::from(kept))
}

/// The session of an upload call of `shape`: 404 when the site runs another shape (or
/// none), the usual 401/403 when the call is not authorized.
fn admit(state: &Shared, headers: &HeaderMap, shape: UploadShape) -> Result<Session, Refusal> {
    if state.config.uploads != Some(shape) {
        return Err(Refusal::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "this site takes no uploads this way",
        ));
    }
    authorize(state, headers).map(|(_, session)| session)
}

// ---------------------------------------------------------------------------------------------
// Multipart shape: `POST /api/files`

/// `POST /api/files` (multipart shape): fields `purpose` = `chat` and `file`; answers
/// `{"id","name","bytes","mime_type"}`.
pub(crate) async fn post_file(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let session = match admit(&state, &headers, UploadShape::Multipart) {
        Ok(session) => session,
        Err(refused) => return refused.into_response(),
    };
    let Some(boundary) = boundary(&headers) else {
        return bad_request("Expected a multipart/form-data body with a boundary.");
    };
    let body = match read_limited(body, MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD).await {
        Ok(body) => body,
        Err(ReadError::TooLong) => return too_large(),
        Err(ReadError::Failed) => return bad_request("The body could not be read."),
    };
    let Some(parts) = multipart_parts(&body, &boundary) else {
        return bad_request("The multipart body is malformed.");
    };
    let purpose = parts
        .iter()
        .find(|part| part.name == "purpose" && part.filename.is_none())
        .map(|part| String::from_utf8_lossy(&part.body).trim().to_owned());
    if purpose.as_deref() != Some("chat") {
        return bad_request("The `purpose` field must be \"chat\".");
    }
    let Some(part) = parts.into_iter().find(|part| part.name == "file") else {
        return bad_request("The `file` field is missing.");
    };
    let Some(name) = part.filename.filter(|name| !name.trim().is_empty()) else {
        return bad_request("The `file` field must be a file with a name.");
    };
    if part.body.len() > MAX_UPLOAD_BYTES {
        return too_large();
    }
    let mime_type = essence(
        part.content_type
            .as_deref()
            .unwrap_or("application/octet-stream"),
    );
    if !accepted(&mime_type) {
        return unsupported();
    }
    let size = part.body.len();
    let file = StoredFile {
        name: name.clone(),
        mime_type: mime_type.clone(),
        // A copy, so that the rest of the request body is not kept with it.
        bytes: Bytes::copy_from_slice(&part.body),
    };
    let id = state.uploads.add_file(&owner(&session), file);
    state.streams.uploaded();
    axum::Json(json!({ "id": id, "name": name, "bytes": size, "mime_type": mime_type }))
        .into_response()
}

/// One part of a `multipart/form-data` body.
struct Part {
    name: String,
    filename: Option<String>,
    content_type: Option<String>,
    body: Bytes,
}

/// The boundary of a `multipart/form-data` request.
fn boundary(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    if essence(value) != "multipart/form-data" {
        return None;
    }
    header_params(value)
        .into_iter()
        .find(|(key, _)| key == "boundary")
        .map(|(_, boundary)| boundary)
        .filter(|boundary| !boundary.is_empty())
}

/// The `key=value` parameters after a header value's first `;` (`"quoted"` values allowed,
/// without backslash escapes: browsers percent-encode quotes in file names instead).
fn header_params(value: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Some((_, mut rest)) = value.split_once(';') else {
        return out;
    };
    loop {
        let rest_trimmed = rest.trim_start();
        let key_end = rest_trimmed.find(['=', ';']).unwrap_or(rest_trimmed.len());
        let key = rest_trimmed[..key_end].trim().to_ascii_lowercase();
        let after = &rest_trimmed[key_end..];
        let (param, next) = if let Some(after) = after.strip_prefix('=') {
            let after = after.trim_start();
            if let Some(quoted) = after.strip_prefix('"') {
                let end = quoted.find('"').unwrap_or(quoted.len());
                let tail = quoted.get(end + 1..).unwrap_or_default();
                let next = tail.split_once(';').map(|(_, next)| next);
                (quoted[..end].to_owned(), next)
            } else {
                match after.split_once(';') {
                    Some((param, next)) => (param.trim().to_owned(), Some(next)),
                    None => (after.trim().to_owned(), None),
                }
            }
        } else {
            (String::new(), after.strip_prefix(';'))
        };
        if !key.is_empty() {
            out.push((key, param));
        }
        match next {
            Some(next) => rest = next,
            None => return out,
        }
    }
}

/// A file name as browsers send it in a part's `filename="…"`: `"`, CR and LF
/// percent-encoded (the HTML standard's form encoding).
fn form_file_name(raw: &str) -> String {
    raw.replace("%22", "\"")
        .replace("%0D", "\r")
        .replace("%0A", "\n")
}

/// The parts of a `multipart/form-data` body, `None` when it is malformed.
fn multipart_parts(body: &Bytes, boundary: &str) -> Option<Vec<Part>> {
    let first = format!("--{boundary}");
    let delimiter = format!("\r\n--{boundary}");
    let next = memchr::memmem::Finder::new(delimiter.as_bytes());
    let mut at = memchr::memmem::find(body, first.as_bytes())? + first.len();
    let mut parts = Vec::new();
    loop {
        let rest = body.get(at..)?;
        if rest.starts_with(b"--") {
            return Some(parts);
        }
        // Transport padding may follow a delimiter before its line break.
        let padding = rest
            .iter()
            .take_while(|b| **b == b' ' || **b == b'\t')
            .count();
        let start = at + padding + 2;
        if body.get(at + padding..start)? != b"\r\n" {
            return None;
        }
        let (head, content_start) = if body.get(start..)?.starts_with(b"\r\n") {
            (&[][..], start + 2)
        } else {
            let end = start + memchr::memmem::find(body.get(start..)?, b"\r\n\r\n")?;
            (body.get(start..end)?, end + 4)
        };
        let content_end = content_start + next.find(body.get(content_start..)?)?;
        if let Some(part) = part(head, body.slice(content_start..content_end)) {
            parts.push(part);
        }
        at = content_end + delimiter.len();
    }
}

/// A part from its header block and content; `None` without a `form-data` name.
fn part(head: &[u8], body: Bytes) -> Option<Part> {
    let head = String::from_utf8_lossy(head);
    let mut name = None;
    let mut filename = None;
    let mut content_type = None;
    for line in head.split("\r\n") {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        match key.trim().to_ascii_lowercase().as_str() {
            "content-disposition" => {
                for (key, param) in header_params(value) {
                    match key.as_str() {
                        "name" => name = Some(param),
                        "filename" => filename = Some(form_file_name(&param)),
                        _ => {}
                    }
                }
            }
            "content-type" => content_type = Some(value.trim().to_owned()),
            _ => {}
        }
    }
    Some(Part {
        name: name?,
        filename,
        content_type,
        body,
    })
}

// ---------------------------------------------------------------------------------------------
// Slot shape: `POST /api/uploads`, `PUT /blob/{token}`, `POST /api/uploads/{id}/confirm`

#[derive(Deserialize)]
struct NewUpload {
    file_name: String,
    mime_type: String,
    size: u64,
}

/// `POST /api/uploads` (slot shape) with `{"file_name","mime_type","size"}`: answers
/// `{"upload_id","upload_url"}`, the URL absolute on this origin.
pub(crate) async fn create_upload(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let session = match admit(&state, &headers, UploadShape::Slot) {
        Ok(session) => session,
        Err(refused) => return refused.into_response(),
    };
    let request = match serde_json::from_slice::<NewUpload>(&body) {
        Ok(request) if !request.file_name.trim().is_empty() => request,
        _ => {
            return bad_request(
                "Expected a JSON body {\"file_name\", \"mime_type\", \"size\"} with a name.",
            );
        }
    };
    let size = match usize::try_from(request.size) {
        Ok(size) if size <= MAX_UPLOAD_BYTES => size,
        _ => return too_large(),
    };
    let mime_type = essence(&request.mime_type);
    if !accepted(&mime_type) {
        return unsupported();
    }
    let (upload_id, token) =
        state
            .uploads
            .open_slot(&owner(&session), &request.file_name, &mime_type, size);
    let upload_url = format!("{}/blob/{token}", origin(&headers));
    axum::Json(json!({ "upload_id": upload_id, "upload_url": upload_url })).into_response()
}

/// `http://HOST` of the request (the demo serves plain HTTP only).
fn origin(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|host| {
            !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
        })
        .unwrap_or("127.0.0.1");
    format!("http://{host}")
}

/// `PUT /blob/{token}` (slot shape): the raw bytes, exactly the declared size. Like a
/// presigned URL it needs no session: the token is the authority, and works once.
pub(crate) async fn put_blob(
    State(state): State<Shared>,
    Path(token): Path<String>,
    body: Body,
) -> Response {
    if state.config.uploads != Some(UploadShape::Slot) {
        return StatusCode::NOT_FOUND.into_response();
    }
    let size = match state.uploads.slot_size(&token) {
        Ok(size) => size,
        Err(refusal) => return refusal.into_response(),
    };
    let bytes = match read_limited(body, size).await {
        Ok(bytes) if bytes.len() == size => bytes,
        Ok(_) | Err(ReadError::TooLong) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "size_mismatch",
                "The body's length differs from the declared size.",
            );
        }
        Err(ReadError::Failed) => return bad_request("The body could not be read."),
    };
    let etag = format!("\"{}\"", hex::encode(&Sha256::digest(&bytes)[..16]));
    if let Err(refusal) = state.uploads.fill(&token, bytes) {
        return refusal.into_response();
    }
    state.streams.uploaded();
    (StatusCode::OK, [(header::ETAG, etag)]).into_response()
}

/// `POST /api/uploads/{upload_id}/confirm` (slot shape): answers
/// `{"file":{"id","status":"ready"}}` once the bytes are there.
pub(crate) async fn confirm(
    State(state): State<Shared>,
    Path(upload_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let session = match admit(&state, &headers, UploadShape::Slot) {
        Ok(session) => session,
        Err(refused) => return refused.into_response(),
    };
    match state.uploads.confirm(&owner(&session), &upload_id) {
        Ok(id) => axum::Json(json!({ "file": { "id": id, "status": "ready" } })).into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_params_read_quoted_and_bare_values() {
        let params = header_params(r#"form-data; name="file"; filename="a; b.png""#);
        assert_eq!(
            params,
            vec![
                ("name".to_owned(), "file".to_owned()),
                ("filename".to_owned(), "a; b.png".to_owned()),
            ]
        );
        let params = header_params("multipart/form-data; boundary=----x1");
        assert_eq!(params, vec![("boundary".to_owned(), "----x1".to_owned())]);
    }

    #[test]
    fn multipart_parts_split_a_browser_body() {
        let body = Bytes::from_static(
            b"--XX\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nchat\r\n\
              --XX\r\nContent-Disposition: form-data; name=\"file\"; filename=\"q%22.txt\"\r\n\
              Content-Type: text/plain\r\n\r\nline\r\n--X\r\n--XX--\r\n",
        );
        let parts = multipart_parts(&body, "XX").unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].name, "purpose");
        assert_eq!(&parts[0].body[..], b"chat");
        assert_eq!(parts[1].filename.as_deref(), Some("q\".txt"));
        assert_eq!(parts[1].content_type.as_deref(), Some("text/plain"));
        assert_eq!(&parts[1].body[..], b"line\r\n--X");
        assert!(multipart_parts(&Bytes::from_static(b"--XX\r\nno end"), "XX").is_none());
    }

    #[test]
    fn only_images_and_plain_text_are_accepted() {
        assert!(accepted(&essence("image/png")));
        assert!(accepted(&essence("Text/Plain; charset=utf-8")));
        assert!(!accepted(&essence("application/zip")));
        assert!(!accepted(&essence("image/")));
        assert!(!accepted(&essence("text/html")));
    }

    #[test]
    fn describe_file_names_size_type_and_digest() {
        assert_eq!(
            describe_file("a\nb.txt", "text/plain", b"abc"),
            "Received a b.txt (text/plain, 3 bytes, sha256 ba7816bf8f01cfea)."
        );
    }
}
