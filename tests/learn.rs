//! Learning with real Chromium: for every demo-site shape, `computetower learn` from URL and
//! credentials alone; then the official SDK gets the exact reply through tier 1, and the
//! learned flow matches the hand-written one in `flows/`. The signed shape is learned,
//! marked as needing the browser, and refused with a clear 503. And no site's names appear
//! in the learner or the replay engine.

mod common;

use std::collections::BTreeMap;

use common::{Data, demo_site, sdk};
use computetower::demo::{Shape, reply_for};
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
    let canonical: BTreeMap<String, String> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), format!("p{i}")))
        .collect();
    // Longest first, so that `id` does not clobber part of `conversation_id`.
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    let rename = |text: &str| {
        let mut text = text.to_owned();
        for name in &names {
            text = text.replace(
                &format!("preflight.{name}"),
                &format!("preflight.{}", canonical[name]),
            );
        }
        text
    };
    let value = essentials_named(flow);
    let renamed = rename(&value.to_string());
    let mut value: serde_json::Value = serde_json::from_str(&renamed).unwrap();
    for step in value["preflight"].as_array_mut().unwrap() {
        let extract = step["extract"].as_object().unwrap().clone();
        step["extract"] = extract
            .into_iter()
            .map(|(k, v)| (canonical[&k].clone(), v))
            .collect::<serde_json::Map<_, _>>()
            .into();
    }
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
    json!({
        "preflight": flow.preflight.iter().map(|s| json!({
            "method": s.http.method, "url": s.http.url,
            "extract": s.extract, "slots": s.http.slots, "refs": refs(&s.http.headers),
        })).collect::<Vec<_>>(),
        "method": flow.request.method,
        "url": flow.request.url,
        "slots": flow.request.slots,
        "refs": refs(&flow.request.headers),
        "body_kind": flow.request.body_kind,
        "transport": flow.response.transport,
        "text": flow.response.text,
        "reasoning": flow.response.reasoning,
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

/// The learner and the replay engine know no site: none of the demo site's names (nor real
/// sites') appear in their code outside tests.
#[test]
fn no_site_names_in_learn_or_replay() {
    let forbidden = [
        "demo_sid",
        "demo_token",
        "csrf-token",
        "x-csrf-token",
        "backend-api",
        "conversations",
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
    for dir in ["src/learn", "src/replay"] {
        for path in walk(&common::repo().join(dir)) {
            if path.file_name().is_some_and(|n| n == "tests.rs") {
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
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}
