//! A mutation fuzzer on stable Rust: random and mutated bytes into every decoder, flow import
//! and the flow renderer, and the HTTP API's request parsers. Seeds are the recorded
//! responses, flows and requests in this repository; each case mutates one (bit flips,
//! splices, truncations, inserted framing tokens) with a seeded RNG, so a failure is
//! reproducible from the seed it prints.
//!
//! `cargo test` runs a bounded count per target (`CT_FUZZ_CASES`, default 1000). A long run:
//! `CT_FUZZ_CASES=200000 cargo test --release --test fuzz -- --nocapture`.
//!
//! Properties checked besides "no panic": a decoder gives the same text and reasoning however
//! the bytes are chunked; no API answer to a bad request is a 500, and every error has a JSON
//! body.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::panic::AssertUnwindSafe;
use std::path::Path;

use computetower::flow::{Flow, ResponseSpec, Transport};
use computetower::replay::decode::{Decoder, Delta, collect_text, decode_all};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

fn cases() -> usize {
    std::env::var("CT_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

fn seed() -> u64 {
    std::env::var("CT_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_c0de)
}

/// Byte strings that matter to the framings and rules: where mutations are most likely to
/// find a bug.
const TOKENS: &[&[u8]] = &[
    b"data: ",
    b"data:",
    b"event: ",
    b"\n\n",
    b"\r\n",
    b"\n",
    b"[DONE]",
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b"\\",
    b":",
    b",",
    b"null",
    b"-1",
    b"99999999999999999999",
    b"{\"p\":\"\",\"o\":\"patch\",\"v\":[",
    b"{\"v\":[{\"p\":\"/message/content/parts/0\",\"o\":\"append\",\"v\":\"x\"}]}",
    b"{\"o\":\"append\",\"v\":",
    b"<think>",
    b"</think>",
    b"<details type=\"reasoning\" done=\"false\">",
    b"</details>",
    b"\x00",
    b"\xff",
    b"\xc3",
    b"\xe2\x82",
    b"\x00\x00\x00\x00\x05",
    b"\x02\x00\x00\x00\x02{}",
    b"8:null\n",
    b"0:\"tok\"\n",
];

fn mutate(rng: &mut StdRng, seed: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let len = data.len();
        match rng.random_range(0..9) {
            0 if len > 0 => {
                let at = rng.random_range(0..len);
                data[at] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let at = rng.random_range(0..len);
                data[at] = rng.random();
            }
            2 => {
                let at = rng.random_range(0..=len);
                let token = TOKENS[rng.random_range(0..TOKENS.len())];
                data.splice(at..at, token.iter().copied());
            }
            3 if len > 0 => {
                let start = rng.random_range(0..len);
                let end = (start + rng.random_range(1..=32)).min(len);
                data.drain(start..end);
            }
            4 if len > 0 => {
                let start = rng.random_range(0..len);
                let end = (start + rng.random_range(1..=64)).min(len);
                let copy = data[start..end].to_vec();
                let at = rng.random_range(0..=data.len());
                data.splice(at..at, copy);
            }
            5 if !others.is_empty() => {
                let other = &others[rng.random_range(0..others.len())];
                if !other.is_empty() && len > 0 {
                    let cut = rng.random_range(0..len);
                    let from = rng.random_range(0..other.len());
                    data.truncate(cut);
                    data.extend_from_slice(&other[from..]);
                }
            }
            6 if len > 0 => data.truncate(rng.random_range(0..len)),
            7 => {
                let at = rng.random_range(0..=len);
                let n = rng.random_range(1..=16);
                let random: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                data.splice(at..at, random);
            }
            _ => {}
        }
    }
    data
}

/// Runs `check` on `cases()` mutated inputs; a panic reports the case and its bytes.
fn fuzz(name: &str, seeds: &[Vec<u8>], mut check: impl FnMut(&[u8], &mut StdRng)) {
    assert!(!seeds.is_empty(), "{name}: no seeds");
    let base = seed();
    let mut rng = StdRng::seed_from_u64(base);
    for case in 0..cases() {
        let seed_bytes = &seeds[rng.random_range(0..seeds.len())];
        let input = if rng.random_range(0..10) == 0 {
            seed_bytes.clone()
        } else {
            mutate(&mut rng, seed_bytes, seeds)
        };
        let mut case_rng = StdRng::seed_from_u64(base ^ case as u64);
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| check(&input, &mut case_rng)));
        if let Err(panic) = outcome {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            panic!(
                "{name}: case {case} (CT_FUZZ_SEED={base}) failed: {message}\ninput: {:?}",
                String::from_utf8_lossy(&input)
            );
        }
    }
    eprintln!("{name}: {} cases, no failure", cases());
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn flows() -> Vec<(String, Flow)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(repo().join("flows")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        out.push((name, Flow::from_json(&text).unwrap()));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The response bodies recorded for a shape (`demo-openai` …), decoded from the recording.
fn recorded_bodies(name: &str) -> Vec<Vec<u8>> {
    let path = repo().join(format!("tests/fixtures/recordings/{name}.json"));
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let recording: Value = serde_json::from_str(&text).unwrap();
    let mut bodies = Vec::new();
    for exchange in recording["exchanges"].as_array().into_iter().flatten() {
        let body = &exchange["response_body"];
        if let Some(text) = body["text"].as_str() {
            bodies.push(text.as_bytes().to_vec());
        } else if let Some(b64) = body["base64"].as_str() {
            use base64::Engine;
            if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(b64) {
                bodies.push(bytes);
            }
        }
    }
    bodies
}

fn response_fixtures() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(repo().join("tests/fixtures/responses")).unwrap() {
        out.push(std::fs::read(entry.unwrap().path()).unwrap());
    }
    out
}

/// The text and reasoning of a decode, or that it failed.
fn reading(result: Result<Vec<Delta>, String>) -> Result<(String, String), ()> {
    result.map(|d| collect_text(&d)).map_err(|_| ())
}

fn decode_chunked(
    spec: &ResponseSpec,
    bytes: &[u8],
    rng: &mut StdRng,
) -> Result<Vec<Delta>, String> {
    let mut decoder = Decoder::new(spec);
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = rng.random_range(1..=rest.len().min(97));
        let (chunk, tail) = rest.split_at(n);
        decoder.feed(chunk, &mut out).map_err(|e| e.to_string())?;
        rest = tail;
    }
    decoder.finish(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Every flow's decoder over its shape's recorded bytes and every fixture, mutated; chunking
/// never changes what is read (the text transport only cuts its pieces differently).
#[test]
fn decoders_survive_mutated_bytes_and_read_the_same_in_any_chunking() {
    let fixtures = response_fixtures();
    for (name, flow) in flows() {
        let mut seeds = recorded_bodies(&name);
        seeds.extend(fixtures.iter().cloned());
        let spec = flow.response.clone();
        let websocket = spec.transport == Transport::Websocket;
        fuzz(&format!("decoder {name}"), &seeds, |input, rng| {
            if websocket {
                // One message per frame: feed lines as messages.
                let mut decoder = Decoder::new(&spec);
                let mut out = Vec::new();
                for line in input.split(|b| *b == b'\n') {
                    let text = String::from_utf8_lossy(line);
                    if decoder.feed_message(None, &text, &mut out).is_err() {
                        break;
                    }
                }
                let _ = decoder.finish(&mut out);
                return;
            }
            let whole = decode_all(&spec, input).map_err(|e| e.to_string());
            let chunked = decode_chunked(&spec, input, rng);
            if spec.transport != Transport::Text {
                assert_eq!(
                    reading(whole),
                    reading(chunked),
                    "chunking changed what was read"
                );
            }
        });
    }
}

/// Flow files, mutated as bytes and as JSON values: import either refuses them with a
/// message or accepts a flow that renders (or refuses to render) without a panic.
#[test]
fn flow_import_and_rendering_survive_mutated_flow_files() {
    use computetower::pinning::{Pins, check_import, static_origins};
    use computetower::replay::render::{Context, Prompt, render};
    let seeds: Vec<Vec<u8>> = flows()
        .iter()
        .map(|(_, f)| serde_json::to_vec(f).unwrap())
        .collect();
    let base = url::Url::parse("https://chat.example.com/app").unwrap();
    let pins = Pins::new(&base, []);
    let session = computetower::session::SessionData {
        local_storage: [("demo_token".to_owned(), "tok".to_owned())].into(),
        ..Default::default()
    };
    let prompt = Prompt {
        messages: vec![(computetower::role::Role::User, "hi {{uuid}}".to_owned())],
        model: "m".into(),
        attachments: Vec::new(),
    };
    let preflight = [
        ("csrf".to_owned(), "c".to_owned()),
        ("conversation_id".to_owned(), "x/y".to_owned()),
        ("org_id".to_owned(), "o".to_owned()),
    ]
    .into();
    let conversation = Default::default();
    fuzz("flow import", &seeds, |input, rng| {
        let mut text = String::from_utf8_lossy(input).into_owned();
        // Half the cases also mutate a JSON leaf, to get past the parser more often.
        if rng.random_bool(0.5)
            && let Ok(mut value) = serde_json::from_str::<Value>(&text)
        {
            mutate_value(&mut value, rng);
            text = value.to_string();
        }
        let Ok(flow) = Flow::from_json(&text) else {
            return;
        };
        let _ = static_origins(&flow);
        let _ = check_import(&flow, [&base], &[]);
        let _ = flow.redacted();
        let ctx = Context {
            prompt: &prompt,
            session: &session,
            preflight: &preflight,
            conversation: &conversation,
            now_ms: 1,
            pins: &pins,
            file: None,
            attached: None,
        };
        for http in std::iter::once(&flow.request).chain(flow.preflight.iter().map(|s| &s.http)) {
            if let Ok(rendered) = render(http, &base, &ctx) {
                assert!(
                    pins.allows(&rendered.url),
                    "a rendered call left the pinned origin"
                );
            }
        }
    });
}

fn mutate_value(value: &mut Value, rng: &mut StdRng) {
    const STRINGS: &[&str] = &[
        "",
        "{{session.local.demo_token}}",
        "https://evil.test/x",
        "//evil.test",
        "{{",
        "}}",
        "/",
        "-1",
        "GET\r\nX: y",
        "{{preflight.nope}}",
        "\u{0}",
        "é🙂",
    ];
    match value {
        Value::Object(map) if !map.is_empty() => {
            let keys: Vec<String> = map.keys().cloned().collect();
            let key = &keys[rng.random_range(0..keys.len())];
            if rng.random_bool(0.15) {
                map.remove(key);
            } else if let Some(child) = map.get_mut(key) {
                mutate_value(child, rng);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            let at = rng.random_range(0..items.len());
            mutate_value(&mut items[at], rng);
        }
        leaf => {
            *leaf = match rng.random_range(0..4) {
                0 => Value::String(STRINGS[rng.random_range(0..STRINGS.len())].to_owned()),
                1 => Value::from(rng.random::<i64>()),
                2 => Value::Null,
                _ => serde_json::json!([{"x": STRINGS[rng.random_range(0..STRINGS.len())]}]),
            }
        }
    }
}

/// Request bodies for every API path, mutated, through the real router (no account: the
/// parse is what runs). No answer is a 500, and every error has a JSON body.
#[tokio::test]
async fn the_api_parsers_survive_mutated_requests() {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;
    let data = common::Data::new();
    let config = computetower::config::Config {
        data_dir: data.path().to_path_buf(),
        ..Default::default()
    };
    let store = computetower::server::open_store(&config).await.unwrap();
    let (events, _writer) = computetower::store::events::EventWriter::start(store.clone());
    let state = computetower::server::app_state(config, store, events);
    let app = computetower::api::router(state);
    let seeds: Vec<Vec<u8>> = [
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}"#,
        r#"{"model":"m","messages":[{"role":"system","content":[{"type":"text","text":"s"}]},{"role":"user","content":"x"},{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},{"role":"tool","tool_call_id":"c1","content":"r"}],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}],"tool_choice":"auto","max_tokens":5,"stop":["x"],"response_format":{"type":"json_object"}}"#,
        r#"{"model":"m","input":[{"role":"user","content":[{"type":"input_text","text":"hi"}]}],"instructions":"be brief","stream":true}"#,
        r#"{"model":"m","max_tokens":10,"system":"s","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"tools":[{"name":"f","input_schema":{"type":"object"}}]}"#,
        include_str!("../flows/demo-openai.json"),
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let paths = [
        "/v1/chat/completions",
        "/v1/responses",
        "/v1/messages",
        "/admin/flows",
    ];
    let base = seed();
    let mut rng = StdRng::seed_from_u64(base);
    for case in 0..cases() {
        let seed_bytes = &seeds[rng.random_range(0..seeds.len())];
        let body = mutate(&mut rng, seed_bytes, &seeds);
        let path = paths[rng.random_range(0..paths.len())];
        let request = Request::post(path)
            .header("content-type", "application/json")
            .body(Body::from(body.clone()))
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        // 502/503 are answers (no flow, no account); a 500 is a failure of ours.
        assert!(
            status != axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "case {case} (CT_FUZZ_SEED={base}) {path}: {status}: {}\nbody: {:?}",
            String::from_utf8_lossy(&bytes),
            String::from_utf8_lossy(&body)
        );
        if !status.is_success() {
            let parsed: Result<Value, _> = serde_json::from_slice(&bytes);
            assert!(
                parsed.is_ok_and(|v| v.get("error").is_some()),
                "case {case} {path}: {status} without a JSON error: {:?}",
                String::from_utf8_lossy(&bytes)
            );
        }
    }
    eprintln!("api parsers: {} cases, no failure", cases());
}
