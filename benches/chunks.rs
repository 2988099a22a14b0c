//! Criterion: the OpenAI chunk encoder (bytes/s of delta text turned into SSE frames) and
//! flow rendering (requests per second).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a bench run fails by panicking

use std::collections::BTreeMap;
use std::hint::black_box;

use computetower::flow::Flow;
use computetower::openai::ChunkEncoder;
use computetower::replay::render::{Context, Prompt, render};
use computetower::role::Role;
use computetower::session::SessionData;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn chunk_encoder(c: &mut Criterion) {
    let encoder = ChunkEncoder::new("chatcmpl-0123456789abcdef", 1_700_000_000, "demo-openai");
    // Typical deltas: a few characters, some needing escapes.
    let deltas: Vec<String> = (0..1000)
        .map(|i| match i % 4 {
            0 => " the".to_owned(),
            1 => " \"quoted\"".to_owned(),
            2 => "\n- item".to_owned(),
            _ => " héllo".to_owned(),
        })
        .collect();
    let bytes: usize = deltas.iter().map(String::len).sum();
    let mut group = c.benchmark_group("chunk_encoder");
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function("content_deltas", |b| {
        b.iter(|| {
            let mut total = 0;
            for delta in &deltas {
                total += encoder.content(black_box(delta)).len();
            }
            total
        })
    });
    group.finish();
}

fn flow_rendering(c: &mut Criterion) {
    let flow = Flow::from_json(include_str!("../flows/demo-patch.json")).expect("flow parses");
    let prompt = Prompt {
        messages: vec![(Role::User, "Hello there, how are you?".to_owned())],
        model: "demo-patch".to_owned(),
        attachments: Vec::new(),
    };
    let session = SessionData {
        local_storage: [("demo_token".to_owned(), "dt_token".to_owned())].into(),
        ..Default::default()
    };
    let preflight: BTreeMap<String, String> = [
        ("csrf".to_owned(), "csrf-token".to_owned()),
        ("conversation_id".to_owned(), "c-1234".to_owned()),
    ]
    .into();
    let conversation = BTreeMap::new();
    let base = url::Url::parse("http://127.0.0.1:8080/").expect("url");
    let pins = computetower::pinning::Pins::new(&base, []);
    let mut group = c.benchmark_group("flow_rendering");
    group.throughput(Throughput::Elements(1));
    group.bench_function("chat_request", |b| {
        b.iter(|| {
            let ctx = Context {
                prompt: &prompt,
                session: &session,
                preflight: &preflight,
                conversation: &conversation,
                now_ms: 1_700_000_000_000,
                pins: &pins,
                file: None,
                attached: None,
            };
            render(black_box(&flow.request), &base, &ctx).expect("renders")
        })
    });
    group.finish();
}

criterion_group!(chunks, chunk_encoder, flow_rendering);
criterion_main!(chunks);
