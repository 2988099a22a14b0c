//! Inference over recorded probes: the demo site's shapes (fixtures recorded by driving the
//! demo site the way its page script does, plus a live test that records them afresh) and
//! hand-written recordings of shapes the demo does not speak.
//!
//! The tests hold no site's names: what differs between shapes lives in the fixtures
//! (`tests/fixtures/recordings/`): `demo-driver.json` describes the page script's calls,
//! `demo-<shape>.json` are recordings, `hand-*.json` hand-written recordings with what their
//! flow must hold. Set `CT_WRITE_FIXTURES=1` to rewrite the demo recordings from the live run.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Deserialize;
use serde_json::{Value, json};

use super::*;
use crate::demo::{DemoConfig, Shape};
use crate::flow::{Accrual, ReasoningRule, ResponseSpec, TextRule, Transport};
use crate::learn::decoder::normalize;
use crate::recording::{Body, Frame, StorageSnapshot};
use crate::replay::decode::{Decoder, collect_text, decode_all};

const USER_AGENT: &str = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36";

fn fixtures_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/recordings")
}

fn flows_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("flows")
}

// ---------------------------------------------------------------------------------------------
// What a page shows

/// The text a DOM shows for a markdown reply: emphasis and code marks gone, list items as
/// plain lines.
fn dom_text(markdown: &str) -> String {
    markdown
        .lines()
        .map(|line| {
            let line = line.trim_start();
            let line = line
                .strip_prefix("- ")
                .or_else(|| line.strip_prefix("* "))
                .unwrap_or(line);
            line.replace("**", "").replace('`', "")
        })
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Decodes a recorded response with `spec`: (text, reasoning).
fn decode_recorded(spec: &ResponseSpec, exchange: &Exchange) -> (String, String) {
    if exchange.frames.is_empty() {
        let body = &exchange.response_body.as_ref().expect("a body").0;
        collect_text(&decode_all(spec, body).expect("decodes"))
    } else {
        let mut decoder = Decoder::new(spec);
        let mut out = Vec::new();
        for frame in exchange.frames.iter().filter(|f| !f.sent) {
            decoder
                .feed_message(None, &frame.payload, &mut out)
                .expect("decodes");
        }
        decoder.finish(&mut out).expect("decodes");
        collect_text(&out)
    }
}

// ---------------------------------------------------------------------------------------------
// Comparing flows where it matters

/// The essentials of a flow with preflight names replaced by what they are (step index and
/// extract rule), so that two flows naming the same value differently compare equal. A
/// follow-up's `conversation.NAME` of a first-turn preflight value is renamed the same way;
/// its own preflights' names by their index in the follow-up.
fn essentials(flow: &Flow) -> Value {
    let names = |steps: &[crate::flow::Step], tag: &str| {
        let mut renames = BTreeMap::new();
        for (i, step) in steps.iter().enumerate() {
            for (name, extract) in &step.extract {
                let rule = serde_json::to_string(extract).unwrap();
                renames.insert(name.clone(), format!("{tag}{i}:{rule}"));
            }
        }
        renames
    };
    let first = names(&flow.preflight, "#");
    let later = flow
        .follow_up
        .as_ref()
        .map(|f| names(&f.preflight, "f#"))
        .unwrap_or_default();
    let rename = |text: &str, own: &BTreeMap<String, String>| -> String {
        let re = regex::Regex::new(r"(preflight|conversation)\.([A-Za-z0-9_]+)").unwrap();
        re.replace_all(text, |c: &regex::Captures<'_>| {
            let table = if &c[1] == "preflight" { own } else { &first };
            format!(
                "{}.{}",
                &c[1],
                table.get(&c[2]).cloned().unwrap_or_else(|| c[2].to_owned())
            )
        })
        .into_owned()
    };
    let http = |http: &HttpTemplate, own: &BTreeMap<String, String>| {
        let headers: BTreeMap<String, String> = http
            .headers
            .iter()
            .filter(|(name, value)| value.contains("{{") || *name == "content-type")
            .map(|(name, value)| (name.clone(), rename(value, own)))
            .collect();
        let slots: BTreeMap<String, String> = http
            .slots
            .iter()
            .map(|(pointer, source)| (pointer.clone(), rename(source, own)))
            .collect();
        json!({
            "method": http.method,
            "url": rename(&http.url, own),
            "headers": headers,
            "slots": slots,
            "body_kind": http.body_kind,
        })
    };
    let steps = |steps: &[crate::flow::Step], own: &BTreeMap<String, String>| -> Vec<Value> {
        steps
            .iter()
            .map(|step| {
                let mut value = http(&step.http, own);
                value["extract"] = json!(step.extract.values().collect::<Vec<_>>());
                value
            })
            .collect()
    };
    let follow_up = flow.follow_up.as_ref().map(|f| {
        json!({
            "preflight": steps(&f.preflight, &later),
            "request": http(&f.request, &later),
            "resends_history": f.resends_history,
        })
    });
    json!({
        "preflight": steps(&flow.preflight, &first),
        "request": http(&flow.request, &first),
        "response": {
            "transport": flow.response.transport,
            "text": flow.response.text,
            "reasoning": flow.response.reasoning,
            "ids": flow.response.ids,
        },
        "follow_up": follow_up,
    })
}

/// Everything that differs between two flows' essentials, by JSON pointer.
fn differences(left: &Value, right: &Value, at: &str, out: &mut Vec<String>) {
    match (left, right) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for key in keys {
                differences(
                    a.get(key).unwrap_or(&Value::Null),
                    b.get(key).unwrap_or(&Value::Null),
                    &format!("{at}/{key}"),
                    out,
                );
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                differences(x, y, &format!("{at}/{i}"), out);
            }
        }
        (a, b) if a != b => out.push(format!("{at}: inferred {a} vs hand-written {b}")),
        _ => {}
    }
}

/// Checks a learned flow for a demo shape: it validates, decodes its own recording to the
/// reply, and matches the hand-written flow (when there is one) where it matters.
fn check_demo(shape: Shape, recording: &Recording, learned: &Learned) {
    let flow = &learned.flow;
    flow.validate().unwrap();
    assert!(
        flow.literal_secrets().is_empty(),
        "{shape}: literal secrets"
    );
    let serialized = serde_json::to_string(flow).unwrap();
    for (name, value) in &recording.storage.cookies {
        assert!(
            !serialized.contains(value.as_str()),
            "{shape}: cookie {name} leaked"
        );
    }
    for value in recording.storage.local_storage.values() {
        assert!(
            !serialized.contains(value.as_str()),
            "{shape}: a token leaked"
        );
    }
    let decoded = decode_recorded(&flow.response, &recording.exchanges[learned.chat_index]);
    assert_eq!(
        normalize(&decoded.0),
        normalize(&recording.rendered_reply),
        "{shape}: decoded reply"
    );
    assert_eq!(
        normalize(&decoded.1),
        normalize(recording.rendered_reasoning.as_deref().unwrap_or_default()),
        "{shape}: decoded reasoning"
    );
    // Only a signed call holds something unexplained: its signature.
    let signs = driver().shapes[shape.as_str()].iter().any(|step| step.sign);
    if signs {
        let signature = &driver().sign_headers["signature"];
        assert_eq!(
            learned.suspicious.len(),
            1,
            "{shape}: {:?}",
            learned.suspicious
        );
        assert!(learned.suspicious[0].contains(signature.as_str()));
    } else {
        assert!(
            learned.suspicious.is_empty(),
            "{shape}: {:?}",
            learned.suspicious
        );
    }
    let path = flows_dir().join(format!("demo-{shape}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{shape}: no hand-written flow {}: {e}", path.display()));
    let hand = Flow::from_json(&text).unwrap();
    let mut inferred = flow.clone();
    if hand.replay.needs_browser {
        // Verification drops the follow-up of a flow that only runs in the browser, where the
        // site's own page continues its conversations.
        inferred.follow_up = None;
    }
    let mut diffs = Vec::new();
    differences(&essentials(&inferred), &essentials(&hand), "", &mut diffs);
    assert!(
        diffs.is_empty(),
        "{shape}: the inferred flow differs from {}:\n{}\ninferred: {}",
        path.display(),
        diffs.join("\n"),
        serde_json::to_string_pretty(flow).unwrap()
    );
}

// ---------------------------------------------------------------------------------------------
// Recording the demo site the way its page does

#[derive(Debug, Deserialize)]
struct Driver {
    probe: String,
    /// The second message, sent in the same conversation.
    follow_up_probe: String,
    /// The `<meta>` whose content the page sends in the CSRF header.
    csrf_meta: String,
    /// Headers of a signed call: `timestamp`, `signature`.
    sign_headers: BTreeMap<String, String>,
    shapes: BTreeMap<String, Vec<DriverStep>>,
    /// Per shape, the steps of the page's second message.
    follow_up: BTreeMap<String, Vec<DriverStep>>,
}

#[derive(Debug, Deserialize)]
struct DriverStep {
    method: String,
    url: String,
    #[serde(default)]
    headers: Option<String>,
    #[serde(default)]
    body: Option<Value>,
    #[serde(default)]
    save: BTreeMap<String, String>,
    #[serde(default)]
    sign: bool,
    #[serde(default)]
    websocket: bool,
    /// A WebSocket step of a follow-up: on the first turn's socket.
    #[serde(default)]
    reuse: bool,
    #[serde(default)]
    frames: Vec<Value>,
    /// Name → JSON pointer into the first event of a streamed response that has it.
    #[serde(default)]
    save_stream: BTreeMap<String, String>,
    #[serde(default)]
    until: Option<Until>,
}

#[derive(Debug, Deserialize)]
struct Until {
    path: String,
    equals: Value,
}

fn driver() -> Driver {
    let text = std::fs::read_to_string(fixtures_dir().join("demo-driver.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

struct Vars {
    prompt: String,
    token: String,
    saved: BTreeMap<String, String>,
    now_ms: i64,
}

impl Vars {
    fn fill(&self, value: &Value) -> Value {
        match value {
            Value::String(s) if s.starts_with('$') => match &s[1..] {
                "prompt" => Value::String(self.prompt.clone()),
                "uuid" => Value::String(uuid::Uuid::new_v4().to_string()),
                "now_ms" => json!(self.now_ms),
                "now_s" => json!(self.now_ms as f64 / 1000.0),
                "now_ms_text" => Value::String(self.now_ms.to_string()),
                "token" => Value::String(self.token.clone()),
                name => Value::String(self.saved.get(name).cloned().unwrap_or_default()),
            },
            Value::Array(items) => Value::Array(items.iter().map(|v| self.fill(v)).collect()),
            Value::Object(map) => {
                Value::Object(map.iter().map(|(k, v)| (k.clone(), self.fill(v))).collect())
            }
            other => other.clone(),
        }
    }

    fn url(&self, template: &str) -> String {
        let mut url = template.to_owned();
        for (name, value) in &self.saved {
            let encoded: String =
                percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC)
                    .collect();
            url = url.replace(&format!("{{{name}}}"), &encoded);
        }
        url
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// The key the signed shape's inline script reassembles (`var p=[pieces],o=[order]`).
fn page_signing_key(html: &str) -> Option<String> {
    let re = regex::Regex::new(r"var p=(\[[^\]]*\]),o=(\[[^\]]*\])").unwrap();
    let found = re.captures(html)?;
    let pieces: Vec<String> = serde_json::from_str(&found[1]).ok()?;
    let order: Vec<usize> = serde_json::from_str(&found[2]).ok()?;
    Some(
        order
            .iter()
            .map(|i| pieces[*i].chars().rev().collect::<String>())
            .collect(),
    )
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// What every step of a recorded probe shares.
struct Live {
    base: String,
    port: u16,
    cookie_header: String,
    client: reqwest::Client,
    page_url: String,
    html: String,
    csrf: String,
    token: String,
    started: Instant,
}

impl Live {
    fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1000.0
    }
}

/// A WebSocket the first turn opened, kept for the follow-up.
struct OpenSocket {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    exchange: Exchange,
}

/// Records one probe against a live demo site of `shape`, then a second in the same
/// conversation (the follow-up), as the page's script would send them.
async fn record_live(shape: Shape) -> Recording {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = DemoConfig {
        shape,
        token_delay: std::time::Duration::ZERO,
        ..DemoConfig::default()
    };
    let password = config.password.clone();
    let server = tokio::spawn(crate::demo::serve(listener, config));
    let base = format!("http://127.0.0.1:{port}");
    let login = crate::demo::json_login(&base, "probe@example.test", &password)
        .await
        .unwrap();
    let cookies: BTreeMap<String, String> = login.cookies.iter().cloned().collect();
    let local: BTreeMap<String, String> = login.local_storage.iter().cloned().collect();
    let token = local
        .get(crate::demo::TOKEN_KEY)
        .cloned()
        .or_else(|| {
            let wrapped = local.get(crate::demo::WRAPPED_TOKEN_KEY)?;
            let value: Value = serde_json::from_str(wrapped).ok()?;
            value["value"].as_str().map(str::to_owned)
        })
        .unwrap();
    let cookie_header = cookies
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("; ");
    let client = crate::demo::http_client().unwrap();
    let page_url = format!("{base}/chat");
    let html = client
        .get(&page_url)
        .header("cookie", &cookie_header)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let meta: BTreeMap<String, String> =
        regex::Regex::new(r#"<meta name="([^"]+)" content="([^"]*)""#)
            .unwrap()
            .captures_iter(&html)
            .map(|c| (c[1].to_owned(), c[2].to_owned()))
            .collect();
    let driver = driver();
    let csrf = meta
        .get(&driver.csrf_meta)
        .cloned()
        .expect("the CSRF meta tag");
    let marker = format!("ct{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let probe = driver.probe.replace("{marker}", &marker);
    let steps = driver
        .shapes
        .get(shape.as_str())
        .expect("the shape in the driver");
    let live = Live {
        base: base.clone(),
        port,
        cookie_header,
        client,
        page_url: page_url.clone(),
        html,
        csrf,
        token: token.clone(),
        started: Instant::now(),
    };
    let mut vars = Vars {
        prompt: probe.clone(),
        token,
        saved: BTreeMap::new(),
        now_ms: now_ms(),
    };
    let mut socket = None;
    let exchanges = run_steps(&live, &driver, shape, steps, &mut vars, &mut socket).await;
    let reply = crate::demo::reply_for(shape, &probe);

    // The second message, in the same conversation.
    let second_marker = format!("ct{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let second_probe = driver.follow_up_probe.replace("{marker}", &second_marker);
    vars.saved.insert("first_prompt".into(), probe.clone());
    vars.saved.insert("reply".into(), reply.content.clone());
    vars.prompt = second_probe.clone();
    let sent_ms = live.elapsed();
    let follow_steps = &driver.follow_up[shape.as_str()];
    let second_exchanges =
        run_steps(&live, &driver, shape, follow_steps, &mut vars, &mut socket).await;
    if let Some(mut open) = socket {
        let _ = futures_util::SinkExt::close(&mut open.socket).await;
    }
    server.abort();
    let storage = StorageSnapshot {
        cookies,
        local_storage: local,
        session_storage: BTreeMap::new(),
        meta,
        user_agent: Some(USER_AGENT.to_owned()),
    };
    let second_reply = crate::demo::reply_for_turn(shape, &second_probe, 2);
    Recording {
        page_url: page_url.clone(),
        marker,
        probe,
        rendered_reply: dom_text(&reply.content),
        rendered_reasoning: reply.reasoning,
        storage: storage.clone(),
        exchanges,
        sent_ms: None,
        follow_up: Some(Box::new(Recording {
            page_url,
            marker: second_marker,
            probe: second_probe,
            rendered_reply: dom_text(&second_reply.content),
            rendered_reasoning: second_reply.reasoning,
            storage,
            exchanges: second_exchanges,
            sent_ms: Some(sent_ms),
            follow_up: None,
            attached: None,
        })),
        attached: None,
    }
}

/// Runs driver steps against the live site, as recorded exchanges.
async fn run_steps(
    live: &Live,
    driver: &Driver,
    shape: Shape,
    steps: &[DriverStep],
    vars: &mut Vars,
    socket: &mut Option<OpenSocket>,
) -> Vec<Exchange> {
    let csrf_header = crate::demo::CSRF_HEADER;
    let mut exchanges = Vec::new();
    for (n, step) in steps.iter().enumerate() {
        vars.now_ms = now_ms();
        let url = format!("{}{}", live.base, vars.url(&step.url));
        if step.websocket {
            exchanges.push(record_websocket(step, vars, &url, live, socket).await);
            continue;
        }
        let mut headers: Vec<(String, String)> = vec![
            ("host".into(), format!("127.0.0.1:{}", live.port)),
            ("connection".into(), "keep-alive".into()),
            ("sec-ch-ua".into(), "\"Chromium\";v=\"124\"".into()),
        ];
        let kind = step.headers.as_deref().unwrap_or("api");
        let (accept, content_type) = match kind {
            "get" => ("application/json", None),
            "form" => (
                "*/*",
                Some("application/x-www-form-urlencoded;charset=UTF-8"),
            ),
            _ => ("*/*", Some("application/json")),
        };
        let body: Option<String> = step.body.as_ref().map(|b| {
            let filled = vars.fill(b);
            if kind == "form" {
                let mut form = form_urlencoded::Serializer::new(String::new());
                for (k, v) in filled.as_object().unwrap() {
                    let text = match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    form.append_pair(k, &text);
                }
                form.finish()
            } else {
                filled.to_string()
            }
        });
        if let Some(body) = &body {
            headers.push(("content-length".into(), body.len().to_string()));
        }
        headers.push(("accept".into(), accept.into()));
        if let Some(ct) = content_type.filter(|_| body.is_some()) {
            headers.push(("content-type".into(), ct.into()));
        }
        headers.push(("authorization".into(), format!("Bearer {}", live.token)));
        headers.push((csrf_header.into(), live.csrf.clone()));
        if step.sign {
            let key = page_signing_key(&live.html).expect("the signing script");
            let ts = now_ms().to_string();
            let signature = sha256_hex(&format!(
                "{key}\n{ts}\n{}",
                body.as_deref().unwrap_or_default()
            ));
            headers.push((driver.sign_headers["timestamp"].clone(), ts));
            headers.push((driver.sign_headers["signature"].clone(), signature));
        }
        headers.extend([
            ("sec-ch-ua-mobile".into(), "?0".into()),
            ("user-agent".into(), USER_AGENT.into()),
            ("sec-ch-ua-platform".into(), "\"Linux\"".into()),
        ]);
        if step.method != "GET" {
            headers.push(("origin".into(), live.base.clone()));
        }
        headers.extend([
            ("sec-fetch-site".into(), "same-origin".into()),
            ("sec-fetch-mode".into(), "cors".into()),
            ("sec-fetch-dest".into(), "empty".into()),
            ("referer".into(), live.page_url.clone()),
            ("accept-encoding".into(), "gzip, deflate, br, zstd".into()),
            ("accept-language".into(), "en-US,en;q=0.9".into()),
            ("cookie".into(), live.cookie_header.clone()),
        ]);
        let started_ms = live.elapsed();
        let method = reqwest::Method::from_bytes(step.method.as_bytes()).unwrap();
        let mut request = live.client.request(method, &url);
        for (name, value) in &headers {
            if !matches!(
                name.as_str(),
                "host" | "connection" | "content-length" | "accept-encoding"
            ) {
                request = request.header(name.as_str(), value.as_str());
            }
        }
        if let Some(body) = &body {
            request = request.body(body.clone());
        }
        let response = request.send().await.unwrap();
        let first_byte_ms = live.elapsed();
        let status = response.status().as_u16();
        assert!(
            response.status().is_success(),
            "{shape} step {n}: {status} {}",
            response.text().await.unwrap_or_default()
        );
        let response_headers: Vec<(String, String)> = response
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    v.to_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        let bytes = response.bytes().await.unwrap().to_vec();
        if let Ok(json) = serde_json::from_slice::<Value>(&bytes) {
            for (name, pointer) in &step.save {
                let value = json.pointer(pointer).and_then(Value::as_str).unwrap();
                vars.saved.insert(name.clone(), value.to_owned());
            }
        }
        for (name, pointer) in &step.save_stream {
            let text = String::from_utf8_lossy(&bytes);
            let found = text
                .lines()
                .map(|line| line.strip_prefix("data: ").unwrap_or(line))
                .filter_map(|line| serde_json::from_str::<Value>(line).ok())
                .find_map(|v| {
                    v.pointer(pointer)
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                })
                .unwrap_or_else(|| panic!("{shape}: no {pointer} in the stream"));
            vars.saved.insert(name.clone(), found);
        }
        exchanges.push(Exchange {
            id: format!("{}.{n}", 1000 + exchanges.len()),
            started_ms,
            resource_type: "Fetch".into(),
            method: step.method.clone(),
            url,
            request_headers: headers,
            request_body: body.map(|b| Body(b.into_bytes())),
            status: Some(status),
            response_headers,
            response_body: Some(Body(bytes)),
            first_byte_ms: Some(first_byte_ms),
            finished_ms: Some(live.elapsed()),
            frames: Vec::new(),
            error: None,
        });
    }
    exchanges
}

/// A WebSocket step: a new socket (kept open in `socket` for a follow-up), or with `reuse`
/// the first turn's, whose exchange (started then) gets only the frames sent now.
async fn record_websocket(
    step: &DriverStep,
    vars: &Vars,
    http_url: &str,
    live: &Live,
    socket: &mut Option<OpenSocket>,
) -> Exchange {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    if !step.reuse || socket.is_none() {
        let ws_url = http_url.replacen("http://", "ws://", 1);
        let mut request = ws_url.as_str().into_client_request().unwrap();
        request
            .headers_mut()
            .insert("cookie", live.cookie_header.parse().unwrap());
        request
            .headers_mut()
            .insert("origin", live.base.parse().unwrap());
        request
            .headers_mut()
            .insert("user-agent", USER_AGENT.parse().unwrap());
        let started_ms = live.elapsed();
        let (opened, response) = tokio_tungstenite::connect_async(request).await.unwrap();
        let response_headers: Vec<(String, String)> = response
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    v.to_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        let host = http_url
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let exchange = Exchange {
            id: "ws.1".into(),
            started_ms,
            resource_type: "WebSocket".into(),
            method: step.method.clone(),
            url: ws_url,
            request_headers: vec![
                ("host".into(), host),
                ("connection".into(), "Upgrade".into()),
                ("pragma".into(), "no-cache".into()),
                ("cache-control".into(), "no-cache".into()),
                ("user-agent".into(), USER_AGENT.into()),
                ("upgrade".into(), "websocket".into()),
                ("origin".into(), live.base.clone()),
                ("sec-websocket-version".into(), "13".into()),
                ("accept-encoding".into(), "gzip, deflate, br, zstd".into()),
                ("accept-language".into(), "en-US,en;q=0.9".into()),
                ("cookie".into(), live.cookie_header.clone()),
                (
                    "sec-websocket-key".into(),
                    "dGhlIHNhbXBsZSBub25jZQ==".into(),
                ),
                (
                    "sec-websocket-extensions".into(),
                    "permessage-deflate; client_max_window_bits".into(),
                ),
            ],
            request_body: None,
            status: Some(101),
            response_headers,
            response_body: None,
            first_byte_ms: Some(started_ms),
            finished_ms: None,
            frames: Vec::new(),
            error: None,
        };
        *socket = Some(OpenSocket {
            socket: opened,
            exchange,
        });
    }
    let open = socket.as_mut().expect("an open socket");
    let mut frames = Vec::new();
    for frame in &step.frames {
        let text = vars.fill(frame).to_string();
        frames.push(Frame {
            sent: true,
            at_ms: live.elapsed(),
            payload: text.clone(),
            binary: false,
        });
        open.socket.send(Message::text(text)).await.unwrap();
    }
    let until = step.until.as_ref().expect("an end condition");
    while let Some(Ok(message)) = open.socket.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        let text = text.as_str().to_owned();
        frames.push(Frame {
            sent: false,
            at_ms: live.elapsed(),
            payload: text.clone(),
            binary: false,
        });
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if value.pointer(&until.path) == Some(&until.equals) {
            break;
        }
    }
    Exchange {
        frames,
        finished_ms: Some(live.elapsed()),
        ..open.exchange.clone()
    }
}

/// The recording with its secrets (cookie values, the bearer token, the CSRF token) replaced
/// by fixed fakes, the same fake for the same secret everywhere.
fn sanitized(recording: &Recording) -> Recording {
    recording.redacted(&[])
}

fn load_recording(name: &str) -> Option<Recording> {
    let text = std::fs::read_to_string(fixtures_dir().join(name)).ok()?;
    Some(serde_json::from_str(&text).unwrap())
}

// ---------------------------------------------------------------------------------------------
// The tests

#[test]
fn recorded_shapes_infer_like_the_hand_written_flows() {
    let mut missing = Vec::new();
    for shape in Shape::ALL {
        let Some(recording) = load_recording(&format!("demo-{shape}.json")) else {
            missing.push(shape.as_str());
            continue;
        };
        let learned = infer(&recording, &format!("demo-{shape}")).unwrap_or_else(|e| {
            panic!("{shape}: {e}");
        });
        check_demo(shape, &recording, &learned);
    }
    assert!(
        missing.is_empty(),
        "no fixture for {missing:?}: run the live test with CT_WRITE_FIXTURES=1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_shapes_infer_like_the_hand_written_flows() {
    let write = std::env::var("CT_WRITE_FIXTURES").is_ok_and(|v| v == "1");
    for shape in Shape::ALL {
        let recording = record_live(shape).await;
        let learned =
            infer(&recording, &format!("demo-{shape}")).unwrap_or_else(|e| panic!("{shape}: {e}"));
        check_demo(shape, &recording, &learned);
        let clean = sanitized(&recording);
        let learned = infer(&clean, &format!("demo-{shape}")).unwrap();
        check_demo(shape, &clean, &learned);
        if write {
            let path = fixtures_dir().join(format!("demo-{shape}.json"));
            let text = serde_json::to_string_pretty(&clean).unwrap();
            std::fs::write(&path, text + "\n").unwrap();
        }
    }
}

/// Every recording kept in the fixtures, saved ones included (a failed learn saves one; a
/// developer drops it here), must infer a flow that reads the rendered reply from its own
/// bytes. A recording that fails is a failing test in milliseconds.
#[test]
fn every_saved_recording_infers_a_flow_that_reads_its_reply() {
    let mut names: Vec<String> = std::fs::read_dir(fixtures_dir())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".json") && !n.starts_with("hand-") && n != "demo-driver.json")
        .collect();
    names.sort();
    assert!(names.len() >= Shape::ALL.len(), "{names:?}");
    let mut failures = Vec::new();
    for name in names {
        let recording = load_recording(&name).unwrap();
        let learned = match infer(&recording, "saved") {
            Ok(learned) => learned,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        let decoded = decode_recorded(
            &learned.flow.response,
            &recording.exchanges[learned.chat_index],
        );
        if normalize(&decoded.0) != normalize(&recording.rendered_reply) {
            failures.push(format!("{name}: the flow reads another reply"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A hand-written recording with what its flow must hold.
#[derive(Debug, Deserialize)]
struct HandFixture {
    recording: Recording,
    expect: Expect,
}

#[derive(Debug, Deserialize)]
struct Expect {
    transport: Transport,
    text: TextRule,
    #[serde(default)]
    reasoning: Option<ReasoningRule>,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    slots: Option<BTreeMap<String, String>>,
    /// Header → templated value.
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// Header names that must not be in the request.
    #[serde(default)]
    absent_headers: Vec<String>,
    /// `METHOD url` of each preflight, in order.
    #[serde(default)]
    preflight: Option<Vec<String>>,
    /// Extract rules of each preflight, in order.
    #[serde(default)]
    extracts: Option<Vec<Vec<Value>>>,
    /// Words each suspicious finding must contain, one list per finding.
    #[serde(default)]
    suspicious: Vec<Vec<String>>,
    #[serde(default)]
    done: Option<Value>,
    #[serde(default)]
    ids: Option<BTreeMap<String, String>>,
    /// The request body template.
    #[serde(default)]
    body: Option<Value>,
}

#[test]
fn hand_written_recordings_infer_their_expected_flows() {
    let mut names: Vec<String> = std::fs::read_dir(fixtures_dir())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("hand-") && n.ends_with(".json"))
        .collect();
    names.sort();
    assert!(names.len() >= 4, "{names:?}");
    for name in names {
        let text = std::fs::read_to_string(fixtures_dir().join(&name)).unwrap();
        let fixture: HandFixture =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        let learned = infer(&fixture.recording, "hand").unwrap_or_else(|e| panic!("{name}: {e}"));
        let flow = &learned.flow;
        let shown = serde_json::to_string_pretty(flow).unwrap();
        let expect = &fixture.expect;
        assert_eq!(flow.response.transport, expect.transport, "{name}: {shown}");
        assert_eq!(flow.response.text, expect.text, "{name}: {shown}");
        assert_eq!(flow.response.reasoning, expect.reasoning, "{name}: {shown}");
        if let Some(url) = &expect.url {
            assert_eq!(&flow.request.url, url, "{name}: {shown}");
        }
        if let Some(slots) = &expect.slots {
            assert_eq!(&flow.request.slots, slots, "{name}: {shown}");
        }
        for (header, value) in &expect.headers {
            assert_eq!(
                flow.request.headers.get(header),
                Some(value),
                "{name}: header {header}: {shown}"
            );
        }
        for header in &expect.absent_headers {
            assert!(
                !flow.request.headers.contains_key(header),
                "{name}: {header}: {shown}"
            );
        }
        if let Some(preflight) = &expect.preflight {
            let found: Vec<String> = flow
                .preflight
                .iter()
                .map(|s| format!("{} {}", s.http.method, s.http.url))
                .collect();
            assert_eq!(&found, preflight, "{name}: {shown}");
        }
        if let Some(extracts) = &expect.extracts {
            let found: Vec<Vec<Value>> = flow
                .preflight
                .iter()
                .map(|s| {
                    s.extract
                        .values()
                        .map(|e| serde_json::to_value(e).unwrap())
                        .collect()
                })
                .collect();
            assert_eq!(&found, extracts, "{name}: {shown}");
        }
        assert_eq!(
            learned.suspicious.len(),
            expect.suspicious.len(),
            "{name}: {:?}",
            learned.suspicious
        );
        for (finding, words) in learned.suspicious.iter().zip(&expect.suspicious) {
            for word in words {
                assert!(
                    finding.contains(word.as_str()),
                    "{name}: {finding} lacks {word}"
                );
            }
        }
        if let Some(done) = &expect.done {
            assert_eq!(
                &serde_json::to_value(&flow.response.done).unwrap(),
                done,
                "{name}"
            );
        }
        if let Some(body) = &expect.body {
            assert_eq!(flow.request.body.as_ref(), Some(body), "{name}: {shown}");
        }
        if let Some(ids) = &expect.ids {
            assert_eq!(&flow.response.ids, ids, "{name}: {shown}");
        }
        let decoded = decode_recorded(
            &flow.response,
            &fixture.recording.exchanges[learned.chat_index],
        );
        assert_eq!(
            normalize(&decoded.0),
            normalize(&fixture.recording.rendered_reply),
            "{name}"
        );
        assert_eq!(
            normalize(&decoded.1),
            normalize(
                fixture
                    .recording
                    .rendered_reasoning
                    .as_deref()
                    .unwrap_or_default()
            ),
            "{name}"
        );
        // Secrets never reach the flow.
        let serialized = serde_json::to_string(flow).unwrap();
        let storage = &fixture.recording.storage;
        for value in storage
            .cookies
            .values()
            .chain(storage.local_storage.values())
        {
            assert!(
                !serialized.contains(value.as_str()),
                "{name}: a secret leaked"
            );
        }
    }
}

fn minimal_recording() -> Recording {
    let exchange = Exchange {
        id: "1".into(),
        started_ms: 10.0,
        resource_type: "Fetch".into(),
        method: "POST".into(),
        url: "https://chat.example.test/api/send".into(),
        request_headers: vec![
            ("content-type".into(), "application/json".into()),
            ("cookie".into(), "sid=SeCrEtCookie0123456789".into()),
        ],
        request_body: Some(Body(br#"{"text":"Hi ctabc123 there"}"#.to_vec())),
        status: Some(200),
        response_headers: vec![("content-type".into(), "text/event-stream".into())],
        response_body: Some(Body(
            b"data: {\"t\":\"Hello\"}\n\ndata: {\"t\":\" world\"}\n\n".to_vec(),
        )),
        first_byte_ms: Some(20.0),
        finished_ms: Some(30.0),
        frames: Vec::new(),
        error: None,
    };
    Recording {
        page_url: "https://chat.example.test/c".into(),
        marker: "ctabc123".into(),
        probe: "Hi ctabc123 there".into(),
        rendered_reply: "Hello world".into(),
        rendered_reasoning: None,
        storage: StorageSnapshot {
            cookies: [("sid".to_owned(), "SeCrEtCookie0123456789".to_owned())].into(),
            ..StorageSnapshot::default()
        },
        exchanges: vec![exchange],
        ..Recording::default()
    }
}

#[test]
fn a_minimal_recording_infers_a_minimal_flow() {
    let learned = infer(&minimal_recording(), "svc").unwrap();
    let flow = &learned.flow;
    assert_eq!(flow.request.url, "/api/send");
    assert_eq!(flow.request.slots["/text"], "prompt");
    assert!(!flow.request.headers.contains_key("cookie"));
    assert_eq!(flow.response.transport, Transport::Sse);
    assert_eq!(
        flow.response.text,
        TextRule {
            path: "/t".into(),
            mode: Accrual::Delta,
            event: None
        }
    );
    assert!(flow.preflight.is_empty());
    assert!(!learned.notes.is_empty());
}

#[test]
fn errors_say_what_is_missing_without_secrets() {
    let mut recording = minimal_recording();
    recording.marker = "ctzzz999".into();
    let err = infer(&recording, "svc").unwrap_err();
    assert_eq!(err, InferError::MarkerNotSent);
    assert!(
        err.to_string()
            .contains("no request carried the probe marker")
    );

    let mut recording = minimal_recording();
    recording.rendered_reply = "Something else entirely".into();
    let err = infer(&recording, "svc").unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, InferError::NoReply { .. }), "{message}");
    assert!(message.contains("POST /api/send"), "{message}");
    assert!(!message.contains("SeCrEtCookie"), "{message}");

    assert_eq!(
        infer(&Recording::default(), "svc").unwrap_err(),
        InferError::Empty
    );
}

#[test]
fn the_prompt_may_travel_in_a_preflight() {
    // `POST /new` carries the message and answers an id; the reply streams from
    // `GET /stream/{id}`.
    let mut recording = minimal_recording();
    let mut first = recording.exchanges[0].clone();
    first.url = "https://chat.example.test/api/new".into();
    first.response_headers = vec![("content-type".into(), "application/json".into())];
    first.response_body = Some(Body(br#"{"chat":{"key":"k9f8e7d6c5b4a3"}}"#.to_vec()));
    let mut second = recording.exchanges[0].clone();
    second.started_ms = 40.0;
    second.first_byte_ms = Some(45.0);
    second.finished_ms = Some(60.0);
    second.method = "GET".into();
    second.url = "https://chat.example.test/api/stream/k9f8e7d6c5b4a3".into();
    second.request_body = None;
    recording.exchanges = vec![first, second];
    let learned = infer(&recording, "svc").unwrap();
    let flow = &learned.flow;
    assert_eq!(flow.request.method, "GET");
    assert_eq!(flow.request.url, "/api/stream/{{preflight.key}}");
    assert_eq!(flow.preflight.len(), 1);
    assert_eq!(flow.preflight[0].http.url, "/api/new");
    assert_eq!(flow.preflight[0].http.slots["/text"], "prompt");
    assert_eq!(
        serde_json::to_value(&flow.preflight[0].extract).unwrap(),
        json!({"key": "/chat/key"})
    );
}

#[test]
fn a_client_made_id_echoed_by_a_preflight_is_read_from_its_response() {
    // `POST /threads` sends a fresh UUID the server confirms; the chat URL uses it.
    let id = "6f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0";
    let mut recording = minimal_recording();
    let mut create = recording.exchanges[0].clone();
    create.url = "https://chat.example.test/api/threads".into();
    create.request_body = Some(Body(format!(r#"{{"uuid":"{id}","name":""}}"#).into_bytes()));
    create.response_headers = vec![("content-type".into(), "application/json".into())];
    create.response_body = Some(Body(format!(r#"{{"uuid":"{id}","name":""}}"#).into_bytes()));
    let mut chat = recording.exchanges[0].clone();
    chat.started_ms = 40.0;
    chat.url = format!("https://chat.example.test/api/threads/{id}/reply");
    recording.exchanges = vec![create, chat];
    let flow = infer(&recording, "svc").unwrap().flow;
    assert_eq!(
        flow.request.url,
        "/api/threads/{{preflight.thread_id}}/reply"
    );
    assert_eq!(flow.preflight.len(), 1);
    assert_eq!(flow.preflight[0].http.slots["/uuid"], "uuid");
    assert_eq!(
        serde_json::to_value(&flow.preflight[0].extract).unwrap(),
        json!({"thread_id": "/uuid"})
    );
}
