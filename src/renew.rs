//! Renewing an account's session: a fresh browser login, harvested and stored sealed.
//!
//! Used by `computetower login`, `POST /admin/accounts/{id}/login` and the gateway when a site
//! rejects a session in the middle of a request.
//!
//! Invariants:
//! - One login per account at a time: callers that arrive while one runs wait for it and get
//!   the session it stored, instead of logging in again.
//! - A failed login stores nothing; in particular nothing is marked authenticated.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::browser::{BrowserPool, LoginError, LoginOutcome, LoginRequest};
use crate::session::SessionData;
use crate::store::accounts::Account;
use crate::store::sessions::Session;
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error("login to account {account} failed: {source}")]
    Login {
        account: String,
        #[source]
        source: LoginError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A stored session with how the login went.
#[derive(Debug)]
pub struct Renewed {
    pub session: Session,
    /// `None` when another caller's login produced the session.
    pub outcome: Option<LoginOutcome>,
}

pub struct Renewer {
    pool: BrowserPool,
    store: Store,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Renewer {
    /// Also makes `pool` keep the stored sessions up to date with what its pages hold after a
    /// probe or a browser-tier page load (see [`keep_harvested`]).
    pub fn new(pool: BrowserPool, store: Store) -> Self {
        let hooked = store.clone();
        pool.set_harvest_hook(Arc::new(move |account_id, harvested| {
            let store = hooked.clone();
            Box::pin(async move { keep_harvested(&store, &account_id, harvested).await })
        }));
        Self {
            pool,
            store,
            locks: Mutex::new(HashMap::new()),
        }
    }

    pub fn pool(&self) -> &BrowserPool {
        &self.pool
    }

    /// Logs `account` in and stores the harvested session. `stale` is the session that just
    /// failed, if any: a usable session other than it, stored while this call waited, is
    /// returned as is.
    pub async fn renew(
        &self,
        account: &Account,
        stale: Option<&str>,
    ) -> Result<Renewed, RenewError> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.entry(account.id.clone()).or_default().clone()
        };
        let _guard = lock.lock().await;
        if let Some(stale) = stale
            && let Some(latest) = self.store.latest_session(&account.id).await?
            && latest.id != stale
            && latest.is_usable(crate::store::now())
        {
            return Ok(Renewed {
                session: latest,
                outcome: None,
            });
        }
        let password = self.store.account_password(&account.id).await?;
        let proxy = self.store.account_proxy(&account.id).await?;
        let request = LoginRequest {
            account_id: account.id.clone(),
            url: account.url.clone(),
            email: account.email.clone(),
            password,
            proxy,
        };
        tracing::info!(account = %account.id, service = %account.service, "logging in with the browser");
        let outcome = self
            .pool
            .login(request)
            .await
            .map_err(|source| RenewError::Login {
                account: account.id.clone(),
                source,
            })?;
        let session = self
            .store
            .save_session(&account.id, &outcome.session, "login", outcome.expires_at)
            .await?;
        tracing::info!(
            account = %account.id,
            elapsed_ms = outcome.elapsed.as_millis() as u64,
            cookies = outcome.session.cookies.len(),
            "logged in; session stored"
        );
        Ok(Renewed {
            session,
            outcome: Some(outcome),
        })
    }
}

/// Merges what an account's page holds now into its latest stored session: a page may write
/// storage after login (a token stored when the chat page loads) that flows refer to. The
/// page's cookies and storage entries win; what only the stored session has is kept.
pub async fn keep_harvested(store: &Store, account_id: &str, harvested: SessionData) {
    let latest = match store.latest_session(account_id).await {
        Ok(Some(latest)) => latest,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(account = %account_id, error = %e, "could not read the session to refresh");
            return;
        }
    };
    let merged = merged(&latest.data, harvested);
    if merged == latest.data {
        return;
    }
    match store.update_session_data(&latest.id, &merged).await {
        Ok(()) => tracing::debug!(account = %account_id, "session refreshed from the page"),
        Err(e) => {
            tracing::warn!(account = %account_id, error = %e, "could not keep the page's session")
        }
    }
}

fn merged(stored: &SessionData, page: SessionData) -> SessionData {
    let mut out = stored.clone();
    for cookie in page.cookies {
        match out
            .cookies
            .iter_mut()
            .find(|c| c.name == cookie.name && c.domain == cookie.domain && c.path == cookie.path)
        {
            Some(same) => *same = cookie,
            None => out.cookies.push(cookie),
        }
    }
    out.local_storage.extend(page.local_storage);
    out.session_storage.extend(page.session_storage);
    if page.user_agent.is_some() {
        out.user_agent = page.user_agent;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Cookie;

    fn cookie(name: &str, value: &str) -> Cookie {
        Cookie {
            name: name.into(),
            value: value.into(),
            domain: "x.test".into(),
            path: "/".into(),
            expires: None,
            secure: false,
            http_only: true,
            host_only: true,
        }
    }

    #[tokio::test]
    async fn what_a_page_wrote_after_login_joins_the_stored_session() {
        let (_dir, store) = crate::store::testing::store().await;
        let account = store
            .add_account(crate::store::accounts::NewAccount {
                url: "https://x.test/".into(),
                service: None,
                email: None,
                password: None,
                proxy: None,
            })
            .await
            .unwrap();
        let login = SessionData {
            cookies: vec![cookie("sid", "s1"), cookie("other", "o1")],
            local_storage: [("a".to_owned(), "1".to_owned())].into(),
            ..SessionData::default()
        };
        store
            .save_session(&account.id, &login, "login", None)
            .await
            .unwrap();
        let page = SessionData {
            cookies: vec![cookie("sid", "s2")],
            local_storage: [("token".to_owned(), r#"{"value":"t"}"#.to_owned())].into(),
            user_agent: Some("UA".into()),
            ..SessionData::default()
        };
        keep_harvested(&store, &account.id, page).await;
        let now = store
            .latest_session(&account.id)
            .await
            .unwrap()
            .unwrap()
            .data;
        assert_eq!(now.local_storage["a"], "1");
        assert_eq!(now.local_storage["token"], r#"{"value":"t"}"#);
        let values: Vec<&str> = now.cookies.iter().map(|c| c.value.as_str()).collect();
        assert_eq!(values, ["s2", "o1"]);
        assert_eq!(now.user_agent.as_deref(), Some("UA"));
    }
}
