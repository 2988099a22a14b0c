//! Settings: embedded defaults, then `computetower.toml` (or `--config`), then `COMPUTETOWER_*`
//! environment variables. Unknown keys are rejected with their name.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Holds the SQLite database, the master key file and screenshots.
    pub data_dir: PathBuf,
    /// A `postgres://` URL puts the store on PostgreSQL (several instances can share it);
    /// unset, the store is the SQLite file in `data_dir`.
    pub database_url: Option<DatabaseUrl>,
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
    /// How long a session-wide preflight value (a CSRF token read from a page) is reused
    /// before it is fetched again, in seconds; 0 fetches it on every request.
    pub preflight_reuse_secs: u64,
    /// `tracing` filter, e.g. `info` or `computetower=debug`.
    pub log: String,
    /// Accept `URL: … | Email: … | Password: …` system messages that add accounts on the fly.
    pub allow_inline_credentials: bool,
    pub api: ApiSettings,
    pub limits: LimitSettings,
    pub browser: BrowserSettings,
    pub captcha: CaptchaSettings,
    /// Page-understanding assist: an OpenAI-compatible vision endpoint (off when `url` is empty).
    pub assist: AssistSettings,
    /// Per-service settings, by service name (`[services.example]`).
    pub services: BTreeMap<String, ServiceSettings>,
}

/// The store's database URL. It may hold a password, so `Debug` hides it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DatabaseUrl(pub String);

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatabaseUrl(<redacted>)")
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceSettings {
    /// Origins besides the account's own that the service's flows may call with the
    /// account's session (an API on another host of the same site, say).
    pub allowed_origins: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSettings {
    /// Origins a browser front end may call the API from (CORS), e.g.
    /// `["http://localhost:3000"]`; `"*"` allows any, and only on a loopback bind.
    pub cors_origins: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    /// Replies running at once on one account.
    pub per_account_concurrency: usize,
    /// Requests waiting for a slot on one account; beyond this, 429.
    pub per_account_queue: usize,
    /// Cooldown of an account the site rate-limited without a `Retry-After`.
    pub rate_limit_cooldown_secs: u64,
    /// Requests per minute per API key (0: unlimited).
    pub requests_per_minute_per_key: u32,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            per_account_concurrency: 4,
            per_account_queue: 64,
            rate_limit_cooldown_secs: 60,
            requests_per_minute_per_key: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrowserSettings {
    /// Account contexts open at once.
    pub max_contexts: usize,
    /// An account context unused this long is closed.
    pub idle_timeout_secs: u64,
    /// A tier 2/3 page unused this long is closed; the context (and the login) stays.
    pub page_idle_secs: u64,
    /// How credentials are typed: `paste`, `fast` or `human`.
    pub typing: String,
    /// Per-key delay range for `human` typing, in milliseconds.
    pub human_delay_ms: [u64; 2],
    /// Longest a whole login may take.
    pub login_timeout_secs: u64,
    /// Longest a browser tier (2 or 3) waits for the site's reply to start, and the longest
    /// silence within it.
    pub tier_timeout_secs: u64,
    /// Cap on a harvested session's lifetime.
    pub max_session_hours: u64,
    pub headless: bool,
}

impl Default for BrowserSettings {
    fn default() -> Self {
        Self {
            max_contexts: 8,
            idle_timeout_secs: 600,
            page_idle_secs: 60,
            typing: "paste".to_owned(),
            human_delay_ms: [40, 160],
            login_timeout_secs: 60,
            tier_timeout_secs: 90,
            max_session_hours: 24,
            headless: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptchaSettings {
    /// A command given the challenge as JSON on stdin; it prints the actions to take.
    pub solver_command: Option<String>,
    /// An HTTP endpoint taking and answering the same JSON.
    pub solver_url: Option<String>,
    /// How long a login waits for a person to solve a challenge at `/admin/sessions/{id}`.
    pub human_timeout_secs: u64,
}

impl Default for CaptchaSettings {
    fn default() -> Self {
        Self {
            solver_command: None,
            solver_url: None,
            human_timeout_secs: 300,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AssistSettings {
    pub url: String,
    pub api_key: String,
    pub model: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            database_url: None,
            bind: SocketAddr::from(([127, 0, 0, 1], 8000)),
            chrome: PathBuf::from("/usr/bin/chromium"),
            max_body_bytes: 4 * 1024 * 1024,
            upstream_connect_timeout_secs: 10,
            upstream_first_byte_timeout_secs: 120,
            upstream_idle_timeout_secs: 120,
            preflight_reuse_secs: 300,
            log: "info".to_owned(),
            allow_inline_credentials: false,
            api: ApiSettings::default(),
            limits: LimitSettings::default(),
            browser: BrowserSettings::default(),
            captcha: CaptchaSettings::default(),
            assist: AssistSettings::default(),
            services: BTreeMap::new(),
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
    #[error("setting `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
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
        config.check()?;
        Ok(config)
    }

    /// Checks settings that depend on each other; run again after the bind address changes.
    pub fn check(&self) -> Result<(), ConfigError> {
        self.store_location().map_err(|e| ConfigError::Invalid {
            key: "database_url",
            message: e.to_string(),
        })?;
        let any_origin = self.api.cors_origins.iter().any(|o| o.trim() == "*");
        if any_origin && !self.bind.ip().is_loopback() {
            return Err(ConfigError::Invalid {
                key: "api.cors_origins",
                message: format!(
                    "\"*\" lets any web page call this server from its visitors' browsers; it is \
                     allowed only on a loopback address, and {} is not one. List the origins \
                     of your front ends instead.",
                    self.bind
                ),
            });
        }
        for origin in self.api.cors_origins.iter().filter(|o| o.trim() != "*") {
            let parsed = url::Url::parse(origin.trim());
            let valid = parsed.as_ref().is_ok_and(|u| {
                matches!(u.scheme(), "http" | "https")
                    && u.host_str().is_some()
                    && u.path() == "/"
                    && !origin.trim().ends_with('/')
            });
            if !valid {
                return Err(ConfigError::Invalid {
                    key: "api.cors_origins",
                    message: format!(
                        "`{origin}` is not an origin: write scheme, host and port only, e.g. \
                         `http://localhost:3000`"
                    ),
                });
            }
        }
        Ok(())
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
        if let Some(v) = env("COMPUTETOWER_DATABASE_URL") {
            self.database_url = Some(DatabaseUrl(v));
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
        if let Some(v) = env("COMPUTETOWER_PREFLIGHT_REUSE_SECS") {
            self.preflight_reuse_secs = parse("COMPUTETOWER_PREFLIGHT_REUSE_SECS", &v)?;
        }
        if let Some(v) = env("COMPUTETOWER_BROWSER_PAGE_IDLE_SECS") {
            self.browser.page_idle_secs = parse("COMPUTETOWER_BROWSER_PAGE_IDLE_SECS", &v)?;
        }
        if let Some(v) = env("COMPUTETOWER_BROWSER_TIER_TIMEOUT_SECS") {
            self.browser.tier_timeout_secs = parse("COMPUTETOWER_BROWSER_TIER_TIMEOUT_SECS", &v)?;
        }
        if let Some(v) = env("COMPUTETOWER_LOG") {
            self.log = v;
        }
        if let Some(v) = env("COMPUTETOWER_CORS_ORIGINS") {
            self.api.cors_origins = v
                .split(',')
                .map(|o| o.trim().to_owned())
                .filter(|o| !o.is_empty())
                .collect();
        }
        if let Some(v) = env("COMPUTETOWER_ALLOW_INLINE_CREDENTIALS") {
            self.allow_inline_credentials = parse("COMPUTETOWER_ALLOW_INLINE_CREDENTIALS", &v)?;
        }
        if let Some(v) = env("COMPUTETOWER_PER_ACCOUNT_CONCURRENCY") {
            self.limits.per_account_concurrency =
                parse("COMPUTETOWER_PER_ACCOUNT_CONCURRENCY", &v)?;
        }
        if let Some(v) = env("COMPUTETOWER_PER_ACCOUNT_QUEUE") {
            self.limits.per_account_queue = parse("COMPUTETOWER_PER_ACCOUNT_QUEUE", &v)?;
        }
        if let Some(v) = env("COMPUTETOWER_REQUESTS_PER_MINUTE_PER_KEY") {
            self.limits.requests_per_minute_per_key =
                parse("COMPUTETOWER_REQUESTS_PER_MINUTE_PER_KEY", &v)?;
        }
        if let Some(v) = env("COMPUTETOWER_CAPTCHA_HUMAN_TIMEOUT_SECS") {
            self.captcha.human_timeout_secs = parse("COMPUTETOWER_CAPTCHA_HUMAN_TIMEOUT_SECS", &v)?;
        }
        if let Some(v) = env("COMPUTETOWER_CAPTCHA_SOLVER_COMMAND") {
            self.captcha.solver_command = Some(v);
        }
        if let Some(v) = env("COMPUTETOWER_ASSIST_API_KEY") {
            // The key is a secret: it is better kept out of the config file.
            self.assist.api_key = v;
        }
        Ok(())
    }

    /// The SQLite file, used when no `database_url` is set.
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("computetower.db")
    }

    /// Where the store lives: `database_url`, else the SQLite file in the data dir.
    pub fn store_location(&self) -> Result<crate::store::Location, crate::store::StoreError> {
        crate::store::Location::new(
            self.database_url.as_ref().map(|u| u.0.as_str()),
            self.database_path(),
        )
    }

    /// The origins the operator allows `service`'s flows to call besides the account's own.
    pub fn allowed_origins(&self, service: &str) -> &[String] {
        self.services
            .get(service)
            .map_or(&[], |s| s.allowed_origins.as_slice())
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
    fn nested_tables_parse_and_reject_unknown_keys() {
        let config: Config =
            toml::from_str("[browser]\ntyping = \"human\"\n[captcha]\nhuman_timeout_secs = 5")
                .unwrap();
        assert_eq!(config.browser.typing, "human");
        assert_eq!(config.captcha.human_timeout_secs, 5);
        assert_eq!(config.browser.max_contexts, 8);
        let err = toml::from_str::<Config>("[browser]\nspeed = 1").unwrap_err();
        assert!(err.to_string().contains("speed"), "{err}");
    }

    #[test]
    fn cors_origins_are_checked() {
        let mut config: Config =
            toml::from_str("[api]\ncors_origins = [\"http://localhost:3000\"]").unwrap();
        assert!(config.check().is_ok());
        config.api.cors_origins = vec!["*".into()];
        assert!(config.check().is_ok(), "any origin on loopback");
        config.bind = "0.0.0.0:8000".parse().unwrap();
        let err = config.check().unwrap_err().to_string();
        assert!(
            err.contains("api.cors_origins") && err.contains("loopback"),
            "{err}"
        );
        config.api.cors_origins = vec!["http://localhost:3000/app".into()];
        assert!(config.check().is_err());
        config
            .apply_env(|name| {
                (name == "COMPUTETOWER_CORS_ORIGINS")
                    .then(|| "https://a.example, http://b:1".into())
            })
            .unwrap();
        assert_eq!(config.api.cors_origins, ["https://a.example", "http://b:1"]);
        assert!(config.check().is_ok());
    }

    #[test]
    fn the_database_url_comes_from_the_file_or_the_env_and_is_never_shown() {
        let mut config: Config =
            toml::from_str("database_url = \"postgres://ct:pw-in-file@db:5432/tower\"").unwrap();
        assert_eq!(
            config.store_location().unwrap().engine(),
            crate::store::Engine::Postgres
        );
        config
            .apply_env(|name| {
                (name == "COMPUTETOWER_DATABASE_URL")
                    .then(|| "postgresql://ct:pw-in-env@db2/tower".to_owned())
            })
            .unwrap();
        assert_eq!(
            config.store_location().unwrap().describe(),
            "postgres db2:5432/tower"
        );
        assert!(config.check().is_ok());
        let shown = format!("{config:?}");
        assert!(!shown.contains("pw-in"), "{shown}");
        let default = Config::default();
        assert!(matches!(
            default.store_location().unwrap(),
            crate::store::Location::Sqlite(p) if p == Path::new("./data/computetower.db")
        ));
        config.database_url = Some(DatabaseUrl("mysql://ct:pw-bad@db/x".into()));
        let err = config.check().unwrap_err().to_string();
        assert!(
            err.contains("database_url") && err.contains("postgres://"),
            "{err}"
        );
        assert!(!err.contains("pw-bad"), "{err}");
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
