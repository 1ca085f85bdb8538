//! Replica keys. Each replica signs its deltas with an Ed25519 key kept in
//! `--node-key FILE` (created on first start); it accepts deltas only from the keys in
//! `--authorized-keys FILE`, each bound to a replica id.
//!
//! ```text
//! node key file:        form-state-node-key v1 <64 hex chars of the secret key>
//! authorized keys file: <replica-id> <64 hex chars of the public key>   (one per line, # comments)
//! ```

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::error::StateError;

const NODE_KEY_TAG: &str = "form-state-node-key v1";

/// Loads the node key from `path`, or creates it (mode 0600) if the file is missing.
pub fn load_or_create_node_key(path: &Path) -> Result<SigningKey, StateError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_node_key(path, &text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut secret = [0u8; 32];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut secret))
                .map_err(StateError::io("/dev/urandom"))?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(StateError::io(dir))?;
            }
            let text = format!("{NODE_KEY_TAG} {}\n", hex(&secret));
            let tmp = path.with_extension("tmp");
            write_private(&tmp, text.as_bytes()).map_err(StateError::io(&tmp))?;
            std::fs::rename(&tmp, path).map_err(StateError::io(path))?;
            tracing::info!(path = %path.display(), "created a new node key");
            Ok(SigningKey::from_bytes(&secret))
        }
        Err(e) => Err(StateError::io(path)(e)),
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn parse_node_key(path: &Path, text: &str) -> Result<SigningKey, StateError> {
    let bad = |m: &str| StateError::Storage {
        path: path.to_owned(),
        message: format!("{m}; expected one line '{NODE_KEY_TAG} <64 hex characters>'"),
    };
    let hexkey = text
        .trim()
        .strip_prefix(NODE_KEY_TAG)
        .ok_or_else(|| bad("not a node key file"))?
        .trim();
    let bytes = unhex(hexkey)
        .filter(|b| b.len() == 32)
        .ok_or_else(|| bad("bad key"))?;
    let mut secret = [0u8; 32];
    secret.copy_from_slice(&bytes);
    Ok(SigningKey::from_bytes(&secret))
}

/// Parses an authorized keys file: replica id -> public key.
pub fn load_authorized(path: &Path) -> Result<BTreeMap<String, VerifyingKey>, StateError> {
    let text = std::fs::read_to_string(path).map_err(StateError::io(path))?;
    parse_authorized(path, &text)
}

/// Parses the text of an authorized keys file.
pub fn parse_authorized(
    path: &Path,
    text: &str,
) -> Result<BTreeMap<String, VerifyingKey>, StateError> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let bad = |m: String| StateError::Storage {
            path: path.to_owned(),
            message: format!(
                "line {}: {m}; expected '<replica-id> <64 hex characters of an Ed25519 public key>'",
                n + 1
            ),
        };
        let mut parts = line.split_whitespace();
        let (Some(id), Some(key), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad(format!("'{line}' is not two fields")));
        };
        crate::model::validate::id("replica id", id).map_err(|e| bad(e.to_string()))?;
        let bytes: [u8; 32] = unhex(key)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| bad(format!("'{key}' is not 64 hex characters")))?;
        let vk = VerifyingKey::from_bytes(&bytes)
            .map_err(|e| bad(format!("not an Ed25519 public key: {e}")))?;
        if out.insert(id.to_owned(), vk).is_some() {
            return Err(bad(format!("replica '{id}' is listed twice")));
        }
    }
    Ok(out)
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_key_is_created_once_and_reloaded() {
        let dir = std::env::temp_dir().join(format!("form-keys-{}", std::process::id()));
        let path = dir.join("node.key");
        let a = load_or_create_node_key(&path).expect("create");
        let b = load_or_create_node_key(&path).expect("reload");
        assert_eq!(a.to_bytes(), b.to_bytes());
        std::fs::write(&path, "garbage").expect("write");
        let e = load_or_create_node_key(&path)
            .expect_err("corrupt")
            .to_string();
        assert!(e.contains("node.key") && e.contains("expected"), "{e}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn authorized_keys_errors_name_the_line() {
        let k = SigningKey::from_bytes(&[7; 32]).verifying_key();
        let text = format!("# replicas\nstate-1 {}\n\nstate-2 zz\n", hex(k.as_bytes()));
        let e = parse_authorized(Path::new("keys"), &text)
            .expect_err("bad line")
            .to_string();
        assert!(e.contains("line 4") && e.contains("zz"), "{e}");
        let ok = parse_authorized(Path::new("keys"), &format!("state-1 {}", hex(k.as_bytes())))
            .expect("ok");
        assert_eq!(ok["state-1"], k);
    }
}
