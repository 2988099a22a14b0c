//! Images through a learned upload flow: the demo site's attach control in both shapes
//! (a multipart upload returning an id; an upload slot, a `PUT` of the bytes, a confirm) is
//! learned with real Chromium from the account's URL and credentials, then the official
//! `openai` SDK sends `data:` images through tier 1 and tier 2 and gets the site's
//! description of exactly those bytes. A resent image is not uploaded again, and each limit
//! and refusal is a 400 naming the part.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use base64::Engine;
use common::{Data, demo_site, get_json, python_client};
use computetower::attachment::Attachment;
use computetower::demo::{Shape, reply_with_files};
use computetower::learn::attach::png_with_text;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

const PROMPT: &str = "What is in this picture?";

fn send(
    server: &str,
    model: &str,
    image: &[u8],
    mime: &str,
    tier: Option<u8>,
    stream: bool,
) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image");
    std::fs::write(&path, image).unwrap();
    python_client(
        "openai_image.py",
        json!({
            "base_url": format!("{server}/v1"),
            "model": model,
            "prompt": PROMPT,
            "image_path": path,
            "mime": mime,
            "tier": tier,
            "stream": stream,
        }),
    )
}

/// What the site answers to `PROMPT` with `image` attached, as the gateway names it.
fn expected(image: &[u8]) -> String {
    let data_url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(image)
    );
    let file = Attachment::from_data_url("m", &data_url, None).unwrap();
    reply_with_files(
        Shape::Openai,
        PROMPT,
        1,
        &[(&file.name, "image/png", image)],
    )
    .content
}

async fn stats(site: &str) -> (u64, u64) {
    let stats = get_json(format!("{site}/__demo/stats")).await;
    (
        stats["uploads"].as_u64().unwrap(),
        stats["files_in_chat"].as_u64().unwrap(),
    )
}

async fn learned_uploads_serve_images(uploads: &str) {
    let site = demo_site("openai", &["--uploads", uploads]);
    let data = Data::new();
    let learned = data.learn_account(&site.url, "pics", "pics@example.com");
    assert!(learned.contains("uploads: choosing"), "{learned}");
    if uploads == "slot" {
        // The slot's URL is sent as the site gave it, not rebuilt from its pieces.
        assert!(
            learned.contains("PUT {{preflight.upload_url}}"),
            "{learned}"
        );
    }
    let server = data.serve(&[]);
    let before = stats(&site.url).await;

    // Tier 1, streamed: the reply describes exactly the bytes sent.
    let first = png_with_text("first image");
    let got = send(&server.url, "pics", &first, "image/png", None, true);
    assert_eq!(got["content"], expected(&first), "{uploads} tier 1: {got}");
    assert!(got["chunks"].as_u64().unwrap() > 5, "{got}");
    assert_eq!(stats(&site.url).await, (before.0 + 1, before.1 + 1));

    // The same image again, in a new conversation: named again, not uploaded again.
    let again = send(&server.url, "pics", &first, "image/png", None, false);
    assert_eq!(
        again["content"],
        expected(&first),
        "{uploads} resent: {again}"
    );
    assert_eq!(stats(&site.url).await, (before.0 + 1, before.1 + 2));

    // Tier 2 runs the upload with fetch() in the page.
    let second = png_with_text("second image, through the page");
    let got = send(&server.url, "pics", &second, "image/png", Some(2), false);
    assert_eq!(got["content"], expected(&second), "{uploads} tier 2: {got}");
    assert_eq!(stats(&site.url).await, (before.0 + 2, before.1 + 3));

    // A file the site refuses (over its 1 MiB limit): a 400 naming the part, nothing sent
    // to the chat.
    let mut large = png_with_text("large");
    large.resize(1_500_000, 0);
    let refused = send(&server.url, "pics", &large, "image/png", None, false);
    assert_eq!(refused["status"], 400, "{refused}");
    assert_eq!(refused["error"]["code"], "file_refused", "{refused}");
    assert_eq!(
        refused["error"]["param"], "messages[0].content[1]",
        "{refused}"
    );
    assert_eq!(stats(&site.url).await.1, before.1 + 3);

    // A type the site's file input does not accept is refused before any upload.
    let zip = send(
        &server.url,
        "pics",
        b"PK\x03\x04zip",
        "application/zip",
        None,
        false,
    );
    assert_eq!(zip["status"], 400, "{zip}");
    assert_eq!(zip["error"]["code"], "unsupported_file_type", "{zip}");
    assert!(
        zip["error"]["message"]
            .as_str()
            .unwrap()
            .contains("image/*"),
        "{zip}"
    );
    assert_eq!(stats(&site.url).await, (before.0 + 2, before.1 + 3));
}

#[tokio::test]
async fn a_multipart_upload_is_learned_and_serves_images_in_tiers_1_and_2() {
    learned_uploads_serve_images("multipart").await;
}

#[tokio::test]
async fn an_upload_slot_put_and_confirm_are_learned_and_serve_images_in_tiers_1_and_2() {
    learned_uploads_serve_images("slot").await;
}

#[tokio::test]
async fn a_site_without_an_attach_control_learns_no_upload_and_images_get_a_clear_400() {
    let site = demo_site("openai", &[]);
    let data = Data::new();
    let learned = data.learn_account(&site.url, "plain", "plain@example.com");
    assert!(!learned.contains("uploads:"), "{learned}");
    let server = data.serve(&[]);
    let got = send(
        &server.url,
        "plain",
        &png_with_text("x"),
        "image/png",
        None,
        false,
    );
    assert_eq!(got["status"], 400, "{got}");
    assert_eq!(got["error"]["code"], "no_upload", "{got}");
    assert_eq!(got["error"]["param"], "messages[0].content[1]", "{got}");
    let message = got["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("no upload step") && message.contains("re-learn"),
        "{message}"
    );
}

#[tokio::test]
async fn files_over_the_configured_size_and_unfetched_urls_are_refused_naming_the_part() {
    let site = demo_site("openai", &[]);
    let data = Data::new();
    let model = data
        .add_demo_account(&site.url, "openai", "limits@example.com")
        .await;
    let server = data.serve(&[("COMPUTETOWER_API__MAX_FILE_BYTES", "100")]);
    let big = send(&server.url, &model, &[7u8; 101], "image/png", None, false);
    assert_eq!(big["status"], 400, "{big}");
    assert_eq!(big["error"]["code"], "file_too_large", "{big}");
    assert_eq!(big["error"]["param"], "messages[0].content[1]", "{big}");

    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": format!("{}/favicon.ico", site.url)}},
        ]}],
    });
    let (status, error) = common::post_chat(&server.url, None, body.to_string()).await;
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["error"]["param"], "messages[0].content[1]", "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("fetch_image_urls"),
        "{error}"
    );
    // Fetching on, but not from this machine: the URL is refused before any request.
    let (image_url, served) = serve_image(png_with_text("never fetched")).await;
    let fetching = data.serve(&[("COMPUTETOWER_API__FETCH_IMAGE_URLS", "true")]);
    let mut private = body.clone();
    private["messages"][0]["content"][1]["image_url"]["url"] = json!(image_url);
    let (status, error) = common::post_chat(&fetching.url, None, private.to_string()).await;
    assert_eq!(status, 400, "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("fetch_private_urls"),
        "{error}"
    );
    assert_eq!(served.load(Ordering::SeqCst), 0);
}

/// A one-route HTTP server answering every request with `image` as `image/png`; its URL
/// (`…/cat.png`) and how many requests it answered.
async fn serve_image(image: Vec<u8>) -> (String, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/cat.png", listener.local_addr().unwrap());
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut request = vec![0u8; 4096];
            let _ = socket.read(&mut request).await;
            count.fetch_add(1, Ordering::SeqCst);
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n",
                image.len()
            );
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(&image).await;
        }
    });
    (url, served)
}

/// The text of a non-streamed Responses API answer.
fn responses_text(body: &Value) -> String {
    body["output"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|item| item["content"].as_array().into_iter().flatten())
        .filter_map(|part| part["text"].as_str())
        .collect()
}

#[tokio::test]
async fn anthropic_and_responses_files_a_text_file_a_continued_turn_and_tier_3_use_the_upload() {
    let site = demo_site("openai", &["--uploads", "multipart"]);
    let data = Data::new();
    data.learn_account(&site.url, "docs", "docs@example.com");
    let server = data.serve(&[
        ("COMPUTETOWER_API__FETCH_IMAGE_URLS", "true"),
        ("COMPUTETOWER_API__FETCH_PRIVATE_URLS", "true"),
    ]);
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);

    // The Anthropic Messages API: an `image` block with a base64 source.
    let image = png_with_text("through the Messages API");
    let answer = common::post_json(
        format!("{}/v1/messages", server.url),
        &json!({
            "model": "docs", "max_tokens": 500,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": PROMPT},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64(&image)}},
            ]}],
        }),
    )
    .await;
    let text = answer["content"]
        .as_array()
        .unwrap()
        .iter()
        .find(|block| block["type"] == "text")
        .map(|block| block["text"].clone());
    assert_eq!(text, Some(Value::String(expected(&image))), "{answer}");

    // The Responses API: an `input_file` text file, named as the client named it.
    let notes = b"Meeting notes: ship it.\n";
    let answer = common::post_json(
        format!("{}/v1/responses", server.url),
        &json!({
            "model": "docs",
            "input": [{"role": "user", "content": [
                {"type": "input_text", "text": PROMPT},
                {"type": "input_file", "filename": "notes.txt",
                 "file_data": format!("data:text/plain;base64,{}", b64(notes))},
            ]}],
        }),
    )
    .await;
    let want = reply_with_files(
        Shape::Openai,
        PROMPT,
        1,
        &[("notes.txt", "text/plain", notes)],
    );
    assert_eq!(responses_text(&answer), want.content, "{answer}");

    // A later turn of that conversation: the site has the file already; nothing is
    // uploaded and the new turn names no file.
    let (uploads, _) = stats(&site.url).await;
    let later = json!({
        "model": "docs",
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": PROMPT},
                {"type": "file", "file": {"filename": "notes.txt",
                 "file_data": format!("data:text/plain;base64,{}", b64(notes))}},
            ]},
            {"role": "assistant", "content": want.content},
        ],
    });
    let (status, first) = common::post_chat(&server.url, None, later.to_string()).await;
    assert_eq!(status, 200, "{first}");
    let mut next = later.clone();
    next["messages"][1]["content"] = first["choices"][0]["message"]["content"].clone();
    next["messages"]
        .as_array_mut()
        .unwrap()
        .push(json!({"role": "user", "content": "And?"}));
    let (status, second) = common::post_chat(&server.url, None, next.to_string()).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(
        second["choices"][0]["message"]["content"],
        computetower::demo::reply_for_turn(Shape::Openai, "And?", 2).content,
        "{second}"
    );
    assert_eq!(
        stats(&site.url).await.0,
        uploads,
        "the file was uploaded again"
    );

    // An image URL, fetched by the server (allowed here, this machine included).
    let cat = png_with_text("a cat, fetched");
    let (image_url, served) = serve_image(cat.clone()).await;
    let body = json!({
        "model": "docs",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": PROMPT},
            {"type": "image_url", "image_url": {"url": image_url}},
        ]}],
    });
    let (status, answer) = common::post_chat(&server.url, None, body.to_string()).await;
    assert_eq!(status, 200, "{answer}");
    let want = reply_with_files(Shape::Openai, PROMPT, 1, &[("cat.png", "image/png", &cat)]);
    assert_eq!(
        answer["choices"][0]["message"]["content"], want.content,
        "{answer}"
    );
    assert_eq!(served.load(Ordering::SeqCst), 1);

    // Tier 3 attaches through the page's own file input.
    let image = png_with_text("through the page's file input");
    let got = send(&server.url, "docs", &image, "image/png", Some(3), false);
    assert_eq!(got["content"], expected(&image), "tier 3: {got}");
    assert_eq!(stats(&site.url).await.0, uploads + 2);
}
