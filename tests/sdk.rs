//! The official `openai` Python SDK against the real server, for every demo-site shape: the
//! streamed and non-streamed answers equal the site's own reply exactly, reasoning arrives as
//! `reasoning_content`, and usage is present when asked for.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use common::{Data, demo_site, sdk};
use computetower::demo::{Shape, reply_for};
use serde_json::json;

/// Unicode, quotes, markdown and a template-looking string must all pass through verbatim.
const PROMPT: &str = "Héllo \"world\" — what is {{uuid}}? 🙂 **bold** `code`";

async fn sdk_gets_the_exact_reply(shape: Shape) {
    let site = demo_site(shape.as_str(), &[]);
    let data = Data::new();
    let model = data
        .add_demo_account(&site.url, shape.as_str(), "sdk@example.com")
        .await;
    let server = data.serve(&[]);
    let report = sdk(json!({
        "base_url": format!("{}/v1", server.url),
        "model": model,
        "prompt": PROMPT,
        "mode": "chat",
    }));
    let expected = reply_for(shape, PROMPT);
    let reasoning = expected.reasoning.clone().map_or(json!(null), |r| json!(r));
    for mode in ["nonstream", "stream"] {
        let got = &report[mode];
        assert_eq!(got["content"], expected.content, "{shape} {mode} content");
        assert_eq!(got["reasoning"], reasoning, "{shape} {mode} reasoning");
        assert_eq!(got["finish_reason"], "stop", "{shape} {mode}");
        let usage = &got["usage"];
        let completion = usage["completion_tokens"].as_u64().unwrap();
        let prompt = usage["prompt_tokens"].as_u64().unwrap();
        assert!(
            completion > 10 && prompt > 5,
            "{shape} {mode} usage {usage}"
        );
        assert_eq!(
            usage["total_tokens"].as_u64().unwrap(),
            completion + prompt,
            "{shape} {mode}"
        );
    }
    assert_eq!(report["nonstream"]["object"], "chat.completion");
    // Streamed token by token, not in one lump (the `json` site itself answers in one piece).
    let chunks = report["stream"]["chunks"].as_u64().unwrap();
    if shape == Shape::Json {
        assert!(chunks >= 3, "{report}");
    } else {
        assert!(chunks > 10, "{report}");
    }
    // Usage only when asked for.
    assert_eq!(report["stream_without_usage"]["usage_seen"], false);
}

#[tokio::test]
async fn openai_shape() {
    sdk_gets_the_exact_reply(Shape::Openai).await;
}

#[tokio::test]
async fn patch_shape() {
    sdk_gets_the_exact_reply(Shape::Patch).await;
}

#[tokio::test]
async fn cumulative_shape() {
    sdk_gets_the_exact_reply(Shape::Cumulative).await;
}

#[tokio::test]
async fn ndjson_shape() {
    sdk_gets_the_exact_reply(Shape::Ndjson).await;
}

#[tokio::test]
async fn numbered_shape() {
    sdk_gets_the_exact_reply(Shape::Numbered).await;
}

#[tokio::test]
async fn json_shape() {
    sdk_gets_the_exact_reply(Shape::Json).await;
}

#[tokio::test]
async fn frames_shape() {
    sdk_gets_the_exact_reply(Shape::Frames).await;
}

#[tokio::test]
async fn claude_shape() {
    sdk_gets_the_exact_reply(Shape::Claude).await;
}

#[tokio::test]
async fn websocket_shape() {
    sdk_gets_the_exact_reply(Shape::Ws).await;
}

#[tokio::test]
async fn prompt_in_a_preflight_shape() {
    sdk_gets_the_exact_reply(Shape::Newchat).await;
}

#[tokio::test]
async fn path_less_batches_shape() {
    sdk_gets_the_exact_reply(Shape::Batch).await;
}

#[tokio::test]
async fn open_webui_markup_shape() {
    sdk_gets_the_exact_reply(Shape::Details).await;
}

#[tokio::test]
async fn cumulative_think_markup_shape() {
    sdk_gets_the_exact_reply(Shape::Think).await;
}

#[tokio::test]
async fn fragile_send_shape() {
    sdk_gets_the_exact_reply(Shape::Fragile).await;
}
