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
    pub fn new(pool: BrowserPool, store: Store) -> Self {
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
