//! CIDR blocks (`10.0.0.0/8`, `127.0.0.1`, `::1/128`): the balancer's trusted proxies,
//! and the networks instance addresses may be in.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One CIDR block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

const ACCEPTED: &str =
    "expected an IP address or CIDR block, e.g. 10.0.0.0/8, 127.0.0.1 or ::1/128";

impl Cidr {
    /// Whether `ip` is in the block (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (addr, prefix) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
        let addr: IpAddr = addr.parse().map_err(|_| format!("'{s}': {ACCEPTED}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix =
            match prefix {
                None => max,
                Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| {
                    format!("'{s}': prefix length must be 0 to {max}; {ACCEPTED}")
                })?,
            };
        // An IPv4-mapped network is the IPv4 one: addresses are compared as IPv4.
        if let IpAddr::V6(v6) = addr
            && let Some(v4) = v6.to_ipv4_mapped()
            && prefix >= 96
        {
            return Ok(Self {
                addr: IpAddr::V4(v4),
                prefix: prefix - 96,
            });
        }
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Checks that `ip` is in one of `networks` (none given: every address is); the
/// error names the address, `what` it is and the networks.
pub fn check_within(what: &str, ip: IpAddr, networks: &[Cidr]) -> Result<(), String> {
    if networks.is_empty() || networks.iter().any(|n| n.contains(ip)) {
        return Ok(());
    }
    let list: Vec<String> = networks.iter().map(ToString::to_string).collect();
    Err(format!(
        "{what} {ip} is outside the networks instances may use here ({}); expected an address in one of them",
        list.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_match_their_addresses_only() {
        let c: Cidr = "10.1.0.0/16".parse().expect("valid");
        assert!(c.contains("10.1.200.3".parse().expect("ip")));
        assert!(!c.contains("10.2.0.1".parse().expect("ip")));
        assert!(c.contains("::ffff:10.1.0.9".parse().expect("ip")));
        let one: Cidr = "::1".parse().expect("valid");
        assert!(one.contains("::1".parse().expect("ip")));
        assert!(!one.contains("127.0.0.1".parse().expect("ip")));
        let all: Cidr = "0.0.0.0/0".parse().expect("valid");
        assert!(all.contains("8.8.8.8".parse().expect("ip")));
        for bad in ["10.0.0.0/33", "nope", "10.0.0/8", "1.2.3.4/x"] {
            let e = bad.parse::<Cidr>().expect_err("refused");
            assert!(e.contains(bad) && e.contains("expected"), "{e}");
        }
    }

    #[test]
    fn addresses_outside_the_networks_are_refused_naming_them() {
        let nets: Vec<Cidr> = vec!["172.28.0.0/16".parse().expect("cidr")];
        assert!(check_within("member", "172.28.3.4".parse().expect("ip"), &nets).is_ok());
        let e = check_within("member", "10.0.0.5".parse().expect("ip"), &nets).expect_err("out");
        assert!(e.contains("10.0.0.5") && e.contains("172.28.0.0/16"), "{e}");
        assert!(check_within("member", "10.0.0.5".parse().expect("ip"), &[]).is_ok());
        let mapped: Cidr = "::ffff:10.0.0.0/104".parse().expect("mapped");
        assert_eq!(mapped.to_string(), "10.0.0.0/8");
        assert!(mapped.contains("10.1.2.3".parse().expect("ip")));
    }
}
