//! A minimal HTTP/1.1 health probe: `GET path` on an instance's address, 200 or not.
//! The controller checks a new instance itself before it is routed to.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Whether `GET http://{address}{path}` answers 200 within `timeout`.
pub async fn http_ok(address: &str, path: &str, timeout: Duration) -> bool {
    tokio::time::timeout(timeout, get_status(address, path))
        .await
        .ok()
        .flatten()
        == Some(200)
}

async fn get_status(address: &str, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(address).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 4096 {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = std::str::from_utf8(&buf).ok()?.lines().next()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn reads_the_status_code() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            for code in [200, 503] {
                let (mut s, _) = l.accept().await.expect("accept");
                let mut b = [0u8; 512];
                let _ = s.read(&mut b).await;
                let r = format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\n\r\n");
                let _ = s.write_all(r.as_bytes()).await;
            }
        });
        assert!(http_ok(&addr, "/healthz", Duration::from_secs(5)).await);
        assert!(!http_ok(&addr, "/healthz", Duration::from_secs(5)).await);
    }
}
