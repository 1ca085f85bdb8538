//! The balancers' session cookie key: one file of 64 hex characters that every
//! form-rplb of a stack reads (`--cookie-key-file`), so that a session pinned by one
//! balancer is honored by the others and survives a balancer's restart. Made once from
//! /dev/urandom, then kept.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, bail};

/// Where `formctl up` keeps the key in its data directory.
pub(crate) fn path(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("cookie.key")
}

/// Makes the key at `p` unless a valid one is there; true when it made one. A file
/// that holds something else is an error naming it, not overwritten: the balancers
/// that read it would refuse to start anyway, and an operator may have put it there.
pub(crate) fn ensure(p: &Path) -> anyhow::Result<bool> {
    match std::fs::read_to_string(p) {
        Ok(text) if valid(&text) => return Ok(false),
        Ok(_) => bail!(
            "{} exists but does not hold a cookie key (64 hex characters); remove it to have one made",
            p.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
    }
    let hex = crate::tokens::random_hex(32)?;
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    // Written whole under another name, then renamed: a balancer never reads half a key.
    let tmp = p.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    writeln!(f, "{hex}").with_context(|| format!("writing {}", tmp.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, p).with_context(|| format!("renaming to {}", p.display()))?;
    Ok(true)
}

/// Whether `text` is a key as form-rplb reads it: 64 hex characters, white space around.
fn valid(text: &str) -> bool {
    let t = text.trim();
    t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_made_once_then_kept_and_a_foreign_file_is_refused() {
        let dir = form_testkit::TestDir::new("cookie-key");
        let p = dir.path().join("keys/cookie.key");
        assert!(ensure(&p).expect("made"));
        let first = std::fs::read_to_string(&p).expect("key");
        assert!(valid(&first), "{first:?}");
        let mode = std::fs::metadata(&p).expect("meta").permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        assert!(!ensure(&p).expect("kept"));
        assert_eq!(std::fs::read_to_string(&p).expect("key"), first);
        // form-rplb reads it.
        form_rplb::read_key(&p).expect("form-rplb accepts it");

        std::fs::write(&p, "not a key\n").expect("write");
        let e = ensure(&p).expect_err("refused").to_string();
        assert!(e.contains("does not hold a cookie key"), "{e}");
        assert_eq!(std::fs::read_to_string(&p).expect("kept"), "not a key\n");
    }
}
