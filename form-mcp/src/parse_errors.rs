//! JSON bodies for the errors hyper answers before any route runs.
//!
//! A request that hyper cannot parse (a request line over 65534 bytes, headers over
//! its buffer, a line that is not HTTP) is answered by hyper itself, with a 400, 414 or
//! 431 and an empty body, and the connection is closed: no layer of the router sees it.
//! The limits are hyper's own and cannot be changed, so the gateway rewrites those
//! answers on their way out instead: every accepted connection is wrapped, and a
//! response that starts a write with one of those statuses and `content-length: 0`
//! (which no route of the gateway sends: its errors are JSON) gets the documented
//! `{"error": {"code", "message"}}` body in its place. Everything else passes untouched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::serve::Listener;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A listener whose connections get JSON bodies on hyper's own error answers.
pub(crate) struct JsonParseErrors<L>(pub L);

impl<L: Listener> Listener for JsonParseErrors<L> {
    type Io = ParseErrorsAsJson<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = self.0.accept().await;
        (ParseErrorsAsJson::new(io), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// A connection whose hyper-made error answers are rewritten (see the module).
pub(crate) struct ParseErrorsAsJson<T> {
    inner: T,
    /// The rewritten answer still to be written, and how many bytes of the caller's
    /// buffer it stands for (reported once it is all written).
    pending: Option<(Vec<u8>, usize)>,
}

impl<T> ParseErrorsAsJson<T> {
    fn new(inner: T) -> Self {
        Self {
            inner,
            pending: None,
        }
    }
}

impl<T: AsyncWrite + Unpin> ParseErrorsAsJson<T> {
    /// Writes the rewritten answer out; ready with the caller's byte count once done.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some((bytes, stands_for)) = self.pending.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        while !bytes.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, bytes))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            bytes.drain(..n);
        }
        let done = *stands_for;
        self.pending = None;
        Poll::Ready(Ok(done))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ParseErrorsAsJson<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ParseErrorsAsJson<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.pending.is_none() {
            match rewrite(buf) {
                Some(answer) => self.pending = Some(answer),
                None => return Pin::new(&mut self.inner).poll_write(cx, buf),
            }
        }
        self.poll_pending(cx)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    // Not vectored, so that hyper writes a response head in one contiguous buffer
    // that `rewrite` can read whole.
    fn is_write_vectored(&self) -> bool {
        false
    }
}

/// The code and message of each status hyper answers by itself.
fn error_of(status: &[u8]) -> Option<(&'static str, String)> {
    Some(match status {
        b"400" => (
            "invalid_request",
            "the request is not valid HTTP/1.1: a request line `METHOD /path HTTP/1.1` \
             and `Name: value` header lines are accepted"
                .to_owned(),
        ),
        b"414" => (
            "uri_too_long",
            format!(
                "the request's path and query are longer than 65534 bytes; ids in a path \
                 are at most {} bytes",
                form_runtime::ids::MAX_ID_LEN
            ),
        ),
        b"431" => (
            "headers_too_large",
            "the request's headers are larger than the gateway reads (about 400 KiB in \
             all); send fewer or smaller headers"
                .to_owned(),
        ),
        _ => return None,
    })
}

/// The JSON answer that replaces a hyper error answer at the start of `buf`, and how
/// many bytes of `buf` it replaces; `None` for anything else.
fn rewrite(buf: &[u8]) -> Option<(Vec<u8>, usize)> {
    let rest = buf.strip_prefix(b"HTTP/1.1 ")?;
    let (code, message) = error_of(rest.get(..3)?)?;
    let head_len = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..head_len]).ok()?;
    let mut lines = head.split("\r\n").filter(|l| !l.is_empty());
    let status_line = lines.next()?;
    let headers: Vec<&str> = lines.collect();
    let named = |h: &str, name: &str| {
        h.split_once(':')
            .is_some_and(|(n, _)| n.trim().eq_ignore_ascii_case(name))
    };
    let empty = headers.iter().any(|h| {
        named(h, "content-length") && h.split_once(':').is_some_and(|(_, v)| v.trim() == "0")
    });
    if !empty || headers.iter().any(|h| named(h, "content-type")) {
        return None;
    }
    let body = serde_json::json!({"error": {"code": code, "message": message}}).to_string();
    let mut out = format!(
        "{status_line}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for h in headers
        .iter()
        .filter(|h| !named(h, "content-length") && !named(h, "connection"))
    {
        out.push_str(h);
        out.push_str("\r\n");
    }
    // hyper closes the connection after these answers; say so.
    out.push_str("connection: close\r\n\r\n");
    out.push_str(&body);
    Some((out.into_bytes(), head_len))
}

#[cfg(test)]
mod tests {
    use super::rewrite;

    fn rewritten(buf: &str) -> Option<(String, usize)> {
        rewrite(buf.as_bytes()).map(|(b, n)| (String::from_utf8(b).expect("UTF-8"), n))
    }

    #[test]
    fn hyper_error_answers_get_a_json_body() {
        let head = "HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let (out, n) = rewritten(head).expect("rewritten");
        assert_eq!(n, head.len());
        let (out_head, body) = out.split_once("\r\n\r\n").expect("a head");
        assert!(
            out_head.starts_with("HTTP/1.1 414 URI Too Long\r\n"),
            "{out}"
        );
        assert!(out_head.contains("date: x"), "{out}");
        assert!(out_head.contains("connection: close"), "{out}");
        assert!(
            out_head.contains(&format!("content-length: {}", body.len())),
            "{out}"
        );
        let v: serde_json::Value = serde_json::from_str(body).expect("JSON");
        assert_eq!(v["error"]["code"], "uri_too_long");
        for (status, code) in [
            ("400 Bad Request", "invalid_request"),
            ("431 x", "headers_too_large"),
        ] {
            let (out, _) = rewritten(&format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n"))
                .expect("rewritten");
            assert!(out.contains(code), "{out}");
        }
    }

    #[test]
    fn everything_else_passes_untouched() {
        for buf in [
            // A route's JSON error.
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
            // A success, an error hyper does not make, a body, half a head.
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 414 URI Too Long\r\ncontent-length: 5\r\n\r\nhello",
            "{\"HTTP/1.1 414\": 1}",
            "HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\n",
        ] {
            assert!(rewritten(buf).is_none(), "{buf}");
        }
    }
}
