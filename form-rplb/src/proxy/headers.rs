//! Header handling of a proxied request and response: hop-by-hop fields go, the
//! forwarding fields (`X-Forwarded-For`, `X-Forwarded-Proto`, `Forwarded`) are set,
//! and the client address is found (believing `X-Forwarded-For` only from a trusted
//! proxy).

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::trusted::Trusted;

/// The header fields of a message as the functions here read them: hyper's
/// [`HeaderMap`] or the fields the direct HTTP/1 path parsed in place.
pub trait Fields {
    /// Every value of field `name` (lowercase), in order.
    fn values<'a>(&'a self, name: &str) -> impl DoubleEndedIterator<Item = &'a [u8]>;
}

impl Fields for HeaderMap {
    fn values<'a>(&'a self, name: &str) -> impl DoubleEndedIterator<Item = &'a [u8]> {
        self.get_all(name).into_iter().map(HeaderValue::as_bytes)
    }
}

/// Fields parsed in place by httparse.
#[derive(Debug, Clone, Copy)]
pub struct Parsed<'h, 'b>(pub &'h [httparse::Header<'b>]);

impl Fields for Parsed<'_, '_> {
    fn values<'a>(&'a self, name: &str) -> impl DoubleEndedIterator<Item = &'a [u8]> {
        self.0
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }
}

/// `X-Forwarded-For`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Hop-by-hop fields (RFC 9110 7.6.1) and `Upgrade` (the balancer does not tunnel
/// upgraded protocols), never forwarded.
const HOP_BY_HOP_NAMES: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Fields that frame or route a message: a `Connection` field naming them does not
/// make them hop-by-hop (a relayed body would lose its length, a request its host).
const NEVER_HOP_BY_HOP: [&[u8]; 3] = [b"content-length", b"host", b"transfer-encoding"];

/// The field names a message's `Connection` fields list (hop-by-hop too), except
/// those that frame or route the message.
pub fn connection_tokens(fields: &impl Fields) -> Vec<&[u8]> {
    fields
        .values("connection")
        .flat_map(|v| v.split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty() && !NEVER_HOP_BY_HOP.iter().any(|n| t.eq_ignore_ascii_case(n)))
        .collect()
}

/// Whether field `name` is hop-by-hop (`HOP_BY_HOP_NAMES`) or one of the message's
/// `Connection` tokens.
pub fn is_hop_by_hop(name: &str, tokens: &[&[u8]]) -> bool {
    HOP_BY_HOP_NAMES
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h))
        || tokens
            .iter()
            .any(|t| t.eq_ignore_ascii_case(name.as_bytes()))
}

/// Removes hop-by-hop fields, including those the `Connection` field names. `Upgrade`
/// goes too: the balancer does not tunnel upgraded protocols.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = connection_tokens(headers)
        .into_iter()
        .filter_map(|n| HeaderName::from_bytes(n).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for name in HOP_BY_HOP_NAMES {
        headers.remove(name);
    }
}

/// The client's address: the peer's, or, when the peer is a trusted proxy, the last
/// untrusted address of `X-Forwarded-For` (read right to left).
pub fn client_ip(peer: IpAddr, headers: &impl Fields, trusted: &Trusted) -> IpAddr {
    if !trusted.contains(peer) {
        return peer;
    }
    let mut last = None;
    for value in headers.values("x-forwarded-for").rev() {
        let Ok(list) = std::str::from_utf8(value) else {
            return peer;
        };
        for item in list.rsplit(',') {
            let Ok(ip) = item.trim().parse::<IpAddr>() else {
                return last.unwrap_or(peer);
            };
            if !trusted.contains(ip) {
                return ip;
            }
            last = Some(ip);
        }
    }
    last.unwrap_or(peer)
}

/// Every line of field `name`, joined with ", " (a list field may be split over
/// several lines); `None` when absent or not text.
fn joined(headers: &impl Fields, name: &str) -> Option<String> {
    let mut out: Option<String> = None;
    for v in headers.values(name) {
        let v = std::str::from_utf8(v).ok()?;
        match out.as_mut() {
            Some(o) => {
                o.push_str(", ");
                o.push_str(v);
            }
            None => out = Some(v.to_owned()),
        }
    }
    out
}

/// The forwarding fields of a request from `peer` for `host`: appended to what a
/// trusted proxy sent, replacing what anyone else sent (a client cannot make a backend
/// believe a forged chain).
#[derive(Debug)]
pub struct Forwarding {
    /// `X-Forwarded-For`.
    pub xff: String,
    /// `Forwarded`.
    pub forwarded: String,
    /// Whether the request's own `X-Forwarded-Proto` stays (a trusted proxy's);
    /// otherwise it is set to [`Self::proto`].
    pub keep_proto: bool,
    /// How the client reached the balancer: `http` or `https`.
    pub proto: &'static str,
}

/// The scheme a client used: `https` over TLS, else `http`.
pub fn scheme(tls: bool) -> &'static str {
    if tls { "https" } else { "http" }
}

impl Forwarding {
    /// The fields for a request with `headers` from `peer` for `host`, which came
    /// over `proto` (`http` or `https`).
    pub fn new(
        headers: &impl Fields,
        peer: IpAddr,
        host: &str,
        peer_trusted: bool,
        proto: &'static str,
    ) -> Self {
        let peer_s = peer.to_string();
        let xff = match joined(headers, "x-forwarded-for") {
            Some(prev) if peer_trusted => format!("{prev}, {peer_s}"),
            _ => peer_s.clone(),
        };
        let node = if peer.is_ipv6() {
            format!("\"[{peer_s}]\"")
        } else {
            peer_s
        };
        let quoted_host: String = host.chars().filter(|c| *c != '"' && *c != '\\').collect();
        let element = format!("for={node};proto={proto};host=\"{quoted_host}\"");
        let forwarded = match joined(headers, "forwarded") {
            Some(prev) if peer_trusted => format!("{prev}, {element}"),
            _ => element,
        };
        let keep_proto = peer_trusted && headers.values("x-forwarded-proto").next().is_some();
        Self {
            xff,
            forwarded,
            keep_proto,
            proto,
        }
    }

    /// Whether field `name` of the request is replaced by these.
    pub fn replaces(&self, name: &str) -> bool {
        name.eq_ignore_ascii_case("x-forwarded-for")
            || name.eq_ignore_ascii_case("forwarded")
            || (!self.keep_proto && name.eq_ignore_ascii_case("x-forwarded-proto"))
    }
}

/// Sets the forwarding fields for a request from `peer` for `host`, which came over
/// `proto` ([`Forwarding`]).
pub fn set_forwarded(
    headers: &mut HeaderMap,
    peer: IpAddr,
    host: &str,
    peer_trusted: bool,
    proto: &'static str,
) {
    let f = Forwarding::new(headers, peer, host, peer_trusted, proto);
    if !f.keep_proto {
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    headers.remove(&X_FORWARDED_FOR);
    headers.remove(header::FORWARDED);
    if let Ok(v) = HeaderValue::from_str(&f.xff) {
        headers.insert(&X_FORWARDED_FOR, v);
    }
    if let Ok(v) = HeaderValue::from_str(&f.forwarded) {
        headers.insert(header::FORWARDED, v);
    }
}

/// The value of cookie `name` in the request's `Cookie` fields.
pub fn cookie<'a>(headers: &'a impl Fields, name: &str) -> Option<&'a str> {
    headers
        .values("cookie")
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then(|| v.trim_matches('"'))
        })
}

/// The value of the hash parameter: a header, or `query:NAME` from the query string.
pub fn hash_value<'a>(
    parameter: &str,
    headers: &'a impl Fields,
    query: Option<&'a str>,
) -> Option<&'a [u8]> {
    match parameter.strip_prefix("query:") {
        Some(name) => query?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then_some(v.as_bytes())
        }),
        None => headers.values(parameter).next(),
    }
}

/// The request's host, lowercase and without the port: the URI's authority (HTTP/2,
/// absolute-form) or the `Host` field.
pub fn host<'a>(uri: &'a http::Uri, headers: &'a HeaderMap) -> Option<std::borrow::Cow<'a, str>> {
    match uri.authority() {
        Some(a) => normalized(a.host()),
        None => host_field(headers.get(header::HOST)?.to_str().ok()?),
    }
}

/// The host of a `Host` field's value, lowercase and without the port.
pub fn host_field(h: &str) -> Option<std::borrow::Cow<'_, str>> {
    let name = match h.rsplit_once(':') {
        Some((name, port))
            if port.bytes().all(|b| b.is_ascii_digit())
                && (!name.contains(':') || name.ends_with(']')) =>
        {
            name
        }
        _ => h,
    };
    normalized(name)
}

fn normalized(raw: &str) -> Option<std::borrow::Cow<'_, str>> {
    let raw = raw.trim_end_matches('.');
    if raw.is_empty() {
        return None;
    }
    Some(if raw.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(raw.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(raw)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_fields_and_those_connection_names_go() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("connection", "x-other, Content-Length, host"),
            ("x-other", "2"),
            ("content-length", "2"),
            ("host", "a"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h);
        // A Connection field cannot unframe or unroute a message.
        assert_eq!(h.len(), 3, "{h:?}");
        assert!(
            h.contains_key("x-kept") && h.contains_key("content-length") && h.contains_key("host")
        );
    }

    #[test]
    fn forwarded_chain_is_believed_only_from_trusted_proxies() {
        let trusted = Trusted::new(vec!["10.0.0.0/8".parse().expect("cidr")]);
        let h = map(&[("x-forwarded-for", "203.0.113.7, 10.0.0.2")]);
        let proxy: IpAddr = "10.0.0.1".parse().expect("ip");
        let outsider: IpAddr = "198.51.100.1".parse().expect("ip");
        assert_eq!(
            client_ip(proxy, &h, &trusted),
            "203.0.113.7".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(client_ip(outsider, &h, &trusted), outsider);

        let mut forged = h.clone();
        set_forwarded(&mut forged, outsider, "demo.fog", false, "http");
        assert_eq!(forged["x-forwarded-for"], "198.51.100.1");
        assert_eq!(
            forged["forwarded"],
            "for=198.51.100.1;proto=http;host=\"demo.fog\""
        );
        assert_eq!(forged["x-forwarded-proto"], "http");
        let mut chained = h.clone();
        set_forwarded(&mut chained, proxy, "demo.fog", true, "http");
        assert_eq!(
            chained["x-forwarded-for"],
            "203.0.113.7, 10.0.0.2, 10.0.0.1"
        );
        let mut v6 = HeaderMap::new();
        set_forwarded(
            &mut v6,
            "::1".parse().expect("ip"),
            "demo.fog",
            false,
            "https",
        );
        assert!(
            v6["forwarded"]
                .to_str()
                .expect("ascii")
                .starts_with("for=\"[::1]\";proto=https;")
        );
        assert_eq!(v6["x-forwarded-proto"], "https");
    }

    #[test]
    fn cookies_hash_values_and_hosts_are_read() {
        let h = map(&[
            ("cookie", "a=1; FORM=xyz"),
            ("x-user", "alice"),
            ("host", "Demo.FOG:8080"),
        ]);
        assert_eq!(cookie(&h, "FORM"), Some("xyz"));
        assert_eq!(cookie(&h, "B"), None);
        assert_eq!(hash_value("x-user", &h, None), Some(&b"alice"[..]));
        assert_eq!(
            hash_value("query:u", &h, Some("a=1&u=bob")),
            Some(&b"bob"[..])
        );
        assert_eq!(hash_value("query:u", &h, Some("a=1")), None);
        let uri: http::Uri = "/x".parse().expect("uri");
        assert_eq!(host(&uri, &h).as_deref(), Some("demo.fog"));
        let abs: http::Uri = "http://other.fog:81/x".parse().expect("uri");
        assert_eq!(host(&abs, &h).as_deref(), Some("other.fog"));
        let v6 = map(&[("host", "[::1]:80")]);
        assert_eq!(host(&uri, &v6).as_deref(), Some("[::1]"));
        assert_eq!(host(&uri, &HeaderMap::new()), None);
    }
}
