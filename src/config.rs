//! Settings: embedded defaults, then `computetower.toml` (or `--config`), then `COMPUTETOWER_*`
//! environment variables. Unknown keys are rejected with their name.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Holds the SQLite database, the master key file and screenshots.
    pub data_dir: PathBuf,
    /// Address `serve` listens on.
    pub bind: SocketAddr,
    /// Chromium binary for the browser tiers.
    pub chrome: PathBuf,
    /// Largest accepted request body, in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Connect timeout for calls to chat sites, in seconds.
    pub upstream_connect_timeout_secs: u64,
    /// Longest wait for a chat site's first response byte, in seconds.
    pub upstream_first_byte_timeout_secs: u64,
    /// Longest silence in the middle of a streamed reply, in seconds.
    pub upstream_idle_timeout_secs: u64,
    /// `tracing` filter, e.g. `info` or `computetower=debug`.
    pub log: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            bind: SocketAddr::from(([127, 0, 0, 1], 8000)),
            chrome: PathBuf::from("/usr/bin/chromium"),
            max_body_bytes: 4 * 1024 * 1024,
            upstream_connect_timeout_secs: 10,
            upstream_first_byte_timeout_secs: 120,
            upstream_idle_timeout_secs: 120,
            log: "info".to_owned(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {name}: {message}")]
    Env { name: String, message: String },
}

/// Name of the config file looked for in the working directory.
pub const DEFAULT_FILE: &str = "computetower.toml";

impl Config {
    /// Loads the layered config. `file` is an explicit path (which must exist); otherwise
    /// `COMPUTETOWER_CONFIG`, then `./computetower.toml` when present.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let explicit = file
            .map(Path::to_path_buf)
            .or_else(|| env("COMPUTETOWER_CONFIG").map(PathBuf::from));
        let mut config = match explicit {
            Some(path) => Self::from_file(&path)?,
            None if Path::new(DEFAULT_FILE).exists() => Self::from_file(Path::new(DEFAULT_FILE))?,
            None => Self::default(),
        };
        config.apply_env(env)?;
        Ok(config)
    }

    fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn parse<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            value.parse().map_err(|e: T::Err| ConfigError::Env {
                name: name.to_owned(),
                message: format!("`{value}`: {e}"),
            })
        }
        if let Some(v) = env("COMPUTETOWER_DATA") {
            self.data_dir = PathBuf::from(v);
        }
        if let Some(v) = env("COMPUTETOWER_BIND") {
            self.bind = parse("COMPUTETOWER_BIND", &v)?;
        }
        if let Some(v) = env("COMPUTETOWER_CHROME") {
            self.chrome = PathBuf::from(v);
        }
        if let Some(v) = env("COMPUTETOWER_MAX_BODY_BYTES") {
            self.max_body_bytes = parse("COMPUTETOWER_MAX_BODY_BYTES", &v)?;
        }
        if let Some(v) = env("COMPUTETOWER_UPSTREAM_FIRST_BYTE_TIMEOUT_SECS") {
            self.upstream_first_byte_timeout_secs =
                parse("COMPUTETOWER_UPSTREAM_FIRST_BYTE_TIMEOUT_SECS", &v)?;
        }
        if let Some(v) = env("COMPUTETOWER_UPSTREAM_IDLE_TIMEOUT_SECS") {
            self.upstream_idle_timeout_secs = parse("COMPUTETOWER_UPSTREAM_IDLE_TIMEOUT_SECS", &v)?;
        }
        if let Some(v) = env("COMPUTETOWER_LOG") {
            self.log = v;
        }
        Ok(())
    }

    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("computetower.db")
    }

    pub fn key_file(&self) -> PathBuf {
        self.data_dir.join("master.key")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_file_and_defaults() {
        let mut config: Config = toml::from_str("bind = \"127.0.0.1:9000\"").unwrap();
        assert_eq!(config.bind.port(), 9000);
        assert_eq!(config.data_dir, PathBuf::from("./data"));
        config
            .apply_env(|name| (name == "COMPUTETOWER_DATA").then(|| "/tmp/x".to_owned()))
            .unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn unknown_key_is_named() {
        let err = toml::from_str::<Config>("bnd = \"x\"").unwrap_err();
        assert!(err.to_string().contains("bnd"), "{err}");
    }

    #[test]
    fn bad_env_value_is_named() {
        let err = Config::default()
            .apply_env(|name| (name == "COMPUTETOWER_BIND").then(|| "nope".to_owned()))
            .unwrap_err();
        assert!(err.to_string().contains("COMPUTETOWER_BIND"), "{err}");
    }
}
