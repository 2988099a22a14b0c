//! The gateway's phases carried out over a real demo site (real sockets) and a real SQLite
//! store, in process and without Chromium (no renewer, no learner): admission, cooldowns,
//! hand-over between accounts and the errors a client gets, decided by `fallback` and
//! observed through what the store recorded and what the site saw.

use super::*;
use crate::demo::{self, DemoConfig, Shape};
use crate::replay::Timeouts;
use crate::store::accounts::NewAccount;
use crate::store::testing;

const PASSWORD: &str = "demo-password";
const SERVICE: &str = "demo-openai";

struct Fixture {
    _dir: tempfile::TempDir,
    site: String,
    gateway: Gateway,
    /// Account ids by email.
    ids: BTreeMap<String, String>,
}

async fn demo_site() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = DemoConfig {
        shape: Shape::Openai,
        ..DemoConfig::default()
    };
    tokio::spawn(demo::serve(listener, config));
    format!("http://{addr}")
}

/// The site's cookies and token after a login, as a Playwright storage-state file.
async fn storage_state(site: &str, email: &str) -> String {
    let login = demo::json_login(site, email, PASSWORD).await.unwrap();
    let host = Url::parse(site).unwrap().host_str().unwrap().to_owned();
    serde_json::json!({
        "cookies": login.cookies.iter().map(|(name, value)| serde_json::json!({
            "name": name, "value": value, "domain": host, "path": "/", "expires": -1,
            "httpOnly": true, "secure": false, "sameSite": "Lax"
        })).collect::<Vec<_>>(),
        "origins": [{
            "origin": site,
            "localStorage": login.local_storage.iter()
                .map(|(k, v)| serde_json::json!({"name": k, "value": v}))
                .collect::<Vec<_>>(),
        }],
    })
    .to_string()
}

/// A gateway over the demo site with one logged-in account per email, in that order.
async fn fixture(emails: &[&str]) -> Fixture {
    crate::server::install_tls_provider();
    let site = demo_site().await;
    let (dir, store) = testing::store().await;
    let mut ids = BTreeMap::new();
    for email in emails {
        let account = store
            .add_account(NewAccount {
                url: site.clone(),
                service: Some(SERVICE.into()),
                email: Some((*email).into()),
                password: Some(PASSWORD.into()),
                proxy: None,
            })
            .await
            .unwrap();
        store
            .import_session(&account, &storage_state(&site, email).await)
            .await
            .unwrap();
        ids.insert((*email).to_owned(), account.id);
    }
    let flow: Flow = serde_json::from_str(Shape::Openai.flow_file()).unwrap();
    store.import_flow(flow, &[]).await.unwrap();
    let (events, _task) = EventWriter::start(store.clone());
    let replayer = Replayer::new(Timeouts {
        connect: Duration::from_secs(5),
        first_byte: Duration::from_secs(30),
        idle: Duration::from_secs(30),
    });
    let limits = Limits {
        per_account: 2,
        queue: 4,
        cooldown: Duration::from_secs(60),
    };
    let gateway = Gateway::new(store, replayer, events, None, None, limits);
    Fixture {
        _dir: dir,
        site,
        gateway,
        ids,
    }
}

impl Fixture {
    async fn control(&self, path: &str) {
        let response = reqwest::Client::new()
            .post(format!("{}{path}", self.site))
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
    }

    /// The email of the account the gateway would try first now.
    fn first_in_order(&self) -> String {
        let emails: Vec<&String> = self.ids.keys().collect();
        let ids: Vec<&str> = emails.iter().map(|e| self.ids[*e].as_str()).collect();
        emails[self.gateway.accounts.order(&ids)[0]].clone()
    }

    fn email_of(&self, account_id: &str) -> String {
        self.ids
            .iter()
            .find(|(_, id)| *id == account_id)
            .map(|(email, _)| email.clone())
            .unwrap()
    }

    async fn decisions(&self, request_id: &str) -> Vec<(String, String, String)> {
        self.gateway.events().flush().await;
        let mut decisions: Vec<_> = self
            .gateway
            .store()
            .recent_decisions(100)
            .await
            .unwrap()
            .into_iter()
            .filter(|d| d.request_id == request_id)
            .map(|d| {
                let email = self.email_of(d.account_id.as_deref().unwrap_or_default());
                (email, d.failure, d.action)
            })
            .collect();
        decisions.reverse();
        decisions
    }

    fn cooling(&self, email: &str) -> Option<u64> {
        self.gateway
            .account_loads()
            .into_iter()
            .find(|load| load.account_id == self.ids[email])
            .and_then(|load| load.cooling_down_secs)
    }
}

fn prompt(text: &str) -> Prompt {
    Prompt {
        messages: vec![(Role::User, text.to_owned())],
        model: SERVICE.into(),
        attachments: Vec::new(),
    }
}

async fn text_of(mut reply: Reply) -> String {
    let mut text = String::new();
    while let Some(delta) = reply.next().await {
        if let Delta::Text(piece) = delta.unwrap() {
            text.push_str(&piece);
        }
    }
    text
}

#[tokio::test]
async fn a_rate_limited_account_hands_the_request_over_and_cools_down_for_the_sites_seconds() {
    let fx = fixture(&["ann@example.com", "bob@example.com"]).await;
    let first = fx.first_in_order();
    let other = fx.ids.keys().find(|e| **e != first).unwrap().clone();
    fx.control(&format!("/__demo/rate-limit?email={first}&seconds=40"))
        .await;

    let reply = fx.gateway.chat(&prompt("hi"), "r1", Some(1)).await.unwrap();
    assert_eq!(fx.email_of(reply.account_id().unwrap()), other);
    assert_eq!(reply.tier(), 1);
    assert_eq!(
        text_of(reply).await,
        demo::reply_for(Shape::Openai, "hi").content
    );
    assert_eq!(
        fx.decisions("r1").await,
        [(first.clone(), "rate_limit".into(), "next_account".into())]
    );
    // The site's 40 s Retry-After, not the configured 60 s.
    let left = fx.cooling(&first).unwrap();
    assert!((1..=40).contains(&left), "{left}");
    assert_eq!(fx.cooling(&other), None);

    // Cooling down, the account now comes last and the next request goes straight through.
    assert_eq!(fx.first_in_order(), other);
    let reply = fx.gateway.chat(&prompt("hi"), "r2", Some(1)).await.unwrap();
    assert_eq!(fx.email_of(reply.account_id().unwrap()), other);
    drop(text_of(reply).await);
    assert!(fx.decisions("r2").await.is_empty());
}

#[tokio::test]
async fn every_account_rate_limited_is_a_rate_limit_error_with_the_soonest_retry_after() {
    let fx = fixture(&["ann@example.com", "bob@example.com"]).await;
    fx.control("/__demo/rate-limit?email=ann@example.com&seconds=50")
        .await;
    fx.control("/__demo/rate-limit?email=bob@example.com&seconds=20")
        .await;

    let Err(error) = fx.gateway.chat(&prompt("hi"), "r1", Some(1)).await else {
        panic!("served while every account is held at 429");
    };
    let GatewayError::RateLimited { retry_after, .. } = &error else {
        panic!("{error:?}");
    };
    assert!(matches!(retry_after, Some(1..=20)), "{retry_after:?}");
    let actions: Vec<String> = fx
        .decisions("r1")
        .await
        .into_iter()
        .map(|(_, _, action)| action)
        .collect();
    assert_eq!(actions, ["next_account", "next_account"]);

    // Both cool down: the next request is refused by the pool, the site is not asked.
    fx.control("/__demo/reset-stats").await;
    let Err(GatewayError::RateLimited { retry_after, .. }) =
        fx.gateway.chat(&prompt("hi"), "r2", Some(1)).await
    else {
        panic!("a cooling-down account was tried");
    };
    assert!(matches!(retry_after, Some(1..=20)), "{retry_after:?}");
    let stats: serde_json::Value = reqwest::get(format!("{}/__demo/stats", fx.site))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["completed"], 0, "{stats}");
    assert_eq!(stats["pages"], 0, "{stats}");
}

#[tokio::test]
async fn a_revoked_session_without_a_renewer_passes_to_the_next_account_and_says_how_to_fix_it() {
    let fx = fixture(&["ann@example.com", "bob@example.com"]).await;
    let first = fx.first_in_order();
    let other = fx.ids.keys().find(|e| **e != first).unwrap().clone();
    fx.control(&format!("/__demo/revoke?email={first}")).await;

    let reply = fx.gateway.chat(&prompt("hi"), "r1", Some(1)).await.unwrap();
    assert_eq!(fx.email_of(reply.account_id().unwrap()), other);
    drop(text_of(reply).await);
    let decisions = fx.decisions("r1").await;
    assert_eq!(decisions[0].0, first);
    assert_eq!(decisions[0].1, "auth");

    // With the other revoked too, nothing can serve: the error names each account and the fix.
    fx.control(&format!("/__demo/revoke?email={other}")).await;
    fx.gateway.invalidate();
    let Err(error) = fx.gateway.chat(&prompt("hi"), "r2", Some(1)).await else {
        panic!("served on revoked sessions");
    };
    let message = error.to_string();
    assert!(
        matches!(error, GatewayError::NoUsableAccount { .. }),
        "{message}"
    );
    assert!(message.contains("computetower login"), "{message}");
}

#[tokio::test]
async fn unknown_models_and_missing_flows_are_errors_that_say_what_exists() {
    let fx = fixture(&["ann@example.com"]).await;
    let mut unknown = prompt("hi");
    unknown.model = "nope".into();
    let error = fx.gateway.chat(&unknown, "r1", None).await.err().unwrap();
    assert!(
        matches!(error, GatewayError::UnknownModel { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains(SERVICE), "{error}");

    let store = fx.gateway.store();
    let account = store.account(&fx.ids["ann@example.com"]).await.unwrap();
    store
        .add_account(NewAccount {
            url: account.url.clone(),
            service: Some("no-flow".into()),
            email: None,
            password: None,
            proxy: None,
        })
        .await
        .unwrap();
    let mut no_flow = prompt("hi");
    no_flow.model = "no-flow".into();
    let error = fx.gateway.chat(&no_flow, "r2", None).await.err().unwrap();
    assert!(matches!(error, GatewayError::NoFlow(_)), "{error:?}");
}

/// Another instance's gateway on the fixture's store, sharing what it sees with the others
/// (polled every 10 ms).
fn instance(fx: &Fixture, id: &str) -> Gateway {
    let store = fx.gateway.store().clone();
    let (events, _task) = EventWriter::start(store.clone());
    let replayer = Replayer::new(Timeouts {
        connect: Duration::from_secs(5),
        first_byte: Duration::from_secs(30),
        idle: Duration::from_secs(30),
    });
    let limits = Limits {
        per_account: 2,
        queue: 4,
        cooldown: Duration::from_secs(60),
    };
    let shared = Shared::new(
        store.clone(),
        id.to_owned(),
        crate::lease::system_clock(),
        Duration::from_millis(10),
    );
    let slots = crate::slots::Slots::start(
        store.clone(),
        id.to_owned(),
        crate::lease::LeaseSettings::default(),
        crate::lease::system_clock(),
    );
    Gateway::new(store, replayer, events, None, None, limits)
        .with_shared(shared)
        .with_shared_slots(slots)
}

/// Two instances on one store keep an account to its limit between them: the site never
/// has more of its replies running at once than one instance alone would allow.
#[tokio::test]
async fn an_accounts_limit_holds_across_instances() {
    let fx = fixture(&["ann@example.com"]).await;
    let gateways = [instance(&fx, "i_a"), instance(&fx, "i_b")];
    let replies = (0..4).map(|i| {
        let gateway = &gateways[i % 2];
        async move {
            let asked = format!("question {i}");
            let reply = gateway
                .chat(&prompt(&asked), &format!("r{i}"), Some(1))
                .await
                .unwrap();
            (asked, text_of(reply).await)
        }
    });
    for (asked, text) in futures_util::future::join_all(replies).await {
        assert_eq!(text, demo::reply_for(Shape::Openai, &asked).content);
    }
    let stats: serde_json::Value = reqwest::get(format!("{}/__demo/stats", fx.site))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["completed"], 4, "{stats}");
    // The fixture's limit is 2 per account: without the store's slots, each instance
    // would run 2 of its own.
    assert_eq!(
        stats["max_active_by_email"]["ann@example.com"], 2,
        "{stats}"
    );
}

/// Waits until `check` holds, looking again after each round in which `gateway` read the
/// other instances' changes (panics after 10 s).
async fn until(gateway: &Gateway, what: &str, mut check: impl FnMut() -> bool) {
    let mut polled = gateway.shared().expect("an instance that shares").polled();
    let held = tokio::time::timeout(Duration::from_secs(10), async {
        while !check() {
            let _ = polled.changed().await;
        }
    })
    .await;
    assert!(held.is_ok(), "timed out waiting for {what}");
}

/// A 429 seen through one instance keeps the others off that account too: once the site
/// lets it through again, an instance that had not heard would use it first, and the one
/// that heard goes to the next account.
#[tokio::test]
async fn a_rate_limit_seen_by_one_instance_moves_the_others_to_the_next_account() {
    let fx = fixture(&["ann@example.com", "bob@example.com"]).await;
    let (a, b) = (instance(&fx, "i_a"), instance(&fx, "i_b"));
    let first = fx.first_in_order();
    let other = fx.ids.keys().find(|e| **e != first).unwrap().clone();
    fx.control(&format!("/__demo/rate-limit?email={first}&seconds=40"))
        .await;
    let reply = a.chat(&prompt("hi"), "r1", Some(1)).await.unwrap();
    assert_eq!(fx.email_of(reply.account_id().unwrap()), other);
    drop(text_of(reply).await);

    let cooling_on_b = || {
        b.account_loads()
            .iter()
            .find(|l| l.account_id == fx.ids[&first])
            .and_then(|l| l.cooling_down_secs)
    };
    until(&b, "instance B to hear of the cooldown", || {
        cooling_on_b().is_some()
    })
    .await;
    assert!((1..=40).contains(&cooling_on_b().unwrap()));
    fx.control(&format!("/__demo/rate-limit?email={first}&seconds=0"))
        .await;
    let reply = b.chat(&prompt("hi"), "r2", Some(1)).await.unwrap();
    assert_eq!(fx.email_of(reply.account_id().unwrap()), other);
    drop(text_of(reply).await);
    // The fixture's own gateway shares nothing: it still starts with the account.
    let reply = fx.gateway.chat(&prompt("hi"), "r3", Some(1)).await.unwrap();
    assert_eq!(fx.email_of(reply.account_id().unwrap()), first);
    drop(text_of(reply).await);
}

/// A tier floor raised by one instance is respected by the others, and so is its lifting.
#[tokio::test]
async fn tier_floors_raised_and_lifted_on_one_instance_hold_on_the_others() {
    let fx = fixture(&["ann@example.com"]).await;
    let b = instance(&fx, "i_b");
    let a = Shared::new(
        fx.gateway.store().clone(),
        "i_a".into(),
        crate::lease::system_clock(),
        Duration::from_millis(10),
    );
    let flow = fx
        .gateway
        .store()
        .active_flow(SERVICE)
        .await
        .unwrap()
        .unwrap();
    a.publish(Change::FloorRaised {
        flow: flow.id.clone(),
        tier: 3,
    });
    until(&b, "the floor on B", || b.tier_floor(&flow.id).is_some()).await;
    assert_eq!(b.tier_floor(&flow.id).unwrap().tier, 3);
    assert_eq!(b.start_tier(&flow), (3, false));
    a.publish(Change::FloorLifted {
        flow: flow.id.clone(),
    });
    until(&b, "the floor lifted on B", || {
        b.tier_floor(&flow.id).is_none()
    })
    .await;
    assert_eq!(b.start_tier(&flow), (1, false));
}

/// A conversation whose turns land on different instances continues one site conversation:
/// each instance finds what the other remembered in the store.
#[tokio::test]
async fn a_conversation_continues_when_its_turns_alternate_between_instances() {
    let fx = fixture(&["ann@example.com"]).await;
    let gateways = [instance(&fx, "i_a"), instance(&fx, "i_b")];
    let mut messages: Vec<(Role, String)> = Vec::new();
    for turn in 1..=3u32 {
        let asked = format!("turn {turn} of one conversation");
        messages.push((Role::User, asked.clone()));
        let gateway = &gateways[(turn as usize - 1) % 2];
        let conversation = Prompt {
            messages: messages.clone(),
            model: SERVICE.into(),
            attachments: Vec::new(),
        };
        let reply = gateway
            .chat(&conversation, &format!("t{turn}"), Some(1))
            .await
            .unwrap();
        let text = text_of(reply).await;
        assert_eq!(
            text,
            demo::reply_for_turn(Shape::Openai, &asked, turn).content,
            "turn {turn}"
        );
        messages.push((Role::Assistant, text));
    }
    let conversations: serde_json::Value =
        reqwest::get(format!("{}/__demo/conversations", fx.site))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    let conversations = conversations.as_array().unwrap();
    assert_eq!(conversations.len(), 1, "{conversations:?}");
    assert_eq!(conversations[0]["turns"], 3, "{conversations:?}");
}
