//! The client conformance suite (`tests/clients/`): the official `openai` SDKs (Python and
//! Node), the official `anthropic` SDK, LangChain's `ChatOpenAI`, and a streaming Responses
//! client that checks events the way the Codex CLI does, all against the real binary serving
//! the demo site, whose model follows tool and JSON instructions deterministically.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use common::{Data, checks_of, demo_site, python_client};
use computetower::demo::{Shape, reply_for};
use serde_json::json;

const PLAIN: &str = "Tell me something";

/// A demo site of `shape`, an account for it and a server; returns (site, data, server, model).
async fn serving(shape: Shape) -> (common::Proc, Data, common::Proc, String) {
    let site = demo_site(shape.as_str(), &[]);
    let data = Data::new();
    let model = data
        .add_demo_account(&site.url, shape.as_str(), "agent@example.com")
        .await;
    let server = data.serve(&[]);
    (site, data, server, model)
}

#[tokio::test]
async fn openai_python_sdk_tools_parameters_and_responses() {
    let (site, _data, server, model) = serving(Shape::Openai).await;
    let report = python_client(
        "openai_agent.py",
        json!({
            "base_url": format!("{}/v1", server.url),
            "server": server.url,
            "site": site.url,
            "model": model,
            "plain_prompt": PLAIN,
            "plain_reply": reply_for(Shape::Openai, PLAIN).content,
        }),
    );
    let checks = checks_of(&report);
    for expected in [
        "tool_auto_nonstream",
        "tool_auto_stream",
        "tool_parallel_and_not",
        "tool_named",
        "tool_required_gets_a_repair_turn",
        "malformed_call_is_repaired",
        "a_call_still_broken_after_the_repair_comes_back_as_text",
        "tool_results_in_history",
        "max_tokens_cuts_and_cancels_the_site",
        "stop_sequences_cut",
        "json_object",
        "json_schema_parse",
        "models_retrieve",
        "responses_function_call_round_trip",
        "responses_stream_round_trip",
        "responses_previous_response_id_continues_the_site_conversation",
    ] {
        assert!(
            checks.iter().any(|c| c == expected),
            "{expected} did not run: {checks:?}"
        );
    }
}

/// The Anthropic SDK sends its key as `x-api-key`; with a key created, a wrong one is a 401 in
/// Anthropic's shape. The claude shape of the demo site reasons, so thinking blocks show.
#[tokio::test]
async fn anthropic_python_sdk_messages() {
    let site = demo_site("claude", &[]);
    let data = Data::new();
    let model = data
        .add_demo_account(&site.url, "claude", "claude@example.com")
        .await;
    let key = data.ok(&["keys", "create"], None).trim().to_owned();
    let server = data.serve(&[]);
    let report = python_client(
        "anthropic_messages.py",
        json!({
            "base_url": server.url,
            "model": model,
            "api_key": key,
            "plain_prompt": PLAIN,
            "plain_reply": reply_for(Shape::Claude, PLAIN).content,
        }),
    );
    let checks = checks_of(&report);
    for expected in [
        "text",
        "stream",
        "tool_use_round_trip",
        "stop_sequences_and_max_tokens",
        "errors_in_anthropic_shape",
        "count_tokens",
    ] {
        assert!(
            checks.iter().any(|c| c == expected),
            "{expected} did not run: {checks:?}"
        );
    }
    assert!(
        !server.stderr().contains(&key),
        "the key must not appear in the server's log"
    );
}

/// LangChain's `ChatOpenAI`, the Node SDK and a Codex-like raw Responses stream reader, on one
/// server (the checks do not depend on each other).
#[tokio::test]
async fn langchain_node_sdk_and_a_codex_like_stream() {
    let (_site, _data, server, model) = serving(Shape::Openai).await;
    let args = json!({"base_url": format!("{}/v1", server.url), "model": model});
    let langchain = checks_of(&python_client("langchain_agent.py", args.clone()));
    assert_eq!(
        langchain,
        [
            "bind_tools_gives_tool_calls",
            "structured_output_returns_the_object"
        ]
    );
    let codex = checks_of(&python_client("codex_stream.py", args.clone()));
    assert_eq!(codex, ["function_call_then_answer"]);
    let node = checks_of(&common::node_client("openai_node.mjs", args));
    assert_eq!(node, ["chat_stream_with_tool_calls", "responses_stream"]);
}
