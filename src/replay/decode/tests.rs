//! Decoder tests over recorded-style bytes (`tests/fixtures/responses/`), modeled on what
//! real sites send (see WIRE-FORMATS.md §3–6).

use futures_util::StreamExt;
use serde_json::json;

use super::*;

fn spec(json: serde_json::Value) -> ResponseSpec {
    serde_json::from_value(json).expect("test spec parses")
}

fn text(s: &str) -> Delta {
    Delta::Text(s.to_owned())
}

fn thought(s: &str) -> Delta {
    Delta::Reasoning(s.to_owned())
}

fn id(name: &str, value: &str) -> Delta {
    Delta::Id {
        name: name.to_owned(),
        value: value.to_owned(),
    }
}

/// A small deterministic generator for chunk sizes and fuzz bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Decodes `body` fed in chunks of the given sizes (cycled).
fn decode_chunked(
    spec: &ResponseSpec,
    body: &[u8],
    sizes: &mut dyn FnMut() -> usize,
) -> Result<Vec<Delta>, DecodeError> {
    let mut decoder = Decoder::new(spec);
    let mut out = Vec::new();
    let mut at = 0;
    while at < body.len() {
        let end = (at + sizes().max(1)).min(body.len());
        decoder.feed(&body[at..end], &mut out)?;
        at = end;
    }
    decoder.finish(&mut out)?;
    Ok(out)
}

/// Adjacent text (and reasoning) pieces joined: the form chunking cannot change for the
/// `text` transport.
fn merged(deltas: Vec<Delta>) -> Vec<Delta> {
    let mut merged: Vec<Delta> = Vec::new();
    for delta in deltas {
        match (merged.last_mut(), delta) {
            (Some(Delta::Text(a)), Delta::Text(b)) => a.push_str(&b),
            (Some(Delta::Reasoning(a)), Delta::Reasoning(b)) => a.push_str(&b),
            (_, delta) => merged.push(delta),
        }
    }
    merged
}

struct Case {
    name: &'static str,
    spec: ResponseSpec,
    body: Vec<u8>,
    expected: Result<Vec<Delta>, DecodeError>,
}

fn openai() -> Case {
    Case {
        name: "openai",
        spec: spec(json!({
            "transport": "sse",
            "text": {"path": "/choices/0/delta/content", "mode": "delta"},
            "reasoning": {"field": {"path": "/choices/0/delta/reasoning_content", "mode": "delta"}},
            "done": [{"data": "[DONE]"}],
            "ids": {"completion": "/id"}
        })),
        body: include_bytes!("../../../tests/fixtures/responses/openai_reasoning.txt").to_vec(),
        expected: Ok(vec![
            id("completion", "chatcmpl-1"),
            thought("Let me"),
            thought(" think."),
            text("Hello"),
            text(" wörld 👋"),
            Delta::Done,
        ]),
    }
}

fn chatgpt() -> Case {
    Case {
        name: "chatgpt",
        spec: spec(json!({
            "transport": "sse",
            "text": {"path": "/message/content/parts/0", "mode": "append_patch", "event": "delta"},
            "done": [{"path": "/type", "equals": "message_stream_complete"}, {"data": "[DONE]"}],
            "error": [{"event": "delta", "path": "/v/error"}],
            "ids": {"conversation": "/v/conversation_id", "message": "/v/message/id"}
        })),
        body: include_bytes!("../../../tests/fixtures/responses/chatgpt_patch.txt").to_vec(),
        expected: Ok(vec![
            id("conversation", "conv-1"),
            id("message", "msg-1"),
            text("Hello"),
            text(" there"),
            text(", friend"),
            text("!"),
            Delta::Done,
        ]),
    }
}

/// Newer patch streams batch operations as `{"v": [ops]}` with no `p` or `o` of their own:
/// a batch, not a continuation whose value is a list (the last words of a reply travel so).
fn chatgpt_batch() -> Case {
    Case {
        name: "chatgpt_batch",
        spec: spec(json!({
            "transport": "sse",
            "text": {"path": "/message/content/parts/0", "mode": "append_patch", "event": "delta"},
            "done": [{"data": "[DONE]"}],
            "ids": {"message": "/v/message/id"}
        })),
        body: include_bytes!("../../../tests/fixtures/responses/chatgpt_batch.txt").to_vec(),
        expected: Ok(vec![
            id("message", "msg-2"),
            text("Batched"),
            text(" hello"),
            text(", there"),
            text(" at the end"),
            text("!"),
            Delta::Done,
        ]),
    }
}

fn deepseek() -> Case {
    Case {
        name: "deepseek",
        spec: spec(json!({
            "transport": "sse",
            "text": {"path": "response/fragments/-1/content", "mode": "append_patch"},
            "reasoning": {"flag": {"path": "type", "equals": "THINK"}},
            "done": [{"event": "close"}],
            "ids": {"message": "/v/response/message_id"}
        })),
        body: include_bytes!("../../../tests/fixtures/responses/deepseek_fragments.txt").to_vec(),
        expected: Ok(vec![
            id("message", "2"),
            thought("We"),
            thought(" need"),
            thought(" to greet."),
            text("Hi"),
            text("!"),
            text(" How can I help?"),
            text(" 😊"),
            Delta::Done,
        ]),
    }
}

fn qwen() -> Case {
    Case {
        name: "qwen",
        spec: spec(json!({
            "transport": "sse",
            "text": {"path": "/choices/0/delta/content", "mode": "cumulative"},
            "reasoning": {"flag": {"path": "/choices/0/delta/phase", "equals": "think"}},
            "done": [{"data": "[DONE]"}],
            "ids": {"response": "/response_id"}
        })),
        body: include_bytes!("../../../tests/fixtures/responses/qwen_cumulative.txt").to_vec(),
        expected: Ok(vec![
            id("response", "r-1"),
            thought("Okay,"),
            thought(" the user"),
            thought(" says hi."),
            text("Hello"),
            text("! 你好"),
            Delta::Done,
        ]),
    }
}

fn ndjson() -> Case {
    Case {
        name: "ndjson",
        spec: spec(json!({
            "transport": "ndjson",
            "text": {"path": "/result/response/token", "mode": "delta"},
            "done": [{"path": "/result/done", "equals": true}],
            "ids": {"conversation": "/conversation/id"}
        })),
        body: include_bytes!("../../../tests/fixtures/responses/ndjson_tokens.txt").to_vec(),
        expected: Ok(vec![
            id("conversation", "c-9"),
            text("Hel"),
            text("lo"),
            text(" wörld"),
            Delta::Done,
        ]),
    }
}

fn numbered() -> Case {
    Case {
        name: "numbered",
        spec: spec(json!({
            "transport": "numbered_lines",
            "text": {"path": "/json/text", "mode": "delta", "event": "15"},
            "reasoning": {"flag": {"path": "/json/thinking", "equals": true}},
            "done": [{"event": "8"}],
            "ids": {"chat": "/json/chatId"}
        })),
        body: include_bytes!("../../../tests/fixtures/responses/numbered_lines.txt").to_vec(),
        expected: Ok(vec![
            id("chat", "ch-1"),
            thought("Hmm"),
            thought(", greet."),
            text("Hey"),
            text("!"),
            Delta::Done,
        ]),
    }
}

fn frame(flag: u8, payload: &str) -> Vec<u8> {
    let mut bytes = vec![flag];
    bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    bytes.extend_from_slice(payload.as_bytes());
    bytes
}

fn connect_spec() -> ResponseSpec {
    spec(json!({
        "transport": "length_prefixed",
        "text": {"path": "/message/text", "mode": "delta", "event": "0"},
        "ids": {"turn": "/turnId"}
    }))
}

fn length_prefixed() -> Case {
    let body = [
        frame(0, r#"{"turnId":"t-1","message":{"text":"Hé"}}"#),
        frame(0, r#"{"message":{"text":"llo"}}"#),
        frame(0, r#"{"usage":{"tokens":2}}"#),
        frame(2, "{}"),
    ]
    .concat();
    Case {
        name: "length_prefixed",
        spec: connect_spec(),
        body,
        expected: Ok(vec![
            id("turn", "t-1"),
            text("Hé"),
            text("llo"),
            Delta::Done,
        ]),
    }
}

fn length_prefixed_error() -> Case {
    let body = [
        frame(0, r#"{"message":{"text":"Par"}}"#),
        frame(
            2,
            r#"{"error":{"code":"resource_exhausted","message":"quota exceeded"}}"#,
        ),
    ]
    .concat();
    Case {
        name: "length_prefixed_error",
        spec: connect_spec(),
        body,
        expected: Err(DecodeError::Upstream("quota exceeded".into())),
    }
}

fn single_json() -> Case {
    Case {
        name: "single_json",
        spec: spec(json!({
            "transport": "json",
            "text": {"path": "/reply/text", "mode": "delta"},
            "ids": {"conversation": "/conversation_id"}
        })),
        body: br#"  {"conversation_id":"c-1","reply":{"text":"All at once: {\"ok\"} ]"}}
"#
        .to_vec(),
        expected: Ok(vec![
            id("conversation", "c-1"),
            text("All at once: {\"ok\"} ]"),
        ]),
    }
}

fn markup() -> Case {
    Case {
        name: "markup",
        spec: spec(json!({
            "transport": "sse",
            "text": {"path": "/t", "mode": "delta"},
            "reasoning": {"markup": {"open": "<think>", "close": "</think>"}}
        })),
        body: include_bytes!("../../../tests/fixtures/responses/markup_think.txt").to_vec(),
        expected: Ok(vec![
            thought("Reason"),
            thought("ing"),
            text("Answer <b>"),
            text("ok</b>"),
        ]),
    }
}

/// Open WebUI's markup in a delta stream: summary, quote prefixes and answer tags dropped,
/// whitespace at the block edges too.
fn open_webui() -> Case {
    Case {
        name: "open_webui",
        spec: spec(json!({
            "transport": "sse",
            "text": {"path": "/choices/0/delta/content", "mode": "delta"},
            "reasoning": {"markup": {"open": "<details type=\"reasoning\"", "close": "</details>",
                "summary": true, "quoted": true, "answer": {"open": "<answer>", "close": "</answer>"}}},
            "done": [{"data": "[DONE]"}]
        })),
        body: include_bytes!("../../../tests/fixtures/responses/openwebui_details.txt").to_vec(),
        expected: Ok(vec![
            thought("First I"),
            thought(" read it."),
            thought("\nThen I answer."),
            text("Hello"),
            text(" there, friend."),
            Delta::Done,
        ]),
    }
}

/// Cumulative events of `<think>` markup whose closing tag moves: one clean piece per event.
fn cumulative_think() -> Case {
    let reasoning = ["Two", " and", " two", " make", " four."].map(thought);
    let answer = ["The", " answer", " is", " 4."].map(text);
    Case {
        name: "cumulative_think",
        spec: spec(json!({
            "transport": "sse",
            "text": {"path": "/text", "mode": "cumulative"},
            "reasoning": {"markup": {"open": "<think>", "close": "</think>"}},
            "done": [{"path": "/done", "equals": true}]
        })),
        body: include_bytes!("../../../tests/fixtures/responses/cumulative_think.txt").to_vec(),
        expected: Ok(reasoning
            .into_iter()
            .chain(answer)
            .chain([Delta::Done])
            .collect()),
    }
}

fn inband_error() -> Case {
    Case {
        name: "inband_error",
        spec: spec(json!({
            "transport": "sse",
            "text": {"path": "/text", "mode": "delta"},
            "error": [{"event": "error", "message": "/message"}]
        })),
        body: include_bytes!("../../../tests/fixtures/responses/inband_error.txt").to_vec(),
        expected: Err(DecodeError::Upstream("Too many requests".into())),
    }
}

fn cases() -> Vec<Case> {
    vec![
        openai(),
        chatgpt(),
        chatgpt_batch(),
        deepseek(),
        qwen(),
        ndjson(),
        numbered(),
        length_prefixed(),
        length_prefixed_error(),
        single_json(),
        markup(),
        open_webui(),
        cumulative_think(),
        inband_error(),
    ]
}

#[test]
fn fixtures_decode_to_the_exact_deltas() {
    for case in cases() {
        assert_eq!(
            decode_all(&case.spec, &case.body),
            case.expected,
            "{}",
            case.name
        );
    }
}

#[test]
fn any_chunking_gives_the_same_deltas() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for case in cases() {
        let one_by_one = decode_chunked(&case.spec, &case.body, &mut || 1);
        assert_eq!(one_by_one, case.expected, "{} byte by byte", case.name);
        for round in 0..50 {
            let max = [2, 7, 64][round % 3];
            let chunked = decode_chunked(&case.spec, &case.body, &mut || 1 + rng.below(max));
            assert_eq!(
                chunked, case.expected,
                "{} random chunks, round {round}",
                case.name
            );
        }
    }
}

#[test]
fn text_transport_keeps_multibyte_characters_whole() {
    let spec = spec(json!({"transport": "text", "text": {"path": "", "mode": "delta"}}));
    let body = "Grüße, 世界! 👋 done".as_bytes();
    let whole = decode_all(&spec, body).unwrap();
    assert_eq!(whole, vec![text("Grüße, 世界! 👋 done")]);
    let mut rng = Rng(7);
    for _ in 0..50 {
        let chunked = decode_chunked(&spec, body, &mut || 1 + rng.below(4)).unwrap();
        assert_eq!(merged(chunked), whole);
    }
    // Split inside "ü" (two bytes) and "👋" (four bytes): nothing is emitted for half a char.
    let mut decoder = Decoder::new(&spec);
    let mut out = Vec::new();
    decoder.feed(&body[..3], &mut out).unwrap();
    assert_eq!(out, vec![text("Gr")]);
    decoder.feed(&body[3..], &mut out).unwrap();
    decoder.finish(&mut out).unwrap();
    assert_eq!(merged(out), whole);
    // Invalid bytes are replaced, not fatal, in the text transport.
    assert_eq!(
        merged(decode_all(&spec, b"ok \xff\xfe then \xe2\x82").unwrap()),
        vec![text("ok \u{fffd}\u{fffd} then \u{fffd}")]
    );
}

#[test]
fn text_transport_splits_markup_reasoning_across_chunks() {
    let spec = spec(json!({
        "transport": "text",
        "text": {"path": "", "mode": "delta"},
        "reasoning": {"markup": {"open": "<details type=\"reasoning\"", "close": "</details>"}}
    }));
    let body = "<details type=\"reasoning\" done=\"true\">plan</details>Answer".as_bytes();
    for size in 1..body.len() {
        let out = decode_chunked(&spec, body, &mut || size).unwrap();
        assert_eq!(
            collect_text(&out),
            ("Answer".into(), "plan".into()),
            "chunks of {size}"
        );
    }
}

#[test]
fn cumulative_flag_sticky_phase_announced_once() {
    let spec = spec(json!({
        "transport": "ndjson",
        "text": {"path": "/text", "mode": "cumulative"},
        "reasoning": {"flag": {"path": "/phase", "equals": "thinking", "sticky": true}}
    }));
    let body = br#"{"phase":"thinking","text":"A"}
{"text":"AB"}
{"phase":"answer"}
{"text":"C"}
{"text":"CD"}
{"text":""}
{"text":"CDE"}
"#;
    assert_eq!(
        decode_all(&spec, body).unwrap(),
        vec![thought("A"), thought("B"), text("C"), text("D"), text("E")]
    );
}

#[test]
fn cumulative_value_that_does_not_extend_starts_a_new_segment() {
    let spec = spec(json!({"transport": "ndjson", "text": {"path": "/t", "mode": "cumulative"}}));
    let body = b"{\"t\":\"Let\"}\n{\"t\":\"Let me\"}\n{\"t\":\"Hi\"}\n{\"t\":\"Hi!\"}\n";
    assert_eq!(
        decode_all(&spec, body).unwrap(),
        vec![text("Let"), text(" me"), text("Hi"), text("!")]
    );
}

#[test]
fn patch_ops_bare_lists_sets_and_case() {
    let spec = spec(json!({
        "transport": "websocket",
        "text": {"path": "/message/content", "mode": "append_patch"}
    }));
    let mut decoder = Decoder::new(&spec);
    let mut out = Vec::new();
    for message in [
        r#"{"v":{"message":{"content":"He"}}}"#,
        r#"[{"p":"message/content","o":"APPEND","v":"llo"},{"p":"/message/x","o":"add","v":1}]"#,
        r#"{"p":"/message/content","o":"Replace","v":"Hello, world"}"#,
        r#"{"v":"Hello, world and more"}"#,
        r#"{"p":"/message/content","o":"set","v":"Restart"}"#,
        r#"{"p":"/message","o":"replace","v":{"content":"Restart!"}}"#,
        "ping",
        r#"{"p":"/message/content","o":"remove","v":null}"#,
    ] {
        decoder.feed_message(None, message, &mut out).unwrap();
    }
    decoder
        .feed(
            br#"{"p":"/message/content","o":"append","v":" via feed"}"#,
            &mut out,
        )
        .unwrap();
    decoder.finish(&mut out).unwrap();
    assert_eq!(
        out,
        vec![
            text("He"),
            text("llo"),
            text(", world"),
            text(" and more"),
            text("Restart"),
            text("!"),
            text(" via feed"),
        ]
    );
}

#[test]
fn patch_reasoning_field_and_text_share_one_document() {
    let spec = spec(json!({
        "transport": "sse",
        "text": {"path": "/message/content/parts/0", "mode": "append_patch"},
        "reasoning": {"field": {"path": "/message/thoughts", "mode": "append_patch"}}
    }));
    let body =
        br#"data: {"p":"","o":"add","v":{"message":{"thoughts":"Plan","content":{"parts":[""]}}}}

data: {"p":"/message/thoughts","o":"append","v":" more"}

data: {"v":" still"}

data: {"p":"/message/content/parts/0","o":"append","v":"Answer"}

"#;
    assert_eq!(
        decode_all(&spec, body).unwrap(),
        vec![
            thought("Plan"),
            thought(" more"),
            thought(" still"),
            text("Answer")
        ]
    );
}

#[test]
fn done_signal_stops_further_output() {
    let spec = spec(json!({
        "transport": "sse",
        "text": {"path": "/t", "mode": "delta"},
        "done": [{"path": "/status", "equals": "finished"}],
        "error": [{"path": "/error"}]
    }));
    let body = br#"data: {"t":"a"}

data: {"t":"b","status":"finished"}

data: {"t":"c"}

data: {"error":"too late"}

"#;
    let mut decoder = Decoder::new(&spec);
    let mut out = Vec::new();
    decoder.feed(body, &mut out).unwrap();
    assert!(decoder.is_done());
    decoder.feed(b"data: {\"t\":\"d\"}\n\n", &mut out).unwrap();
    decoder
        .feed_message(None, r#"{"t":"e"}"#, &mut out)
        .unwrap();
    decoder.finish(&mut out).unwrap();
    assert_eq!(out, vec![text("a"), text("b"), Delta::Done]);
}

#[test]
fn error_rules_take_status_fields_and_need_a_name() {
    let failed = spec(json!({
        "transport": "ndjson",
        "text": {"path": "/t", "mode": "delta"},
        "error": [{"path": "/status", "equals": "failed", "message": "/error/msg"},
                  {"path": "/detail"}]
    }));
    let status =
        b"{\"t\":\"x\",\"status\":\"ok\"}\n{\"status\":\"failed\",\"error\":{\"msg\":\"boom\"}}\n";
    assert_eq!(
        decode_all(&failed, status),
        Err(DecodeError::Upstream("boom".into()))
    );
    let detail = b"{\"detail\":null,\"t\":\"x\"}\n{\"detail\":{\"code\":7}}\n";
    assert_eq!(
        decode_all(&failed, detail),
        Err(DecodeError::Upstream("{\"code\":7}".into()))
    );

    // `event: error` is not an error unless a rule names it; raw (non-JSON) data is the
    // message of a rule without pointers.
    let body = b"event: error\ndata: {\"message\":\"x\"}\n\ndata: {\"t\":\"fine\"}\n\n";
    let unnamed = spec(json!({"transport": "sse", "text": {"path": "/t", "mode": "delta"}}));
    assert_eq!(decode_all(&unnamed, body), Ok(vec![text("fine")]));
    let named = spec(json!({
        "transport": "sse",
        "text": {"path": "/t", "mode": "delta"},
        "error": [{"event": "error"}]
    }));
    let raw = b"event: error\ndata: Rate limit reached\n\n";
    assert_eq!(
        decode_all(&named, raw),
        Err(DecodeError::Upstream("Rate limit reached".into()))
    );
}

#[test]
fn ids_are_emitted_once_from_any_event() {
    let spec = spec(json!({
        "transport": "ndjson",
        "text": {"path": "/t", "mode": "delta", "event": "never"},
        "ids": {"a": "/a", "n": "/n/0"}
    }));
    let body = b"{\"a\":null}\n{\"a\":\"\"}\n{\"n\":[42]}\n{\"a\":\"first\",\"n\":[43]}\n{\"a\":\"second\"}\n";
    assert_eq!(
        decode_all(&spec, body).unwrap(),
        vec![id("n", "42"), id("a", "first")]
    );
}

#[test]
fn unterminated_last_sse_event_is_dropped_but_last_ndjson_line_is_kept() {
    let sse = spec(json!({"transport": "sse", "text": {"path": "/t", "mode": "delta"}}));
    assert_eq!(
        decode_all(&sse, b"data: {\"t\":\"a\"}\n\ndata: {\"t\":\"b\"}\n").unwrap(),
        vec![text("a")]
    );
    let ndjson = spec(json!({"transport": "ndjson", "text": {"path": "/t", "mode": "delta"}}));
    assert_eq!(
        decode_all(&ndjson, b"{\"t\":\"a\"}\n{\"t\":\"b\"}").unwrap(),
        vec![text("a"), text("b")]
    );
}

#[test]
fn single_json_is_decoded_as_soon_as_it_is_complete() {
    let case = single_json();
    let mut decoder = Decoder::new(&case.spec);
    let mut out = Vec::new();
    decoder
        .feed(&case.body[..case.body.len() - 1], &mut out)
        .unwrap();
    assert_eq!(Ok(out.clone()), case.expected);
    decoder.finish(&mut out).unwrap();
    assert_eq!(Ok(out), case.expected);
    // A scalar document waits for the end of the body.
    let scalar = spec(json!({"transport": "json", "text": {"path": "", "mode": "delta"}}));
    assert_eq!(
        decode_all(&scalar, b"\"just text\"").unwrap(),
        vec![text("just text")]
    );
}

#[test]
fn malformed_inputs_are_reported_with_where() {
    let ndjson = spec(json!({"transport": "ndjson", "text": {"path": "/t", "mode": "delta"}}));
    let err = decode_all(&ndjson, b"{\"t\":\"a\"}\n{\"t\":\n").unwrap_err();
    assert!(
        matches!(&err, DecodeError::Malformed(m) if m.contains("not JSON")),
        "{err}"
    );

    let numbered =
        spec(json!({"transport": "numbered_lines", "text": {"path": "", "mode": "delta"}}));
    let err = decode_all(&numbered, b"0:\"a\"\nno tag here\n").unwrap_err();
    assert!(
        matches!(&err, DecodeError::Malformed(m) if m.contains("line 2")),
        "{err}"
    );

    let huge = [vec![0u8], (MAX_FRAME as u32 + 1).to_be_bytes().to_vec()].concat();
    let err = decode_all(&connect_spec(), &huge).unwrap_err();
    assert!(
        matches!(&err, DecodeError::Malformed(m) if m.contains("exceeds")),
        "{err}"
    );

    let truncated = frame(0, r#"{"message":{"text":"x"}}"#);
    let err = decode_all(&connect_spec(), &truncated[..truncated.len() - 2]).unwrap_err();
    assert!(
        matches!(&err, DecodeError::Malformed(m) if m.contains("ends inside frame 1")),
        "{err}"
    );

    let compressed = frame(1, "{}");
    assert!(matches!(
        decode_all(&connect_spec(), &compressed),
        Err(DecodeError::Malformed(_))
    ));

    let sse = spec(json!({"transport": "sse", "text": {"path": "/t", "mode": "delta"}}));
    let err = decode_all(&sse, b"data: {\"t\":\"\xff\"}\n\n").unwrap_err();
    assert!(
        matches!(&err, DecodeError::Malformed(m) if m.contains("UTF-8")),
        "{err}"
    );

    let json_doc = spec(json!({"transport": "json", "text": {"path": "/t", "mode": "delta"}}));
    assert!(matches!(
        decode_all(&json_doc, b"{\"t\":\"a\"} trailing"),
        Err(DecodeError::Malformed(_))
    ));
    assert!(matches!(
        decode_all(&json_doc, b"{\"t\":"),
        Err(DecodeError::Malformed(_))
    ));
    assert!(matches!(
        decode_all(&json_doc, b"  "),
        Err(DecodeError::Malformed(_))
    ));

    // After an error the decoder stays quiet.
    let mut decoder = Decoder::new(&ndjson);
    let mut out = Vec::new();
    assert!(decoder.feed(b"nope\n", &mut out).is_err());
    decoder.feed(b"{\"t\":\"late\"}\n", &mut out).unwrap();
    decoder.finish(&mut out).unwrap();
    assert!(out.is_empty());
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(12345);
    let alphabet = b"data: {}[]\"\\:\n\r,event0123456789-/pvo\xff\xe2\x82\xac";
    let mut specs: Vec<ResponseSpec> = cases().into_iter().map(|c| c.spec).collect();
    for transport in [
        "text",
        "websocket",
        "json",
        "ndjson",
        "numbered_lines",
        "length_prefixed",
    ] {
        specs.push(spec(json!({
            "transport": transport,
            "text": {"path": "response/fragments/-1/content", "mode": "append_patch"},
            "reasoning": {"markup": {"open": "<think>", "close": "</think>"}}
        })));
    }
    for spec in &specs {
        for _ in 0..200 {
            let len = rng.below(200);
            let body: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.below(alphabet.len())])
                .collect();
            let _ = decode_chunked(spec, &body, &mut || 1 + rng.below(9));
        }
        // Valid shapes with hostile values.
        for message in [
            r#"{"p":"response/fragments/-1/content","o":"append","v":{"x":1}}"#,
            r#"{"p":"response/fragments","o":"append","v":"str"}"#,
            r#"{"p":"response/fragments/99/content","o":"set","v":"x"}"#,
            r#"{"o":"batch","v":"not a list"}"#,
            r#"[1, "two", {"v": null}]"#,
            r#"{"v":[]}"#,
        ] {
            let mut decoder = Decoder::new(spec);
            let _ = decoder.feed_message(None, message, &mut Vec::new());
        }
    }
}

#[tokio::test]
async fn decode_stream_matches_decode_all_and_reports_body_errors() {
    for case in cases() {
        let chunks: Vec<Result<Vec<u8>, String>> =
            case.body.chunks(5).map(|c| Ok(c.to_vec())).collect();
        let streamed: Vec<_> = decode_stream(&case.spec, futures_util::stream::iter(chunks))
            .collect()
            .await;
        let expected: Vec<Result<Delta, DecodeError>> = match case.expected {
            Ok(deltas) => deltas.into_iter().map(Ok).collect(),
            Err(e) => {
                let mut prefix: Vec<_> = decode_all_prefix(&case.spec, &case.body)
                    .into_iter()
                    .map(Ok)
                    .collect();
                prefix.push(Err(e));
                prefix
            }
        };
        assert_eq!(streamed, expected, "{}", case.name);
    }

    // A broken body ends the stream with a `Body` error after what was decoded.
    let spec = openai().spec;
    let body = futures_util::stream::iter(vec![
        Ok(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n".to_vec()),
        Err("connection reset"),
        Ok(b"data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n".to_vec()),
    ]);
    let streamed: Vec<_> = decode_stream(&spec, body).collect().await;
    assert_eq!(
        streamed,
        vec![
            Ok(text("a")),
            Err(DecodeError::Body("connection reset".into()))
        ]
    );

    // Once done, the body is not read any further.
    let body = futures_util::stream::iter(vec![
        Ok(b"data: [DONE]\n\n".to_vec()),
        Err("must not be read"),
    ]);
    let streamed: Vec<_> = decode_stream(&spec, body).collect().await;
    assert_eq!(streamed, vec![Ok(Delta::Done)]);
}

/// The deltas a decode produced before failing.
fn decode_all_prefix(spec: &ResponseSpec, body: &[u8]) -> Vec<Delta> {
    let mut decoder = Decoder::new(spec);
    let mut out = Vec::new();
    let _ = decoder
        .feed(body, &mut out)
        .and_then(|()| decoder.finish(&mut out));
    out
}

#[test]
fn collect_text_joins_channels() {
    let deltas = vec![
        text("a"),
        thought("x"),
        id("n", "v"),
        text("b"),
        Delta::Done,
    ];
    assert_eq!(collect_text(&deltas), ("ab".into(), "x".into()));
}
