//! The API tokens of the local stack: `DATA_DIR/tokens` holds an admin and a read
//! token (made at the first `formctl up`, readable by the user only). formctl reads
//! the admin token from there when neither --token nor FORM_TOKEN is given.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// The tokens file of `data_dir`.
pub(crate) fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("tokens")
}

/// The stack's tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Tokens {
    /// Reads and writes.
    pub(crate) admin: String,
    /// Reads only.
    pub(crate) read: String,
}

fn random_token() -> anyhow::Result<String> {
    random_hex(24)
}

/// `bytes` random bytes from /dev/urandom, in hex.
pub(crate) fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut b = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The tokens of `data_dir`, made (mode 0600) if the file does not exist.
pub(crate) fn ensure(data_dir: &Path) -> anyhow::Result<Tokens> {
    let p = path(data_dir);
    if let Some(t) = read(&p) {
        return Ok(t);
    }
    let t = Tokens {
        admin: random_token()?,
        read: random_token()?,
    };
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&p)
        .with_context(|| format!("creating {}", p.display()))?;
    writeln!(
        f,
        "# API tokens of the local stack (formctl up): TOKEN ROLE NAME\n{} admin formctl\n{} read viewer",
        t.admin, t.read
    )
    .with_context(|| format!("writing {}", p.display()))?;
    Ok(t)
}

/// The tokens in the file at `p`, if it holds both.
pub(crate) fn read(p: &Path) -> Option<Tokens> {
    let text = std::fs::read_to_string(p).ok()?;
    let find = |role: &str| {
        text.lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .find_map(|l| {
                let mut parts = l.split_whitespace();
                let token = parts.next()?;
                (parts.next()? == role).then(|| token.to_owned())
            })
    };
    Some(Tokens {
        admin: find("admin")?,
        read: find("read")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_then_read_back() {
        let dir = std::env::temp_dir().join(format!("formctl-tokens-{}", std::process::id()));
        let a = ensure(&dir).expect("made");
        assert_eq!(a.admin.len(), 48);
        assert_ne!(a.admin, a.read);
        assert_eq!(ensure(&dir).expect("again"), a, "kept across runs");
        let mode = std::fs::metadata(path(&dir)).expect("meta");
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
        drop(std::fs::remove_dir_all(&dir));
    }
}
