//! Sealing of every secret at rest with AES-256-GCM-SIV.
//!
//! Invariants:
//! - A ciphertext is bound to its place (`table`, `column`, row id) as associated data, so a
//!   sealed value copied to another row or column does not open.
//! - The master key comes from `COMPUTETOWER_MASTER_KEY` or a key file created on first run
//!   with mode 0600. It never appears in logs, errors or `Debug` output.
//! - A wrong key is reported as such ([`VaultError::WrongKey`]), never as garbage plaintext.

use std::fmt;
use std::io::Write;
use std::path::Path;

use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use rand::RngCore;

/// Format byte in front of every ciphertext, so the format can evolve.
const FORMAT: u8 = 1;
const NONCE_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error(
        "the master key does not open this data (it was sealed with another key); \
         set COMPUTETOWER_MASTER_KEY to the key this data dir was created with"
    )]
    WrongKey,
    #[error("master key is not valid: {0} (expected 32 bytes, as 64 hex digits or base64)")]
    BadKey(String),
    #[error("cannot read or create the master key file {path}: {source}")]
    KeyFile {
        path: String,
        source: std::io::Error,
    },
    #[error("sealed value at {0} is damaged")]
    Damaged(String),
}

/// The master key and the cipher built from it.
#[derive(Clone)]
pub struct Vault {
    cipher: Aes256GcmSiv,
}

impl fmt::Debug for Vault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Vault(<redacted>)")
    }
}

/// Where a sealed value lives; it is the associated data of its ciphertext.
#[derive(Debug, Clone, Copy)]
pub struct Place<'a> {
    pub table: &'a str,
    pub column: &'a str,
    pub row: &'a str,
}

impl Place<'_> {
    fn aad(&self) -> Vec<u8> {
        [self.table, self.column, self.row].join("\0").into_bytes()
    }
}

impl fmt::Display for Place<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}[{}]", self.table, self.column, self.row)
    }
}

impl Vault {
    pub fn from_key(key: &[u8; 32]) -> Self {
        Self {
            cipher: Aes256GcmSiv::new(key.into()),
        }
    }

    /// Parses a key given as 64 hex digits or as base64 of 32 bytes.
    pub fn from_text(text: &str) -> Result<Self, VaultError> {
        let text = text.trim();
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex::decode(text).map_err(|e| VaultError::BadKey(e.to_string()))?
        } else {
            BASE64
                .decode(text)
                .map_err(|_| VaultError::BadKey("neither hex nor base64".into()))?
        };
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| VaultError::BadKey(format!("{} bytes", b.len())))?;
        Ok(Self::from_key(&key))
    }

    /// The key from `env_key` when given, else from `key_file`, creating it (mode 0600) when
    /// absent. Returns whether a new key was created.
    pub fn open(env_key: Option<&str>, key_file: &Path) -> Result<(Self, bool), VaultError> {
        if let Some(text) = env_key.filter(|t| !t.trim().is_empty()) {
            return Ok((Self::from_text(text)?, false));
        }
        let file_err = |source| VaultError::KeyFile {
            path: key_file.display().to_string(),
            source,
        };
        match std::fs::read_to_string(key_file) {
            Ok(text) => Ok((Self::from_text(&text)?, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                rand::rng().fill_bytes(&mut key);
                write_private(key_file, BASE64.encode(key).as_bytes()).map_err(file_err)?;
                Ok((Self::from_key(&key), true))
            }
            Err(e) => Err(file_err(e)),
        }
    }

    pub fn seal(&self, place: Place<'_>, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let aad = place.aad();
        // Encryption with a valid key and nonce length cannot fail; an empty output would only
        // fail to open later, which is reported then.
        let ciphertext = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .unwrap_or_default();
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ciphertext.len());
        out.push(FORMAT);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        out
    }

    /// Opens a sealed value. A value sealed under another key, or for another place, is
    /// [`VaultError::WrongKey`]; a truncated one is [`VaultError::Damaged`].
    pub fn open_sealed(&self, place: Place<'_>, sealed: &[u8]) -> Result<Vec<u8>, VaultError> {
        if sealed.len() < 1 + NONCE_LEN + 16 || sealed[0] != FORMAT {
            return Err(VaultError::Damaged(place.to_string()));
        }
        let (nonce, ciphertext) = sealed[1..].split_at(NONCE_LEN);
        let aad = place.aad();
        self.cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| VaultError::WrongKey)
    }

    pub fn seal_str(&self, place: Place<'_>, plaintext: &str) -> Vec<u8> {
        self.seal(place, plaintext.as_bytes())
    }

    pub fn open_string(&self, place: Place<'_>, sealed: &[u8]) -> Result<String, VaultError> {
        let bytes = self.open_sealed(place, sealed)?;
        String::from_utf8(bytes).map_err(|_| VaultError::Damaged(place.to_string()))
    }
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // The data dir, when it is made here: owner-only, like everything in it.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLACE: Place<'static> = Place {
        table: "accounts",
        column: "password_sealed",
        row: "a_1",
    };

    #[test]
    fn round_trip() {
        let vault = Vault::from_key(&[7; 32]);
        let sealed = vault.seal_str(PLACE, "hunter2");
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(vault.open_string(PLACE, &sealed).unwrap(), "hunter2");
    }

    #[test]
    fn wrong_key_is_reported_not_garbage() {
        let sealed = Vault::from_key(&[7; 32]).seal_str(PLACE, "hunter2");
        let err = Vault::from_key(&[8; 32])
            .open_string(PLACE, &sealed)
            .unwrap_err();
        assert!(matches!(err, VaultError::WrongKey));
    }

    #[test]
    fn ciphertext_is_bound_to_its_row_and_column() {
        let vault = Vault::from_key(&[7; 32]);
        let sealed = vault.seal_str(PLACE, "hunter2");
        let other_row = Place {
            row: "a_2",
            ..PLACE
        };
        let other_column = Place {
            column: "data_sealed",
            ..PLACE
        };
        assert!(vault.open_sealed(other_row, &sealed).is_err());
        assert!(vault.open_sealed(other_column, &sealed).is_err());
    }

    #[test]
    fn truncated_value_is_damaged_not_a_panic() {
        let vault = Vault::from_key(&[7; 32]);
        assert!(matches!(
            vault.open_sealed(PLACE, &[1, 2, 3]),
            Err(VaultError::Damaged(_))
        ));
    }

    #[test]
    fn key_file_is_created_private_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let (first, created) = Vault::open(None, &path).unwrap();
        assert!(created);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (second, created) = Vault::open(None, &path).unwrap();
        assert!(!created);
        let sealed = first.seal_str(PLACE, "x");
        assert_eq!(second.open_string(PLACE, &sealed).unwrap(), "x");
    }

    #[test]
    fn bad_key_text_is_a_clear_error() {
        let err = Vault::from_text("not a key").unwrap_err();
        assert!(err.to_string().contains("32 bytes"), "{err}");
        assert!(Vault::from_text(&"ab".repeat(32)).is_ok());
    }
}
