//! The operator commands' HTTP client: one HTTP/1.1 request per connection to a node given as
//! `http://host:port`, with a bound on the whole exchange and on the answer's size.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

/// Longest one operator request may take, connect to last byte. Control-plane changes recall
/// leases from other nodes (bounded by `recall_wait_max`, 2 s by default), so this is generous.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest answer read: a ledger page of `ledger_page_max` entries fits many times over.
pub const ANSWER_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Where a node listens, from `--url`. Only plain HTTP to a host and port: the control plane
/// is meant for loopback or a private network, and TLS would need a dependency of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    /// Host name or IP address, without the brackets of an IPv6 literal.
    pub host: String,
    pub port: u16,
    /// `host:port` as written, for the `Host` header and messages.
    pub authority: String,
}

impl BaseUrl {
    /// Parses `http://host[:port][/]`; the port defaults to 80. Anything else is refused with a
    /// message that says what is accepted.
    pub fn parse(url: &str) -> Result<BaseUrl, String> {
        let refuse = |why: &str| format!("--url {url:?}: {why}; expected http://HOST:PORT");
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| refuse("only http:// URLs are supported"))?;
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() {
            return Err(refuse("no host"));
        }
        if authority.contains(['/', '?', '#', '@']) {
            return Err(refuse("a path, query or user name is not supported"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| refuse("unclosed [ in an IPv6 address"))?;
            match after {
                "" => (host, None),
                p => (
                    host,
                    Some(
                        p.strip_prefix(':')
                            .ok_or_else(|| refuse("junk after the IPv6 address"))?,
                    ),
                ),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(refuse("no host"));
        }
        let port = match port {
            None => 80,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| refuse("the port must be a number from 1 to 65535"))?,
        };
        Ok(BaseUrl {
            host: host.to_string(),
            port,
            authority: authority.to_string(),
        })
    }
}

/// An answer: the status and the body as sent.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

/// Why no answer came.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("HTTP exchange with {0} failed: {1}")]
    Http(String, hyper::Error),
    #[error("answer from {0} not read: {1}")]
    Body(String, String),
    #[error("no answer from {0} within {secs}s", secs = REQUEST_TIMEOUT.as_secs())]
    Timeout(String),
}

/// Sends one request (`body` as JSON when given) and reads the whole answer.
pub async fn send(
    base: &BaseUrl,
    token: Option<&str>,
    method: Method,
    path_and_query: &str,
    body: Option<&serde_json::Value>,
) -> Result<Answer, TransportError> {
    tokio::time::timeout(
        REQUEST_TIMEOUT,
        send_inner(base, token, method, path_and_query, body),
    )
    .await
    .unwrap_or_else(|_| Err(TransportError::Timeout(base.authority.clone())))
}

async fn send_inner(
    base: &BaseUrl,
    token: Option<&str>,
    method: Method,
    path_and_query: &str,
    body: Option<&serde_json::Value>,
) -> Result<Answer, TransportError> {
    let who = || base.authority.clone();
    let stream = tokio::net::TcpStream::connect((base.host.as_str(), base.port))
        .await
        .map_err(|e| TransportError::Connect(who(), e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| TransportError::Http(who(), e))?;
    // The connection task ends when the answer is read and `sender` is dropped.
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path_and_query)
        .header("host", &base.authority)
        .header("accept", "application/json")
        .header(
            "user-agent",
            concat!("creditd-cli/", env!("CARGO_PKG_VERSION")),
        );
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let bytes = match body {
        Some(v) => {
            req = req.header("content-type", "application/json");
            Bytes::from(v.to_string())
        }
        None => Bytes::new(),
    };
    let req = req
        .body(Full::new(bytes))
        .map_err(|e| TransportError::Body(who(), format!("bad request: {e}")))?;
    let response = sender
        .send_request(req)
        .await
        .map_err(|e| TransportError::Http(who(), e))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), ANSWER_BYTES_MAX)
        .collect()
        .await
        .map_err(|e| TransportError::Body(who(), e.to_string()))?
        .to_bytes();
    Ok(Answer { status, body })
}

/// Percent-encodes one path segment, so that an id with a `/` or `?` reaches the server as
/// one (invalid) id instead of another route.
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_accept_host_and_port_only() {
        let u = BaseUrl::parse("http://127.0.0.1:8787").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("127.0.0.1", 8787));
        let u = BaseUrl::parse("http://creditd-a:8787/").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("creditd-a", 8787));
        assert_eq!(u.authority, "creditd-a:8787");
        let u = BaseUrl::parse("http://[::1]:9000").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 9000));
        assert_eq!(BaseUrl::parse("http://localhost").unwrap().port, 80);
        for bad in [
            "https://127.0.0.1:8787",
            "127.0.0.1:8787",
            "http://",
            "http://:8787",
            "http://host:0",
            "http://host:99999",
            "http://host:8787/v1",
            "http://user@host:8787",
            "http://[::1",
        ] {
            assert!(BaseUrl::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(segment("ws-a.b_c:d"), "ws-a.b_c:d");
        assert_eq!(segment("a/b?c"), "a%2Fb%3Fc");
    }
}
