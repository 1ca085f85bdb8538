//! A client's request as the direct path reads it: parsed in place, taken only when it
//! is plain (HTTP/1.1, origin-form, one `Host`, no `Transfer-Encoding`, `Expect` or
//! `Upgrade`, its body whole in the buffer), and written out for the backend with the
//! hop-by-hop fields gone and the forwarding fields set.

use std::borrow::Cow;
use std::net::IpAddr;

use crate::proxy::headers::{self, Forwarding, Parsed};

/// Fields the direct path parses at most; a request with more goes to hyper, which
/// applies the configured limit.
pub const MAX_FIELDS: usize = 128;

/// A plain request, borrowed from the connection's buffer.
#[derive(Debug)]
pub struct Plain<'h, 'b> {
    /// The method.
    pub method: &'b str,
    /// The origin-form target.
    pub path: &'b str,
    /// The fields.
    pub fields: Parsed<'h, 'b>,
    /// The host, lowercase, without the port.
    pub host: Cow<'b, str>,
    /// The head's length.
    pub head_len: usize,
    /// The body's length.
    pub body_len: usize,
    /// Whether the client asked to close the connection after the response.
    pub close: bool,
}

impl Plain<'_, '_> {
    /// The bytes of the message in the buffer.
    pub fn message_len(&self) -> usize {
        self.head_len + self.body_len
    }

    /// Whether the request may be sent again after a connection failed under it
    /// (RFC 9110 9.2.2).
    pub fn idempotent(&self) -> bool {
        matches!(
            self.method,
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        )
    }

    /// The query string, if any.
    pub fn query(&self) -> Option<&str> {
        self.path.split_once('?').map(|(_, q)| q)
    }

    /// Writes the request for the backend into `out`: the head with the hop-by-hop
    /// fields gone and the forwarding fields set, then the body.
    pub fn write_upstream(&self, buf: &[u8], fwd: &Forwarding, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(self.method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.path.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let tokens = headers::connection_tokens(&self.fields);
        for h in self.fields.0 {
            if headers::is_hop_by_hop(h.name, &tokens) || fwd.replaces(h.name) {
                continue;
            }
            push_field(out, h.name.as_bytes(), h.value);
        }
        if !fwd.keep_proto {
            push_field(out, b"x-forwarded-proto", fwd.proto.as_bytes());
        }
        push_field(out, b"x-forwarded-for", fwd.xff.as_bytes());
        push_field(out, b"forwarded", fwd.forwarded.as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&buf[self.head_len..self.message_len()]);
    }

    /// The forwarding fields for this request from `peer`.
    pub fn forwarding(&self, peer: IpAddr, peer_trusted: bool, proto: &'static str) -> Forwarding {
        Forwarding::new(&self.fields, peer, &self.host, peer_trusted, proto)
    }
}

/// Appends one field line.
pub fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// What the buffer holds.
#[derive(Debug)]
pub enum Read<'h, 'b> {
    /// A plain request.
    Plain(Plain<'h, 'b>),
    /// The start of a message: its end has not arrived; `at_least` bytes are needed
    /// when the head is known, else `None`.
    Partial(Option<usize>),
    /// Something for hyper: another version or form, a field the direct path does not
    /// handle, or a message hyper answers with an error.
    Other,
}

/// Reads the message at the start of `buf`, its fields going into `fields`.
pub fn read<'h, 'b>(buf: &'b [u8], fields: &'h mut [httparse::Header<'b>]) -> Read<'h, 'b> {
    let mut req = httparse::Request::new(fields);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Read::Partial(None),
        Err(_) => return Read::Other,
    };
    let httparse::Request {
        method: Some(method),
        path: Some(path),
        version: Some(1),
        headers: fields,
    } = req
    else {
        return Read::Other;
    };
    let fields: &'h [httparse::Header<'b>] = fields;
    if !path.starts_with('/') || method == "CONNECT" {
        return Read::Other;
    }
    let mut host = None;
    let mut body_len: Option<usize> = None;
    let mut close = false;
    for h in fields {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Read::Other;
            }
            let Some(v) = std::str::from_utf8(h.value)
                .ok()
                .and_then(headers::host_field)
            else {
                return Read::Other;
            };
            host = Some(v);
        } else if name.eq_ignore_ascii_case("content-length") {
            let Some(n) = std::str::from_utf8(h.value)
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<usize>().ok())
            else {
                return Read::Other;
            };
            if body_len.is_some_and(|prev| prev != n) {
                return Read::Other;
            }
            body_len = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
        {
            return Read::Other;
        } else if name.eq_ignore_ascii_case("connection") {
            close |= h
                .value
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
    }
    let Some(host) = host else {
        return Read::Other;
    };
    let body_len = body_len.unwrap_or(0);
    if buf.len() < head_len + body_len {
        return Read::Partial(Some(head_len + body_len));
    }
    Read::Plain(Plain {
        method,
        path,
        fields: Parsed(fields),
        host,
        head_len,
        body_len,
        close,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with<T>(buf: &[u8], f: impl FnOnce(Read<'_, '_>) -> T) -> T {
        let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
        f(read(buf, &mut fields))
    }

    #[test]
    fn plain_requests_are_taken_and_written_for_the_backend() {
        let buf = b"POST /a?u=1 HTTP/1.1\r\nHost: Demo.FOG:8080\r\nConnection: close, x-secret\r\nx-secret: 1\r\nkeep-alive: 5\r\nx-forwarded-for: 6.6.6.6\r\nx-kept: yes\r\ncontent-length: 3\r\n\r\nabcGET";
        with(buf, |r| {
            let Read::Plain(p) = r else {
                panic!("not plain: {r:?}")
            };
            assert_eq!(
                (p.method, p.path, p.host.as_ref()),
                ("POST", "/a?u=1", "demo.fog")
            );
            assert_eq!((p.body_len, p.close, p.query()), (3, true, Some("u=1")));
            assert_eq!(p.message_len(), buf.len() - 3);
            assert!(!p.idempotent());
            let fwd = p.forwarding("10.1.2.3".parse().expect("ip"), false, "http");
            let mut out = Vec::new();
            p.write_upstream(buf, &fwd, &mut out);
            let text = String::from_utf8(out).expect("text");
            assert_eq!(
                text,
                "POST /a?u=1 HTTP/1.1\r\nHost: Demo.FOG:8080\r\nx-kept: yes\r\ncontent-length: 3\r\n\
                 x-forwarded-proto: http\r\nx-forwarded-for: 10.1.2.3\r\n\
                 forwarded: for=10.1.2.3;proto=http;host=\"demo.fog\"\r\n\r\nabc"
            );
        });
    }

    #[test]
    fn a_connection_field_cannot_strip_the_length_or_the_host() {
        let buf = b"POST / HTTP/1.1\r\nHost: a\r\nConnection: content-length, host\r\nContent-Length: 5\r\n\r\nGET /";
        with(buf, |r| {
            let Read::Plain(p) = r else {
                panic!("not plain: {r:?}")
            };
            let mut out = Vec::new();
            p.write_upstream(
                buf,
                &p.forwarding("10.0.0.1".parse().expect("ip"), false, "http"),
                &mut out,
            );
            let text = String::from_utf8(out).expect("text");
            assert!(text.contains("\r\nHost: a\r\n"), "{text}");
            assert!(text.contains("\r\nContent-Length: 5\r\n"), "{text}");
            assert!(!text.contains("Connection"), "{text}");
            assert!(text.ends_with("\r\n\r\nGET /"), "{text}");
        });
    }

    #[test]
    fn anything_but_a_plain_request_goes_to_hyper_or_waits() {
        let other: [&[u8]; 10] = [
            b"CONNECT /x HTTP/1.1\r\nhost: a\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET / HTTP/1.0\r\nhost: a\r\n\r\n",
            b"GET http://a/ HTTP/1.1\r\nhost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n",
            b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            b"GET / HTTP/1.1\r\nhost: a\r\nupgrade: websocket\r\n\r\n",
            b"GARBAGE \x01\x02\r\n\r\n",
        ];
        for buf in other {
            with(buf, |r| {
                assert!(matches!(r, Read::Other), "{r:?} for {buf:?}")
            });
        }
        with(b"GET / HTTP/1.1\r\nhost:", |r| {
            assert!(matches!(r, Read::Partial(None)), "{r:?}")
        });
        with(
            b"PUT / HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\nab",
            |r| assert!(matches!(r, Read::Partial(Some(n)) if n == 57), "{r:?}"),
        );
    }
}
