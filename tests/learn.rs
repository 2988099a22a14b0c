//! Learning with real Chromium: for every demo-site shape, `computetower learn` from URL and
//! credentials alone; then the official SDK gets the exact reply through tier 1, content and
//! reasoning apart, streamed and not, the learned flow matches the hand-written one in
//! `flows/` (its follow-up included), and a 3-turn SDK conversation continues one site
//! conversation. The signed shape, and any shape whose page signs its calls, is learned as
//! needing the browser and served from tier 3 with its reasoning separated. A failed learn
//! leaves a redacted recording. And no site's names appear in the learner, the replay engine,
//! the browser layer or the gateway.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Data, demo_site, get_json, sdk};
use computetower::demo::{Shape, reply_for, reply_for_turn};
use computetower::flow::Flow;
use serde_json::json;

/// Adds an account from URL + email + password only, and learns it with the CLI.
fn learn(data: &Data, site: &str, name: &str) -> String {
    data.learn_account(site, name, "learn@example.com")
}

fn stored_flow(data: &Data, name: &str) -> Flow {
    serde_json::from_str(&data.ok(&["flows", "show", name], None)).unwrap()
}

/// The parts of a flow that must match: slots, preflights, templates' references, decoder.
/// Preflight value names are the learner's choice, so they are replaced by their order.
fn essentials(flow: &Flow) -> serde_json::Value {
    let mut names: Vec<String> = flow
        .preflight
        .iter()
        .flat_map(|s| s.extract.keys().cloned())
        .collect();
    // A follow-up's own preflights are named apart: `f` and their order.
    let follow_names: Vec<String> = flow
        .follow_up
        .iter()
        .flat_map(|f| f.preflight.iter())
        .flat_map(|s| s.extract.keys().cloned())
        .collect();
    let canonical: BTreeMap<String, String> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), format!("p{i}")))
        .collect();
    // Longest first, so that `id` does not clobber part of `conversation_id`.
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    let follow_canonical: BTreeMap<String, String> = follow_names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), format!("f{i}")))
        .collect();
    let rename = |text: &str, own: &BTreeMap<String, String>| {
        let re = regex::Regex::new(r"(preflight|conversation)\.([A-Za-z0-9_]+)").unwrap();
        re.replace_all(text, |c: &regex::Captures<'_>| {
            let table = if &c[1] == "preflight" {
                own
            } else {
                &canonical
            };
            format!(
                "{}.{}",
                &c[1],
                table.get(&c[2]).cloned().unwrap_or_else(|| c[2].to_owned())
            )
        })
        .into_owned()
    };
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    let mut value = essentials_named(flow);
    let follow_up = value["follow_up"].take();
    let mut value: serde_json::Value =
        serde_json::from_str(&rename(&value.to_string(), &canonical)).unwrap();
    let mut follow_up: serde_json::Value =
        serde_json::from_str(&rename(&follow_up.to_string(), &follow_canonical)).unwrap();
    for (steps, table) in [
        (&mut value["preflight"], &canonical),
        (&mut follow_up["preflight"], &follow_canonical),
    ] {
        for step in steps.as_array_mut().into_iter().flatten() {
            let extract = step["extract"].as_object().unwrap().clone();
            step["extract"] = extract
                .into_iter()
                .map(|(k, v)| (table[&k].clone(), v))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
    }
    value["follow_up"] = follow_up;
    value
}

fn essentials_named(flow: &Flow) -> serde_json::Value {
    let refs = |headers: &BTreeMap<String, String>| -> BTreeMap<String, String> {
        headers
            .iter()
            .filter(|(_, v)| v.contains("{{"))
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect()
    };
    let steps = |steps: &[computetower::flow::Step]| -> Vec<serde_json::Value> {
        steps
            .iter()
            .map(|s| {
                json!({
                    "method": s.http.method, "url": s.http.url,
                    "extract": s.extract, "slots": s.http.slots, "refs": refs(&s.http.headers),
                })
            })
            .collect()
    };
    json!({
        "preflight": steps(&flow.preflight),
        "method": flow.request.method,
        "url": flow.request.url,
        "slots": flow.request.slots,
        "refs": refs(&flow.request.headers),
        "body_kind": flow.request.body_kind,
        "transport": flow.response.transport,
        "text": flow.response.text,
        "reasoning": flow.response.reasoning,
        "ids": flow.response.ids,
        "follow_up": flow.follow_up.as_ref().map(|f| json!({
            "preflight": steps(&f.preflight),
            "url": f.request.url,
            "slots": f.request.slots,
            "refs": refs(&f.request.headers),
            "resends_history": f.resends_history,
        })),
    })
}

async fn learn_then_serve(shape: Shape) {
    let site = demo_site(shape.as_str(), &[]);
    let data = Data::new();
    let name = format!("learned-{shape}");
    let summary = learn(&data, &site.url, &name);
    assert!(summary.contains("learned flow"), "{summary}");
    assert!(summary.contains("verified"), "{summary}");

    let learned = stored_flow(&data, &name);
    let written = Flow::from_json(
        &std::fs::read_to_string(common::repo().join(format!("flows/demo-{shape}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(
        essentials(&learned),
        essentials(&written),
        "the learned flow differs from flows/demo-{shape}.json"
    );
    assert!(learned.stats.tested && !learned.replay.needs_browser);

    let server = data.serve(&[]);
    let prompt = "Tell me about learning — «quoted» **text**";
    let report = sdk(json!({
        "base_url": format!("{}/v1", server.url), "model": name, "prompt": prompt, "mode": "chat",
    }));
    let expected = reply_for(shape, prompt);
    let reasoning = expected.reasoning.map_or(json!(null), |r| json!(r));
    for mode in ["nonstream", "stream"] {
        assert_eq!(report[mode]["content"], expected.content, "{shape} {mode}");
        assert_eq!(report[mode]["reasoning"], reasoning, "{shape} {mode}");
    }
    // Three turns, each resending the history: one site conversation, which counts turn 3.
    three_turns_continue_one_site_conversation(shape, &site.url, &server.url, &name, true).await;
}

/// `direct`: the turns are sent by tier 1 with the learned follow-up (the browser tiers
/// continue in the site's own page instead).
async fn three_turns_continue_one_site_conversation(
    shape: Shape,
    site: &str,
    server: &str,
    model: &str,
    direct: bool,
) {
    let turns = ["first question", "second question", "third question"];
    let report = sdk(json!({
        "base_url": format!("{server}/v1"), "model": model, "mode": "conversation",
        "turns": turns,
    }));
    for (i, turn) in turns.iter().enumerate() {
        assert_eq!(
            report["replies"][i],
            reply_for_turn(shape, turn, i as u32 + 1).content,
            "{shape}: turn {}",
            i + 1
        );
    }
    let conversations = get_json(format!("{site}/__demo/conversations")).await;
    assert!(
        conversations
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["turns"] == 3),
        "{shape}: {conversations}"
    );
    // The edited history starts a new one: turn 1 again (the reply's own lines, after the
    // echoed prompt, name no turn; a flattened history may quote earlier replies that do).
    let edited = report["edited"].as_str().unwrap();
    let own = edited.rsplit("wire format.").next().unwrap_or_default();
    assert!(!own.contains("turn **"), "{shape}: {edited}");
    if direct {
        let events = get_json(format!("{server}/admin/events")).await;
        let continued = events["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["detail"] == "continued the site conversation")
            .count();
        assert!(continued >= 2, "{shape}: {events}");
    }
}

macro_rules! learn_tests {
    ($($name:ident => $shape:expr),* $(,)?) => {
        $(#[tokio::test] async fn $name() { learn_then_serve($shape).await; })*
    };
}

learn_tests! {
    learns_openai => Shape::Openai,
    learns_patch => Shape::Patch,
    learns_cumulative => Shape::Cumulative,
    learns_ndjson => Shape::Ndjson,
    learns_numbered => Shape::Numbered,
    learns_json => Shape::Json,
    learns_frames => Shape::Frames,
    learns_claude => Shape::Claude,
    learns_ws => Shape::Ws,
    learns_the_prompt_in_a_preflight => Shape::Newchat,
    learns_path_less_patch_batches => Shape::Batch,
    learns_open_webui_markup_in_deltas => Shape::Details,
    learns_think_markup_in_a_cumulative_stream => Shape::Think,
    learns_through_a_send_that_reloads_the_page => Shape::Fragile,
}

#[tokio::test]
async fn the_signed_shape_is_learned_as_needing_the_browser() {
    let site = demo_site("signed", &[]);
    let data = Data::new();
    let summary = learn(&data, &site.url, "signed");
    assert!(summary.contains("NEEDS BROWSER"), "{summary}");
    assert!(
        summary.contains("x-signature"),
        "the computed header is named: {summary}"
    );
    let flow = stored_flow(&data, "signed");
    assert!(flow.replay.needs_browser);
    // Page-computed values: an in-page fetch of the template would lack them too.
    assert_eq!(flow.replay.min_tier, Some(3));
    // Served by tier 3, exactly, and its conversations continued in the site's own page.
    let server = data.serve(&[]);
    let prompt = "A signed question";
    let report = sdk(json!({
        "base_url": format!("{}/v1", server.url), "model": "signed", "prompt": prompt,
        "mode": "chat",
    }));
    let expected = reply_for(Shape::Signed, prompt);
    for mode in ["nonstream", "stream"] {
        assert_eq!(report[mode]["content"], expected.content, "{mode}");
        assert_eq!(
            report[mode]["reasoning"],
            json!(expected.reasoning),
            "{mode}"
        );
    }
    three_turns_continue_one_site_conversation(
        Shape::Signed,
        &site.url,
        &server.url,
        "signed",
        false,
    )
    .await;
}

/// A page that signs its calls (a signature computed in JavaScript) leaves only the browser:
/// tier 3 types into the page and still streams the reply from the recorded network call,
/// with the markup reasoning split out by the learned decoder.
#[tokio::test]
async fn a_signed_markup_site_is_served_by_tier_3_with_reasoning_apart() {
    let site = demo_site("details", &["--signed"]);
    let data = Data::new();
    let summary = learn(&data, &site.url, "signed-details");
    assert!(summary.contains("NEEDS BROWSER"), "{summary}");
    let flow = stored_flow(&data, "signed-details");
    assert_eq!(flow.replay.min_tier, Some(3));
    assert!(
        flow.follow_up.is_none(),
        "the site's own page continues conversations"
    );
    assert!(matches!(
        flow.response.reasoning,
        Some(computetower::flow::ReasoningRule::Markup { quoted: true, .. })
    ));
    let server = data.serve(&[]);
    let prompt = "Think about this one";
    let report = sdk(json!({
        "base_url": format!("{}/v1", server.url), "model": "signed-details", "prompt": prompt,
        "mode": "chat",
    }));
    let expected = reply_for(Shape::Details, prompt);
    for mode in ["nonstream", "stream"] {
        assert_eq!(report[mode]["content"], expected.content, "{mode}");
        assert_eq!(
            report[mode]["reasoning"],
            json!(expected.reasoning),
            "{mode}"
        );
    }
    let events = get_json(format!("{}/admin/events", server.url)).await;
    assert!(
        events["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["tier"] == 3 && e["outcome"] == "ok"),
        "{events}"
    );
}

/// A site whose page shows more than its API sent cannot be learned: the learn says how close
/// it came, and leaves the probe's recording, redacted, for a report or a failing fixture.
#[tokio::test]
async fn a_failed_learn_leaves_a_redacted_recording_and_a_clear_message() {
    let site = demo_site("openai", &["--render-suffix", "Was this answer helpful?"]);
    let data = Data::new();
    data.ok(
        &[
            "account",
            "add",
            "--url",
            &site.url,
            "--name",
            "quirky",
            "--email",
            "quirk@example.com",
            "--password-stdin",
        ],
        Some(&format!("{}\n", common::PASSWORD)),
    );
    let out = data.cli(&["learn", "quirky", "--explain"], None);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("could not infer the chat flow"), "{stderr}");
    assert!(stderr.contains("the closest reading was"), "{stderr}");
    assert!(stderr.contains("not taken"), "--explain: {stderr}");
    let at = stderr.find("is saved at ").expect("the recording's path") + "is saved at ".len();
    let path = stderr[at..].split_whitespace().next().unwrap();
    assert!(path.starts_with(data.path().to_str().unwrap()), "{path}");
    let text = std::fs::read_to_string(path).unwrap();
    let recording: computetower::recording::Recording = serde_json::from_str(&text).unwrap();
    // No password, cookie value or token: every one is a placeholder.
    assert!(!text.contains(common::PASSWORD));
    assert!(
        !regex::Regex::new(r"dt_[A-Za-z0-9]{16,}")
            .unwrap()
            .is_match(&text)
    );
    assert!(!recording.storage.cookies.is_empty());
    for value in recording.storage.cookies.values() {
        assert!(value.starts_with("fakeCookie"), "{value}");
    }
    for value in recording.storage.local_storage.values() {
        assert!(value.starts_with("fakeStoredToken"), "{value}");
    }
    assert!(recording.storage.meta["csrf-token"].starts_with("fakeCsrfToken"));
    for exchange in &recording.exchanges {
        for (name, value) in &exchange.request_headers {
            if name == "cookie" {
                for pair in value.split("; ") {
                    assert!(
                        pair.split_once('=').unwrap().1.starts_with("fake"),
                        "{pair}"
                    );
                }
            }
            if name == "authorization" || name == "x-csrf-token" {
                assert!(
                    value.trim_start_matches("Bearer ").starts_with("fake"),
                    "{value}"
                );
            }
        }
    }
    // What the page showed is kept: the recording reproduces the failure.
    assert!(
        recording
            .rendered_reply
            .ends_with("Was this answer helpful?")
    );
    assert!(computetower::learn::infer::infer(&recording, "quirky").is_err());
}

/// Tier 3 types into the page with the probe's sending code: a send control that submits the
/// form natively the first time (the page reloads, the typed text is gone) is retyped and
/// sent with Enter there too.
#[tokio::test]
async fn tier_3_retypes_a_message_the_page_lost_in_a_reload() {
    let site = demo_site("fragile", &[]);
    let data = Data::new();
    learn(&data, &site.url, "fragile");
    let server = data.serve(&[]);
    let pages_before = get_json(format!("{}/__demo/stats", site.url)).await["pages"]
        .as_u64()
        .unwrap();
    let response = common::http()
        .post(format!("{}/v1/chat/completions", server.url))
        .header("x-computetower-tier", "3")
        .json(&json!({"model": "fragile",
            "messages": [{"role": "user", "content": "typed into the page"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-computetower-tier"], "3");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        reply_for(Shape::Fragile, "typed into the page").content
    );
    // The tier's page loaded the chat, and loaded it again after the native submission.
    let pages = get_json(format!("{}/__demo/stats", site.url)).await["pages"]
        .as_u64()
        .unwrap();
    assert!(pages >= pages_before + 2, "{pages_before} → {pages}");
}

/// A page that stores its token only when the chat page loads: a session taken before that
/// lacks it (tier 1 could not render the flow); once a browser tier has run the page, the
/// stored session has it and tier 1 answers.
#[tokio::test]
async fn a_browser_tier_s_page_load_completes_the_stored_session() {
    let site = demo_site("think", &[]);
    let data = Data::new();
    computetower::server::install_tls_provider();
    let login = computetower::demo::json_login(&site.url, "late@example.com", common::PASSWORD)
        .await
        .unwrap();
    let host = url::Url::parse(&site.url)
        .unwrap()
        .host_str()
        .unwrap()
        .to_owned();
    // The cookies alone, as a login leaves them: no token in storage yet.
    let state = json!({
        "cookies": login.cookies.iter().map(|(n, v)| json!({
            "name": n, "value": v, "domain": host, "path": "/", "expires": -1,
            "httpOnly": true, "secure": false, "sameSite": "Lax"
        })).collect::<Vec<_>>(),
        "origins": [],
    });
    let file = data.path().join("state.json");
    std::fs::write(&file, state.to_string()).unwrap();
    // No password: a new login cannot fill the gap, only a page load can.
    data.ok(
        &[
            "account",
            "add",
            "--url",
            &site.url,
            "--name",
            "demo-think",
            "--cookies",
            file.to_str().unwrap(),
        ],
        None,
    );
    let flow = common::repo().join("flows/demo-think.json");
    data.ok(&["flows", "import", flow.to_str().unwrap()], None);
    let server = data.serve(&[]);
    let ask = |tier: &'static str| {
        common::http()
            .post(format!("{}/v1/chat/completions", server.url))
            .header("x-computetower-tier", tier)
            .json(&json!({"model": "demo-think",
                "messages": [{"role": "user", "content": "late token"}]}))
            .send()
    };
    let stored_keys = || async {
        let sessions = get_json(format!("{}/admin/sessions", server.url)).await;
        sessions["data"][0]["local_storage"].clone()
    };
    assert_eq!(stored_keys().await, json!([]), "nothing stored at login");
    let through_the_page = ask("3").await.unwrap();
    assert_eq!(through_the_page.status(), 200);
    let _ = through_the_page.bytes().await.unwrap();
    // The page's storage reaches the store right after its load (written off the reply's path).
    common::eventually(
        Duration::from_secs(30),
        "the page's token in the store",
        || async {
            let keys = stored_keys().await;
            (keys == json!(["userToken"])).then_some(())
        },
    )
    .await;
    let answered: serde_json::Value = ask("1").await.unwrap().json().await.unwrap();
    assert_eq!(
        answered["choices"][0]["message"]["content"],
        reply_for(Shape::Think, "late token").content
    );
}

#[tokio::test]
async fn relearning_keeps_the_previous_version() {
    let site = demo_site("ndjson", &[]);
    let data = Data::new();
    learn(&data, &site.url, "twice");
    let out = data.cli(&["learn", "twice"], None);
    assert!(out.status.success());
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("replacing version 1"), "{summary}");
    let all = data.ok(&["flows", "list", "--all"], None);
    assert!(all.contains("v1") && all.contains("v2"), "{all}");
}

/// The learner, the replay engine, the browser layer and the gateway know no site: none of the
/// demo site's names (nor real sites') appear in their code outside tests.
#[test]
fn no_site_names_in_learn_replay_browser_or_gateway() {
    let forbidden = [
        "demo_sid",
        "demo_token",
        "userToken",
        "csrf-token",
        "x-csrf-token",
        "backend-api",
        "/conversations",
        "newChat",
        "__version",
        "demo_ready",
        "demo-signed",
        "chat_id",
        "isThinking",
        "chat.send",
        "ChatService",
        "organizations",
        "__demo",
        "127.0.0.1",
        "deepseek",
        "chatgpt",
        "openai.com",
        "claude.ai",
        "anthropic",
        "qwen",
        "grok",
        "mistral",
        "k2think",
    ];
    let mut offences = Vec::new();
    let mut files = vec![common::repo().join("src/gateway.rs")];
    for dir in ["src/learn", "src/replay", "src/browser"] {
        files.extend(walk(&common::repo().join(dir)));
    }
    {
        for path in files {
            if path
                .file_name()
                .is_some_and(|n| n == "tests.rs" || n == "tier_tests.rs")
            {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            // Unit tests may use realistic fixtures; only the code proper is checked.
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            for (number, line) in code.lines().enumerate() {
                let lower = line.to_ascii_lowercase();
                if lower.trim_start().starts_with("//") {
                    continue;
                }
                for name in forbidden {
                    if lower.contains(&name.to_ascii_lowercase()) {
                        offences.push(format!("{}:{}: {name}", path.display(), number + 1));
                    }
                }
            }
        }
    }
    assert!(
        offences.is_empty(),
        "site names in generic code:\n{}",
        offences.join("\n")
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else if path.extension().is_some_and(|e| e == "rs" || e == "js") {
            out.push(path);
        }
    }
    out
}
