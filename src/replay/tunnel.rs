//! A TCP stream to a site through an account's proxy, for the calls the HTTP client does not
//! make itself (the WebSocket replay): `CONNECT` through an HTTP proxy, or SOCKS5.
//!
//! Invariant: proxy credentials go to the proxy only (a `Proxy-Authorization` header on the
//! `CONNECT`, or the SOCKS5 login), never to the site.

use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use url::Url;

/// The longest proxy answer to a `CONNECT` read before giving up on it.
const MAX_CONNECT_RESPONSE: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("the account's proxy URL is not usable")]
    BadProxy,
    #[error("cannot reach the proxy: {0}")]
    Connect(std::io::Error),
    #[error("the proxy refused the tunnel: {0}")]
    Refused(String),
    #[error("the proxy did not answer within {0} s")]
    Timeout(u64),
}

/// A stream to `host:port` through `proxy` (`http://` or `socks5(h)://`, with optional
/// `user:password@`).
pub async fn open(
    proxy: &str,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<TcpStream, TunnelError> {
    let proxy = Url::parse(proxy).map_err(|_| TunnelError::BadProxy)?;
    let proxy_host = proxy.host_str().ok_or(TunnelError::BadProxy)?.to_owned();
    let user = percent_decode(proxy.username());
    let password = proxy.password().map(percent_decode);
    let work = async {
        match proxy.scheme() {
            "http" => {
                let port_of_proxy = proxy.port().unwrap_or(80);
                let stream = TcpStream::connect((proxy_host.as_str(), port_of_proxy))
                    .await
                    .map_err(TunnelError::Connect)?;
                let auth = (!user.is_empty())
                    .then(|| basic_auth(&user, password.as_deref().unwrap_or_default()));
                http_connect(stream, host, port, auth.as_deref()).await
            }
            "socks5" | "socks5h" => {
                let port_of_proxy = proxy.port().unwrap_or(1080);
                let target = (host, port);
                let proxy_addr = (proxy_host.as_str(), port_of_proxy);
                let stream = if user.is_empty() {
                    tokio_socks::tcp::Socks5Stream::connect(proxy_addr, target).await
                } else {
                    tokio_socks::tcp::Socks5Stream::connect_with_password(
                        proxy_addr,
                        target,
                        &user,
                        password.as_deref().unwrap_or_default(),
                    )
                    .await
                };
                stream
                    .map(tokio_socks::tcp::Socks5Stream::into_inner)
                    .map_err(|e| TunnelError::Refused(e.to_string()))
            }
            // A TLS connection to the proxy itself is not offered for the WebSocket replay.
            _ => Err(TunnelError::BadProxy),
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| TunnelError::Timeout(timeout.as_secs()))?
}

/// `CONNECT host:port` on `stream`; the stream once the proxy answered 2xx.
async fn http_connect(
    mut stream: TcpStream,
    host: &str,
    port: u16,
    auth: Option<&str>,
) -> Result<TcpStream, TunnelError> {
    let authority = match host.contains(':') {
        true => format!("[{host}]:{port}"),
        false => format!("{host}:{port}"),
    };
    let mut request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some(auth) = auth {
        request.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(TunnelError::Connect)?;
    // Read the answer byte by byte up to its blank line: nothing of the tunnel after it may
    // be consumed here.
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_CONNECT_RESPONSE {
            return Err(TunnelError::Refused("its answer is too long".into()));
        }
        let byte = stream.read_u8().await.map_err(TunnelError::Connect)?;
        head.push(byte);
    }
    let head = String::from_utf8_lossy(&head);
    let status_line = head.lines().next().unwrap_or_default();
    let status = status_line.split_whitespace().nth(1).unwrap_or_default();
    if !status.starts_with('2') {
        return Err(TunnelError::Refused(status_line.trim().to_owned()));
    }
    Ok(stream)
}

fn basic_auth(user: &str, password: &str) -> String {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {token}")
}

fn percent_decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A one-shot HTTP proxy: reads the `CONNECT` head, answers `answer`, then echoes.
    async fn proxy(answer: &'static str) -> (String, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                head.push(socket.read_u8().await.unwrap());
            }
            socket.write_all(answer.as_bytes()).await.unwrap();
            let mut buf = [0u8; 5];
            if socket.read_exact(&mut buf).await.is_ok() {
                socket.write_all(&buf).await.unwrap();
            }
            String::from_utf8(head).unwrap()
        });
        (format!("http://u%40x:p%3Aw@{addr}"), task)
    }

    #[tokio::test]
    async fn connect_sends_the_credentials_to_the_proxy_and_yields_the_tunnel() {
        let (url, seen) = proxy("HTTP/1.1 200 Connection established\r\n\r\n").await;
        let mut stream = open(&url, "chat.example.com", 443, Duration::from_secs(5))
            .await
            .unwrap();
        stream.write_all(b"hello").await.unwrap();
        let mut echo = [0u8; 5];
        stream.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"hello");
        let head = seen.await.unwrap();
        assert!(
            head.starts_with("CONNECT chat.example.com:443 HTTP/1.1\r\n"),
            "{head}"
        );
        let expected = basic_auth("u@x", "p:w");
        assert!(
            head.contains(&format!("Proxy-Authorization: {expected}")),
            "{head}"
        );
    }

    #[tokio::test]
    async fn a_refused_tunnel_says_what_the_proxy_answered() {
        let (url, _seen) = proxy("HTTP/1.1 407 Proxy Authentication Required\r\n\r\n").await;
        let err = open(&url, "chat.example.com", 443, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("407"), "{err}");
        assert!(!err.to_string().contains("p:w"), "{err}");
    }
}
