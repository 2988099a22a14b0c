//! Decoder inference over hand-made response bodies of every transport and accrual.

use super::*;
use crate::recording::{Body, Frame};

fn exchange(content_type: &str, body: &[u8]) -> Exchange {
    Exchange {
        id: "1".into(),
        method: "POST".into(),
        url: "https://x.test/api/chat".into(),
        resource_type: "Fetch".into(),
        request_body: Some(Body(
            br#"{"q":"hello there friend","cid":"c0ffee12345678"}"#.to_vec(),
        )),
        response_headers: vec![("content-type".into(), content_type.into())],
        response_body: Some(Body(body.to_vec())),
        ..Exchange::default()
    }
}

fn rule(path: &str, mode: Accrual, event: Option<&str>) -> TextRule {
    TextRule {
        path: path.into(),
        mode,
        event: event.map(str::to_owned),
    }
}

#[test]
fn sse_delta_with_done_and_ids() {
    let body = b"data: {\"id\":\"m-1234567\",\"cid\":\"c0ffee12345678\",\"d\":{\"t\":\"\"}}\n\n\
data: {\"d\":{\"t\":\"Hello **wor\"}}\n\n\
data: {\"d\":{\"t\":\"ld**\"}}\n\n\
data: [DONE]\n\n";
    let spec = infer_response(&exchange("text/event-stream", body), "Hello world", None).unwrap();
    assert_eq!(spec.transport, Transport::Sse);
    assert_eq!(spec.text, rule("/d/t", Accrual::Delta, None));
    assert_eq!(spec.done[0].data.as_deref(), Some("[DONE]"));
    assert_eq!(spec.ids["message_id"], "/id");
    assert_eq!(spec.ids["conversation_id"], "/cid");
}

#[test]
fn ndjson_cumulative_with_a_status_done() {
    let body = b"{\"s\":\"go\",\"text\":\"Hel\"}\n{\"s\":\"go\",\"text\":\"Hello\"}\n{\"s\":\"end\",\"text\":\"Hello\"}\n";
    let spec = infer_response(&exchange("application/x-ndjson", body), "Hello", None).unwrap();
    assert_eq!(spec.transport, Transport::Ndjson);
    assert_eq!(spec.text, rule("/text", Accrual::Cumulative, None));
    assert_eq!(spec.done.len(), 1);
    assert_eq!(spec.done[0].path.as_deref(), Some("/s"));
    assert_eq!(spec.done[0].equals, Some(Value::from("end")));
}

#[test]
fn numbered_lines_with_an_event_and_a_flag() {
    let body = b"1:{\"x\":1}\n0:{\"k\":\"r\",\"d\":\"think \"}\n0:{\"k\":\"t\",\"d\":\"An\"}\n0:{\"k\":\"t\",\"d\":\"swer\"}\n9:null\n";
    let spec = infer_response(&exchange("text/plain", body), "Answer", Some("think")).unwrap();
    assert_eq!(spec.transport, Transport::NumberedLines);
    assert_eq!(spec.text, rule("/d", Accrual::Delta, Some("0")));
    assert_eq!(
        spec.reasoning,
        Some(ReasoningRule::Flag {
            path: "/k".into(),
            equals: Value::from("r"),
            sticky: false
        })
    );
    assert_eq!(spec.done[0].event.as_deref(), Some("9"));
}

#[test]
fn length_prefixed_frames_are_sniffed() {
    let frame = |flag: u8, json: &str| {
        let mut out = vec![flag];
        out.extend_from_slice(&(json.len() as u32).to_be_bytes());
        out.extend_from_slice(json.as_bytes());
        out
    };
    let body = [
        frame(0, r#"{"r":{"tok":"Hi"}}"#),
        frame(0, r#"{"r":{"tok":" there"}}"#),
        frame(2, "{}"),
    ]
    .concat();
    let spec = infer_response(
        &exchange("application/octet-stream", &body),
        "Hi there",
        None,
    )
    .unwrap();
    assert_eq!(spec.transport, Transport::LengthPrefixed);
    assert_eq!(spec.text, rule("/r/tok", Accrual::Delta, Some("0")));
}

#[test]
fn single_json_and_plain_text() {
    let body = br#"{"ok":true,"answer":{"md":"- one\n- **two**"}}"#;
    let spec = infer_response(&exchange("application/json", body), "one\ntwo", None).unwrap();
    assert_eq!(spec.transport, Transport::Json);
    assert_eq!(spec.text, rule("/answer/md", Accrual::Delta, None));
    assert_eq!(spec.error[0].path.as_deref(), Some("/error"));

    let body = b"<think>Let me see.</think>The answer is 4.";
    let spec = infer_response(
        &exchange("text/plain", body),
        "The answer is 4.",
        Some("Let me see."),
    )
    .unwrap();
    assert_eq!(spec.transport, Transport::Text);
    assert_eq!(
        spec.reasoning,
        Some(ReasoningRule::Markup {
            open: "<think>".into(),
            close: "</think>".into(),
            summary: false,
            quoted: false,
            answer: None,
        })
    );
}

#[test]
fn details_markup_inside_sse_deltas() {
    let body = "data: {\"c\":\"<details type=\\\"reasoning\\\" done=\\\"true\\\">\\nPlan\"}\n\n\
data: {\"c\":\" it</details>\\nDone\"}\n\n";
    let spec = infer_response(
        &exchange("text/event-stream", body.as_bytes()),
        "Done",
        Some("Plan it"),
    )
    .unwrap();
    assert_eq!(
        spec.reasoning,
        Some(ReasoningRule::Markup {
            open: "<details type=\"reasoning\"".into(),
            close: "</details>".into(),
            summary: false,
            quoted: false,
            answer: None,
        })
    );
}

/// Open WebUI: the opening tag is a piece of its own, later pieces carry a phase, the
/// reasoning is quoted line by line under a `<summary>`, the answer sits in `<answer>`. The
/// phase alone would leave tags in the answer; the markup reading is the one the page shows.
#[test]
fn open_webui_markup_in_a_delta_stream_with_a_phase() {
    let body = include_bytes!("../../../tests/fixtures/responses/openwebui_details.txt");
    let spec = infer_response(
        &exchange("text/event-stream", body),
        "Hello there, friend.",
        Some("First I read it.\nThen I answer."),
    )
    .unwrap();
    assert_eq!(
        spec.text,
        rule("/choices/0/delta/content", Accrual::Delta, None)
    );
    assert_eq!(
        spec.reasoning,
        Some(ReasoningRule::Markup {
            open: "<details type=\"reasoning\"".into(),
            close: "</details>".into(),
            summary: true,
            quoted: true,
            answer: Some(Tags {
                open: "<answer>".into(),
                close: "</answer>".into()
            }),
        })
    );
    let decoded = run(
        &spec,
        &input_of(&exchange("text/event-stream", body)).unwrap(),
    )
    .unwrap();
    assert_eq!(decoded.0, "Hello there, friend.");
    assert_eq!(decoded.1, "First I read it.\nThen I answer.");
}

/// A cumulative stream of `<think>` markup: every event repeats the whole text with the
/// closing tag moved to its end, so no event extends the previous one.
#[test]
fn think_markup_in_a_cumulative_stream_whose_closing_tag_moves() {
    let body = include_bytes!("../../../tests/fixtures/responses/cumulative_think.txt");
    let spec = infer_response(
        &exchange("text/event-stream", body),
        "The answer is 4.",
        Some("Two and two make four."),
    )
    .unwrap();
    assert_eq!(spec.text, rule("/text", Accrual::Cumulative, None));
    assert_eq!(
        spec.reasoning,
        Some(ReasoningRule::Markup {
            open: "<think>".into(),
            close: "</think>".into(),
            summary: false,
            quoted: false,
            answer: None,
        })
    );
    let deltas = decode_all(&spec, body).unwrap();
    // Incremental: one piece per event, never a tag.
    assert!(deltas.len() >= 8, "{deltas:?}");
    for delta in &deltas {
        if let crate::replay::decode::Delta::Text(t) | crate::replay::decode::Delta::Reasoning(t) =
            delta
        {
            assert!(!t.contains('<'), "{deltas:?}");
        }
    }
    let (text, reasoning) = collect_text(&deltas);
    assert_eq!(text, "The answer is 4.");
    assert_eq!(reasoning, "Two and two make four.");
}

#[test]
fn append_patch_with_batches_and_an_event_filter() {
    let body = "event: delta_encoding\ndata: \"v1\"\n\n\
data: {\"type\":\"echo\",\"m\":{\"parts\":[\"hello there friend\"]}}\n\n\
event: delta\ndata: {\"p\":\"\",\"o\":\"add\",\"v\":{\"message\":{\"id\":\"msg-abc123\",\"content\":{\"parts\":[\"\"]}}}}\n\n\
event: delta\ndata: {\"p\":\"/message/content/parts/0\",\"o\":\"append\",\"v\":\"Hel\"}\n\n\
event: delta\ndata: {\"v\":\"lo \"}\n\n\
event: delta\ndata: {\"p\":\"\",\"o\":\"patch\",\"v\":[{\"p\":\"/message/content/parts/0\",\"o\":\"append\",\"v\":\"you\"},{\"p\":\"/message/status\",\"o\":\"replace\",\"v\":\"done\"}]}\n\n\
data: {\"type\":\"complete\"}\n\n\
data: [DONE]\n\n";
    let spec = infer_response(
        &exchange("text/event-stream", body.as_bytes()),
        "Hello you",
        None,
    )
    .unwrap();
    assert_eq!(
        spec.text,
        rule(
            "/message/content/parts/0",
            Accrual::AppendPatch,
            Some("delta")
        )
    );
    assert_eq!(spec.ids["message_id"], "/v/message/id");
}

#[test]
fn batches_without_a_path_of_their_own_keep_the_last_words() {
    let body = include_bytes!("../../../tests/fixtures/responses/chatgpt_batch.txt");
    let spec = infer_response(
        &exchange("text/event-stream", body),
        "Batched hello, there at the end!",
        None,
    )
    .unwrap();
    assert_eq!(
        spec.text,
        rule(
            "/message/content/parts/0",
            Accrual::AppendPatch,
            Some("delta")
        )
    );
}

#[test]
fn websocket_messages() {
    let mut chat = exchange("", b"");
    chat.response_body = None;
    chat.frames = vec![
        Frame {
            sent: true,
            at_ms: 1.0,
            payload: r#"{"say":"hello there friend"}"#.into(),
            binary: false,
        },
        Frame {
            sent: false,
            at_ms: 2.0,
            payload: r#"{"k":"start","msg_id":"x1y2z3w4"}"#.into(),
            binary: false,
        },
        Frame {
            sent: false,
            at_ms: 3.0,
            payload: r#"{"k":"tok","t":"Hi"}"#.into(),
            binary: false,
        },
        Frame {
            sent: false,
            at_ms: 4.0,
            payload: r#"{"k":"tok","t":"!"}"#.into(),
            binary: false,
        },
        Frame {
            sent: false,
            at_ms: 5.0,
            payload: r#"{"k":"end"}"#.into(),
            binary: false,
        },
    ];
    let spec = infer_response(&chat, "Hi!", None).unwrap();
    assert_eq!(spec.transport, Transport::Websocket);
    assert_eq!(spec.text, rule("/t", Accrual::Delta, None));
    assert_eq!(spec.done[0].path.as_deref(), Some("/k"));
    assert_eq!(spec.ids["message_id"], "/msg_id");
}

#[test]
fn no_match_is_explained_without_quoting_the_body() {
    let body = b"data: {\"t\":\"Hello\",\"secret\":\"tok_SeCrEt123\"}\n\n";
    let err = infer_response(&exchange("text/event-stream", body), "Goodbye", None).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, DecoderError::NoMatch { .. }));
    assert!(message.contains("POST /api/chat"), "{message}");
    assert!(!message.contains("SeCrEt"), "{message}");
    let mut empty = exchange("text/event-stream", b"");
    empty.response_body = None;
    assert!(matches!(
        infer_response(&empty, "x", None),
        Err(DecoderError::NoResponse(_))
    ));
}

#[test]
fn reasoning_and_text_at_one_path_told_apart_by_event_name() {
    let body = "event: thinking\ndata: {\"d\":\"Hmm, \"}\n\n\
event: thinking\ndata: {\"d\":\"a greeting.\"}\n\n\
event: text\ndata: {\"d\":\"Hi \"}\n\n\
event: text\ndata: {\"d\":\"back\"}\n\n\
event: end\ndata: {}\n\n";
    let spec = infer_response(
        &exchange("text/event-stream", body.as_bytes()),
        "Hi back",
        Some("Hmm, a greeting."),
    )
    .unwrap();
    assert_eq!(spec.text, rule("/d", Accrual::Delta, Some("text")));
    assert_eq!(
        spec.reasoning,
        Some(ReasoningRule::Field {
            path: "/d".into(),
            mode: Accrual::Delta,
            event: Some("thinking".into())
        })
    );
    assert_eq!(spec.done[0].event.as_deref(), Some("end"));
}
