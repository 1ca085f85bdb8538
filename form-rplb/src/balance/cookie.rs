//! Session cookies that name a backend, authenticated with HMAC-SHA256 so a client
//! cannot pin itself to a backend of its choice, and carrying their expiry.
//!
//! ```text
//! <backend-id>~<expiry, unix seconds>~<session, 16 hex>~<first 16 bytes of HMAC(key, id ~ expiry ~ session), hex>
//! ```
//!
//! The session part makes every issued cookie distinct (two sessions pinned in the
//! same second to the same backend are still two sessions).

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of the MAC kept in the cookie (128 bits).
const MAC_BYTES: usize = 16;

/// Issues and checks session cookies with one secret key.
#[derive(Clone)]
pub struct CookieSigner {
    /// HMAC state with the key already absorbed; cloned per use (half the hashing).
    keyed: HmacSha256,
    /// Cookie values already verified, with their expiry and the length of the backend
    /// id: a session's later requests skip the HMAC. Only authentic values get in.
    /// (Only the balancer's own values get in, so a client cannot choose the keys.)
    /// `None` where the CPU computes SHA-256 itself: the HMAC (about 200 ns) is then
    /// cheaper than a lookup in a large shared map, and a first request costs no more
    /// than a later one.
    verified: Option<std::sync::Arc<std::sync::Mutex<Verified>>>,
    /// Sessions issued so far (mixed with the key into each session part).
    issued: std::sync::Arc<std::sync::atomic::AtomicU64>,
    salt: u64,
}

/// Verified cookie values remembered at most (then the memory starts over).
const VERIFIED_CACHE: usize = 100_000;

impl std::fmt::Debug for CookieSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CookieSigner(..)")
    }
}

/// Lowercase hex of a MAC, on the stack.
fn hex(bytes: &[u8; MAC_BYTES]) -> [u8; 2 * MAC_BYTES] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 2 * MAC_BYTES];
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
    out
}

/// Whether this CPU has SHA-256 instructions (sha2 uses them when it has).
#[cfg(target_arch = "x86_64")]
fn sha256_in_hardware() -> bool {
    std::arch::is_x86_feature_detected!("sha") && std::arch::is_x86_feature_detected!("sse4.1")
}

/// Whether this CPU has SHA-256 instructions (sha2 uses them when it has).
#[cfg(target_arch = "aarch64")]
fn sha256_in_hardware() -> bool {
    std::arch::is_aarch64_feature_detected!("sha2")
}

/// Whether this CPU has SHA-256 instructions: not known here.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn sha256_in_hardware() -> bool {
    false
}

/// Verified cookie values: their expiry and the length of their backend id.
type Verified = std::collections::HashMap<String, (u64, usize), super::KeyHash>;

impl CookieSigner {
    /// A signer with `key` (32 random bytes, shared by every balancer replica), which
    /// remembers verified values only where SHA-256 runs in software.
    pub fn new(key: [u8; 32]) -> Self {
        Self::with_cache(key, !sha256_in_hardware())
    }

    /// A signer with `key` that remembers verified values (`cache`) or computes the MAC
    /// of every value it checks.
    pub fn with_cache(key: [u8; 32], cache: bool) -> Self {
        // Any key length is valid for HMAC.
        let keyed = HmacSha256::new_from_slice(&key).unwrap_or_else(|_| unreachable!());
        let salt = super::hash64(&key);
        Self {
            keyed,
            verified: cache.then(Default::default),
            issued: Default::default(),
            salt,
        }
    }

    /// Whether verified values are remembered (SHA-256 runs in software here).
    pub fn remembers_verified(&self) -> bool {
        self.verified.is_some()
    }

    fn mac(&self, payload: &str) -> [u8; MAC_BYTES] {
        let mut m = self.keyed.clone();
        m.update(payload.as_bytes());
        let mut out = [0u8; MAC_BYTES];
        out.copy_from_slice(&m.finalize().into_bytes()[..MAC_BYTES]);
        out
    }

    /// A cookie value pinning `backend` until `now_unix + ttl_seconds`.
    pub fn issue(&self, backend: &str, now_unix: u64, ttl_seconds: u64) -> String {
        let n = self
            .issued
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let session = super::hash64(
            &[
                self.salt.to_le_bytes(),
                n.to_le_bytes(),
                now_unix.to_le_bytes(),
            ]
            .concat(),
        );
        let payload = format!(
            "{backend}~{}~{session:016x}",
            now_unix.saturating_add(ttl_seconds)
        );
        let mac = hex(&self.mac(&payload));
        // Hex digits are ASCII.
        let mac = std::str::from_utf8(&mac).unwrap_or_default();
        format!("{payload}~{mac}")
    }

    /// The backend a cookie value names, if it is authentic and not expired at `now_unix`.
    pub fn verify<'a>(&self, value: &'a str, now_unix: u64) -> Option<&'a str> {
        let Some(verified) = &self.verified else {
            return self.verify_mac(value, now_unix);
        };
        let cached = verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(value)
            .copied();
        if let Some((expiry, len)) = cached {
            return (now_unix < expiry).then(|| &value[..len]);
        }
        let backend = self.verify_mac(value, now_unix)?;
        let expiry = value
            .split('~')
            .nth(1)
            .and_then(|e| e.parse().ok())
            .unwrap_or(0);
        let mut cache = verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.len() >= VERIFIED_CACHE {
            cache.clear();
        }
        cache.insert(value.to_owned(), (expiry, backend.len()));
        Some(backend)
    }

    fn verify_mac<'a>(&self, value: &'a str, now_unix: u64) -> Option<&'a str> {
        let (payload, mac) = value.rsplit_once('~')?;
        let (pinned, session) = payload.rsplit_once('~')?;
        let (backend, expiry) = pinned.rsplit_once('~')?;
        if session.len() != 16 {
            return None;
        }
        let expiry: u64 = expiry.parse().ok()?;
        let expected = hex(&self.mac(payload));
        // Compare in constant time: a timing leak must not reveal the MAC byte by byte.
        let same = mac.len() == expected.len()
            && mac
                .bytes()
                .zip(expected)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        (same && now_unix < expiry && !backend.is_empty()).then_some(backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A signer of each kind: remembering verified values, and not.
    fn signers(key: [u8; 32]) -> [CookieSigner; 2] {
        [true, false].map(|cache| CookieSigner::with_cache(key, cache))
    }

    #[test]
    fn authentic_cookies_verify_until_they_expire() {
        for s in signers([1; 32]) {
            let c = s.issue("i-3", 1000, 60);
            assert_eq!(s.verify(&c, 1000), Some("i-3"));
            assert_eq!(s.verify(&c, 1059), Some("i-3"), "again");
            assert_eq!(s.verify(&c, 1060), None, "expired");
            assert_eq!(
                signers([1; 32])[1].verify(&c, 1000),
                Some("i-3"),
                "another replica with the key"
            );
        }
    }

    #[test]
    fn forged_cookies_do_not_pin() {
        for s in signers([1; 32]) {
            forged_cookies_do_not_pin_on(&s);
        }
    }

    fn forged_cookies_do_not_pin_on(s: &CookieSigner) {
        let c = s.issue("i-3", 1000, 60);
        assert_eq!(
            s.verify(&c, 1000),
            Some("i-3"),
            "remembered, where it can be"
        );
        let other = c.replacen("i-3", "i-4", 1);
        assert_eq!(
            s.verify(&other, 1000),
            None,
            "another backend with the old MAC"
        );
        let longer = c.replacen("1060", "9999", 1);
        let a = s.issue("i-3", 1000, 60);
        assert_ne!(a, c, "every cookie names its own session");
        assert_eq!(s.verify(&longer, 1000), None, "a longer expiry");
        assert_eq!(
            CookieSigner::new([2; 32]).verify(&c, 1000),
            None,
            "another key"
        );
        for junk in ["", "i-3", "i-3~1060", "~~", "i-3~x~00", "i-3~1060~00"] {
            assert_eq!(s.verify(junk, 1000), None, "{junk}");
        }
    }
}
