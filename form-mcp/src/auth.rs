//! Bearer tokens from `--tokens-file`: one per line, `TOKEN ROLE [NAME]`, where ROLE is
//! `admin` (reads and writes) or `read` (reads only); `#` starts a comment. A request
//! without a known token gets 401, a read token on a write gets 403. Tokens are compared
//! in constant time.

use std::path::Path;

use axum::http::{HeaderMap, StatusCode, header};

use crate::error::ApiError;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Reads and writes.
    Admin,
    /// Reads only.
    Read,
}

/// One token.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Token {
    secret: Vec<u8>,
    role: Role,
    name: String,
}

/// The accepted tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tokens(Vec<Token>);

/// Shortest token accepted (bytes).
pub const MIN_TOKEN_LEN: usize = 16;

impl Tokens {
    /// Parses a tokens file's text; errors name the line and what is accepted.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(secret), Some(role)) = (parts.next(), parts.next()) else {
                return Err(format!(
                    "line {}: expected 'TOKEN ROLE [NAME]' with ROLE admin or read",
                    n + 1
                ));
            };
            if secret.len() < MIN_TOKEN_LEN {
                return Err(format!(
                    "line {}: the token is {} characters; at least {MIN_TOKEN_LEN} accepted",
                    n + 1,
                    secret.len()
                ));
            }
            let role = match role {
                "admin" => Role::Admin,
                "read" => Role::Read,
                other => {
                    return Err(format!(
                        "line {}: role '{other}' is not accepted; expected admin or read",
                        n + 1
                    ));
                }
            };
            let name = parts.next().unwrap_or("unnamed").to_owned();
            out.push(Token {
                secret: secret.as_bytes().to_vec(),
                role,
                name,
            });
        }
        if out.is_empty() {
            return Err("no token; expected at least one line 'TOKEN ROLE [NAME]'".into());
        }
        Ok(Self(out))
    }

    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The role of the bearer token in `headers`, or 401.
    pub fn check(&self, headers: &HeaderMap) -> Result<(Role, &str), ApiError> {
        let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
        let value = headers.get(header::AUTHORIZATION).ok_or_else(|| {
            unauthorized("missing Authorization header; expected 'Authorization: Bearer TOKEN'")
        })?;
        let presented = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .ok_or_else(|| unauthorized("malformed Authorization header; expected 'Bearer TOKEN'"))?
            .trim()
            .as_bytes();
        self.0
            .iter()
            .find(|t| constant_time_eq(&t.secret, presented))
            .map(|t| (t.role, t.name.as_str()))
            .ok_or_else(|| unauthorized("unknown token"))
    }

    /// The role of a bearer `token` (for callers without headers), or 401.
    pub fn role_of(&self, token: &str) -> Result<Role, ApiError> {
        let mut h = HeaderMap::new();
        if let Ok(v) = format!("Bearer {token}").parse() {
            h.insert(header::AUTHORIZATION, v);
        }
        self.check(&h).map(|(r, _)| r)
    }
}

/// Equality that takes the same time wherever the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // Digests have one length, so the time does not tell the token's length either.
    use sha2::{Digest, Sha256};
    let (x, y) = (Sha256::digest(a), Sha256::digest(b));
    x.iter()
        .zip(y.iter())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q))
        == 0
}

/// 403 unless `role` may write.
pub fn require_write(role: Role) -> Result<(), ApiError> {
    match role {
        Role::Admin => Ok(()),
        Role::Read => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token may only read; writes need an admin token",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_file_lines_are_checked_and_roles_enforced() {
        let t =
            Tokens::parse("# tokens\nadmin-token-0123456 admin ops\nread-token-01234567 read\n")
                .expect("valid");
        assert_eq!(
            t.role_of("admin-token-0123456").expect("admin"),
            Role::Admin
        );
        assert_eq!(t.role_of("read-token-01234567").expect("read"), Role::Read);
        assert_eq!(
            t.role_of("nope-nope-nope-nope")
                .expect_err("unknown")
                .status,
            StatusCode::UNAUTHORIZED
        );
        assert!(require_write(Role::Read).is_err());
        for (bad, want) in [
            ("short admin", "at least 16"),
            ("long-enough-token-1 root", "role 'root'"),
            ("lonely-token-0000000", "expected 'TOKEN ROLE"),
            ("# nothing", "no token"),
        ] {
            let e = Tokens::parse(bad).expect_err(bad);
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}
