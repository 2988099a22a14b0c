//! Renewing an account's session: a fresh browser login, harvested and stored sealed.
//!
//! Used by `computetower login`, `POST /admin/accounts/{id}/login` and the gateway when a site
//! rejects a session in the middle of a request.
//!
//! Invariants:
//! - One login per account at a time, across instances sharing the store: a login runs only
//!   under the account's lease (`lease`). Callers that arrive while one runs, in this process
//!   or another, wait for it and get the session it stored, instead of logging in again.
//! - A failed login stores nothing; in particular nothing is marked authenticated.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::browser::{BrowserPool, LoginError, LoginOutcome, LoginRequest};
use crate::lease::{LeaseError, LeaseGuard, Leases};
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
    /// Another instance holds the account's browser work and produced no session in time.
    #[error(transparent)]
    Busy(LeaseError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<LeaseError> for RenewError {
    fn from(e: LeaseError) -> Self {
        match e {
            LeaseError::Store(e) => RenewError::Store(e),
            held => RenewError::Busy(held),
        }
    }
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
    leases: Arc<Leases>,
    /// Longest wait for another instance's login (or other browser work) on an account.
    wait: Duration,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Renewer {
    /// Also makes `pool` keep the stored sessions up to date with what its pages hold after a
    /// probe or a browser-tier page load (see [`keep_harvested`]). `wait` bounds how long a
    /// login waits for another instance's browser work on the same account.
    pub fn new(pool: BrowserPool, store: Store, leases: Arc<Leases>, wait: Duration) -> Self {
        let hooked = store.clone();
        pool.set_harvest_hook(Arc::new(move |account_id, harvested| {
            let store = hooked.clone();
            Box::pin(async move { keep_harvested(&store, &account_id, harvested).await })
        }));
        Self {
            pool,
            store,
            leases,
            wait,
            locks: Mutex::new(HashMap::new()),
        }
    }

    pub fn pool(&self) -> &BrowserPool {
        &self.pool
    }

    pub fn leases(&self) -> &Arc<Leases> {
        &self.leases
    }

    /// The account's lease, for browser work (a learn, a browser tier), waiting up to `within`
    /// for another instance to finish with it.
    pub async fn hold(&self, account_id: &str, within: Duration) -> Result<LeaseGuard, LeaseError> {
        self.leases.take(account_id, within).await
    }

    /// A usable session for `account`: the stored one, or a fresh login's. `stale` is the
    /// session that just failed, if any: then a usable session other than it, stored while
    /// this call waited, is returned as is. While another instance holds the account's lease,
    /// this waits for the session its login stores instead of logging in too.
    pub async fn renew(
        &self,
        account: &Account,
        stale: Option<&Session>,
    ) -> Result<Renewed, RenewError> {
        let want = match stale {
            Some(stale) => Want::Replacing(stale),
            None => Want::Usable,
        };
        self.run(account, want).await
    }

    /// Logs `account` in now, even when it has a usable session (`login`, the admin page);
    /// a login another instance finishes meanwhile counts as this one.
    pub async fn login(&self, account: &Account) -> Result<Renewed, RenewError> {
        self.run(account, Want::Fresh).await
    }

    async fn run(&self, account: &Account, want: Want<'_>) -> Result<Renewed, RenewError> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.entry(account.id.clone()).or_default().clone()
        };
        let _guard = lock.lock().await;
        let baseline = self.store.latest_session(&account.id).await?;
        // The session a login (here or elsewhere) must differ from; `None`: any usable one.
        let before = match want {
            Want::Usable => None,
            Want::Replacing(stale) => Some(stale.clone()),
            Want::Fresh => baseline.clone(),
        };
        if !matches!(want, Want::Fresh)
            && let Some(latest) = baseline
            && newer(&latest, before.as_ref())
        {
            return Ok(Renewed {
                session: latest,
                outcome: None,
            });
        }
        let _lease = match self.lease_or_session(account, before.as_ref()).await? {
            Turn::Lease(lease) => lease,
            Turn::Session(session) => {
                return Ok(Renewed {
                    session,
                    outcome: None,
                });
            }
        };
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

impl Renewer {
    /// The account's lease, or the session another instance's login stored while this one
    /// waited for it (newer than `before`).
    async fn lease_or_session(
        &self,
        account: &Account,
        before: Option<&Session>,
    ) -> Result<Turn, RenewError> {
        let deadline = tokio::time::Instant::now() + self.wait;
        let mut logged = false;
        loop {
            if let Some(lease) = self.leases.try_take(&account.id).await? {
                // A login elsewhere may have finished just before the lease came free.
                return Ok(match self.fresher(account, before).await? {
                    Some(session) => Turn::Session(session),
                    None => Turn::Lease(lease),
                });
            }
            if !logged {
                tracing::info!(account = %account.id, "another instance holds this account's browser work; waiting for its session instead of logging in");
                logged = true;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(self.leases.held_error(&account.id, self.wait).await.into());
            }
            tokio::time::sleep(self.leases.settings().poll).await;
            if let Some(session) = self.fresher(account, before).await? {
                return Ok(Turn::Session(session));
            }
        }
    }

    /// The account's stored session when it is usable and newer than `before`.
    async fn fresher(
        &self,
        account: &Account,
        before: Option<&Session>,
    ) -> Result<Option<Session>, StoreError> {
        Ok(self
            .store
            .latest_session(&account.id)
            .await?
            .filter(|latest| newer(latest, before)))
    }
}

/// This instance's turn to log in, or the session another instance's login stored.
enum Turn {
    Lease(LeaseGuard),
    Session(Session),
}

/// What a caller of [`Renewer::run`] needs.
enum Want<'a> {
    /// A usable session; a login only when there is none.
    Usable,
    /// A usable session other than this one, which the site just rejected.
    Replacing(&'a Session),
    /// A new login, whatever the store holds.
    Fresh,
}

/// Whether `latest` is usable and another session than `before`, or `before` with its
/// material replaced since.
fn newer(latest: &Session, before: Option<&Session>) -> bool {
    latest.is_usable(crate::store::now())
        && before.is_none_or(|b| b.id != latest.id || latest.version > b.version)
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

    fn fast_leases() -> crate::lease::LeaseSettings {
        crate::lease::LeaseSettings {
            poll: std::time::Duration::from_millis(1),
            ..Default::default()
        }
    }

    /// A renewer of another instance on `store`, whose browser is never started: its
    /// account's URL is unreachable, so a login of its own would fail.
    fn other_instance(store: &Store, dir: &std::path::Path, wait: Duration) -> Renewer {
        let config = crate::config::Config {
            data_dir: dir.to_owned(),
            ..Default::default()
        };
        let leases = Leases::start(store.clone(), fast_leases(), crate::lease::system_clock());
        Renewer::new(
            BrowserPool::new(crate::server::browser_config(&config)),
            store.clone(),
            leases,
            wait,
        )
    }

    async fn account(store: &Store) -> Account {
        store
            .add_account(crate::store::accounts::NewAccount {
                url: "http://127.0.0.1:9/".into(),
                service: None,
                email: Some("me@x.test".into()),
                password: Some("pw".into()),
                proxy: None,
            })
            .await
            .unwrap()
    }

    /// While another instance holds the account's lease (it is logging in), a renewal here
    /// waits for the session that login stores and returns it, without a login of its own;
    /// so does one replacing a rejected session.
    #[tokio::test]
    async fn a_login_by_another_instance_is_waited_for_not_repeated() {
        let (dir, store) = crate::store::testing::store().await;
        let account = account(&store).await;
        let holder = Leases::start(store.clone(), fast_leases(), crate::lease::system_clock());
        let here = Arc::new(other_instance(&store, dir.path(), Duration::from_secs(60)));
        for stale in [None, Some(true)] {
            let rejected = match stale {
                Some(_) => {
                    let old = store
                        .save_session(&account.id, &SessionData::default(), "login", None)
                        .await
                        .unwrap();
                    store.mark_session_rejected(&old.id).await.unwrap();
                    Some(old)
                }
                None => None,
            };
            let logging_in = holder.try_take(&account.id).await.unwrap().unwrap();
            let waiting = tokio::spawn({
                let (here, account) = (here.clone(), account.clone());
                async move { here.renew(&account, rejected.as_ref()).await }
            });
            let stored = store
                .save_session(&account.id, &SessionData::default(), "login", None)
                .await
                .unwrap();
            drop(logging_in);
            let renewed = waiting.await.unwrap().unwrap();
            assert_eq!(renewed.session.id, stored.id);
            assert!(renewed.outcome.is_none(), "no login of its own");
        }
    }

    /// A holder that produces no session in time makes the renewal fail naming it, rather
    /// than log in beside it.
    #[tokio::test]
    async fn a_renewal_gives_up_on_a_holder_that_produces_nothing() {
        let (dir, store) = crate::store::testing::store().await;
        let account = account(&store).await;
        let holder = Leases::start(store.clone(), fast_leases(), crate::lease::system_clock());
        let _busy = holder.try_take(&account.id).await.unwrap().unwrap();
        let here = other_instance(&store, dir.path(), Duration::from_millis(30));
        let err = here.renew(&account, None).await.unwrap_err();
        assert!(matches!(err, RenewError::Busy(_)), "{err}");
        assert!(err.to_string().contains(holder.instance()), "{err}");
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
