//! What a node agrees to run: the commands of its allowlist only, and no environment
//! variable that changes how any program is loaded (`LD_PRELOAD` and the like), so a
//! caller that may create instances still cannot run a shell or inject a library.

use std::path::{Path, PathBuf};

use form_proto::types::v1 as types;

use crate::error::VmmError;

/// Variables that change how a program is loaded or resolves names; refused in a
/// workload's environment. `LD_` covers the dynamic loader's (`LD_PRELOAD`,
/// `LD_LIBRARY_PATH`, `LD_AUDIT` ...).
const DENIED_PREFIXES: &[&str] = &["LD_"];
const DENIED: &[&str] = &[
    "GCONV_PATH",
    "HOSTALIASES",
    "LOCPATH",
    "MALLOC_TRACE",
    "NLSPATH",
    "RESOLV_HOST_CONF",
    "RES_OPTIONS",
];

/// The commands a node runs.
#[derive(Debug, Clone)]
pub enum Allowed {
    /// Any command (`--allowed-commands '*'`: development and tests only).
    Any,
    /// These programs (canonical paths).
    Only(Vec<PathBuf>),
}

impl Allowed {
    /// The allowlist `--allowed-commands` gives: `*` for any; empty for the default,
    /// the demo app beside this binary.
    pub fn from_config(list: &[String]) -> Result<Self, String> {
        if list.iter().any(|c| c.trim() == "*") {
            return Ok(Allowed::Any);
        }
        let mut out = Vec::new();
        for c in list.iter().map(|c| c.trim()).filter(|c| !c.is_empty()) {
            out.push(resolve(c).ok_or_else(|| {
                format!("'{c}' is no program on this node; expected an absolute path, or a name found in PATH")
            })?);
        }
        if out.is_empty()
            && let Some(demo) = std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(|d| d.join("form-demo-app")))
                .and_then(|p| p.canonicalize().ok())
        {
            out.push(demo);
        }
        Ok(Allowed::Only(out))
    }

    /// Checks `w` against the allowlist and the environment denylist.
    pub fn check(&self, w: &types::Workload) -> Result<(), VmmError> {
        if let Some(k) = w.env.keys().find(|k| denied(k)) {
            return Err(VmmError::invalid(
                "workload.env",
                format!(
                    "'{k}' is refused: variables that change how programs load ({}, {}*) are never passed to a workload",
                    DENIED.join(", "),
                    DENIED_PREFIXES.join("*, ")
                ),
            ));
        }
        let Allowed::Only(list) = self else {
            return Ok(());
        };
        let found = resolve(&w.command);
        if found.as_ref().is_some_and(|p| list.contains(p)) {
            return Ok(());
        }
        Err(VmmError::PermissionDenied(format!(
            "workload.command '{}' is not on this node's allowlist; it runs only {} (--allowed-commands)",
            w.command,
            if list.is_empty() {
                "nothing".to_owned()
            } else {
                list.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        )))
    }
}

fn denied(k: &str) -> bool {
    DENIED.contains(&k) || DENIED_PREFIXES.iter().any(|p| k.starts_with(p))
}

/// The canonical path of the program `command` names: a path, or a name in `PATH`.
fn resolve(command: &str) -> Option<PathBuf> {
    let command = command.trim();
    if command.contains('/') {
        return Path::new(command).canonicalize().ok();
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join(command))
            .find(|p| p.is_file())
            .and_then(|p| p.canonicalize().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(command: &str, env: &[(&str, &str)]) -> types::Workload {
        types::Workload {
            command: command.into(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn only_listed_programs_run_and_loader_variables_are_refused() {
        let sh = Allowed::from_config(&["/bin/sh".into()]).expect("allowlist");
        assert!(sh.check(&workload("/bin/sh", &[])).is_ok());
        assert!(sh.check(&workload("sh", &[])).is_ok(), "found in PATH");
        let e = sh
            .check(&workload("/bin/true", &[]))
            .expect_err("not listed");
        assert!(e.to_string().contains("allowlist"), "{e}");
        for k in ["LD_PRELOAD", "LD_LIBRARY_PATH", "GCONV_PATH"] {
            let e = Allowed::Any
                .check(&workload("/bin/sh", &[(k, "/tmp/evil.so")]))
                .expect_err("denied");
            assert!(e.to_string().contains(k), "{e}");
        }
        assert!(
            Allowed::Any
                .check(&workload("/bin/sh", &[("DB_URL", "x")]))
                .is_ok()
        );
        assert!(Allowed::from_config(&["/no/such/program".into()]).is_err());
    }
}
