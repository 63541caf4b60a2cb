//! Operator commands of the `creditd` binary, talking to a running node over HTTP.

use std::process::ExitCode;
use std::time::Duration;

use crate::config::Config;

/// Longest the health check waits for an answer.
pub const HEALTHCHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// `creditd healthcheck`: GET /readyz on the configured listen port of this host; exit 0 on 200.
pub async fn healthcheck(config: &Config) -> ExitCode {
    let mut addr = config.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    match tokio::time::timeout(HEALTHCHECK_TIMEOUT, http_get(addr, "/readyz")).await {
        Ok(Ok(200)) => ExitCode::SUCCESS,
        Ok(Ok(status)) => {
            eprintln!("creditd healthcheck: /readyz answered {status}");
            ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            eprintln!("creditd healthcheck: {e}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!(
                "creditd healthcheck: no answer within {}s",
                HEALTHCHECK_TIMEOUT.as_secs()
            );
            ExitCode::FAILURE
        }
    }
}

/// A minimal HTTP/1.1 GET returning the status code.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut head = vec![0u8; 64];
    let n = stream.read(&mut head).await?;
    let line = String::from_utf8_lossy(&head[..n]);
    line.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer"))
}
