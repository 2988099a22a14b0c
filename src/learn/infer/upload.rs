//! Learning how a site takes a file, from the probe that chose one in the page's file input
//! before typing (`learn::attach`): the calls the page made between choosing the file and
//! typing the probe are the upload; the chat call names what they returned.
//!
//! While the chat call and its preflights are templated (`Learner`), the file is one more
//! source: a value equal to its name, type, size, hash, base64 or data URL is `file.*`; a
//! `multipart/form-data` body whose part has a `filename` is a `Multipart` body with the
//! file in that part (DevTools does not show the bytes of a file part, only its headers); a
//! call in the window with no recorded body (a `PUT` of the file itself: DevTools shows no
//! body for it) or with exactly the file's bytes is a `File` body. Every such call is kept.
//!
//! Then [`split`] moves the window's steps out of the flow's preflights into `upload.steps`,
//! and the place where the chat call names an upload value (a list element, or one value)
//! out of its body into `upload.attach` and `upload.item`; the list is left empty in the
//! body, for messages without files.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::{Learner, StepKey};
use crate::flow::{BodyKind, Flow, Upload};
use crate::recording::{AttachedFile, Exchange};

impl<'r> Learner<'r> {
    /// Whether exchange `index` was made between choosing the file and typing the probe.
    pub(super) fn in_upload_window(&self, index: usize) -> bool {
        let Some(file) = self.attached else {
            return false;
        };
        let at = self.exchanges()[index].started_ms;
        at >= file.chosen_ms && at < file.typed_ms
    }

    /// The `file.*` source a value is, in a call made once the file was chosen.
    pub(super) fn file_source(&self, index: usize, value: &str) -> Option<&'static str> {
        let file = self.attached?;
        if self.exchanges()[index].started_ms < file.chosen_ms || value.is_empty() {
            return None;
        }
        if value == file.name {
            return Some("file.name");
        }
        if value.eq_ignore_ascii_case(&file.mime) {
            return Some("file.type");
        }
        if value == file.sha256 {
            return Some("file.sha256");
        }
        if value.len() > 16 {
            let base64 = base64_of(file);
            if value == base64 {
                return Some("file.base64");
            }
            if value == format!("data:{};base64,{base64}", file.mime) {
                return Some("file.data_url");
            }
        }
        (value == file.size.to_string()).then_some("file.size")
    }

    /// Whether exchange `index` carries the file's bytes (see the module docs).
    pub(super) fn carries_file(&self, index: usize) -> bool {
        let Some(file) = self.attached else {
            return false;
        };
        if !self.in_upload_window(index) {
            return false;
        }
        let exchange = &self.exchanges()[index];
        if multipart_boundary(exchange).is_some() {
            return true;
        }
        let sends_body = matches!(
            exchange.method.to_ascii_uppercase().as_str(),
            "PUT" | "POST" | "PATCH"
        );
        match &exchange.request_body {
            Some(body) if !body.0.is_empty() => body.0 == file.bytes.0,
            _ => {
                sends_body
                    && exchange
                        .request_header("content-type")
                        .is_none_or(|t| t.to_ascii_lowercase().starts_with(&file.mime))
            }
        }
    }

    /// The body of a call carrying the file: multipart fields templated, or the bytes.
    pub(super) fn template_file_body(
        &mut self,
        index: usize,
        at: f64,
    ) -> (BodyKind, Option<Value>) {
        let exchange = &self.exchanges()[index];
        let Some(boundary) = multipart_boundary(exchange) else {
            return (BodyKind::File, None);
        };
        let text = exchange
            .request_body
            .as_ref()
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .unwrap_or_default();
        let mut fields = Vec::new();
        for part in multipart_parts(&text, &boundary) {
            if part.filename.is_some() {
                fields.push(Value::Object(Map::from_iter([
                    ("name".to_owned(), Value::String(part.name)),
                    ("file".to_owned(), Value::Bool(true)),
                ])));
                continue;
            }
            let spot = super::Spot {
                label: format!("multipart field `{}`", part.name),
                key: Some(part.name.clone()),
            };
            let value = match self.plan_string(index, at, &part.value, &spot) {
                super::Plan::Source(source) => format!("{{{{{source}}}}}"),
                super::Plan::Prompt | super::Plan::PromptInside { .. } => "{{prompt}}".to_owned(),
                super::Plan::Keep => part.value,
            };
            fields.push(Value::Object(Map::from_iter([
                ("name".to_owned(), Value::String(part.name)),
                ("value".to_owned(), Value::String(value)),
            ])));
        }
        if !fields.iter().any(|f| f.get("file").is_some()) {
            fields.push(serde_json::json!({"name": "file", "file": true}));
        }
        (BodyKind::Multipart, Some(Value::Array(fields)))
    }

    /// The calls carrying the file, to keep as steps although nothing later reads them.
    pub(super) fn file_carriers(&self) -> Vec<usize> {
        (0..self.exchanges().len())
            .filter(|i| self.carries_file(*i))
            .collect()
    }
}

fn base64_of(file: &AttachedFile) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(&file.bytes.0)
}

fn multipart_boundary(exchange: &Exchange) -> Option<String> {
    let content_type = exchange.request_header("content-type")?;
    if !content_type
        .to_ascii_lowercase()
        .starts_with("multipart/form-data")
    {
        return None;
    }
    content_type.split(';').find_map(|p| {
        p.trim()
            .strip_prefix("boundary=")
            .map(|b| b.trim_matches('"').to_owned())
    })
}

struct Part {
    name: String,
    filename: Option<String>,
    value: String,
}

/// The parts of a multipart body as DevTools shows it.
fn multipart_parts(text: &str, boundary: &str) -> Vec<Part> {
    let delimiter = format!("--{boundary}");
    let mut parts = Vec::new();
    for chunk in text.split(delimiter.as_str()).skip(1) {
        if chunk.starts_with("--") {
            break;
        }
        let chunk = chunk.strip_prefix("\r\n").unwrap_or(chunk);
        let (head, body) = chunk.split_once("\r\n\r\n").unwrap_or((chunk, ""));
        let disposition = head
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("content-disposition"))
            .unwrap_or("");
        let param = |key: &str| {
            disposition.split(';').find_map(|p| {
                p.trim()
                    .strip_prefix(&format!("{key}="))
                    .map(|v| v.trim_matches('"').to_owned())
            })
        };
        let Some(name) = param("name") else { continue };
        parts.push(Part {
            name,
            filename: param("filename"),
            value: body.strip_suffix("\r\n").unwrap_or(body).to_owned(),
        });
    }
    parts
}

/// Moves the upload out of `flow` (see the module docs), given the preflights' keys in
/// order. A note says what was learned, or why no upload was.
pub(super) fn split(
    learner: &Learner<'_>,
    flow: &mut Flow,
    keys: &[StepKey],
    notes: &mut Vec<String>,
) {
    let Some(file) = learner.attached else {
        return;
    };
    let original = flow.preflight.clone();
    let in_window =
        |key: &StepKey| matches!(key, StepKey::Exchange(i) if learner.in_upload_window(*i));
    let mut upload_steps = Vec::new();
    let mut kept = Vec::new();
    for (step, key) in std::mem::take(&mut flow.preflight).into_iter().zip(keys) {
        if in_window(key) {
            upload_steps.push((step, *key));
        } else {
            kept.push(step);
        }
    }
    flow.preflight = kept;
    let names: Vec<String> = upload_steps
        .iter()
        .flat_map(|(s, _)| s.extract.keys().cloned())
        .collect();
    // Not an upload after all: the preflights stay as they were, but for calls that only
    // carried the file (nothing to send them with).
    let no_upload = |why: String, flow: &mut Flow| {
        flow.preflight = original
            .iter()
            .filter(|s| !matches!(s.http.body_kind, BodyKind::File | BodyKind::Multipart))
            .cloned()
            .collect();
        format!("uploads: {why}; the flow takes no files")
    };
    let Some(body) = flow.request.body.as_mut() else {
        let why = format!("the chat call has no body to name {}", file.name);
        notes.push(no_upload(why, flow));
        return;
    };
    let slot_at = flow
        .request
        .slots
        .iter()
        .find(|(_, source)| {
            source
                .strip_prefix("preflight.")
                .is_some_and(|n| names.iter().any(|m| m == n))
        })
        .map(|(p, _)| p.clone());
    let leaf_at = slot_at.or_else(|| {
        crate::learn::decoder::strings(body)
            .into_iter()
            .find(|(_, s)| {
                names
                    .iter()
                    .any(|n| s.contains(&format!("{{{{preflight.{n}}}}}")))
            })
            .map(|(p, _)| p)
    });
    let Some(leaf) = leaf_at.filter(|_| !upload_steps.is_empty()) else {
        let why = format!(
            "the page made no call between choosing {} and sending that the chat call names",
            file.name
        );
        notes.push(no_upload(why, flow));
        return;
    };
    // The element of the innermost list holding the reference, or the reference alone.
    let segments: Vec<&str> = leaf.split('/').collect();
    let list_at = (1..segments.len())
        .rev()
        .find(|&k| segments[k].parse::<usize>().is_ok());
    let (attach, element, single) = match list_at {
        Some(k) => (segments[..k].join("/"), segments[..=k].join("/"), false),
        None => (leaf.clone(), leaf.clone(), true),
    };
    let item = body.pointer(&element).cloned().unwrap_or(Value::Null);
    if let Some(slot) = body.pointer_mut(&attach) {
        *slot = match single {
            true => Value::Null,
            false => Value::Array(Vec::new()),
        };
    }
    let mut item_slots = BTreeMap::new();
    flow.request.slots.retain(|pointer, source| {
        if pointer == &element || pointer.starts_with(&format!("{element}/")) {
            item_slots.insert(pointer[element.len()..].to_owned(), source.clone());
            false
        } else {
            true
        }
    });
    let described: Vec<String> = upload_steps
        .iter()
        .map(|(s, _)| format!("{} {}", s.http.method, s.http.url))
        .collect();
    let upload = Upload {
        steps: upload_steps.into_iter().map(|(s, _)| s).collect(),
        attach: attach.clone(),
        item,
        item_slots,
        single,
        accept: file.accept.clone(),
    };
    let mut candidate = flow.clone();
    candidate.upload = Some(upload.clone());
    if let Err(e) = candidate.validate() {
        notes.push(no_upload(
            format!("the upload learned is not valid ({e})"),
            flow,
        ));
        return;
    }
    notes.push(format!(
        "uploads: choosing {} made {} ({}); the chat call names the result at body `{attach}`{}",
        file.name,
        if described.len() == 1 {
            "one call".to_owned()
        } else {
            format!("{} calls", described.len())
        },
        described.join(", "),
        if single {
            " (one file per message)"
        } else {
            ", one list element per file"
        }
    ));
    flow.upload = Some(upload);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_bodies_as_devtools_shows_them_split_into_fields() {
        let text = "------B\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nchat\r\n\
                    ------B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"p.png\"\r\n\
                    Content-Type: image/png\r\n\r\n\r\n------B--\r\n";
        let parts = multipart_parts(text, "----B");
        assert_eq!(parts.len(), 2);
        assert_eq!(
            (parts[0].name.as_str(), parts[0].value.as_str()),
            ("purpose", "chat")
        );
        assert_eq!(parts[0].filename, None);
        assert_eq!(parts[1].name, "file");
        assert_eq!(parts[1].filename.as_deref(), Some("p.png"));
    }
}
