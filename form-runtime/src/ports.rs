//! Ports for listeners that another process binds later: an instance's service and
//! admin ports, the children of `formctl up --auto-ports`, test replicas.
//!
//! A port found by binding port 0 and releasing it comes from the kernel's ephemeral
//! range, which every other port-0 bind draws from too: another process can take it
//! before the one it was chosen for binds it. These ports come from below that range
//! (as Nomad's dynamic ports do), where the kernel never hands out a port by itself,
//! and are checked free by binding them once. A port is not chosen twice by one
//! process within [`HOLD`], so two children started at once cannot both get it before
//! either binds it.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::io;
use std::net::{IpAddr, TcpListener};
use std::ops::RangeInclusive;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Where ports are chosen, capped below the kernel's ephemeral range.
pub const RANGE: RangeInclusive<u16> = 20000..=32767;
/// The kernel's ephemeral range, and where its low end is read.
const EPHEMERAL_RANGE_FILE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
/// The kernel's default low end of the ephemeral range.
const DEFAULT_EPHEMERAL_LOW: u16 = 32768;
/// With fewer ports than this left under the ephemeral range, ports come from port 0.
const MIN_PORTS: u16 = 1000;
/// How long a chosen port is not chosen again by this process: time for the process it
/// was chosen for to bind it.
pub const HOLD: Duration = Duration::from_secs(60);

/// Ports this process chose in the last [`HOLD`], oldest first.
static CHOSEN: Mutex<Vec<(u16, Instant)>> = Mutex::new(Vec::new());

/// A port on `host` that is free now, is not in `avoid`, was not chosen by this
/// process in the last [`HOLD`], and that no port-0 bind can be given meanwhile (see
/// the module documentation).
pub fn choose(host: IpAddr, avoid: &[u16]) -> io::Result<u16> {
    choose_from(host, usable_range(), avoid)
}

/// [`choose`] from `range`, or from port 0 when there is none.
fn choose_from(host: IpAddr, range: Option<RangeInclusive<u16>>, avoid: &[u16]) -> io::Result<u16> {
    let mut chosen = CHOSEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    chosen.retain(|(_, at)| at.elapsed() < HOLD);
    let avoid: Vec<u16> = avoid
        .iter()
        .copied()
        .chain(chosen.iter().map(|c| c.0))
        .collect();
    let port = match range {
        Some(range) => choose_in(host, range, &avoid)?,
        None => from_port_zero(host, &avoid)?,
    };
    chosen.push((port, Instant::now()));
    Ok(port)
}

/// `n` distinct ports, as [`choose`] gives them.
pub fn choose_many(host: IpAddr, n: usize) -> io::Result<Vec<u16>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(choose(host, &out)?);
    }
    Ok(out)
}

/// The first port of `range` from a random place on that is not in `avoid` and binds.
fn choose_in(host: IpAddr, range: RangeInclusive<u16>, avoid: &[u16]) -> io::Result<u16> {
    let (lo, hi) = (*range.start(), *range.end());
    let span = u32::from(hi - lo) + 1;
    let start = u32::try_from(RandomState::new().hash_one(std::process::id()) % u64::from(span))
        .unwrap_or(0);
    for i in 0..span {
        let Ok(port) = u16::try_from(u32::from(lo) + (start + i) % span) else {
            continue;
        };
        if !avoid.contains(&port) && TcpListener::bind((host, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("no free port in {lo}-{hi} on {host}"),
    ))
}

/// A port the kernel gives to a port-0 bind, not in `avoid`.
fn from_port_zero(host: IpAddr, avoid: &[u16]) -> io::Result<u16> {
    // Hold every port given that must be avoided, so the next bind gets another one.
    let mut held = Vec::new();
    loop {
        let l = TcpListener::bind((host, 0))?;
        let port = l.local_addr()?.port();
        if !avoid.contains(&port) {
            return Ok(port);
        }
        held.push(l);
    }
}

/// [`RANGE`] below the kernel's ephemeral range, if at least [`MIN_PORTS`] are left.
fn usable_range() -> Option<RangeInclusive<u16>> {
    let lo = *RANGE.start();
    let hi = (*RANGE.end()).min(ephemeral_low().saturating_sub(1));
    (hi >= lo && hi - lo + 1 >= MIN_PORTS).then_some(lo..=hi)
}

/// The low end of the kernel's ephemeral port range.
fn ephemeral_low() -> u16 {
    std::fs::read_to_string(EPHEMERAL_RANGE_FILE)
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(DEFAULT_EPHEMERAL_LOW)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn ports_are_distinct_free_and_below_the_ephemeral_range() {
        let ports = choose_many(LOCAL, 20).expect("ports");
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 20, "{ports:?}");
        for p in ports {
            if let Some(range) = usable_range() {
                assert!(
                    range.contains(&p) && p < ephemeral_low(),
                    "{p} not in {range:?}"
                );
            }
            drop(TcpListener::bind((LOCAL, p)).expect("the port is free"));
        }
    }

    #[test]
    fn a_bound_or_avoided_port_is_skipped_and_a_full_range_is_an_error() {
        let held = TcpListener::bind((LOCAL, choose(LOCAL, &[]).expect("port"))).expect("hold");
        let p = held.local_addr().expect("addr").port();
        let err = choose_in(LOCAL, p..=p, &[]).expect_err("the only port is bound");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(
            err.to_string()
                .contains(&format!("no free port in {p}-{p}")),
            "{err}"
        );

        let q = choose(LOCAL, &[p]).expect("another port");
        assert_ne!(q, p);
        assert!(
            choose_from(LOCAL, Some(q..=q), &[]).is_err(),
            "a port this process chose a moment ago is not chosen again"
        );
        assert!(
            choose_in(LOCAL, q..=q, &[q]).is_err(),
            "an avoided port is not chosen"
        );
        assert_eq!(choose_in(LOCAL, q..=q, &[]).expect("free"), q);
    }
}
