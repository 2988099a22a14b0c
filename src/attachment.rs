//! A file a client sent with its message (an image or a document), held as bytes with what a
//! site's upload needs to know of it: a name, a MIME type, a size, a content hash.
//!
//! Invariant: the bytes are never logged; `Debug` shows the name, type, size and hash only.

use std::sync::Arc;

use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

/// One attached file.
#[derive(Clone, PartialEq, Eq)]
pub struct Attachment {
    /// Where it was in the client's request (`messages[0].content[1]`), for errors.
    pub at: String,
    pub name: String,
    pub mime: String,
    pub bytes: Arc<[u8]>,
    /// Lowercase hex SHA-256 of `bytes`: the upload cache's key.
    pub sha256: String,
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("at", &self.at)
            .field("name", &self.name)
            .field("mime", &self.mime)
            .field("size", &self.bytes.len())
            .field("sha256", &self.sha256)
            .finish()
    }
}

impl Attachment {
    pub fn new(at: impl Into<String>, name: Option<&str>, mime: &str, bytes: Vec<u8>) -> Self {
        let sha256 = hex(&Sha256::digest(&bytes));
        let mime = normalized_mime(mime);
        let name = match name.map(str::trim).filter(|n| !n.is_empty()) {
            Some(name) => sanitized_name(name),
            // A name sites accept: the hash keeps two images apart, the extension says what
            // the bytes are.
            None => format!("{}{}", &sha256[..12], extension_of(&mime)),
        };
        Self {
            at: at.into(),
            name,
            mime,
            bytes: bytes.into(),
            sha256,
        }
    }

    /// An attachment from a `data:` URL (`data:image/png;base64,…`); the error says what is
    /// wrong with it.
    pub fn from_data_url(at: &str, url: &str, name: Option<&str>) -> Result<Self, String> {
        let rest = url
            .strip_prefix("data:")
            .ok_or_else(|| "is not a `data:` URL".to_owned())?;
        let (meta, data) = rest
            .split_once(',')
            .ok_or_else(|| "is a `data:` URL without a `,` before its data".to_owned())?;
        let base64 = meta.ends_with(";base64");
        let mime = meta
            .trim_end_matches(";base64")
            .split(';')
            .next()
            .unwrap_or("");
        let mime = if mime.is_empty() { "text/plain" } else { mime };
        let bytes = if base64 {
            decode_base64(data)?
        } else {
            percent_encoding::percent_decode_str(data).collect()
        };
        Ok(Self::new(at, name, mime, bytes))
    }

    /// An attachment from base64 data and its media type (Anthropic's `source`).
    pub fn from_base64(
        at: &str,
        mime: &str,
        data: &str,
        name: Option<&str>,
    ) -> Result<Self, String> {
        Ok(Self::new(at, name, mime, decode_base64(data)?))
    }

    pub fn size(&self) -> usize {
        self.bytes.len()
    }

    pub fn base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.bytes)
    }

    pub fn data_url(&self) -> String {
        format!("data:{};base64,{}", self.mime, self.base64())
    }

    /// Whether an `accept` list (`image/*,.txt,text/plain`, a file input's) takes this file.
    /// An empty list takes anything.
    pub fn accepted_by(&self, accept: &str) -> bool {
        let entries: Vec<&str> = accept
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .collect();
        if entries.is_empty() {
            return true;
        }
        let mime = self.mime.to_ascii_lowercase();
        let name = self.name.to_ascii_lowercase();
        entries.iter().any(|entry| {
            let entry = entry.to_ascii_lowercase();
            if let Some(ext) = entry.strip_prefix('.') {
                name.ends_with(&format!(".{ext}"))
            } else if let Some(kind) = entry.strip_suffix("/*") {
                mime.split('/').next() == Some(kind)
            } else {
                entry == mime || entry == "*/*"
            }
        })
    }
}

fn decode_base64(data: &str) -> Result<Vec<u8>, String> {
    let cleaned: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(cleaned.as_bytes())
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(cleaned.as_bytes()))
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(cleaned.as_bytes()))
        .map_err(|_| "has data that is not valid base64".to_owned())
}

fn normalized_mime(mime: &str) -> String {
    let mime = mime.trim().to_ascii_lowercase();
    let valid = mime.split_once('/').is_some_and(|(a, b)| {
        !a.is_empty()
            && !b.is_empty()
            && mime
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"/+-.".contains(&c))
    });
    if valid {
        mime
    } else {
        "application/octet-stream".to_owned()
    }
}

/// A file name safe to put in a multipart header: no path, quotes or control characters.
fn sanitized_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    let clean: String = base
        .chars()
        .filter(|c| !c.is_control() && *c != '"')
        .take(200)
        .collect();
    if clean.trim_matches('.').is_empty() {
        "file".to_owned()
    } else {
        clean
    }
}

fn extension_of(mime: &str) -> &'static str {
    match mime {
        "image/png" => ".png",
        "image/jpeg" | "image/jpg" => ".jpg",
        "image/gif" => ".gif",
        "image/webp" => ".webp",
        "text/plain" => ".txt",
        "application/pdf" => ".pdf",
        "application/json" => ".json",
        _ => ".bin",
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How an attachment is stored with a conversation (the Responses API keeps its history):
/// the bytes as base64.
#[derive(Serialize, Deserialize)]
struct Stored {
    at: String,
    name: String,
    mime: String,
    data: String,
}

impl Serialize for Attachment {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        Stored {
            at: self.at.clone(),
            name: self.name.clone(),
            mime: self.mime.clone(),
            data: self.base64(),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Attachment {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let stored = Stored::deserialize(deserializer)?;
        Attachment::from_base64(&stored.at, &stored.mime, &stored.data, Some(&stored.name))
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_urls_decode_and_name_themselves_by_hash() {
        let a = Attachment::from_data_url("m", "data:image/png;base64,iVBORw0KGgo=", None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.mime, "image/png");
        assert_eq!(&a.bytes[..4], b"\x89PNG");
        assert!(a.name.ends_with(".png") && a.name.len() == 16, "{}", a.name);
        let text = Attachment::from_data_url("m", "data:,hello%20there", Some("../a\"b.txt"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&*text.bytes, b"hello there");
        assert_eq!(text.mime, "text/plain");
        assert_eq!(text.name, "ab.txt");
        assert!(Attachment::from_data_url("m", "data:image/png;base64,@@", None).is_err());
        assert!(Attachment::from_data_url("m", "https://x/y.png", None).is_err());
    }

    #[test]
    fn accept_lists_match_types_wildcards_and_extensions() {
        let png = Attachment::new("m", Some("a.png"), "image/png", vec![1]);
        let txt = Attachment::new("m", Some("notes.TXT"), "text/plain", vec![1]);
        let zip = Attachment::new("m", Some("a.zip"), "application/zip", vec![1]);
        for (accept, file, ok) in [
            ("image/*,text/plain", &png, true),
            ("image/*,text/plain", &txt, true),
            ("image/*,text/plain", &zip, false),
            (".txt", &txt, true),
            ("", &zip, true),
        ] {
            assert_eq!(file.accepted_by(accept), ok, "{accept} {}", file.name);
        }
    }

    #[test]
    fn stored_form_round_trips_and_debug_hides_the_bytes() {
        let a = Attachment::new("m", Some("a.png"), "image/png", b"secret-bytes".to_vec());
        let json = serde_json::to_string(&a).unwrap_or_default();
        let back: Attachment = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, a);
        assert!(!format!("{a:?}").contains("secret"));
    }
}
