//! The decision for one request: which backend, whether the request is pinned there,
//! and which cookie to set.
//!
//! | affinity | new request | pinned request |
//! |---|---|---|
//! | none | power of two choices over active backends | - |
//! | client IP | ring of active backends, by client address | - |
//! | hash of a parameter | ring of active backends, by the value (P2C without one) | - |
//! | cookie | P2C over active backends; a cookie is set | its backend while it is active or draining within the grace period; else re-pinned with a new cookie |
//!
//! A draining backend takes no new request the moment its drain starts; hash-based
//! affinity moves its keys at once (they are not sessions the balancer pinned).

use std::net::IpAddr;

use tokio::time::Instant;

use super::Backend;
use super::cookie::CookieSigner;
use super::p2c::Rng;
use super::ring::Ring;

/// How a route keeps clients on backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Affinity {
    /// None: power of two choices.
    None,
    /// Consistent hash of the client address.
    ClientIp,
    /// A balancer-issued cookie naming the backend.
    Cookie {
        /// Cookie name.
        name: String,
        /// Seconds a pin lasts.
        ttl_seconds: u64,
    },
    /// Consistent hash of a header (or `query:NAME`).
    Hash {
        /// The parameter.
        parameter: String,
    },
}

/// What the selector needs to know of a request.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestKey<'a> {
    /// The client's address (after trusted-proxy handling).
    pub client_ip: Option<IpAddr>,
    /// The value of the hash parameter, if the route hashes one.
    pub hash_value: Option<&'a [u8]>,
    /// The value of the affinity cookie, if present.
    pub cookie: Option<&'a str>,
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Index of the backend in the route's list.
    pub backend: usize,
    /// Whether the request follows a session pin (cookie).
    pub pinned: bool,
    /// A cookie value to set (new or re-pinned session).
    pub set_cookie: Option<String>,
}

/// Requests in flight per backend index (the proxy reads its live counters; tests
/// and benchmarks pass arrays).
pub trait Loads {
    /// Requests in flight to the backend at `index`.
    fn load(&self, index: usize) -> u64;
}

impl Loads for [u64] {
    fn load(&self, index: usize) -> u64 {
        self.get(index).copied().unwrap_or(0)
    }
}

impl<const N: usize> Loads for [u64; N] {
    fn load(&self, index: usize) -> u64 {
        self.get(index).copied().unwrap_or(0)
    }
}

impl Loads for Vec<u64> {
    fn load(&self, index: usize) -> u64 {
        self.get(index).copied().unwrap_or(0)
    }
}

/// A route's backends with the ring of those taking new requests. Rebuilt (and swapped
/// in whole) on every change of the backends or their states.
#[derive(Debug, Clone)]
pub struct Selector {
    backends: Vec<Backend>,
    ring: Ring,
    index: std::collections::HashMap<String, usize, super::KeyHash>,
    /// Indices of the backends taking new requests.
    open: Vec<usize>,
}

impl Selector {
    /// The selector of `backends`.
    pub fn new(backends: Vec<Backend>) -> Self {
        let open: Vec<usize> = (0..backends.len())
            .filter(|i| backends[*i].takes_new())
            .collect();
        // A ring position is a position in `open`.
        let ring = Ring::new(
            open.iter()
                .map(|i| (backends[*i].id.as_str(), backends[*i].weight)),
        );
        let index = backends
            .iter()
            .enumerate()
            .map(|(i, b)| (b.id.clone(), i))
            .collect();
        Self {
            backends,
            ring,
            index,
            open,
        }
    }

    /// The backends, in order.
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    fn index_of(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }

    /// P2C over backends taking new requests, except `exclude` (no allocation: two
    /// random positions in the open set, the excluded one skipped).
    fn least_loaded<L: Loads + ?Sized>(
        &self,
        in_flight: &L,
        exclude: Option<usize>,
        rng: &mut Rng,
    ) -> Option<usize> {
        let skip = exclude.and_then(|x| self.open.iter().position(|i| *i == x));
        let n = self.open.len() - usize::from(skip.is_some());
        let at = |k: usize| {
            self.open[if skip.is_some_and(|s| k >= s) {
                k + 1
            } else {
                k
            }]
        };
        let load = |i: usize| in_flight.load(i);
        match n {
            0 => None,
            1 => Some(at(0)),
            _ => {
                let a = rng.below(n);
                let mut b = rng.below(n - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (at(a), at(b));
                Some(if load(b) < load(a) { b } else { a })
            }
        }
    }

    /// Chooses a backend for a request; `None` when no backend can take it.
    /// `exclude` is a backend that just failed to connect (the one retry goes elsewhere).
    #[allow(clippy::too_many_arguments)]
    pub fn select<L: Loads + ?Sized>(
        &self,
        affinity: &Affinity,
        key: RequestKey<'_>,
        in_flight: &L,
        exclude: Option<usize>,
        signer: &CookieSigner,
        now: Instant,
        now_unix: u64,
        rng: &mut Rng,
    ) -> Option<Decision> {
        let fresh = |backend| Decision {
            backend,
            pinned: false,
            set_cookie: None,
        };
        // The ring holds the open backends, in order.
        let by_ring = |k: &[u8]| {
            self.ring
                .position(k)
                .map(|p| self.open[p])
                .filter(|i| Some(*i) != exclude)
        };
        match affinity {
            Affinity::None => self.least_loaded(in_flight, exclude, rng).map(fresh),
            Affinity::ClientIp => {
                let octets = key.client_ip.map(|ip| match ip {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                    IpAddr::V6(v6) => v6.octets(),
                });
                octets
                    .and_then(|o| by_ring(&o))
                    .or_else(|| self.least_loaded(in_flight, exclude, rng))
                    .map(fresh)
            }
            Affinity::Hash { .. } => key
                .hash_value
                .and_then(by_ring)
                .or_else(|| self.least_loaded(in_flight, exclude, rng))
                .map(fresh),
            Affinity::Cookie { ttl_seconds, .. } => {
                let pinned = key
                    .cookie
                    .and_then(|c| signer.verify(c, now_unix))
                    .and_then(|id| self.index_of(id))
                    .filter(|i| self.backends[*i].takes_pinned(now) && Some(*i) != exclude);
                match pinned {
                    Some(backend) => Some(Decision {
                        backend,
                        pinned: true,
                        set_cookie: None,
                    }),
                    None => self
                        .least_loaded(in_flight, exclude, rng)
                        .map(|backend| Decision {
                            backend,
                            pinned: false,
                            set_cookie: Some(signer.issue(
                                &self.backends[backend].id,
                                now_unix,
                                *ttl_seconds,
                            )),
                        }),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::State;
    use super::*;

    fn backend(id: &str, state: State) -> Backend {
        Backend {
            id: id.into(),
            weight: 1,
            state,
        }
    }

    fn cookie_affinity() -> Affinity {
        Affinity::Cookie {
            name: "FORM".into(),
            ttl_seconds: 600,
        }
    }

    #[test]
    fn cookie_sessions_stay_while_backends_come_and_go_and_forgeries_do_not_pin() {
        let signer = CookieSigner::new([9; 32]);
        let mut rng = Rng::new(3);
        let now = Instant::now();
        let s = Selector::new(vec![
            backend("a", State::Active),
            backend("b", State::Active),
        ]);
        let first = s
            .select(
                &cookie_affinity(),
                RequestKey::default(),
                &[0, 0],
                None,
                &signer,
                now,
                100,
                &mut rng,
            )
            .expect("pick");
        let cookie = first.set_cookie.expect("a new session gets a cookie");
        let pinned_id = s.backends()[first.backend].id.clone();
        // More backends arrive, one leaves (not the pinned one): the session stays.
        let mut grown: Vec<Backend> = ["c", "d", "e"]
            .iter()
            .map(|i| backend(i, State::Active))
            .collect();
        grown.push(backend(&pinned_id, State::Active));
        let s2 = Selector::new(grown);
        let key = RequestKey {
            cookie: Some(&cookie),
            ..Default::default()
        };
        let again = s2
            .select(
                &cookie_affinity(),
                key,
                &[0; 4],
                None,
                &signer,
                now,
                200,
                &mut rng,
            )
            .expect("pick");
        assert!(again.pinned && again.set_cookie.is_none());
        assert_eq!(s2.backends()[again.backend].id, pinned_id);
        // A forged cookie naming another backend does not pin; it gets a real cookie.
        let forged = cookie.replacen(&pinned_id, "c", 1);
        let key = RequestKey {
            cookie: Some(&forged),
            ..Default::default()
        };
        let d = s2
            .select(
                &cookie_affinity(),
                key,
                &[0; 4],
                None,
                &signer,
                now,
                200,
                &mut rng,
            )
            .expect("pick");
        assert!(!d.pinned && d.set_cookie.is_some());
    }

    #[test]
    fn draining_backends_take_pinned_sessions_until_the_grace_period_ends_and_nothing_new() {
        let signer = CookieSigner::new([9; 32]);
        let mut rng = Rng::new(5);
        let now = Instant::now();
        let until = now + Duration::from_secs(10);
        let cookie = signer.issue("a", 100, 600);
        let s = Selector::new(vec![
            backend("a", State::Draining { until }),
            backend("b", State::Active),
        ]);
        let key = RequestKey {
            cookie: Some(&cookie),
            ..Default::default()
        };
        let d = s
            .select(
                &cookie_affinity(),
                key,
                &[0, 9],
                None,
                &signer,
                now,
                100,
                &mut rng,
            )
            .expect("pick");
        assert_eq!(
            (d.backend, d.pinned),
            (0, true),
            "the pinned session continues on the draining backend"
        );
        for _ in 0..100 {
            let n = s
                .select(
                    &cookie_affinity(),
                    RequestKey::default(),
                    &[0, 9],
                    None,
                    &signer,
                    now,
                    100,
                    &mut rng,
                )
                .expect("pick");
            assert_eq!(
                n.backend, 1,
                "no new session on a draining backend, however idle"
            );
            let n = s
                .select(
                    &Affinity::None,
                    RequestKey::default(),
                    &[0, 9],
                    None,
                    &signer,
                    now,
                    100,
                    &mut rng,
                )
                .expect("pick");
            assert_eq!(n.backend, 1);
        }
        let late = s
            .select(
                &cookie_affinity(),
                key,
                &[0, 9],
                None,
                &signer,
                until,
                100,
                &mut rng,
            )
            .expect("pick");
        assert_eq!(
            (late.backend, late.pinned),
            (1, false),
            "after the grace period the session is re-pinned"
        );
        assert!(late.set_cookie.is_some());
    }

    #[test]
    fn power_of_two_choices_prefers_the_idle_and_evens_out_load() {
        let signer = CookieSigner::new([9; 32]);
        let mut rng = Rng::new(42);
        let now = Instant::now();
        let two = Selector::new(vec![
            backend("a", State::Active),
            backend("b", State::Active),
        ]);
        for _ in 0..100 {
            let d = two.select(
                &Affinity::None,
                RequestKey::default(),
                &[5, 0],
                None,
                &signer,
                now,
                1,
                &mut rng,
            );
            assert_eq!(
                d.map(|d| d.backend),
                Some(1),
                "both are always the candidates: the idle one wins"
            );
        }
        let ten = Selector::new(
            (0..10)
                .map(|i| backend(&format!("b{i}"), State::Active))
                .collect(),
        );
        let mut load = vec![0u64; 10];
        for _ in 0..10_000 {
            let d = ten.select(
                &Affinity::None,
                RequestKey::default(),
                &load,
                None,
                &signer,
                now,
                1,
                &mut rng,
            );
            load[d.expect("pick").backend] += 1;
        }
        let (min, max) = (
            load.iter().min().copied().unwrap_or(0),
            load.iter().max().copied().unwrap_or(0),
        );
        assert!(max - min <= 2, "{load:?}");
    }

    #[test]
    fn ejected_backends_are_avoided_and_a_retry_goes_elsewhere() {
        let signer = CookieSigner::new([9; 32]);
        let mut rng = Rng::new(1);
        let now = Instant::now();
        let s = Selector::new(vec![
            backend("a", State::Ejected),
            backend("b", State::Active),
            backend("c", State::Active),
        ]);
        let ip = RequestKey {
            client_ip: Some("10.1.2.3".parse().expect("ip")),
            ..Default::default()
        };
        let d = s
            .select(
                &Affinity::ClientIp,
                ip,
                &[0; 3],
                None,
                &signer,
                now,
                1,
                &mut rng,
            )
            .expect("pick");
        assert_ne!(d.backend, 0);
        let retry = s
            .select(
                &Affinity::ClientIp,
                ip,
                &[0; 3],
                Some(d.backend),
                &signer,
                now,
                1,
                &mut rng,
            )
            .expect("pick");
        assert!(retry.backend != d.backend && retry.backend != 0);
        let none = Selector::new(vec![backend("a", State::Ejected)]);
        assert_eq!(
            none.select(
                &Affinity::None,
                RequestKey::default(),
                &[0],
                None,
                &signer,
                now,
                1,
                &mut rng
            ),
            None
        );
    }
}
