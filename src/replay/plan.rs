//! A flow's calls, run once for every tier that makes them itself: the preflights (reusing
//! session-wide values, skipping those a continued site conversation already knows), their
//! extracts, the chat call, the decoded reply. How a call travels is the tier's: [`Calls`]
//! has two implementations, direct HTTP (`client`, tier 1) and `fetch()` inside the account's
//! page (`browser::inpage`, tier 2).
//!
//! Invariants:
//! - Calls go out in the flow's order; each is rendered (and pin-checked) just before it is
//!   sent, with every value known by then.
//! - A preflight whose extracts are all known (from the conversation or reuse) is not sent.
//! - A run that used reused values and failed for a reason a stale value could cause forgets
//!   them and runs once more with fresh preflights (see `reuse`).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Mutex;

use http::HeaderMap;
use serde_json::Value;
use url::Url;

use super::DeltaStream;
use super::failure::{Call, FailureKind, ReplayError};
use super::render::{self, Context, Prompt, Rendered};
use super::reuse::Reused;
use super::uploads::{Uploaded, flow_key};
use crate::flow::{Extract, Flow, ResponseSpec};
use crate::pinning::Pins;
use crate::session::SessionData;

/// Largest preflight response read.
pub const PREFLIGHT_BODY_LIMIT: usize = 4 * 1024 * 1024;

/// A preflight's 2xx answer, read whole.
#[derive(Debug, Default)]
pub struct Answer {
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

/// How one tier makes a flow's calls.
pub trait Calls: Send {
    /// Sends one preflight and reads its whole answer; a non-2xx answer is the classified
    /// error (`failure::status_error`), a body over [`PREFLIGHT_BODY_LIMIT`] format drift.
    fn preflight(
        &mut self,
        call: Call,
        request: Rendered,
    ) -> impl Future<Output = Result<Answer, ReplayError>> + Send;

    /// Sends the chat call; returns once its answer started (2xx, and not a page where the
    /// flow expects data), with the reply decoded by `spec` as it arrives.
    fn chat(
        &mut self,
        request: Rendered,
        spec: &ResponseSpec,
    ) -> impl Future<Output = Result<DeltaStream, ReplayError>> + Send;

    /// Forgets what an earlier run changed (cookies the site set) before the plan runs again.
    fn reset(&mut self);
}

/// What a run needs besides the calls.
#[derive(Clone, Copy)]
pub struct Plan<'a> {
    pub flow: &'a Flow,
    pub prompt: &'a Prompt,
    /// The account's URL; relative flow URLs resolve against it.
    pub base: &'a Url,
    /// Session references in the flow render from this.
    pub session: &'a SessionData,
    /// Values an earlier exchange of the same site conversation produced (preflight extracts
    /// and reply ids).
    pub conversation: &'a BTreeMap<String, String>,
    /// The origins the account's calls may reach; every call is checked before it is built.
    pub pins: &'a Pins,
    /// Session-wide preflight values, and the stored session's id they are kept under
    /// (`None`: every preflight runs).
    pub reuse: Option<(&'a Reused, &'a str)>,
    /// Files this session uploaded, and the session's id (`None`: every file is uploaded).
    pub uploads: Option<(&'a Uploaded, &'a str)>,
}

/// A started run: the chat call answered and its reply is being decoded.
pub struct Started {
    pub deltas: DeltaStream,
    /// Every preflight value the run used (known, reused or extracted), to continue the
    /// site conversation next time.
    pub extracted: BTreeMap<String, String>,
}

/// One run's view of the reused preflight values.
struct Reuse<'a> {
    reused: &'a Reused,
    session: &'a str,
    steps: &'a [bool],
    /// Whether stored values may be read (`false` on the run after a failure).
    read: bool,
    /// Whether this run used a stored value.
    used: bool,
}

/// Runs `plan` with `calls`: see the module docs.
pub async fn run<C: Calls>(calls: &mut C, plan: Plan<'_>) -> Result<Started, ReplayError> {
    let reuse = plan.reuse.and_then(|(reused, session)| {
        let steps = reused.steps(plan.flow);
        steps.contains(&true).then_some((reused, session, steps))
    });
    let Some((reused, session, steps)) = reuse else {
        return run_once(calls, plan, None).await;
    };
    let mut reuse = Reuse {
        reused,
        session,
        steps: &steps,
        read: true,
        used: false,
    };
    match run_once(calls, plan, Some(&mut reuse)).await {
        Err(e)
            if reuse.used && !matches!(e.kind(), FailureKind::Network | FailureKind::RateLimit) =>
        {
            tracing::debug!(flow = %plan.flow.id, error = %e, "reused preflight values failed; running the preflights again");
            reused.forget(session, plan.flow);
            reuse.read = false;
            calls.reset();
            run_once(calls, plan, Some(&mut reuse)).await
        }
        result => result,
    }
}

async fn run_once<C: Calls>(
    calls: &mut C,
    plan: Plan<'_>,
    mut reuse: Option<&mut Reuse<'_>>,
) -> Result<Started, ReplayError> {
    let flow = plan.flow;
    let mut extracted = plan.conversation.clone();
    let now_ms = now_ms();
    for (index, step) in flow.preflight.iter().enumerate() {
        if !step.extract.is_empty() && step.extract.keys().all(|k| extracted.contains_key(k)) {
            continue;
        }
        let reusable = reuse.as_ref().is_some_and(|r| r.steps[index]);
        if let Some(reuse) = reuse.as_mut().filter(|r| reusable && r.read)
            && let Some(values) = reuse.reused.get(reuse.session, flow, index)
        {
            extracted.extend(values.iter().map(|(k, v)| (k.clone(), v.clone())));
            reuse.used = true;
            continue;
        }
        let call = Call::Preflight(index);
        let rendered = render::render(&step.http, plan.base, &context(&plan, &extracted, now_ms))
            .map_err(|source| ReplayError::Render { call, source })?;
        let answer = calls.preflight(call, rendered).await?;
        let mut values = BTreeMap::new();
        for (name, rule) in &step.extract {
            let value = extract(rule, &answer.headers, &answer.body).ok_or_else(|| {
                ReplayError::Unexpected {
                    call,
                    kind: FailureKind::FormatDrift,
                    message: format!("its response has no `{name}` where the flow expects it"),
                }
            })?;
            values.insert(name.clone(), value);
        }
        if let Some(reuse) = reuse.as_ref().filter(|_| reusable) {
            reuse.reused.put(reuse.session, flow, index, values.clone());
        }
        extracted.extend(values);
    }
    let attached = upload_files(calls, &plan, &extracted, now_ms).await?;
    let mut ctx = context(&plan, &extracted, now_ms);
    ctx.attached = attached
        .as_ref()
        .zip(flow.upload.as_ref())
        .map(|(value, upload)| (upload.attach.as_str(), value));
    let rendered =
        render::render(&flow.request, plan.base, &ctx).map_err(|source| ReplayError::Render {
            call: Call::Chat,
            source,
        })?;
    let deltas = calls.chat(rendered, &flow.response).await?;
    Ok(Started { deltas, extracted })
}

/// Sends the prompt's files with the flow's upload steps (a file this session uploaded
/// before is named again, not sent), and returns what the chat call names them by: the
/// value for `upload.attach`. `None` when there is nothing to attach.
async fn upload_files<C: Calls>(
    calls: &mut C,
    plan: &Plan<'_>,
    extracted: &BTreeMap<String, String>,
    now_ms: i64,
) -> Result<Option<Value>, ReplayError> {
    let files = &plan.prompt.attachments;
    let Some(upload) = plan.flow.upload.as_ref().filter(|_| !files.is_empty()) else {
        return Ok(None);
    };
    let flow_id = flow_key(&plan.flow.id);
    let mut items = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for (n, attached) in files.iter().enumerate() {
        let file = &attached.file;
        // The same bytes twice in one conversation are one file on the site.
        if seen.contains(&file.sha256.as_str()) {
            continue;
        }
        seen.push(&file.sha256);
        let cached = plan
            .uploads
            .and_then(|(uploaded, session)| uploaded.get(session, flow_id, &file.sha256));
        let own = match cached {
            Some(values) => values,
            None => {
                let mut visible = extracted.clone();
                let mut own = BTreeMap::new();
                for (index, step) in upload.steps.iter().enumerate() {
                    let call = Call::Upload {
                        step: index,
                        file: n,
                    };
                    let mut ctx = context(plan, &visible, now_ms);
                    ctx.file = Some(file.as_ref());
                    let rendered = render::render(&step.http, plan.base, &ctx)
                        .map_err(|source| ReplayError::Render { call, source })?;
                    let answer = calls.preflight(call, rendered).await?;
                    for (name, rule) in &step.extract {
                        let value =
                            extract(rule, &answer.headers, &answer.body).ok_or_else(|| {
                                ReplayError::Unexpected {
                                    call,
                                    kind: FailureKind::FormatDrift,
                                    message: format!(
                                        "its response has no `{name}` where the flow expects it"
                                    ),
                                }
                            })?;
                        own.insert(name.clone(), value.clone());
                        visible.insert(name.clone(), value);
                    }
                }
                if let Some((uploaded, session)) = plan.uploads {
                    uploaded.put(session, flow_id, &file.sha256, own.clone());
                }
                own
            }
        };
        let mut visible = extracted.clone();
        visible.extend(own);
        let mut ctx = context(plan, &visible, now_ms);
        ctx.file = Some(file.as_ref());
        let item =
            render::render_value(&upload.item, &upload.item_slots, &ctx).map_err(|source| {
                ReplayError::Render {
                    call: Call::Chat,
                    source,
                }
            })?;
        items.push(item);
    }
    Ok(Some(match upload.single {
        // One file per message: the newest (the gateway refused more in the new turn).
        true => items.pop().unwrap_or(Value::Null),
        false => Value::Array(items),
    }))
}

fn context<'a>(
    plan: &Plan<'a>,
    extracted: &'a BTreeMap<String, String>,
    now_ms: i64,
) -> Context<'a> {
    Context {
        prompt: plan.prompt,
        session: plan.session,
        preflight: extracted,
        conversation: plan.conversation,
        now_ms,
        pins: plan.pins,
        file: None,
        attached: None,
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The value `rule` reads from a preflight's answer.
pub(crate) fn extract(rule: &Extract, headers: &HeaderMap, body: &[u8]) -> Option<String> {
    let text = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    match rule {
        Extract::Pointer(pointer) => {
            let json: Value = serde_json::from_slice(body).ok()?;
            json.pointer(pointer).and_then(text)
        }
        Extract::Regex { regex } => {
            let re = compiled(regex)?;
            let body = String::from_utf8_lossy(body);
            re.captures(&body)
                .and_then(|c| c.get(1).or_else(|| c.get(0)))
                .map(|m| m.as_str().to_owned())
        }
        Extract::Header { header } => headers
            .get(header.as_str())
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    }
}

/// A flow's extract regex, compiled once: compiling it costs more than the rest of an extract.
fn compiled(pattern: &str) -> Option<regex::Regex> {
    static CACHE: std::sync::OnceLock<Mutex<HashMap<String, Option<regex::Regex>>>> =
        std::sync::OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if cache.len() > 1024 {
        cache.clear();
    }
    cache
        .entry(pattern.to_owned())
        .or_insert_with(|| regex::Regex::new(pattern).ok())
        .clone()
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn extracts_pointer_regex_and_header() {
        let mut headers = HeaderMap::new();
        headers.insert("x-id", HeaderValue::from_static("h1"));
        let body = br#"{"data":{"id":42}}"#;
        assert_eq!(
            extract(&Extract::Pointer("/data/id".into()), &headers, body).as_deref(),
            Some("42")
        );
        let html = br#"<meta name="csrf-token" content="abc123">"#;
        let rule = Extract::Regex {
            regex: r#"name="csrf-token" content="([^"]+)""#.into(),
        };
        assert_eq!(extract(&rule, &headers, html).as_deref(), Some("abc123"));
        let rule = Extract::Header {
            header: "x-id".into(),
        };
        assert_eq!(extract(&rule, &headers, b"").as_deref(), Some("h1"));
    }
}
