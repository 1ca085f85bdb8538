//! Trusted proxies: the peers whose `X-Forwarded-For` the balancer believes, as a list
//! of CIDR blocks (`10.0.0.0/8`, `127.0.0.1`, `::1/128`).

use std::net::IpAddr;

pub use form_runtime::cidr::Cidr;

/// The trusted proxies.
#[derive(Debug, Clone, Default)]
pub struct Trusted(Vec<Cidr>);

impl Trusted {
    /// The set of `blocks`.
    pub fn new(blocks: Vec<Cidr>) -> Self {
        Self(blocks)
    }

    /// Whether `ip` is a trusted proxy.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }
}
