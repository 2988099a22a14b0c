//! Settings: embedded defaults, then `computetower.toml` (or `--config`), then `COMPUTETOWER_*`
//! environment variables. Unknown keys are rejected with their name.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
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
    /// Instances sharing one store: account leases and how soon they pass on.
    pub cluster: ClusterSettings,
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
    #[serde(deserialize_with = "list_or_commas")]
    pub allowed_origins: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSettings {
    /// Origins a browser front end may call the API from (CORS), e.g.
    /// `["http://localhost:3000"]`; `"*"` allows any, and only on a loopback bind.
    #[serde(deserialize_with = "list_or_commas")]
    pub cors_origins: Vec<String>,
    /// Fetch `http(s)` image and file URLs that clients send (off: only `data:` URLs and
    /// base64 are taken). The server then makes requests to URLs its clients choose.
    pub fetch_image_urls: bool,
    /// Also fetch URLs whose host is this machine or a private network (off: such a URL is
    /// refused, so a client cannot make the server read its own admin API or a cloud
    /// metadata endpoint).
    pub fetch_private_urls: bool,
    /// Largest image or file taken, in bytes (a site's own limit may be lower).
    pub max_file_bytes: u64,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            cors_origins: Vec::new(),
            fetch_image_urls: false,
            fetch_private_urls: false,
            max_file_bytes: 10 * 1024 * 1024,
        }
    }
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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSettings {
    /// An account lease (its browser work) not renewed for this long passes to another
    /// instance: how soon a crashed instance's accounts are taken over.
    pub lease_secs: u64,
    /// How often an instance renews the leases it holds (well under `lease_secs`).
    pub lease_renew_secs: u64,
    /// How often an instance on PostgreSQL reads what the others saw (429 cooldowns, tier
    /// floors, re-learned flows), in ms: how soon they follow one another.
    pub shared_poll_ms: u64,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            lease_secs: 15,
            lease_renew_secs: 5,
            shared_poll_ms: 1000,
        }
    }
}

impl ClusterSettings {
    /// The leases' timings; renewal at least twice per lifetime, whatever is configured.
    pub fn leases(&self) -> crate::lease::LeaseSettings {
        let ttl = std::time::Duration::from_secs(self.lease_secs.max(1));
        let renew_every = std::time::Duration::from_secs(self.lease_renew_secs.max(1)).min(ttl / 2);
        crate::lease::LeaseSettings {
            ttl,
            renew_every,
            ..Default::default()
        }
    }
}

#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AssistSettings {
    pub url: String,
    pub api_key: String,
    pub model: String,
}

impl std::fmt::Debug for AssistSettings {
    /// The API key is a secret: only whether one is set is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssistSettings")
            .field("url", &self.url)
            .field("api_key", &(!self.api_key.is_empty()).then_some("<set>"))
            .field("model", &self.model)
            .finish()
    }
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
            cluster: ClusterSettings::default(),
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
    /// A value in the file or the environment that does not fit, or an unknown key; the
    /// message names the key and where it came from.
    #[error("config: {0}")]
    Layer(String),
    #[error("setting `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

/// Name of the config file looked for in the working directory.
pub const DEFAULT_FILE: &str = "computetower.toml";

const ENV_PREFIX: &str = "COMPUTETOWER_";

/// `COMPUTETOWER_*` variables that are not settings.
const NOT_SETTINGS: &[&str] = &["config", "master_key", "chromium_exec"];

/// Environment names (after the prefix) documented before every key had one, and the keys
/// they set.
pub const ENV_ALIASES: &[(&str, &str)] = &[
    ("data", "data_dir"),
    ("browser_page_idle_secs", "browser.page_idle_secs"),
    ("browser_tier_timeout_secs", "browser.tier_timeout_secs"),
    ("cors_origins", "api.cors_origins"),
    ("per_account_concurrency", "limits.per_account_concurrency"),
    ("per_account_queue", "limits.per_account_queue"),
    (
        "requests_per_minute_per_key",
        "limits.requests_per_minute_per_key",
    ),
    ("captcha_human_timeout_secs", "captcha.human_timeout_secs"),
    ("captcha_solver_command", "captcha.solver_command"),
    ("assist_api_key", "assist.api_key"),
];

/// The config key an environment name (prefix removed, lower case) sets.
fn env_key(name: &str) -> String {
    ENV_ALIASES
        .iter()
        .find(|(alias, _)| *alias == name)
        .map_or_else(|| name.replace("__", "."), |(_, key)| (*key).to_owned())
}

/// A list given as a list, or as one comma-separated string (handy in the environment).
fn list_or_commas<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<String>),
        Text(String),
    }
    Ok(match Either::deserialize(d)? {
        Either::List(list) => list,
        Either::Text(text) => text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

impl Config {
    /// Loads the layered config: defaults, then the file (`file`, which must exist; else
    /// `COMPUTETOWER_CONFIG`; else `./computetower.toml` when present), then the environment.
    ///
    /// Every key can be set from the environment: `COMPUTETOWER_` plus the key, with `__`
    /// between a table and its key (`COMPUTETOWER_LIMITS__PER_ACCOUNT_QUEUE=10`,
    /// `COMPUTETOWER_SERVICES__EXAMPLE__ALLOWED_ORIGINS='["https://api.example.com"]'`).
    /// The shorter names documented before tables existed still work (see [`ENV_ALIASES`]).
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let vars: Vec<(String, String)> = std::env::vars()
            .filter(|(k, v)| k.starts_with(ENV_PREFIX) && !v.is_empty())
            .collect();
        Self::load_from(file, &vars)
    }

    /// [`Config::load`] with `vars` as the environment (the `COMPUTETOWER_*` variables).
    fn load_from(file: Option<&Path>, vars: &[(String, String)]) -> Result<Self, ConfigError> {
        let var = |name: &str| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let explicit = file
            .map(Path::to_path_buf)
            .or_else(|| var("COMPUTETOWER_CONFIG").map(PathBuf::from));
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        match explicit {
            Some(path) => {
                // An explicit file must exist: a typo in its name must not silently fall back.
                std::fs::metadata(&path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                figment = figment.merge(Toml::file_exact(path));
            }
            None if Path::new(DEFAULT_FILE).exists() => {
                figment = figment.merge(Toml::file_exact(DEFAULT_FILE));
            }
            None => {}
        }
        // Each variable is one key (values read as TOML-ish: numbers, booleans, lists).
        let mut from_env: Vec<(String, &str)> = Vec::new();
        for (name, value) in vars {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let rest = rest.to_ascii_lowercase();
            if NOT_SETTINGS.contains(&rest.as_str()) {
                continue;
            }
            let key = env_key(&rest);
            let parsed: figment::value::Value = value.parse().unwrap_or_else(|e| match e {});
            figment = figment.merge(Serialized::default(&key, parsed));
            from_env.push((key, name.as_str()));
        }
        let config: Config = figment.extract().map_err(|e| {
            // Name the variable when the bad value came from one.
            let key = e.path.join(".");
            let source = from_env
                .iter()
                .find(|(k, _)| *k == key || (key.is_empty() && e.to_string().contains(k.as_str())))
                .map(|(_, name)| format!(" (from the environment variable {name})"))
                .unwrap_or_default();
            ConfigError::Layer(format!("{e}{source}"))
        })?;
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

    /// Loads with `file` (TOML text, if any) and `vars` as the whole environment.
    fn load(file: Option<&str>, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        if let Some(text) = file {
            std::fs::write(&path, text).unwrap();
        }
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::load_from(file.map(|_| path.as_path()), &vars)
    }

    #[test]
    fn env_overrides_file_and_defaults() {
        let config = load(Some("bind = \"127.0.0.1:9000\""), &[]).unwrap();
        assert_eq!(config.bind.port(), 9000);
        assert_eq!(config.data_dir, PathBuf::from("./data"));
        let config = load(
            Some("bind = \"127.0.0.1:9000\"\n[limits]\nper_account_queue = 3"),
            &[
                ("COMPUTETOWER_DATA", "/tmp/x"),
                ("COMPUTETOWER_LIMITS__PER_ACCOUNT_QUEUE", "10"),
                ("COMPUTETOWER_BROWSER__HEADLESS", "false"),
            ],
        )
        .unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(config.limits.per_account_queue, 10);
        assert!(!config.browser.headless);
        assert_eq!(config.bind.port(), 9000);
    }

    #[test]
    fn every_key_and_the_old_names_come_from_the_environment() {
        let config = load(
            None,
            &[
                ("COMPUTETOWER_PER_ACCOUNT_CONCURRENCY", "7"),
                ("COMPUTETOWER_ASSIST_API_KEY", "sk-assist"),
                (
                    "COMPUTETOWER_CAPTCHA__SOLVER_URL",
                    "http://127.0.0.1:1/solve",
                ),
                (
                    "COMPUTETOWER_SERVICES__EXAMPLE__ALLOWED_ORIGINS",
                    "https://api.example.com, https://cdn.example.com",
                ),
                ("COMPUTETOWER_BROWSER__HUMAN_DELAY_MS", "[10, 20]"),
            ],
        )
        .unwrap();
        assert_eq!(config.limits.per_account_concurrency, 7);
        assert_eq!(config.assist.api_key, "sk-assist");
        assert_eq!(
            config.captcha.solver_url.as_deref(),
            Some("http://127.0.0.1:1/solve")
        );
        assert_eq!(
            config.allowed_origins("example"),
            ["https://api.example.com", "https://cdn.example.com"]
        );
        assert_eq!(config.browser.human_delay_ms, [10, 20]);
        // The secret never shows in the config's debug output.
        assert!(!format!("{config:?}").contains("sk-assist"));
    }

    #[test]
    fn nested_tables_parse_and_reject_unknown_keys() {
        let config = load(
            Some("[browser]\ntyping = \"human\"\n[captcha]\nhuman_timeout_secs = 5"),
            &[],
        )
        .unwrap();
        assert_eq!(config.browser.typing, "human");
        assert_eq!(config.captcha.human_timeout_secs, 5);
        assert_eq!(config.browser.max_contexts, 8);
        let err = load(Some("[browser]\nspeed = 1"), &[]).unwrap_err();
        assert!(err.to_string().contains("speed"), "{err}");
        let err = load(None, &[("COMPUTETOWER_BROWSER__SPEED", "1")]).unwrap_err();
        assert!(err.to_string().contains("speed"), "{err}");
    }

    #[test]
    fn cors_origins_are_checked() {
        let mut config = load(
            Some("[api]\ncors_origins = [\"http://localhost:3000\"]"),
            &[],
        )
        .unwrap();
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
        let config = load(
            None,
            &[("COMPUTETOWER_CORS_ORIGINS", "https://a.example, http://b:1")],
        )
        .unwrap();
        assert_eq!(config.api.cors_origins, ["https://a.example", "http://b:1"]);
    }

    #[test]
    fn the_database_url_comes_from_the_file_or_the_env_and_is_never_shown() {
        let from_file = load(
            Some("database_url = \"postgres://ct:pw-in-file@db:5432/tower\""),
            &[],
        )
        .unwrap();
        assert_eq!(
            from_file.store_location().unwrap().describe(),
            "postgres db:5432/tower"
        );
        let mut config = load(
            Some("database_url = \"postgres://ct:pw-in-file@db:5432/tower\""),
            &[(
                "COMPUTETOWER_DATABASE_URL",
                "postgresql://ct:pw-in-env@db2/tower",
            )],
        )
        .unwrap();
        assert_eq!(
            config.store_location().unwrap().describe(),
            "postgres db2:5432/tower"
        );
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
        let err = load(
            None,
            &[("COMPUTETOWER_DATABASE_URL", "mysql://ct:pw-bad@db/x")],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("database_url") && !err.contains("pw-bad"),
            "{err}"
        );
    }

    #[test]
    fn unknown_key_and_bad_values_are_named() {
        let err = load(Some("bnd = \"x\""), &[]).unwrap_err();
        assert!(err.to_string().contains("bnd"), "{err}");
        let err = load(None, &[("COMPUTETOWER_BIND", "nope")]).unwrap_err();
        assert!(err.to_string().contains("COMPUTETOWER_BIND"), "{err}");
    }
}
