//! Accounts: a site URL, the service name clients ask for, and sealed credentials.

use serde::Serialize;
use url::Url;

use super::{Op, Store, StoreError, new_id, now, on_pool};
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

/// An `accounts` row as stored.
#[derive(sqlx::FromRow)]
struct AccountRow {
    id: String,
    service: String,
    url: String,
    email: Option<String>,
    password_sealed: Option<Vec<u8>>,
    proxy_sealed: Option<Vec<u8>>,
    enabled: bool,
    created_at: i64,
    updated_at: i64,
}

const SELECT_ACCOUNT: &str = "SELECT id, service, url, email, password_sealed, proxy_sealed, \
     enabled, created_at, updated_at FROM accounts";

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
        on_pool!(self, Op::Write, |pool| {
            sqlx::query(
                "INSERT INTO accounts (id, service, url, email, password_sealed, proxy_sealed, enabled, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, TRUE, $7, $8)",
            )
            .bind(&id)
            .bind(&service)
            .bind(url.as_str())
            .bind(&new.email)
            .bind(&password)
            .bind(&proxy)
            .bind(now)
            .bind(now)
            .execute(pool)
            .await?;
            Ok(())
        })
        .await?;
        self.account(&id).await
    }

    pub async fn accounts(&self) -> Result<Vec<Account>, StoreError> {
        let rows: Vec<AccountRow> = on_pool!(self, Op::Read, |pool| {
            Ok(
                sqlx::query_as(&format!("{SELECT_ACCOUNT} ORDER BY service, created_at"))
                    .fetch_all(pool)
                    .await?,
            )
        })
        .await?;
        rows.into_iter()
            .map(|row| self.account_from_row(row))
            .collect()
    }

    pub async fn accounts_for_service(&self, service: &str) -> Result<Vec<Account>, StoreError> {
        let rows: Vec<AccountRow> = on_pool!(self, Op::Read, |pool| {
            Ok(sqlx::query_as(&format!(
                "{SELECT_ACCOUNT} WHERE service = $1 ORDER BY created_at"
            ))
            .bind(service)
            .fetch_all(pool)
            .await?)
        })
        .await?;
        rows.into_iter()
            .map(|row| self.account_from_row(row))
            .collect()
    }

    /// Finds an account by id, or by service name when exactly one account has it.
    pub async fn account(&self, id_or_service: &str) -> Result<Account, StoreError> {
        let row: Option<AccountRow> = on_pool!(self, Op::Read, |pool| {
            Ok(sqlx::query_as(&format!("{SELECT_ACCOUNT} WHERE id = $1"))
                .bind(id_or_service)
                .fetch_optional(pool)
                .await?)
        })
        .await?;
        if let Some(row) = row {
            return self.account_from_row(row);
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

    fn account_from_row(&self, row: AccountRow) -> Result<Account, StoreError> {
        let proxy = match row.proxy_sealed {
            Some(sealed) => Some(redact_proxy(
                &self
                    .vault
                    .open_string(place("proxy_sealed", &row.id), &sealed)?,
            )),
            None => None,
        };
        Ok(Account {
            service: row.service,
            url: row.url,
            email: row.email,
            has_password: row.password_sealed.is_some(),
            proxy,
            enabled: row.enabled,
            created_at: row.created_at,
            updated_at: row.updated_at,
            id: row.id,
        })
    }

    /// The account's password, opened from the vault.
    pub async fn account_password(&self, id: &str) -> Result<Option<String>, StoreError> {
        self.account_secret(id, "password_sealed").await
    }

    /// The account's proxy URL, credentials included, for building its HTTP client.
    pub async fn account_proxy(&self, id: &str) -> Result<Option<String>, StoreError> {
        self.account_secret(id, "proxy_sealed").await
    }

    /// A sealed column of the account, opened.
    async fn account_secret(
        &self,
        id: &str,
        column: &'static str,
    ) -> Result<Option<String>, StoreError> {
        let sql = format!("SELECT {column} FROM accounts WHERE id = $1");
        let sealed: Option<Vec<u8>> = on_pool!(self, Op::Read, |pool| {
            Ok(sqlx::query_scalar(&sql)
                .bind(id)
                .fetch_optional(pool)
                .await?
                .flatten())
        })
        .await?;
        sealed
            .map(|s| self.vault.open_string(place(column, id), &s))
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
        // Checked and sealed before the transaction: it only writes.
        let url = update
            .url
            .map(|url| parse_site_url(&url).map(|u| u.to_string()))
            .transpose()?;
        if let Some(service) = &update.service {
            check_service_name(service)?;
        }
        let password = update
            .password
            .map(|p| self.vault.seal_str(place("password_sealed", &id), &p));
        // `Some(None)` removes the proxy.
        let proxy = match update.proxy {
            None => None,
            Some(p) if p.is_empty() => Some(None),
            Some(p) => {
                let proxy = parse_proxy(&p)?.to_string();
                Some(Some(
                    self.vault.seal_str(place("proxy_sealed", &id), &proxy),
                ))
            }
        };
        on_pool!(self, Op::Write, |pool| {
            let mut tx = pool.begin().await?;
            if let Some(url) = &url {
                sqlx::query("UPDATE accounts SET url = $1 WHERE id = $2")
                    .bind(url)
                    .bind(&id)
                    .execute(&mut *tx)
                    .await?;
            }
            if let Some(service) = &update.service {
                sqlx::query("UPDATE accounts SET service = $1 WHERE id = $2")
                    .bind(service)
                    .bind(&id)
                    .execute(&mut *tx)
                    .await?;
            }
            if let Some(email) = &update.email {
                sqlx::query("UPDATE accounts SET email = $1 WHERE id = $2")
                    .bind(email)
                    .bind(&id)
                    .execute(&mut *tx)
                    .await?;
            }
            if let Some(sealed) = &password {
                sqlx::query("UPDATE accounts SET password_sealed = $1 WHERE id = $2")
                    .bind(sealed)
                    .bind(&id)
                    .execute(&mut *tx)
                    .await?;
            }
            if let Some(sealed) = &proxy {
                sqlx::query("UPDATE accounts SET proxy_sealed = $1 WHERE id = $2")
                    .bind(sealed)
                    .bind(&id)
                    .execute(&mut *tx)
                    .await?;
            }
            if let Some(enabled) = update.enabled {
                sqlx::query("UPDATE accounts SET enabled = $1 WHERE id = $2")
                    .bind(enabled)
                    .bind(&id)
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query("UPDATE accounts SET updated_at = $1 WHERE id = $2")
                .bind(now())
                .bind(&id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        })
        .await?;
        self.account(&id).await
    }

    /// Removes an account and, with it, its sessions.
    pub async fn remove_account(&self, id_or_service: &str) -> Result<Account, StoreError> {
        let account = self.account(id_or_service).await?;
        on_pool!(self, Op::Write, |pool| {
            sqlx::query("DELETE FROM accounts WHERE id = $1")
                .bind(&account.id)
                .execute(pool)
                .await?;
            Ok(())
        })
        .await?;
        Ok(account)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::on_both_engines;

    #[test]
    fn service_names_from_hosts() {
        let name = |u: &str| service_name_for(&Url::parse(u).unwrap());
        assert_eq!(name("https://chat.deepseek.com/"), "deepseek");
        assert_eq!(name("https://www.example.co/x"), "example");
        assert_eq!(name("https://grok.com"), "grok");
        assert_eq!(name("http://127.0.0.1:8123/"), "127-0-0-1-8123");
        assert_eq!(name("http://localhost:3000/"), "localhost-3000");
    }

    on_both_engines! {
        async fn password_and_proxy_are_sealed_and_hidden(_db, store) {
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
            for stored in store
                .raw_bytes("SELECT password_sealed FROM accounts")
                .await
                .into_iter()
                .chain(store.raw_bytes("SELECT proxy_sealed FROM accounts").await)
            {
                assert!(!stored.windows(7).any(|w| w == b"hunter2" || w == b"user:pw"));
            }
        }

        async fn update_and_remove_by_service_name(_db, store) {
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
                        url: Some("https://chat2.example.com/x".into()),
                        email: Some("new@example.com".into()),
                        password: Some("new-password".into()),
                        proxy: Some("socks5://proxy.test:1080".into()),
                        enabled: Some(false),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            assert!(!updated.enabled);
            assert_eq!(updated.url, "https://chat2.example.com/x");
            assert_eq!(updated.email.as_deref(), Some("new@example.com"));
            assert!(updated.has_password && updated.proxy.is_some());
            let id = updated.id.clone();
            assert_eq!(
                store.account_password(&id).await.unwrap().as_deref(),
                Some("new-password")
            );
            let renamed = store
                .update_account(
                    "ex",
                    AccountUpdate {
                        service: Some("ex2".into()),
                        proxy: Some(String::new()),
                        enabled: Some(true),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            assert_eq!(renamed.service, "ex2");
            assert!(renamed.enabled && renamed.proxy.is_none());
            assert!(store.account_proxy(&id).await.unwrap().is_none());
            let bad = AccountUpdate {
                service: Some("no spaces".into()),
                email: Some("unchanged@example.com".into()),
                ..Default::default()
            };
            assert!(matches!(
                store.update_account(&id, bad).await,
                Err(StoreError::Invalid(_))
            ));
            assert_eq!(
                store.account(&id).await.unwrap().email.as_deref(),
                Some("new@example.com"),
                "a refused update changes nothing"
            );
            store
                .save_session(&id, &Default::default(), "imported", None)
                .await
                .unwrap();
            store.remove_account("ex2").await.unwrap();
            assert!(store.sessions().await.unwrap().is_empty(), "its sessions go with it");
            assert!(matches!(
                store.account("ex2").await,
                Err(StoreError::NotFound(_))
            ));
        }

        async fn bad_input_is_rejected_and_nothing_is_stored(_db, store) {
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
}
