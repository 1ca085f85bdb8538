//! A route's settings in the balancer's own types, converted from and to the
//! `form.rplb.v1` messages with validation: every refusal names the field, the value
//! and what is accepted.

use std::time::Duration;

use form_proto::rplb::v1 as pb;
use form_proto::types::v1 as types;
use http::uri::Authority;

use crate::balance::select::Affinity;

/// Active health check settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSettings {
    /// Path to GET; empty disables active checks.
    pub path: String,
    /// Time between checks.
    pub interval: Duration,
    /// Time before a check counts as failed.
    pub timeout: Duration,
    /// Passed checks that bring an ejected backend back.
    pub rise: u32,
    /// Failed checks that eject a backend.
    pub fall: u32,
}

impl Default for CheckSettings {
    fn default() -> Self {
        Self {
            path: String::new(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
        }
    }
}

/// Drain settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainSettings {
    /// How long pinned sessions may still use the backend.
    pub grace: Duration,
    /// Complete as soon as in-flight requests reach zero.
    pub wait_for_connections: bool,
    /// `Connection: close` (HTTP/1) and GOAWAY (HTTP/2) on the backend's responses.
    pub notify_clients: bool,
}

impl Default for DrainSettings {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(30),
            wait_for_connections: true,
            notify_clients: true,
        }
    }
}

/// Everything about a route except its backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSettings {
    /// Host name (lowercase, without port).
    pub domain: String,
    /// Cluster served.
    pub cluster_id: String,
    /// Session affinity.
    pub affinity: Affinity,
    /// Active health checks.
    pub check: CheckSettings,
    /// Default drain settings.
    pub drain: DrainSettings,
}

/// One backend as a request names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// Stable id.
    pub id: String,
    /// `host:port`.
    pub authority: Authority,
    /// Relative weight (>= 1).
    pub weight: u32,
    /// Wanted taking new requests: a backend listed again after a drain (or while it
    /// was leaving) becomes active again. False for members form-state says are
    /// draining.
    pub active: bool,
}

/// Longest accepted domain (DNS limit).
const MAX_DOMAIN: usize = 253;
/// Largest accepted weight.
const MAX_WEIGHT: u32 = 100;

/// Checks and normalises a domain (lowercase; letters, digits, '-', '.').
pub fn domain(value: &str) -> Result<String, String> {
    let d = value.trim().trim_end_matches('.').to_ascii_lowercase();
    if d.is_empty() || d.len() > MAX_DOMAIN {
        return Err(format!(
            "domain '{value}': expected a host name of 1 to {MAX_DOMAIN} characters, e.g. demo.fog"
        ));
    }
    let ok = d.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    });
    if !ok {
        return Err(format!(
            "domain '{value}': expected labels of letters, digits and '-' separated by '.', e.g. demo.fog"
        ));
    }
    Ok(d)
}

/// The balancer's affinity from the contract's (unset means none).
pub fn affinity(method: Option<&types::AffinityMethod>) -> Result<Affinity, String> {
    use types::affinity_method::Method;
    if let Some(m) = method {
        form_proto::check_affinity(m)?;
    }
    Ok(match method.and_then(|m| m.method.as_ref()) {
        None | Some(Method::None(_)) => Affinity::None,
        Some(Method::ClientIp(_)) => Affinity::ClientIp,
        Some(Method::Cookie(c)) => Affinity::Cookie {
            name: c.name.clone(),
            ttl_seconds: c.ttl_seconds,
        },
        Some(Method::ConsistentHashing(h)) => Affinity::Hash {
            parameter: h.parameter.trim().to_ascii_lowercase(),
        },
    })
}

/// The contract's affinity from the balancer's.
pub fn affinity_to_pb(a: &Affinity) -> types::AffinityMethod {
    use types::affinity_method::Method;
    let method = match a {
        Affinity::None => Method::None(types::NoAffinity {}),
        Affinity::ClientIp => Method::ClientIp(types::ClientIpAffinity {}),
        Affinity::Cookie { name, ttl_seconds } => Method::Cookie(types::CookieAffinity {
            name: name.clone(),
            ttl_seconds: *ttl_seconds,
        }),
        Affinity::Hash { parameter } => Method::ConsistentHashing(types::ConsistentHashAffinity {
            parameter: parameter.clone(),
        }),
    };
    types::AffinityMethod {
        method: Some(method),
    }
}

/// Health check settings from the contract's (unset: no active checks).
pub fn check(c: Option<&pb::HealthCheckConfig>) -> Result<CheckSettings, String> {
    let Some(c) = c else {
        return Ok(CheckSettings::default());
    };
    let d = CheckSettings::default();
    let ms = |v: u32, default: Duration| {
        if v == 0 {
            default
        } else {
            Duration::from_millis(u64::from(v))
        }
    };
    if !c.path.is_empty()
        && (!c.path.starts_with('/') || c.path.parse::<http::uri::PathAndQuery>().is_err())
    {
        return Err(format!(
            "health_check.path '{}': expected an absolute path such as /healthz",
            c.path
        ));
    }
    let s = CheckSettings {
        path: c.path.clone(),
        interval: ms(c.interval_ms, d.interval),
        timeout: ms(c.timeout_ms, d.timeout),
        rise: if c.rise == 0 { d.rise } else { c.rise },
        fall: if c.fall == 0 { d.fall } else { c.fall },
    };
    if s.interval < Duration::from_millis(10) {
        return Err(format!(
            "health_check.interval_ms {}: expected at least 10",
            c.interval_ms
        ));
    }
    if s.rise > 100 || s.fall > 100 {
        return Err(format!(
            "health_check rise {} / fall {}: expected 1 to 100 each",
            c.rise, c.fall
        ));
    }
    Ok(s)
}

/// The contract's health check settings.
pub fn check_to_pb(c: &CheckSettings) -> pb::HealthCheckConfig {
    pb::HealthCheckConfig {
        path: c.path.clone(),
        interval_ms: u32::try_from(c.interval.as_millis()).unwrap_or(u32::MAX),
        timeout_ms: u32::try_from(c.timeout.as_millis()).unwrap_or(u32::MAX),
        rise: c.rise,
        fall: c.fall,
    }
}

/// Drain settings from the contract's (unset: the defaults).
pub fn drain(d: Option<&pb::ConnectionDrainConfig>) -> DrainSettings {
    d.map_or_else(DrainSettings::default, |d| DrainSettings {
        grace: Duration::from_secs(u64::from(d.grace_period_seconds)),
        wait_for_connections: d.wait_for_connections,
        notify_clients: d.notify_clients,
    })
}

/// The contract's drain settings.
pub fn drain_to_pb(d: &DrainSettings) -> pb::ConnectionDrainConfig {
    pb::ConnectionDrainConfig {
        grace_period_seconds: u32::try_from(d.grace.as_secs()).unwrap_or(u32::MAX),
        wait_for_connections: d.wait_for_connections,
        notify_clients: d.notify_clients,
    }
}

/// Checks that every backend's address is an IP in one of `networks` (none given:
/// any address); the error names the backend, its address and the networks.
pub fn within_networks(
    specs: &[BackendSpec],
    networks: &[form_runtime::cidr::Cidr],
) -> Result<(), String> {
    if networks.is_empty() {
        return Ok(());
    }
    for s in specs {
        let host = s
            .authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let ip: std::net::IpAddr = host.parse().map_err(|_| {
            format!(
                "backend '{}' address '{}' is a name; with backend_networks set, expected an IP address in them",
                s.id, s.authority
            )
        })?;
        form_runtime::cidr::check_within(&format!("backend '{}' address", s.id), ip, networks)?;
    }
    Ok(())
}

/// A backend from the contract's, checked.
pub fn backend(b: &pb::Backend) -> Result<BackendSpec, String> {
    form_runtime::ids::check(&b.id).map_err(|e| format!("backend id: {e}"))?;
    let addr: form_runtime::addr::HostPort = b
        .address
        .parse()
        .map_err(|e| format!("backend '{}' address {e}", b.id))?;
    if let Ok(ip) = addr.host().parse::<std::net::IpAddr>()
        && let Some(why) = form_runtime::addr::forbidden_ip(ip)
    {
        return Err(format!(
            "backend '{}' address '{}' is {why}: no traffic is ever sent there",
            b.id, b.address
        ));
    }
    let authority: Authority = addr
        .to_string()
        .parse()
        .map_err(|e| format!("backend '{}' address '{}': {e}", b.id, b.address))?;
    if b.weight > MAX_WEIGHT {
        return Err(format!(
            "backend '{}' weight {}: expected 0 to {MAX_WEIGHT} (0 is taken as 1)",
            b.id, b.weight
        ));
    }
    Ok(BackendSpec {
        id: b.id.clone(),
        authority,
        weight: b.weight.max(1),
        active: true,
    })
}

/// A backend set, checked (ids unique).
pub fn backends(list: &[pb::Backend]) -> Result<Vec<BackendSpec>, String> {
    let specs = list.iter().map(backend).collect::<Result<Vec<_>, _>>()?;
    let mut ids: Vec<&str> = specs.iter().map(|b| b.id.as_str()).collect();
    ids.sort_unstable();
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!(
            "backend id '{}' appears twice; ids must be unique",
            w[0]
        ));
    }
    Ok(specs)
}

/// A route's settings from the contract's, checked.
pub fn route(r: &pb::Route) -> Result<RouteSettings, String> {
    Ok(RouteSettings {
        domain: domain(&r.domain)?,
        cluster_id: r.cluster_id.clone(),
        affinity: affinity(r.affinity.as_ref())?,
        check: check(r.health_check.as_ref())?,
        drain: drain(r.drain.as_ref()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_are_refused_with_what_is_accepted() {
        let e = domain("bad_domain!").expect_err("refused");
        assert!(e.contains("bad_domain!") && e.contains("expected"), "{e}");
        assert_eq!(domain("Demo.FOG.").expect("ok"), "demo.fog");
        let cookie = types::AffinityMethod {
            method: Some(types::affinity_method::Method::Cookie(
                types::CookieAffinity {
                    name: "a b".into(),
                    ttl_seconds: 10,
                },
            )),
        };
        let e = affinity(Some(&cookie)).expect_err("refused");
        assert!(e.contains("affinity.cookie.name 'a b'"), "{e}");
        let e = backend(&pb::Backend {
            id: "x".into(),
            address: "nowhere".into(),
            weight: 1,
            state: 0,
        })
        .expect_err("refused");
        assert!(
            e.contains("backend 'x' address") && e.contains("HOST:PORT"),
            "{e}"
        );
        let b = |id: &str| pb::Backend {
            id: id.into(),
            address: "127.0.0.1:1".into(),
            weight: 0,
            state: 0,
        };
        let e = backends(&[b("a"), b("a")]).expect_err("refused");
        assert!(e.contains("'a' appears twice"), "{e}");
        assert_eq!(backends(&[b("a")]).expect("ok")[0].weight, 1);
        let e = check(Some(&pb::HealthCheckConfig {
            path: "healthz".into(),
            ..Default::default()
        }))
        .expect_err("refused");
        assert!(e.contains("health_check.path 'healthz'"), "{e}");
    }

    #[test]
    fn affinity_round_trips() {
        for a in [
            Affinity::None,
            Affinity::ClientIp,
            Affinity::Cookie {
                name: "S".into(),
                ttl_seconds: 60,
            },
            Affinity::Hash {
                parameter: "x-user".into(),
            },
        ] {
            assert_eq!(affinity(Some(&affinity_to_pb(&a))).expect("valid"), a);
        }
    }
}
