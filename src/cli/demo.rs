//! `computetower demo`: the whole job on the built-in demo site, in one process — start the
//! site, learn it with Chromium (log in, one probe message, inference, a verifying replay),
//! serve the OpenAI API, and answer one streamed request, checking it against the site's own reply.

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures_util::StreamExt;

use super::CliResult;
use crate::config::Config;
use crate::demo::{DemoConfig, LoginPattern, Shape};
use crate::store::accounts::NewAccount;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Which internal API shape the demo site speaks.
    #[arg(long, default_value = "openai")]
    shape: Shape,
    /// How the demo site's login looks: direct, landing, two-step, open.
    #[arg(long, default_value = "direct")]
    login: LoginPattern,
    /// The message to send.
    #[arg(long, default_value = "Explain in one line what ComputeTower does.")]
    prompt: String,
    /// Delay between the demo site's tokens, in milliseconds.
    #[arg(long, default_value_t = 30)]
    token_delay_ms: u64,
    /// Keep serving after the answer, until Ctrl-C.
    #[arg(long)]
    serve: bool,
    /// Where to serve the OpenAI API (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    bind: SocketAddr,
}

const EMAIL: &str = "demo@example.com";

pub async fn run(args: DemoArgs, mut config: Config) -> CliResult {
    // The demo keeps its own data dir, fresh each run, beside (not inside) real data.
    config.data_dir = config.data_dir.join("demo");
    if config.data_dir.exists() {
        std::fs::remove_dir_all(&config.data_dir)?;
    }

    let progress = super::progress::Progress::stderr();
    progress.step(&format!(
        "starting the demo chat site (shape `{}`)",
        args.shape
    ));
    let site_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let site = format!("http://{}/", site_listener.local_addr()?);
    let demo_config = DemoConfig {
        shape: args.shape,
        login: args.login,
        token_delay: Duration::from_millis(args.token_delay_ms),
        ..Default::default()
    };
    let password = demo_config.password.clone();
    tokio::spawn(crate::demo::serve(site_listener, demo_config));
    progress.note(&site);

    let store = crate::server::open_store(&config).await?;
    let service = format!("demo-{}", args.shape);
    let account = store
        .add_account(NewAccount {
            url: site.clone(),
            service: Some(service.clone()),
            email: Some(EMAIL.into()),
            password: Some(password),
            proxy: None,
        })
        .await?;
    let (events, _writer) = crate::store::events::EventWriter::start(store.clone());
    let state = crate::server::app_state(config.clone(), store, events);
    let (Some(renewer), Some(learner)) = (state.gateway.renewer().cloned(), state.learner.clone())
    else {
        return Err("the browser is not available".into());
    };

    progress.step(&format!(
        "learning the site with Chromium: log in as {EMAIL} (`{}` login pages), send one probe message, infer its chat API",
        args.login
    ));
    let on_stage = |stage: crate::learn::Stage| progress.step(stage.as_str());
    let learned = learner.learn(&account, &on_stage).await;
    let report = match learned {
        Ok(report) => report,
        Err(e) => {
            progress.finish();
            renewer.pool().shutdown().await;
            return Err(e.into());
        }
    };
    let flow = &report.flow;
    let t = &report.timings;
    progress.note(&format!(
        "learned in {:.1} s (login {:.1} s, probe {:.1} s, infer {} ms, verify {} ms); session and flow stored in {}",
        t.total_ms as f64 / 1000.0,
        t.login_ms.unwrap_or_default() as f64 / 1000.0,
        t.probe_ms as f64 / 1000.0,
        t.infer_ms,
        t.verify_ms,
        config.data_dir.display()
    ));
    progress.note(&format!(
        "flow {}: {} preflight(s), then {} {} → {:?} ({:?})",
        flow.id,
        flow.preflight.len(),
        flow.request.method,
        flow.request.url,
        flow.response.transport,
        flow.response.text.mode
    ));
    if flow.replay.needs_browser {
        progress.finish();
        renewer.pool().shutdown().await;
        return Err(format!(
            "the learned flow cannot be replayed directly: {}",
            flow.replay.reason.as_deref().unwrap_or("unknown reason")
        )
        .into());
    }

    progress.step("serving the OpenAI API");
    let listener = tokio::net::TcpListener::bind(args.bind).await?;
    let addr = listener.local_addr()?;
    let app = crate::api::router(state.clone());
    let listener = crate::server::no_delay(listener);
    tokio::spawn(async move { axum::serve(listener, app).await });
    progress.note(&format!("http://{addr}/v1  (model `{service}`)"));
    progress.step(&format!("asking: {}", args.prompt));
    // The answer streams on stdout: the spinner would draw over it.
    progress.finish();
    let answer = ask(addr, &service, &args.prompt).await?;
    let expected = crate::demo::reply_for(args.shape, &args.prompt);
    if answer.content != expected.content
        || answer.reasoning != expected.reasoning.clone().unwrap_or_default()
    {
        return Err("the answer differs from the demo site's own reply".into());
    }
    eprintln!(
        "==> done: first token after {} ms, whole reply in {} ms; it matches the site's reply exactly",
        answer.first_token.as_millis(),
        answer.total.as_millis()
    );

    if args.serve {
        eprintln!(
            "\nStill serving. Try:\n  curl -N http://{addr}/v1/chat/completions -H 'content-type: application/json' \\\n    -d '{{\"model\":\"{service}\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"hello\"}}]}}'\n\
             or with the openai SDK: OpenAI(base_url=\"http://{addr}/v1\", api_key=\"unused\")\n\
             The admin page (accounts, flows, live traffic): http://{addr}/admin\n\
             Next, a real site: computetower account add --url https://chat.example.com --name example \\\n\
             \x20   --email you@example.com --password-stdin  (or --cookies FILE), then computetower learn example\n\
             Ctrl-C to stop."
        );
        tokio::signal::ctrl_c().await?;
    }
    renewer.pool().shutdown().await;
    Ok(())
}

struct Answer {
    content: String,
    reasoning: String,
    first_token: Duration,
    total: Duration,
}

/// Streams one chat completion, printing tokens as they arrive.
async fn ask(
    addr: SocketAddr,
    model: &str,
    prompt: &str,
) -> Result<Answer, Box<dyn std::error::Error + Send + Sync>> {
    let started = Instant::now();
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/v1/chat/completions"))
        .json(&serde_json::json!({
            "model": model,
            "stream": true,
            "messages": [{"role": "user", "content": prompt}],
        }))
        .send()
        .await?;
    if !response.status().is_success() {
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        return Err(format!("the API answered {status}: {body}").into());
    }
    let mut events = response.bytes_stream().eventsource();
    let mut answer = Answer {
        content: String::new(),
        reasoning: String::new(),
        first_token: Duration::ZERO,
        total: Duration::ZERO,
    };
    let mut out = std::io::stdout().lock();
    let mut thinking = false;
    while let Some(event) = events.next().await {
        let event = event?;
        if event.data == "[DONE]" {
            break;
        }
        let chunk: serde_json::Value = serde_json::from_str(&event.data)?;
        if let Some(error) = chunk.get("error") {
            return Err(format!("stream failed: {error}").into());
        }
        let delta = &chunk["choices"][0]["delta"];
        for (field, is_reasoning) in [("reasoning_content", true), ("content", false)] {
            let Some(text) = delta
                .get(field)
                .and_then(|v| v.as_str())
                .filter(|t| !t.is_empty())
            else {
                continue;
            };
            if answer.first_token.is_zero() {
                answer.first_token = started.elapsed();
            }
            if is_reasoning && !thinking {
                write!(out, "[thinking] ")?;
                thinking = true;
            } else if !is_reasoning && thinking {
                write!(out, "\n[answer] ")?;
                thinking = false;
            }
            write!(out, "{text}")?;
            out.flush()?;
            if is_reasoning {
                answer.reasoning.push_str(text);
            } else {
                answer.content.push_str(text);
            }
        }
    }
    writeln!(out)?;
    answer.total = started.elapsed();
    Ok(answer)
}
