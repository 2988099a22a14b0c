//! Accounts: a site URL, the service name clients ask for, and sealed credentials.

use serde::Serialize;
use sqlx::Row;
use url::Url;

use super::{Store, StoreError, new_id, now};
use crate::vault::Place;

/// An account as shown to people: no secret, only whether one is set.
#[derive(Debug, Clone, Serialize)]
pub struct Account {
    pub id: String,
    pub service: String,
    pub url: String,
    pub email: Option<String>,
    pub has_password: bool,
    /// The proxy with any credentials masked.
    pub proxy: Option<String>,
    pub enabled: bool,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Default, Clone)]
pub struct NewAccount {
    pub url: String,
    pub service: Option<String>,
    pub email: Option<String>,
    pub password: Option<String>,
    pub proxy: Option<String>,
}

/// Fields to change; `None` leaves a field as it is.
#[derive(Debug, Default, Clone)]
pub struct AccountUpdate {
    pub url: Option<String>,
    pub service: Option<String>,
    pub email: Option<String>,
    pub password: Option<String>,
    /// `Some("")` removes the proxy.
    pub proxy: Option<String>,
    pub enabled: Option<bool>,
}

fn place<'a>(column: &'a str, id: &'a str) -> Place<'a> {
    Place {
        table: "accounts",
        column,
        row: id,
    }
}

/// Checks a site URL: absolute http(s) with a host.
pub fn parse_site_url(url: &str) -> Result<Url, StoreError> {
    // A URL that may hold credentials is never echoed back (errors reach logs and clients).
    let shown = if url.contains('@') {
        "the account URL".to_owned()
    } else {
        format!("`{url}`")
    };
    let parsed = Url::parse(url.trim())
        .map_err(|e| StoreError::Invalid(format!("{shown} is not a valid URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(StoreError::Invalid(format!(
            "{shown} must be an http(s) URL with a host"
        )));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(StoreError::Invalid(
            "the account URL must not hold a user name or password (`user:pass@host`): give \
             the login as `--email` and `--password-stdin` (or `email` and `password` in the \
             admin API), which are stored sealed"
                .into(),
        ));
    }
    Ok(parsed)
}

fn parse_proxy(proxy: &str) -> Result<Url, StoreError> {
    let parsed = Url::parse(proxy)
        .map_err(|e| StoreError::Invalid(format!("proxy is not a valid URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https" | "socks5" | "socks5h") {
        return Err(StoreError::Invalid(
            "proxy must be an http, https or socks5 URL".into(),
        ));
    }
    Ok(parsed)
}

/// The proxy URL with user and password masked, fit for listings and logs.
pub fn redact_proxy(proxy: &str) -> String {
    match Url::parse(proxy) {
        Ok(mut url) if !url.username().is_empty() || url.password().is_some() => {
            let _ = url.set_username("***");
            let _ = url.set_password(None);
            url.to_string()
        }
        Ok(url) => url.to_string(),
        Err(_) => "<invalid>".to_owned(),
    }
}

/// The default service name for a site: its host without `www.`/`chat.` and the TLD
/// (`https://chat.example.com` → `example`), or host and port for an IP or localhost.
pub fn service_name_for(url: &Url) -> String {
    let host = url.host_str().unwrap_or("site");
    let is_ip = url
        .host()
        .is_some_and(|h| !matches!(h, url::Host::Domain(_)));
    if is_ip || host == "localhost" {
        let host = host.trim_matches(['[', ']']).replace(['.', ':'], "-");
        return match url.port() {
            Some(port) => format!("{host}-{port}"),
            None => host,
        };
    }
    let mut labels: Vec<&str> = host.split('.').collect();
    if labels.len() > 1 {
        labels.pop();
    }
    while labels.len() > 1 && matches!(labels[0], "www" | "chat" | "app") {
        labels.remove(0);
    }
    labels.join("-").to_ascii_lowercase()
}

/// A service name is a model id: keep it to what clients can type without quoting.
pub fn check_service_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "service name `{name}` must be 1-64 characters of letters, digits, - _ . : /"
        )))
    }
}

impl Store {
    pub async fn add_account(&self, new: NewAccount) -> Result<Account, StoreError> {
        let url = parse_site_url(&new.url)?;
        let service = match new.service {
            Some(name) => name.trim().to_owned(),
            None => service_name_for(&url),
        };
        check_service_name(&service)?;
        if new.password.is_some() && new.email.is_none() {
            return Err(StoreError::Invalid("a password needs an email".into()));
        }
        let proxy = match new.proxy.as_deref().filter(|p| !p.is_empty()) {
            Some(p) => Some(parse_proxy(p)?.to_string()),
            None => None,
        };
        let id = new_id("a");
        let password = new
            .password
            .as_deref()
            .map(|p| self.vault.seal_str(place("password_sealed", &id), p));
        let proxy = proxy
            .as_deref()
            .map(|p| self.vault.seal_str(place("proxy_sealed", &id), p));
        let now = now();
        sqlx::query(
            "INSERT INTO accounts (id, service, url, email, password_sealed, proxy_sealed, enabled, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?)",
        )
        .bind(&id)
        .bind(&service)
        .bind(url.as_str())
        .bind(&new.email)
        .bind(password)
        .bind(proxy)
        .bind(now)
        .bind(now)
        .execute(&self.pool)
        .await?;
        self.account(&id).await
    }

    pub async fn accounts(&self) -> Result<Vec<Account>, StoreError> {
        let rows = sqlx::query("SELECT * FROM accounts ORDER BY service, created_at")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|row| self.account_from_row(row)).collect()
    }

    pub async fn accounts_for_service(&self, service: &str) -> Result<Vec<Account>, StoreError> {
        let rows = sqlx::query("SELECT * FROM accounts WHERE service = ? ORDER BY created_at")
            .bind(service)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|row| self.account_from_row(row)).collect()
    }

    /// Finds an account by id, or by service name when exactly one account has it.
    pub async fn account(&self, id_or_service: &str) -> Result<Account, StoreError> {
        let row = sqlx::query("SELECT * FROM accounts WHERE id = ?")
            .bind(id_or_service)
            .fetch_optional(&self.pool)
            .await?;
        if let Some(row) = row {
            return self.account_from_row(&row);
        }
        let mut matches = self.accounts_for_service(id_or_service).await?;
        match matches.len() {
            1 => Ok(matches.remove(0)),
            0 => Err(StoreError::NotFound(format!("account `{id_or_service}`"))),
            n => Err(StoreError::Invalid(format!(
                "service `{id_or_service}` has {n} accounts; name one by id"
            ))),
        }
    }

    fn account_from_row(&self, row: &sqlx::sqlite::SqliteRow) -> Result<Account, StoreError> {
        let id: String = row.try_get("id")?;
        let password: Option<Vec<u8>> = row.try_get("password_sealed")?;
        let proxy: Option<Vec<u8>> = row.try_get("proxy_sealed")?;
        let proxy = match proxy {
            Some(sealed) => Some(redact_proxy(
                &self
                    .vault
                    .open_string(place("proxy_sealed", &id), &sealed)?,
            )),
            None => None,
        };
        Ok(Account {
            service: row.try_get("service")?,
            url: row.try_get("url")?,
            email: row.try_get("email")?,
            has_password: password.is_some(),
            proxy,
            enabled: row.try_get::<i64, _>("enabled")? != 0,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
            id,
        })
    }

    /// The account's password, opened from the vault.
    pub async fn account_password(&self, id: &str) -> Result<Option<String>, StoreError> {
        let sealed: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT password_sealed FROM accounts WHERE id = ?")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?
                .flatten();
        sealed
            .map(|s| self.vault.open_string(place("password_sealed", id), &s))
            .transpose()
            .map_err(Into::into)
    }

    /// The account's proxy URL, credentials included, for building its HTTP client.
    pub async fn account_proxy(&self, id: &str) -> Result<Option<String>, StoreError> {
        let sealed: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT proxy_sealed FROM accounts WHERE id = ?")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?
                .flatten();
        sealed
            .map(|s| self.vault.open_string(place("proxy_sealed", id), &s))
            .transpose()
            .map_err(Into::into)
    }

    pub async fn update_account(
        &self,
        id_or_service: &str,
        update: AccountUpdate,
    ) -> Result<Account, StoreError> {
        let current = self.account(id_or_service).await?;
        let id = current.id;
        let mut tx = self.pool.begin().await?;
        if let Some(url) = update.url {
            let url = parse_site_url(&url)?;
            sqlx::query("UPDATE accounts SET url = ? WHERE id = ?")
                .bind(url.as_str())
                .bind(&id)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(service) = update.service {
            check_service_name(&service)?;
            sqlx::query("UPDATE accounts SET service = ? WHERE id = ?")
                .bind(service)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(email) = update.email {
            sqlx::query("UPDATE accounts SET email = ? WHERE id = ?")
                .bind(email)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(password) = update.password {
            let sealed = self
                .vault
                .seal_str(place("password_sealed", &id), &password);
            sqlx::query("UPDATE accounts SET password_sealed = ? WHERE id = ?")
                .bind(sealed)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(proxy) = update.proxy {
            let sealed = if proxy.is_empty() {
                None
            } else {
                let proxy = parse_proxy(&proxy)?.to_string();
                Some(self.vault.seal_str(place("proxy_sealed", &id), &proxy))
            };
            sqlx::query("UPDATE accounts SET proxy_sealed = ? WHERE id = ?")
                .bind(sealed)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(enabled) = update.enabled {
            sqlx::query("UPDATE accounts SET enabled = ? WHERE id = ?")
                .bind(enabled)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("UPDATE accounts SET updated_at = ? WHERE id = ?")
            .bind(now())
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.account(&id).await
    }

    /// Removes an account and, with it, its sessions.
    pub async fn remove_account(&self, id_or_service: &str) -> Result<Account, StoreError> {
        let account = self.account(id_or_service).await?;
        sqlx::query("DELETE FROM accounts WHERE id = ?")
            .bind(&account.id)
            .execute(&self.pool)
            .await?;
        Ok(account)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::store;

    #[test]
    fn service_names_from_hosts() {
        let name = |u: &str| service_name_for(&Url::parse(u).unwrap());
        assert_eq!(name("https://chat.deepseek.com/"), "deepseek");
        assert_eq!(name("https://www.example.co/x"), "example");
        assert_eq!(name("https://grok.com"), "grok");
        assert_eq!(name("http://127.0.0.1:8123/"), "127-0-0-1-8123");
        assert_eq!(name("http://localhost:3000/"), "localhost-3000");
    }

    #[tokio::test]
    async fn password_and_proxy_are_sealed_and_hidden() {
        let (_dir, store) = store().await;
        let account = store
            .add_account(NewAccount {
                url: "https://chat.example.com".into(),
                email: Some("me@example.com".into()),
                password: Some("hunter2".into()),
                proxy: Some("http://user:pw@proxy.test:8080".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(account.service, "example");
        assert!(account.has_password);
        let shown = serde_json::to_string(&account).unwrap();
        assert!(
            !shown.contains("hunter2") && !shown.contains("pw@"),
            "{shown}"
        );
        assert_eq!(
            store
                .account_password(&account.id)
                .await
                .unwrap()
                .as_deref(),
            Some("hunter2")
        );
        assert_eq!(
            store.account_proxy(&account.id).await.unwrap().as_deref(),
            Some("http://user:pw@proxy.test:8080/")
        );
    }

    #[tokio::test]
    async fn update_and_remove_by_service_name() {
        let (_dir, store) = store().await;
        store
            .add_account(NewAccount {
                url: "https://chat.example.com".into(),
                service: Some("ex".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        let updated = store
            .update_account(
                "ex",
                AccountUpdate {
                    enabled: Some(false),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert!(!updated.enabled);
        store.remove_account("ex").await.unwrap();
        assert!(matches!(
            store.account("ex").await,
            Err(StoreError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn bad_input_is_rejected_and_nothing_is_stored() {
        let (_dir, store) = store().await;
        for bad in [
            NewAccount {
                url: "not a url".into(),
                ..Default::default()
            },
            NewAccount {
                url: "https://x.com".into(),
                service: Some("has space".into()),
                ..Default::default()
            },
            NewAccount {
                url: "https://x.com".into(),
                password: Some("p".into()),
                ..Default::default()
            },
        ] {
            assert!(matches!(
                store.add_account(bad).await,
                Err(StoreError::Invalid(_))
            ));
        }
        assert!(store.accounts().await.unwrap().is_empty());
    }
}
