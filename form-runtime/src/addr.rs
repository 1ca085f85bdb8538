//! `host:port` addresses of other services. Services find each other by configured
//! address lists (`a:3004,b:3004`); nothing is hard-coded to localhost, and host
//! names are resolved when connecting, so container names work.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One `host:port`; the host is a name, an IPv4 address or a bracketed IPv6 address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostPort {
    host: String,
    port: u16,
}

impl HostPort {
    /// The host part (IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://host:port`, as tonic endpoints want it.
    pub fn http_uri(&self) -> String {
        format!("http://{self}")
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

const ACCEPTED: &str = "expected HOST:PORT, e.g. form-state-1:3004, 10.0.0.5:3004 or [::1]:3004";

impl FromStr for HostPort {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, rest) = rest
                .split_once(']')
                .ok_or_else(|| format!("'{s}': missing ']'; {ACCEPTED}"))?;
            let port = rest
                .strip_prefix(':')
                .ok_or_else(|| format!("'{s}': missing port; {ACCEPTED}"))?;
            (host, port)
        } else {
            s.rsplit_once(':')
                .ok_or_else(|| format!("'{s}': missing port; {ACCEPTED}"))?
        };
        let valid_host = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'));
        if !valid_host || (host.contains(':') && !s.starts_with('[')) {
            return Err(format!("'{s}': bad host '{host}'; {ACCEPTED}"));
        }
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("'{s}': bad port '{port}' (1-65535); {ACCEPTED}"))?;
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

impl Serialize for HostPort {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HostPort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Parses a listen address `IP:PORT` with a message that says what is accepted.
pub fn parse_listen(s: &str) -> Result<std::net::SocketAddr, String> {
    s.trim().parse().map_err(|_| {
        format!("'{s}' is not a listen address; expected IP:PORT, e.g. 0.0.0.0:3004, 127.0.0.1:0 or [::]:3004")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_ipv4_and_ipv6() {
        let a: HostPort = "form-state-1:3004".parse().expect("name");
        assert_eq!((a.host(), a.port()), ("form-state-1", 3004));
        let b: HostPort = "[::1]:80".parse().expect("v6");
        assert_eq!(b.to_string(), "[::1]:80");
        assert_eq!(b.http_uri(), "http://[::1]:80");
    }

    #[test]
    fn rejects_bad_input_naming_it() {
        for bad in [
            "nohost", "a:0", "a:70000", ":80", "a b:1", "::1:80", "[::1]80",
        ] {
            let err = bad.parse::<HostPort>().expect_err(bad);
            assert!(err.contains("HOST:PORT"), "{bad}: {err}");
        }
        let err = parse_listen("localhost:x").expect_err("bad listen");
        assert!(
            err.contains("IP:PORT") && err.contains("localhost:x"),
            "{err}"
        );
    }
}

/// Why traffic must never be sent to `ip`, if it must not: addresses that name no
/// instance (unspecified, broadcast, multicast) and link-local ones, where cloud
/// metadata services answer (169.254.169.254) and a forwarded request would hand an
/// attacker the node's credentials. IPv4-mapped IPv6 forms are judged as IPv4.
pub fn forbidden_ip(ip: std::net::IpAddr) -> Option<&'static str> {
    use std::net::IpAddr;
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => Some("unspecified"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("broadcast"),
        IpAddr::V4(v4) if v4.is_multicast() => Some("multicast"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("link-local (cloud metadata lives there)"),
        IpAddr::V6(v6) if v6.is_unspecified() => Some("unspecified"),
        IpAddr::V6(v6) if v6.is_multicast() => Some("multicast"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("link-local"),
        _ => None,
    }
}

/// Checks an instance's address as members carry it: `IP:PORT` (instances are
/// reached by address, not by name), a port, and an IP that may receive traffic
/// ([`forbidden_ip`]).
pub fn check_instance_address(s: &str) -> Result<std::net::SocketAddr, String> {
    let a: std::net::SocketAddr = s.parse().map_err(|_| {
        format!("'{s}' is not IP:PORT; expected an instance's address, e.g. 10.0.0.5:8080 or [fd00::5]:8080")
    })?;
    if a.port() == 0 {
        return Err(format!(
            "'{s}' has port 0; expected the port the instance serves on"
        ));
    }
    if let Some(why) = forbidden_ip(a.ip()) {
        return Err(format!("'{s}' is {why}: no traffic is ever sent there"));
    }
    Ok(a)
}

#[cfg(test)]
mod backend_tests {
    use super::*;

    #[test]
    fn metadata_link_local_and_non_addresses_are_refused() {
        for bad in [
            "169.254.169.254:80",
            "[::ffff:169.254.169.254]:80",
            "[fe80::1]:80",
            "0.0.0.0:80",
            "224.0.0.1:80",
            "255.255.255.255:80",
            "10.0.0.5:0",
            "metadata.google.internal:80",
        ] {
            assert!(check_instance_address(bad).is_err(), "{bad}");
        }
        for good in [
            "10.0.0.5:8080",
            "127.0.0.1:3000",
            "[fd00::5]:8080",
            "172.28.0.20:41000",
        ] {
            assert!(check_instance_address(good).is_ok(), "{good}");
        }
    }
}
