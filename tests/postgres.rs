//! `serve` with its store on PostgreSQL, end to end: a real server (the unprivileged cluster
//! of `common::postgres`), the real binary and the demo site. Migrations, an account and its
//! flow, chat requests, events in `/admin/events`, a conversation and a stored response
//! across a restart, the store in `/health` and `/metrics`, a wrong master key refused, and
//! no secret in the database in clear nor in the logs — the database password included.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use common::{Data, MASTER_KEY, demo_site, get_json, http, post_chat};
use computetower::demo::{Shape, reply_for, reply_for_turn};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde_json::{Value, json};

/// Every row of every table, as PostgreSQL prints it (sealed columns as hex).
async fn dump(url: &str) -> String {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert!(tables.len() >= 10, "{tables:?}");
    let mut out = String::new();
    for table in tables {
        let rows: Vec<String> = sqlx::query_scalar(&format!("SELECT t::text FROM {table} t"))
            .fetch_all(&mut conn)
            .await
            .unwrap();
        for row in rows {
            out.push_str(&format!("{table}: {row}\n"));
        }
    }
    out
}

async fn streamed(server: &str, model: &str, prompt: &str) -> String {
    let response = http()
        .post(format!("{server}/v1/chat/completions"))
        .json(&json!({"model": model, "stream": true,
                      "messages": [{"role": "user", "content": prompt}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut events = response.bytes_stream().eventsource();
    let mut text = String::new();
    while let Some(event) = events.next().await {
        let event = event.unwrap();
        if event.data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(&event.data).unwrap();
        if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
            text.push_str(piece);
        }
    }
    text
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `{series}` in /metrics:\n{text}"))
}

#[tokio::test]
async fn serve_on_postgres_keeps_everything_across_a_restart() {
    let url = common::postgres::fresh_database().await;
    let db_password = common::postgres::cluster().password.clone();
    let site = demo_site("openai", &[]);
    let data = Data::on_postgres(&url);

    // `migrate` applies the schema and says so; a second run has nothing to do.
    let migrated = data.ok(&["migrate"], None);
    // Every migration the binary embeds, 1 to N.
    let latest = std::fs::read_dir(common::repo().join("migrations/postgres"))
        .unwrap()
        .count();
    let applied: Vec<String> = (1..=latest).map(|v| v.to_string()).collect();
    assert!(
        migrated.contains("postgres 127.0.0.1:")
            && migrated.contains(&format!("schema version {latest}")),
        "{migrated}"
    );
    assert!(
        migrated.contains(&format!("applied {}", applied.join(", "))),
        "{migrated}"
    );
    let again: Value = serde_json::from_str(&data.ok(&["migrate", "--json"], None)).unwrap();
    assert_eq!(
        again,
        json!({"engine": "postgres", "store": again["store"], "version": latest, "applied": []})
    );
    assert!(!again.to_string().contains(&db_password));

    let (model, secrets) = data
        .add_demo_account_with_secrets(&site.url, "openai", "pg@example.com")
        .await;
    let mut server = data.serve(&[("RUST_LOG", "trace")]);

    let health = get_json(format!("{}/health", server.url)).await;
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["store"]["engine"], "postgres", "{health}");
    assert_eq!(health["store"]["state"], "ok", "{health}");

    // Chat, streamed and not, from the flow and session stored in PostgreSQL.
    let (status, body) = post_chat(
        &server.url,
        None,
        common::ask(&model, "hello from postgres"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        reply_for(Shape::Openai, "hello from postgres").content
    );
    assert_eq!(
        streamed(&server.url, &model, "a streamed one").await,
        reply_for(Shape::Openai, "a streamed one").content
    );
    // Turn 1 of a conversation, and a stored Responses API response, for after the restart.
    let first = "first turn on postgres";
    let (status, turn1) = post_chat(&server.url, None, common::ask(&model, first)).await;
    assert_eq!(status, 200, "{turn1}");
    let reply1 = turn1["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    let response: Value = http()
        .post(format!("{}/v1/responses", server.url))
        .json(&json!({"model": model, "input": "keep this response"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let response_id = response["id"].as_str().unwrap().to_owned();

    let events = get_json(format!("{}/admin/events", server.url)).await;
    let events = events["data"].as_array().unwrap().clone();
    assert_eq!(events.len(), 4, "{events:?}");
    assert!(
        events
            .iter()
            .all(|e| e["outcome"] == "ok" && e["tier"] == 1 && e["service"] == model.as_str()),
        "{events:?}"
    );
    let metrics = http()
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let count = |op: &str| {
        metric(
            &metrics,
            &format!("computetower_store_query_seconds_count{{engine=\"postgres\",op=\"{op}\"}}"),
        )
    };
    assert!(count("read") >= 1.0 && count("events") >= 1.0, "{metrics}");
    assert_eq!(
        metric(
            &metrics,
            "computetower_store_errors_total{engine=\"postgres\",op=\"read\"}"
        ),
        0.0
    );
    let accounts = get_json(format!("{}/admin/accounts", server.url)).await;
    let flows = get_json(format!("{}/admin/flows", server.url)).await;
    let sessions = get_json(format!("{}/admin/sessions", server.url)).await;
    let mut log = server.stderr();
    server.terminate();

    // Restarted: the same accounts, flows, sessions and events; the conversation continues on
    // the site (its turn 2) from what PostgreSQL remembered, and the response is still there.
    let mut server = data.serve(&[("RUST_LOG", "trace")]);
    assert_eq!(
        get_json(format!("{}/admin/accounts", server.url)).await,
        accounts
    );
    assert_eq!(get_json(format!("{}/admin/flows", server.url)).await, flows);
    assert_eq!(
        get_json(format!("{}/admin/sessions", server.url)).await["data"],
        sessions["data"]
    );
    let kept = get_json(format!("{}/admin/events", server.url)).await;
    assert_eq!(kept["data"].as_array().unwrap().len(), 4, "{kept}");
    let second = "second turn on postgres";
    let (status, turn2) = post_chat(
        &server.url,
        None,
        json!({"model": model, "messages": [
            {"role": "user", "content": first},
            {"role": "assistant", "content": reply1},
            {"role": "user", "content": second},
        ]})
        .to_string(),
    )
    .await;
    assert_eq!(status, 200, "{turn2}");
    assert_eq!(
        turn2["choices"][0]["message"]["content"],
        reply_for_turn(Shape::Openai, second, 2).content
    );
    let stored = http()
        .get(format!("{}/v1/responses/{response_id}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(stored.status(), 200);
    let stored: Value = stored.json().await.unwrap();
    assert_eq!(stored["output"], response["output"], "{stored}");
    let text: String = response["output"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|item| item["content"].as_array().cloned().unwrap_or_default())
        .filter_map(|part| part["text"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(text, reply_for(Shape::Openai, "keep this response").content);
    log.push_str(&server.stderr());
    server.terminate();

    // Nothing on disk but what the data dir holds anyway: no SQLite file.
    assert!(!data.path().join("computetower.db").exists());

    // A wrong master key is refused at start, by the CLI and by `serve`, naming the store
    // without its password.
    let wrong = "02".repeat(32);
    for args in [
        &["account", "list"][..],
        &["serve", "--bind", "127.0.0.1:0"],
    ] {
        let out = data
            .command_for(args)
            .env("COMPUTETOWER_MASTER_KEY", &wrong)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("master key does not open the store (postgres 127.0.0.1:"),
            "{stderr}"
        );
        assert!(!stderr.contains(&db_password) && !stderr.contains("panicked"));
    }

    // Sealed in the database, and absent from the trace logs.
    let rows = dump(&url).await;
    assert!(rows.contains("pg@example.com"), "the dump reads the tables");
    for secret in &secrets {
        assert!(secret.len() >= 8, "secret too short to grep reliably");
        assert!(
            !rows.contains(secret.as_str()),
            "a secret is stored in clear"
        );
        assert!(
            !rows.contains(&hex::encode(secret)),
            "a secret is stored in clear"
        );
        assert!(!log.contains(secret.as_str()), "a secret is in the log");
    }
    assert!(log.contains("TRACE"), "trace logging is off");
    assert!(
        !log.contains(&db_password),
        "the database password is in the log"
    );
    assert!(!log.contains(MASTER_KEY));
}

/// A `database_url` that is not PostgreSQL's is refused before anything is opened or made.
#[tokio::test]
async fn a_database_url_that_is_not_postgres_is_refused() {
    let data = Data::on_postgres("mysql://ct:not-shown@127.0.0.1:1/x");
    let out = data.cli(&["account", "list"], None);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("database_url") && stderr.contains("postgres://"),
        "{stderr}"
    );
    assert!(!stderr.contains("not-shown"), "{stderr}");
    assert!(std::fs::read_dir(data.path()).unwrap().next().is_none());
}
