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
        let method = exchange.method.to_ascii_uppercase();
        match &exchange.request_body {
            Some(body) if !body.0.is_empty() => body.0 == file.bytes.0,
            // DevTools shows no body for a File sent whole: a PUT, or a POST declaring the
            // file's own type.
            _ => {
                let declared = exchange.request_header("content-type").map(|t| {
                    t.split(';')
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_ascii_lowercase()
                });
                match declared {
                    Some(t) => (method == "PUT" || method == "POST") && t == file.mime,
                    None => method == "PUT",
                }
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

/// The file's base64 (`AttachedFile` is the recording's, not an `Attachment`).
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
/// order; the note says what was learned. An error says why no upload can be learned from
/// this recording: the caller probes again without a file, so the chat flow never depends
/// on one.
pub(super) fn split(
    learner: &Learner<'_>,
    flow: &mut Flow,
    keys: &[StepKey],
) -> Result<Option<String>, String> {
    let Some(file) = learner.attached else {
        return Ok(None);
    };
    let in_window =
        |key: &StepKey| matches!(key, StepKey::Exchange(i) if learner.in_upload_window(*i));
    let (mut upload_steps, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut flow.preflight)
        .into_iter()
        .zip(keys)
        .partition(|(_, key)| in_window(key));
    flow.preflight = kept.into_iter().map(|(s, _)| s).collect();
    let names = extract_names(upload_steps.iter().map(|(s, _)| s));
    let leaf = reference(&flow.request, &names).ok_or_else(|| {
        format!(
            "the page made no call between choosing {} and sending that the chat call names",
            file.name
        )
    })?;
    let body = flow
        .request
        .body
        .as_mut()
        .ok_or("the chat call has no body")?;
    let (attach, element, single) = attach_point(body, &flow.request.slots, &leaf, &names);
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
    // A call of the window whose value the chat call still needs without a file (a
    // conversation the page made meanwhile) stays a preflight.
    let rest = serde_json::to_string(&flow.request).unwrap_or_default();
    if rest.contains("file.") {
        return Err(
            "the chat call uses the file's name, type or size outside its reference".into(),
        );
    }
    let needed = |step: &crate::flow::Step| {
        step.extract
            .keys()
            .any(|n| rest.contains(&format!("preflight.{n}")))
    };
    let (back, stay): (Vec<_>, Vec<_>) = upload_steps.into_iter().partition(|(s, _)| needed(s));
    upload_steps = stay;
    if back.iter().any(|(s, _)| sends_file(s)) {
        return Err("the call that sent the file also gave the chat call a value".into());
    }
    if !back.is_empty() {
        let mut all: Vec<(crate::flow::Step, StepKey)> = std::mem::take(&mut flow.preflight)
            .into_iter()
            .zip(keys.iter().copied().filter(|k| !in_window(k)))
            .chain(back.into_iter().map(|(s, k)| (s, *k)))
            .collect();
        all.sort_by_key(|(_, k)| *k);
        flow.preflight = all.into_iter().map(|(s, _)| s).collect();
    }
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
    candidate
        .validate()
        .map_err(|e| format!("the upload learned is not valid ({e})"))?;
    flow.upload = Some(upload);
    Ok(Some(format!(
        "uploads: choosing {} made {} ({}); the chat call names the result at body `{attach}`{}",
        file.name,
        match described.len() {
            1 => "one call".to_owned(),
            n => format!("{n} calls"),
        },
        described.join(", "),
        match single {
            true => " (one file per message)",
            false => ", one list element per file",
        }
    )))
}

fn extract_names<'s>(steps: impl Iterator<Item = &'s crate::flow::Step>) -> Vec<String> {
    steps.flat_map(|s| s.extract.keys().cloned()).collect()
}

fn sends_file(step: &crate::flow::Step) -> bool {
    matches!(step.http.body_kind, BodyKind::File | BodyKind::Multipart)
}

/// Where the chat call's body refers to one of `names` (a slot, or a placeholder in a
/// string).
fn reference(request: &crate::flow::HttpTemplate, names: &[String]) -> Option<String> {
    let named = |source: &str| {
        source
            .strip_prefix("preflight.")
            .is_some_and(|n| names.iter().any(|m| m == n))
    };
    if let Some((pointer, _)) = request.slots.iter().find(|(_, source)| named(source)) {
        return Some(pointer.clone());
    }
    let body = request.body.as_ref()?;
    crate::learn::decoder::strings(body)
        .into_iter()
        .find(|(_, s)| {
            names
                .iter()
                .any(|n| s.contains(&format!("{{{{preflight.{n}}}}}")))
        })
        .map(|(p, _)| p)
}

/// `(attach, element, single)` for a reference at `leaf`: the element of the innermost list
/// holding it when everything in that element is the file's (its id, name, type, size), else
/// the reference alone, one file per message. (A reference inside a message of a message list
/// must not make the message list the file list.)
fn attach_point(
    body: &Value,
    slots: &BTreeMap<String, String>,
    leaf: &str,
    names: &[String],
) -> (String, String, bool) {
    let segments: Vec<&str> = leaf.split('/').collect();
    let list_at = (1..segments.len())
        .rev()
        .find(|&k| segments[k].parse::<usize>().is_ok());
    let Some(k) = list_at else {
        return (leaf.to_owned(), leaf.to_owned(), true);
    };
    let (attach, element) = (segments[..k].join("/"), segments[..=k].join("/"));
    let files_only = |source: &str| {
        source.starts_with("file.")
            || source
                .strip_prefix("preflight.")
                .is_some_and(|n| names.iter().any(|m| m == n))
    };
    let slots_ok = slots
        .iter()
        .filter(|(p, _)| *p == &element || p.starts_with(&format!("{element}/")))
        .all(|(_, source)| files_only(source));
    let strings_ok = body.pointer(&element).is_some_and(|item| {
        crate::learn::decoder::strings(item).iter().all(|(_, s)| {
            let mut rest = *s;
            while let Some(at) = rest.find("{{") {
                let after = &rest[at + 2..];
                let end = after.find("}}").unwrap_or(after.len());
                if !files_only(after[..end].trim()) {
                    return false;
                }
                rest = &after[end.min(after.len())..];
            }
            true
        })
    });
    let one_element = body
        .pointer(&attach)
        .and_then(Value::as_array)
        .is_some_and(|list| list.len() == 1);
    match slots_ok && strings_ok && one_element {
        true => (attach, element, false),
        false => (leaf.to_owned(), leaf.to_owned(), true),
    }
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
