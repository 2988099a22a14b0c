//! Image and file parts as each front door spells them, read into [`Part`]s holding their
//! bytes (or an `http(s)` URL to fetch), and the fetching of those URLs.
//!
//! - OpenAI chat: `image_url` (`{"url": "data:…" | "https://…"}`), `file`
//!   (`{"file_data": "data:…", "filename"}`), `input_audio` (`{"data", "format"}`).
//! - Responses: `input_image` (`"image_url": "data:…"`), `input_file` (`file_data`,
//!   `filename`, or `file_url`).
//! - Anthropic: `image` and `document` blocks with a `base64`, `text` or `url` source.
//!
//! A file id (`file_id`) names a file in an OpenAI or Anthropic files store, which this
//! server does not have: it is refused, naming the part.

use serde_json::Value;

use super::error::ApiError;
use crate::attachment::Attachment;
use crate::chat::request::{Media, Part, Request};
use crate::config::ApiSettings;

fn bad(place: &str, message: String) -> ApiError {
    ApiError::bad_request(message)
        .param(place)
        .code("invalid_file")
}

fn no_file_ids(place: &str) -> ApiError {
    bad(
        place,
        format!(
            "`{place}` names a file by id; this server keeps no files store. Send the bytes \
             (a `data:` URL or base64) instead."
        ),
    )
}

/// A URL as an image or file: a `data:` URL is read now, an `http(s)` one kept to fetch.
fn from_url(place: &str, url: &str, name: Option<&str>) -> Result<Media, ApiError> {
    if url.starts_with("data:") {
        let file = Attachment::from_data_url(place, url, name)
            .map_err(|why| bad(place, format!("The file at `{place}` {why}.")))?;
        return Ok(Media::Inline { file });
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(Media::Url {
            url: url.to_owned(),
            name: name.map(str::to_owned),
        });
    }
    Err(bad(
        place,
        format!("The URL at `{place}` must be a `data:` URL or an http(s) URL."),
    ))
}

/// OpenAI chat's `image_url` part.
pub fn openai_image(item: &Value, place: &str) -> Result<Part, ApiError> {
    let url = match item.get("image_url") {
        Some(Value::String(url)) => Some(url.as_str()),
        Some(object) => object.get("url").and_then(Value::as_str),
        None => None,
    };
    let url = url.ok_or_else(|| {
        bad(
            &format!("{place}.image_url"),
            "An `image_url` part needs `image_url.url`.".into(),
        )
    })?;
    Ok(Part::Image {
        at: place.to_owned(),
        media: from_url(place, url, None)?,
    })
}

/// OpenAI chat's `file` part and Responses' `input_file` part (the fields are the same,
/// one level apart).
pub fn openai_file(file: &Value, place: &str) -> Result<Part, ApiError> {
    let name = file.get("filename").and_then(Value::as_str);
    if let Some(data) = file.get("file_data").and_then(Value::as_str) {
        let media = if data.starts_with("data:") {
            from_url(place, data, name)?
        } else {
            // Plain base64: the type follows from the name.
            let mime = mime_of_name(name.unwrap_or(""));
            let file = Attachment::from_base64(place, mime, data, name)
                .map_err(|why| bad(place, format!("The file at `{place}` {why}.")))?;
            Media::Inline { file }
        };
        return Ok(Part::File {
            at: place.to_owned(),
            media,
        });
    }
    if let Some(url) = file.get("file_url").and_then(Value::as_str) {
        return Ok(Part::File {
            at: place.to_owned(),
            media: from_url(place, url, name)?,
        });
    }
    if file.get("file_id").is_some() {
        return Err(no_file_ids(place));
    }
    Err(bad(
        place,
        format!("The file at `{place}` needs `file_data` (a `data:` URL or base64)."),
    ))
}

/// OpenAI chat's `input_audio` part: a file of the audio's format.
pub fn openai_audio(item: &Value, place: &str) -> Result<Part, ApiError> {
    let audio = item.get("input_audio").unwrap_or(&Value::Null);
    let data = audio.get("data").and_then(Value::as_str).ok_or_else(|| {
        bad(
            &format!("{place}.input_audio.data"),
            "An `input_audio` part needs base64 `data`.".into(),
        )
    })?;
    let format = audio.get("format").and_then(Value::as_str).unwrap_or("wav");
    let file = Attachment::from_base64(place, &format!("audio/{format}"), data, None)
        .map_err(|why| bad(place, format!("The audio at `{place}` {why}.")))?;
    Ok(Part::File {
        at: place.to_owned(),
        media: Media::Inline { file },
    })
}

/// Responses' `input_image` part.
pub fn responses_image(part: &Value, place: &str) -> Result<Part, ApiError> {
    if let Some(url) = part.get("image_url").and_then(Value::as_str) {
        return Ok(Part::Image {
            at: place.to_owned(),
            media: from_url(place, url, None)?,
        });
    }
    if part.get("file_id").is_some() {
        return Err(no_file_ids(place));
    }
    Err(bad(
        &format!("{place}.image_url"),
        "An `input_image` part needs `image_url`.".into(),
    ))
}

/// Anthropic's `image` and `document` blocks.
pub fn anthropic_block(block: &Value, place: &str, image: bool) -> Result<Part, ApiError> {
    let source = block.get("source").unwrap_or(&Value::Null);
    let name = block.get("title").and_then(Value::as_str);
    let media = match source.get("type").and_then(Value::as_str) {
        Some("base64") => {
            let mime = source
                .get("media_type")
                .and_then(Value::as_str)
                .unwrap_or("application/octet-stream");
            let data = source.get("data").and_then(Value::as_str).unwrap_or("");
            let file = Attachment::from_base64(place, mime, data, name).map_err(|why| {
                bad(
                    &format!("{place}.source.data"),
                    format!("{place}.source.data {why}"),
                )
            })?;
            Media::Inline { file }
        }
        Some("text") => {
            let data = source.get("data").and_then(Value::as_str).unwrap_or("");
            let mime = source
                .get("media_type")
                .and_then(Value::as_str)
                .unwrap_or("text/plain");
            Media::Inline {
                file: Attachment::new(place, name, mime, data.as_bytes().to_vec()),
            }
        }
        Some("url") => {
            let url = source.get("url").and_then(Value::as_str).unwrap_or("");
            from_url(place, url, name)?
        }
        Some("file") => return Err(no_file_ids(place)),
        other => {
            return Err(bad(
                &format!("{place}.source.type"),
                format!(
                    "{place}.source.type: `{}` is not a source this server takes (base64, text \
                     or url)",
                    other.unwrap_or("(none)")
                ),
            ));
        }
    };
    Ok(match image {
        true => Part::Image {
            at: place.to_owned(),
            media,
        },
        false => Part::File {
            at: place.to_owned(),
            media,
        },
    })
}

fn mime_of_name(name: &str) -> &'static str {
    let lower = name.to_ascii_lowercase();
    let ext = lower.rsplit('.').next().unwrap_or("");
    match ext {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "txt" | "md" => "text/plain",
        "pdf" => "application/pdf",
        "json" => "application/json",
        "csv" => "text/csv",
        _ => "application/octet-stream",
    }
}

/// How many image URLs one request may have fetched.
const MAX_FETCHED: usize = 8;

/// Checks every file of `request` against the size limit and fetches its `http(s)` images
/// when `[api] fetch_image_urls` allows it; the error names the part.
pub async fn resolve(request: &mut Request, settings: &ApiSettings) -> Result<(), ApiError> {
    let limit = settings.max_file_bytes;
    let mut fetched = 0;
    for (at, media, new) in request.media_mut() {
        // A URL in the history stays `[image]` text: only the new turn's are fetched.
        if let Media::Url { url, name } = media
            && new
        {
            if !settings.fetch_image_urls {
                return Err(bad(
                    at,
                    format!(
                        "`{at}` is an http(s) URL, and this server does not fetch URLs \
                         (`[api] fetch_image_urls` is off). Send the file as a `data:` URL."
                    ),
                ));
            }
            fetched += 1;
            if fetched > MAX_FETCHED {
                return Err(bad(
                    at,
                    format!(
                        "At most {MAX_FETCHED} URLs are fetched per request; `{at}` is one more."
                    ),
                ));
            }
            let file = fetch(at, url, name.as_deref(), limit, settings.fetch_private_urls).await?;
            *media = Media::Inline { file };
        }
        if let Media::Inline { file } = media
            && file.size() as u64 > limit
        {
            return Err(ApiError::bad_request(format!(
                "The file at `{at}` is {} bytes; this server takes files of at most {limit} \
                     bytes (`[api] max_file_bytes`).",
                file.size()
            ))
            .param(at)
            .code("file_too_large"));
        }
    }
    Ok(())
}

/// Whether an address is this machine's, a private network's, or one no public host has.
fn is_private(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_broadcast()
                || a == 0 // "this network"
                || a >= 240 // reserved
                || (a == 100 && (b & 0xc0) == 64) // carrier-grade NAT
                || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
                || (a == 198 && (b & 0xfe) == 18) // benchmarking
        }
        std::net::IpAddr::V6(v6) => {
            let s = v6.segments();
            let embedded = |bytes: [u8; 4]| is_private(std::net::Ipv4Addr::from(bytes).into());
            let low = [(s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8];
            v6.is_loopback()
                || v6.is_unspecified()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link local
                || (s[0] & 0xffc0) == 0xfec0 // site local (deprecated)
                || v6.to_ipv4_mapped().is_some_and(|v4| is_private(v4.into()))
                || (s[..6] == [0; 6] && embedded(low)) // IPv4-compatible
                || (s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] && embedded(low)) // NAT64
                || (s[0] == 0x2002 && embedded([(s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8])) // 6to4
        }
    }
}

/// The addresses of a URL's host, refused when any is private (see [`is_private`]).
async fn public_addresses(url: &reqwest::Url) -> Result<Vec<std::net::SocketAddr>, String> {
    let host = url.host_str().ok_or("it has no host")?;
    let port = url.port_or_known_default().unwrap_or(443);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addresses: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|_| "its host does not resolve".to_owned())?
        .collect();
    if addresses.is_empty() || addresses.iter().any(|a| is_private(a.ip())) {
        return Err(
            "its host is this machine or a private network (`[api] fetch_private_urls` is off)"
                .to_owned(),
        );
    }
    Ok(addresses)
}

/// Fetches an image URL, reading at most `limit` bytes. Redirects are followed by hand, so
/// every hop is checked like the first.
async fn fetch(
    at: &str,
    url: &str,
    name: Option<&str>,
    limit: u64,
    private: bool,
) -> Result<Attachment, ApiError> {
    use futures_util::StreamExt;
    let failed = |why: String| {
        bad(
            at,
            format!("The URL at `{at}` could not be fetched: {why}."),
        )
    };
    let mut next = reqwest::Url::parse(url).map_err(|_| failed("it is not a valid URL".into()))?;
    let mut hops = 0;
    let response = loop {
        let mut builder = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(20))
            .redirect(reqwest::redirect::Policy::none());
        if !private {
            // The connection goes to the addresses checked, not to a second DNS answer.
            let addresses = public_addresses(&next).await.map_err(failed)?;
            if let Some(host) = next.host_str() {
                builder = builder.resolve_to_addrs(host, &addresses);
            }
        }
        let client = builder.build().map_err(|e| failed(e.to_string()))?;
        let response = client
            .get(next.clone())
            .send()
            .await
            .map_err(|e| failed(e.without_url().to_string()))?;
        if !response.status().is_redirection() {
            break response;
        }
        hops += 1;
        if hops > 3 {
            return Err(failed("it redirects more than 3 times".into()));
        }
        next = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .and_then(|l| next.join(l).ok())
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| failed("it redirects nowhere usable".into()))?;
    };
    if !response.status().is_success() {
        return Err(failed(format!(
            "it answered HTTP {}",
            response.status().as_u16()
        )));
    }
    let mime = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .unwrap_or("application/octet-stream")
        .trim()
        .to_owned();
    let from_path = url
        .split(['?', '#'])
        .next()
        .and_then(|u| u.rsplit('/').next())
        .filter(|n| n.contains('.'));
    let name = name.or(from_path);
    let mut bytes = Vec::new();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| failed(e.without_url().to_string()))?;
        if (bytes.len() + chunk.len()) as u64 > limit {
            return Err(failed(format!("it is larger than {limit} bytes")));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(Attachment::new(at, name, &mime, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_reserved_addresses_are_told_from_public_ones() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.1.2.3",
            "100.64.0.1",
            "198.18.0.1",
            "240.0.0.1",
            "::1",
            "fc00::1",
            "fe80::1",
            "fec0::1",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
        ] {
            assert!(is_private(private.parse().unwrap()), "{private}");
        }
        for public in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(!is_private(public.parse().unwrap()), "{public}");
        }
    }
}
