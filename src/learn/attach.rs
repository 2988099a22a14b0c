//! The probe's attachment: when the chat page has a file input, the probe chooses a small
//! generated file in it before typing, and waits for the uploads the page makes, so the
//! recording shows how the site takes a file (see `infer::upload`).
//!
//! The file is a 1×1 PNG whose `tEXt` chunk holds a fresh token (a text file when the input
//! accepts text and no images), so its name, size and hash are the probe's own: a value
//! equal to them in a call is the file's.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::attachment::{Attachment, hex};
use crate::recording::{AttachedFile, Body};

/// A generated probe file, written where Chromium can read it.
pub struct ProbeFile {
    pub token: String,
    pub name: String,
    pub mime: String,
    pub bytes: Vec<u8>,
    pub path: PathBuf,
}

impl ProbeFile {
    /// A file `accept` takes (PNG first, else text), written under `dir`; `None` when it
    /// takes neither.
    pub async fn create(accept: &str, dir: &Path) -> std::io::Result<Option<ProbeFile>> {
        let token = format!("ctf{:010x}", rand::random::<u64>() & 0xff_ffff_ffff);
        let candidates = [
            (
                format!("probe-{token}.png"),
                "image/png",
                png_with_text(&token),
            ),
            (
                format!("probe-{token}.txt"),
                "text/plain",
                format!("ComputeTower probe file {token}\n").into_bytes(),
            ),
        ];
        let Some((name, mime, bytes)) = candidates.into_iter().find(|(name, mime, bytes)| {
            Attachment::new("", Some(name), mime, bytes.clone()).accepted_by(accept)
        }) else {
            return Ok(None);
        };
        tokio::fs::create_dir_all(dir).await?;
        let path = dir.join(&name);
        tokio::fs::write(&path, &bytes).await?;
        Ok(Some(ProbeFile {
            token,
            name,
            mime: mime.to_owned(),
            bytes,
            path,
        }))
    }

    /// The recording's account of it.
    pub fn recorded(&self, accept: &str, chosen_ms: f64, typed_ms: f64) -> AttachedFile {
        AttachedFile {
            token: self.token.clone(),
            name: self.name.clone(),
            mime: self.mime.clone(),
            size: self.bytes.len() as u64,
            sha256: hex(&Sha256::digest(&self.bytes)),
            bytes: Body(self.bytes.clone()),
            accept: accept.to_owned(),
            chosen_ms,
            typed_ms,
        }
    }
}

/// A 1×1 PNG with `text` in a `tEXt` chunk.
pub fn png_with_text(text: &str) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&1u32.to_be_bytes());
    ihdr.extend_from_slice(&1u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 6, 0, 0, 0]); // 8-bit RGBA
    chunk(&mut out, b"IHDR", &ihdr);
    let mut t = b"Comment\0".to_vec();
    t.extend_from_slice(text.as_bytes());
    chunk(&mut out, b"tEXt", &t);
    // One scanline (filter 0, one RGBA pixel) in a stored deflate block.
    let raw = [0u8, 0x2b, 0x6c, 0xb0, 0xff];
    let mut idat = vec![0x78, 0x01, 0x01, 0x05, 0x00, 0xfa, 0xff];
    idat.extend_from_slice(&raw);
    idat.extend_from_slice(&adler32(&raw).to_be_bytes());
    chunk(&mut out, b"IDAT", &idat);
    chunk(&mut out, b"IEND", &[]);
    out
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn adler32(bytes: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in bytes {
        a = (a + u32::from(x)) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16) | a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_png_is_well_formed() {
        let png = png_with_text("ctf0123456789");
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        // The IHDR chunk's CRC, as every PNG reader checks it.
        assert_eq!(crc32(b"IEND"), 0xae42_6082);
        assert!(png.windows(13).any(|w| w == b"ctf0123456789"));
        assert!(png.ends_with(&[0xae, 0x42, 0x60, 0x82]));
    }

    #[tokio::test]
    async fn a_file_the_input_accepts_is_chosen() {
        let dir = std::env::temp_dir().join(format!("ct-attach-{}", std::process::id()));
        let png = ProbeFile::create("image/*", &dir).await.ok().flatten();
        assert_eq!(png.map(|f| f.mime), Some("image/png".to_owned()));
        let text = ProbeFile::create(".txt,text/plain", &dir)
            .await
            .ok()
            .flatten();
        assert_eq!(text.map(|f| f.mime), Some("text/plain".to_owned()));
        let none = ProbeFile::create("application/pdf", &dir)
            .await
            .ok()
            .flatten();
        assert!(none.is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
