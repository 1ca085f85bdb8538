//! A backend's response head on the direct path: parsed in place, its framing found,
//! and written for the client with the hop-by-hop fields gone (the body's own framing,
//! `Transfer-Encoding`, stays: the body is relayed as it came), the session cookie and,
//! when the connection ends after it, `Connection: close`.

use std::io::Write as _;

use super::framing::{Chunks, Framing};
use super::request::{MAX_FIELDS, push_field};
use crate::proxy::headers::{self, Fields, Parsed};

/// Largest response head relayed.
pub const MAX_HEAD: usize = 64 * 1024;

/// A parsed response head.
#[derive(Debug)]
pub struct Head {
    /// The status code.
    pub status: u16,
    /// The head's length in the buffer.
    pub len: usize,
    /// How the body ends.
    pub framing: Framing,
    /// Whether the backend keeps the connection open after this response.
    pub keep_alive: bool,
}

impl Head {
    /// An interim (1xx) response: the final one follows.
    pub fn interim(&self) -> bool {
        (100..200).contains(&self.status)
    }
}

/// What the buffer holds.
#[derive(Debug)]
pub enum Read {
    /// A head, written for the client into `out`.
    Head(Head),
    /// Not all of it yet.
    Partial,
    /// Not a response the balancer can relay.
    Invalid(&'static str),
}

/// What the balancer adds to a final response.
#[derive(Debug, Default)]
pub struct Extra<'a> {
    /// A `Set-Cookie` value.
    pub set_cookie: Option<&'a str>,
    /// Whether the client connection closes after this response.
    pub close: bool,
}

/// Reads the response head at the start of `buf` (the answer to a HEAD request when
/// `to_head`), writing it for the client into `out`.
pub fn read(buf: &[u8], to_head: bool, extra: &Extra<'_>, out: &mut Vec<u8>) -> Read {
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut resp = httparse::Response::new(&mut fields);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Read::Partial,
        Ok(httparse::Status::Partial) => return Read::Invalid("a response head over 64 KiB"),
        Err(_) => return Read::Invalid("a malformed response head"),
    };
    let (Some(version), Some(status)) = (resp.version, resp.code) else {
        return Read::Invalid("a malformed response head");
    };
    if status == 101 {
        return Read::Invalid("a protocol switch nobody asked for");
    }
    let fields = Parsed(resp.headers);
    let tokens = headers::connection_tokens(&fields);
    let chunked = fields.values("transfer-encoding").next_back().map(|v| {
        v.rsplit(|b| *b == b',')
            .next()
            .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
    });
    let framing = if to_head || status < 200 || status == 204 || status == 304 {
        Framing::Empty
    } else {
        match chunked {
            Some(true) => Framing::Chunked(Chunks::default()),
            Some(false) => Framing::UntilClose,
            None => match content_length(&fields) {
                Ok(Some(0)) => Framing::Empty,
                Ok(Some(n)) => Framing::Length(n),
                Ok(None) => Framing::UntilClose,
                Err(()) => return Read::Invalid("an invalid Content-Length"),
            },
        }
    };
    let says_close = tokens.iter().any(|t| t.eq_ignore_ascii_case(b"close"));
    let keep_alive = version == 1 && !says_close;

    out.clear();
    let _ = write!(out, "HTTP/1.1 {status} ");
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in fields.0 {
        let framing_field = h.name.eq_ignore_ascii_case("transfer-encoding");
        if (headers::is_hop_by_hop(h.name, &tokens) && !framing_field)
            || (chunked.is_some() && h.name.eq_ignore_ascii_case("content-length"))
        {
            continue;
        }
        push_field(out, h.name.as_bytes(), h.value);
    }
    if status >= 200 {
        if let Some(c) = extra.set_cookie {
            push_field(out, b"set-cookie", c.as_bytes());
        }
        if extra.close || framing == Framing::UntilClose {
            push_field(out, b"connection", b"close");
        }
    }
    out.extend_from_slice(b"\r\n");
    Read::Head(Head {
        status,
        len,
        framing,
        keep_alive,
    })
}

/// The `Content-Length`: none, one value (repeated values must agree), or invalid.
fn content_length(fields: &impl Fields) -> Result<Option<u64>, ()> {
    let mut found = None;
    for v in fields.values("content-length") {
        for item in v.split(|b| *b == b',') {
            let item = item.trim_ascii();
            if item.is_empty() || !item.iter().all(u8::is_ascii_digit) {
                return Err(());
            }
            let n: u64 = std::str::from_utf8(item)
                .map_err(|_| ())?
                .parse()
                .map_err(|_| ())?;
            if found.is_some_and(|f| f != n) {
                return Err(());
            }
            found = Some(n);
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(buf: &[u8], to_head: bool, extra: &Extra<'_>) -> (Head, String) {
        let mut out = Vec::new();
        match read(buf, to_head, extra, &mut out) {
            Read::Head(h) => (h, String::from_utf8(out).expect("text")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn heads_are_relayed_with_their_framing_and_the_balancers_fields() {
        let buf = b"HTTP/1.1 200 OK\r\nConnection: keep-alive, x-hop\r\nx-hop: 1\r\nKeep-Alive: timeout=5\r\ncontent-length: 2\r\nx-app: a\r\n\r\nok";
        let extra = Extra {
            set_cookie: Some("FORM=v; Path=/"),
            close: true,
        };
        let (h, text) = head(buf, false, &extra);
        assert_eq!(
            (h.status, h.len, h.framing, h.keep_alive),
            (200, buf.len() - 2, Framing::Length(2), true)
        );
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-app: a\r\nset-cookie: FORM=v; Path=/\r\nconnection: close\r\n\r\n"
        );
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 9\r\nconnection: close\r\n\r\n";
        let (h, text) = head(chunked, false, &Extra::default());
        assert_eq!(
            (h.framing, h.keep_alive),
            (Framing::Chunked(Chunks::default()), false)
        );
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n"
        );
        let (h, text) = head(b"HTTP/1.0 200 OK\r\n\r\n", false, &Extra::default());
        assert_eq!((h.framing, h.keep_alive), (Framing::UntilClose, false));
        assert_eq!(text, "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n");
        let (h, _) = head(
            b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n",
            true,
            &Extra::default(),
        );
        assert_eq!(h.framing, Framing::Empty);
        let (h, text) = head(b"HTTP/1.1 100 Continue\r\n\r\n", false, &extra);
        assert!(h.interim());
        assert_eq!(text, "HTTP/1.1 100 Continue\r\n\r\n");
    }

    #[test]
    fn a_connection_field_cannot_strip_the_length() {
        let buf = b"HTTP/1.1 200 OK\r\nconnection: content-length, transfer-encoding\r\ncontent-length: 2\r\n\r\nok";
        let (h, text) = head(buf, false, &Extra::default());
        assert_eq!(h.framing, Framing::Length(2));
        assert_eq!(text, "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n");
    }

    #[test]
    fn broken_heads_are_refused_and_partial_ones_wait() {
        let mut out = Vec::new();
        let e = Extra::default();
        assert!(matches!(
            read(b"HTTP/1.1 200 OK\r\ncontent-le", false, &e, &mut out),
            Read::Partial
        ));
        for bad in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            b"HTTP/1.1 101 Switching\r\n\r\n",
            b"NOPE\r\n\r\n",
        ] {
            assert!(
                matches!(read(bad, false, &e, &mut out), Read::Invalid(_)),
                "{bad:?}"
            );
        }
    }
}
