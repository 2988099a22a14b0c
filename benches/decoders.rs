//! Decoder throughput: a ~1 MB realistic body per transport/accrual combination, fed to
//! `Decoder::feed` in 4 KiB chunks as a socket would deliver it. Figures go in the README.
//!
//! Groups: `decoders` (this file's). Another group (`chunk_encoder`) can be added to
//! `criterion_main!` at the bottom.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a bench run fails by panicking

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;

use computetower::flow::ResponseSpec;
use computetower::replay::decode::{Decoder, Delta};

const TARGET: usize = 1 << 20;
const CHUNK: usize = 4096;
const WORDS: [&str; 8] = [
    "The ", "quick ", "brown ", "fox, ", "naïve ", "café ", "你好 ", "jumps. ",
];

fn spec(value: serde_json::Value) -> ResponseSpec {
    serde_json::from_value(value).expect("bench spec parses")
}

/// A token of two words.
fn token(i: usize) -> String {
    format!(
        "{}{}",
        WORDS[i % WORDS.len()],
        WORDS[(i * 3 + 1) % WORDS.len()]
    )
}

/// Appends `event(i)` until the body reaches `TARGET`, then `tail`.
fn build(mut event: impl FnMut(usize) -> Vec<u8>, tail: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(TARGET + 4096);
    let mut i = 0;
    while body.len() < TARGET {
        body.extend_from_slice(&event(i));
        i += 1;
    }
    body.extend_from_slice(tail);
    body
}

fn sse(data: &serde_json::Value) -> Vec<u8> {
    format!("data: {data}\n\n").into_bytes()
}

struct Bench {
    name: &'static str,
    spec: ResponseSpec,
    body: Vec<u8>,
}

fn benches() -> Vec<Bench> {
    let openai = Bench {
        name: "sse_delta_field_reasoning",
        spec: spec(json!({
            "transport": "sse",
            "text": {"path": "/choices/0/delta/content", "mode": "delta"},
            "reasoning": {"field": {"path": "/choices/0/delta/reasoning_content", "mode": "delta"}},
            "done": [{"data": "[DONE]"}],
            "ids": {"id": "/id"}
        })),
        body: build(
            |i| {
                let field = if i < 200 {
                    "reasoning_content"
                } else {
                    "content"
                };
                sse(&json!({
                    "id": "chatcmpl-123", "object": "chat.completion.chunk",
                    "created": 1_750_000_000, "model": "some-model",
                    "choices": [{"index": 0, "delta": {field: token(i)}, "finish_reason": null}]
                }))
            },
            b"data: [DONE]\n\n",
        ),
    };
    let chatgpt = Bench {
        name: "sse_append_patch",
        spec: spec(json!({
            "transport": "sse",
            "text": {"path": "/message/content/parts/0", "mode": "append_patch", "event": "delta"},
            "done": [{"data": "[DONE]"}]
        })),
        body: build(
            |i| {
                match i {
                0 => b"event: delta\ndata: {\"p\": \"\", \"o\": \"add\", \"v\": {\"message\": {\"id\": \"m\", \"content\": {\"content_type\": \"text\", \"parts\": [\"\"]}, \"status\": \"in_progress\"}, \"conversation_id\": \"c\"}, \"c\": 0}\n\n".to_vec(),
                1 => format!("event: delta\ndata: {}\n\n", json!({"p": "/message/content/parts/0", "o": "append", "v": token(i)})).into_bytes(),
                _ if i % 50 == 0 => sse(&json!({"type": "server_ste_metadata", "metadata": {"n": i}})),
                _ => format!("event: delta\ndata: {}\n\n", json!({"v": token(i)})).into_bytes(),
            }
            },
            b"data: [DONE]\n\n",
        ),
    };
    let deepseek = Bench {
        name: "sse_append_patch_fragments_flag",
        spec: spec(json!({
            "transport": "sse",
            "text": {"path": "response/fragments/-1/content", "mode": "append_patch"},
            "reasoning": {"flag": {"path": "type", "equals": "THINK"}},
            "done": [{"event": "close"}]
        })),
        body: build(
            |i| match i {
                0 => sse(
                    &json!({"v": {"response": {"message_id": 2, "fragments": [{"id": 1, "type": "THINK", "content": ""}]}}}),
                ),
                1 => sse(
                    &json!({"p": "response/fragments/-1/content", "o": "APPEND", "v": token(i)}),
                ),
                500 => sse(
                    &json!({"p": "response/fragments", "o": "APPEND", "v": [{"id": 2, "type": "RESPONSE", "content": token(i)}]}),
                ),
                501 => sse(
                    &json!({"p": "response/fragments/-1/content", "o": "APPEND", "v": token(i)}),
                ),
                _ => sse(&json!({"v": token(i)})),
            },
            b"event: close\ndata: {\"click_behavior\":\"none\"}\n\n",
        ),
    };
    let mut so_far = String::new();
    let qwen = Bench {
        name: "sse_cumulative_flag",
        spec: spec(json!({
            "transport": "sse",
            "text": {"path": "/choices/0/delta/content", "mode": "cumulative"},
            "reasoning": {"flag": {"path": "/choices/0/delta/phase", "equals": "think"}},
            "done": [{"data": "[DONE]"}]
        })),
        body: build(
            |i| {
                if i == 100 {
                    so_far.clear();
                }
                so_far.push_str(&token(i));
                let phase = if i < 100 { "think" } else { "answer" };
                sse(&json!({"choices": [{"delta": {"content": so_far, "phase": phase}}]}))
            },
            b"data: [DONE]\n\n",
        ),
    };
    let ndjson = Bench {
        name: "ndjson_delta",
        spec: spec(json!({
            "transport": "ndjson",
            "text": {"path": "/result/response/token", "mode": "delta"},
            "done": [{"path": "/result/done", "equals": true}]
        })),
        body: build(
            |i| {
                let line = if i % 40 == 39 {
                    json!({"type": "usage", "result": {"usage": {"tokens": i}}})
                } else {
                    json!({"type": "token", "result": {"response": {"token": token(i)}}})
                };
                format!("{line}\n").into_bytes()
            },
            b"{\"type\":\"done\",\"result\":{\"done\":true}}\n",
        ),
    };
    let numbered = Bench {
        name: "numbered_lines_flag",
        spec: spec(json!({
            "transport": "numbered_lines",
            "text": {"path": "/json/text", "mode": "delta", "event": "15"},
            "reasoning": {"flag": {"path": "/json/thinking", "equals": true}},
            "done": [{"event": "8"}]
        })),
        body: build(
            |i| {
                let event =
                    json!({"json": {"type": "text", "thinking": i < 300, "text": token(i)}});
                format!("15:{event}\n").into_bytes()
            },
            b"8:null\n",
        ),
    };
    let frame = |flag: u8, payload: &[u8]| {
        let mut bytes = vec![flag];
        bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        bytes.extend_from_slice(payload);
        bytes
    };
    let connect = Bench {
        name: "length_prefixed",
        spec: spec(json!({
            "transport": "length_prefixed",
            "text": {"path": "/message/text", "mode": "delta", "event": "0"}
        })),
        body: build(
            |i| {
                frame(
                    0,
                    json!({"message": {"text": token(i)}})
                        .to_string()
                        .as_bytes(),
                )
            },
            &frame(2, b"{}"),
        ),
    };
    let mut text = String::new();
    while text.len() < TARGET {
        text.push_str(&token(text.len()));
    }
    let single = Bench {
        name: "json_document",
        spec: spec(json!({"transport": "json", "text": {"path": "/reply/text", "mode": "delta"}})),
        body: json!({"conversation_id": "c", "reply": {"text": text}})
            .to_string()
            .into_bytes(),
    };
    let plain = Bench {
        name: "text",
        spec: spec(json!({"transport": "text", "text": {"path": "", "mode": "delta"}})),
        body: text.clone().into_bytes(),
    };
    let markup = Bench {
        name: "text_markup",
        spec: spec(json!({
            "transport": "text",
            "text": {"path": "", "mode": "delta"},
            "reasoning": {"markup": {"open": "<think>", "close": "</think>"}}
        })),
        body: format!("<think>{}</think>{}", &text[..TARGET / 4], text).into_bytes(),
    };
    let sse_markup = Bench {
        name: "sse_delta_markup",
        spec: spec(json!({
            "transport": "sse",
            "text": {"path": "/t", "mode": "delta"},
            "reasoning": {"markup": {"open": "<think>", "close": "</think>"}}
        })),
        body: build(
            |i| {
                let piece = match i {
                    0 => "<thi".to_owned(),
                    1 => "nk>".to_owned(),
                    300 => "</think>".to_owned(),
                    _ if i % 7 == 0 => "a < b".to_owned(),
                    _ => token(i),
                };
                sse(&json!({"t": piece}))
            },
            b"",
        ),
    };
    vec![
        openai, chatgpt, deepseek, qwen, ndjson, numbered, connect, single, plain, markup,
        sse_markup,
    ]
}

fn decode(spec: &ResponseSpec, body: &[u8]) -> usize {
    let mut decoder = Decoder::new(spec);
    let mut out: Vec<Delta> = Vec::with_capacity(256);
    let mut emitted = 0;
    for chunk in body.chunks(CHUNK) {
        decoder.feed(chunk, &mut out).expect("bench body decodes");
        emitted += out.len();
        out.clear();
    }
    decoder.finish(&mut out).expect("bench body ends well");
    emitted + out.len()
}

fn bench_decoders(c: &mut Criterion) {
    let mut group = c.benchmark_group("decoders");
    for bench in benches() {
        assert!(
            decode(&bench.spec, &bench.body) > 0,
            "{} yields deltas",
            bench.name
        );
        group.throughput(Throughput::Bytes(bench.body.len() as u64));
        group.bench_function(bench.name, |b| {
            b.iter(|| decode(black_box(&bench.spec), black_box(&bench.body)))
        });
    }
    group.finish();
}

criterion_group!(decoders, bench_decoders);
// Add further groups here (e.g. `chunk_encoder`): criterion_main!(decoders, chunk_encoder);
criterion_main!(decoders);
