//! A minimal HTTP/1.1 client for talking to workloads: readiness probes, the snapshot
//! hook and the state contract. One request per connection; a response body is read
//! whole (by its length, chunked, or until the connection closes), up to a limit.

use std::io::{Error, ErrorKind};
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Body limit of [`request`].
const TEXT_LIMIT: usize = 1024 * 1024;

/// Sends one request; returns the status code and the body as text.
pub(crate) async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    let (code, bytes) = request_bytes(addr, method, path, body, timeout, TEXT_LIMIT).await?;
    Ok((code, String::from_utf8_lossy(&bytes).into_owned()))
}

/// Sends one request; returns the status code and the body, refusing a body longer
/// than `limit` bytes.
pub(crate) async fn request_bytes(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
    limit: usize,
) -> std::io::Result<(u16, Vec<u8>)> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        // Head and body in one write, without Nagle's delay: a request's last partial
        // segment must not wait for the server's delayed acknowledgement.
        s.set_nodelay(true)?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let mut request = Vec::with_capacity(head.len() + body.len());
        request.extend_from_slice(head.as_bytes());
        request.extend_from_slice(body);
        s.write_all(&request).await?;
        // Head, framing and a little slack beyond the body limit.
        let cap = (limit + 64 * 1024) as u64;
        let mut buf = Vec::new();
        (&mut s).take(cap + 1).read_to_end(&mut buf).await?;
        if buf.len() as u64 > cap {
            return Err(Error::new(
                ErrorKind::InvalidData,
                format!("{method} {path}: the response is larger than {limit} bytes"),
            ));
        }
        Ok::<_, Error>(buf)
    };
    let buf = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| Error::new(ErrorKind::TimedOut, format!("{method} {path} timed out")))??;
    parse(&buf, limit)
}

/// The status and the body of a whole response.
fn parse(buf: &[u8], limit: usize) -> std::io::Result<(u16, Vec<u8>)> {
    let bad = |m: &str| Error::new(ErrorKind::InvalidData, m.to_owned());
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of the HTTP head"))?;
    let head = String::from_utf8_lossy(&buf[..end]);
    let rest = &buf[end + 4..];
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("no HTTP status line"))?;
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_ascii_lowercase())
        })
    };
    let body = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        dechunk(rest).ok_or_else(|| bad("malformed chunked body"))?
    } else if let Some(len) = header("content-length") {
        let len: usize = len.parse().map_err(|_| bad("bad Content-Length"))?;
        if rest.len() < len {
            return Err(bad("the body ended before its Content-Length"));
        }
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    if body.len() > limit {
        return Err(bad(&format!("the response is larger than {limit} bytes")));
    }
    Ok((status, body))
}

/// The data of a chunked body, or `None` when it is malformed or cut short.
fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        if rest.len() < size + 2 || &rest[size..size + 2] != b"\r\n" {
            return None;
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_read_by_length_by_chunks_and_to_the_end() {
        let r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef", 10).expect("ok");
        assert_eq!(r, (200, b"abc".to_vec()));
        let r = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
            10,
        )
        .expect("ok");
        assert_eq!(r, (200, b"abcde".to_vec()));
        let r = parse(b"HTTP/1.1 404 Not Found\r\n\r\nno", 10).expect("ok");
        assert_eq!(r, (404, b"no".to_vec()));
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc", 10).is_err());
        assert!(
            parse(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
                10
            )
            .is_err()
        );
        assert!(parse(b"HTTP/1.1 200 OK\r\n\r\n0123456789ab", 10).is_err());
    }
}
