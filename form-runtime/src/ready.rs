//! The ready file: written once a service is ready, so a supervisor or a test that
//! started it with port 0 learns where it listens.
//!
//! ```text
//! {"service":"form-state","pid":4242,"version":"0.1.0",
//!  "addresses":{"grpc":"127.0.0.1:39017","metrics":"127.0.0.1:39018"}}
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::RuntimeError;

/// Contents of a ready file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyInfo {
    /// Binary name, e.g. `form-state`.
    pub service: String,
    /// Process id.
    pub pid: u32,
    /// Version of the binary.
    pub version: String,
    /// Every address actually bound, by listener name (`grpc`, `http`, `metrics`).
    pub addresses: BTreeMap<String, SocketAddr>,
}

impl ReadyInfo {
    /// The address bound for listener `name`.
    pub fn address(&self, name: &str) -> Option<SocketAddr> {
        self.addresses.get(name).copied()
    }
}

/// Writes `info` to `path` atomically (temporary file in the same directory, then rename),
/// so a reader never sees a partial file.
pub fn write(path: &Path, info: &ReadyInfo) -> Result<(), RuntimeError> {
    let err = |source| RuntimeError::ReadyFile {
        path: path.to_owned(),
        source,
    };
    let json = serde_json::to_vec_pretty(info).map_err(|e| err(e.into()))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    std::fs::write(&tmp, json).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Reads a ready file; `None` while it does not exist yet.
pub fn read(path: &Path) -> std::io::Result<Option<ReadyInfo>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(Into::into),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_a_file() {
        let dir = std::env::temp_dir().join(format!("form-ready-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("svc.ready.json");
        assert_eq!(read(&path).expect("absent is fine"), None);
        let info = ReadyInfo {
            service: "form-state".into(),
            pid: 7,
            version: "0.1.0".into(),
            addresses: [("grpc".to_owned(), "127.0.0.1:1234".parse().expect("addr"))].into(),
        };
        write(&path, &info).expect("write");
        assert_eq!(read(&path).expect("read"), Some(info.clone()));
        assert_eq!(info.address("grpc").map(|a| a.port()), Some(1234));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
