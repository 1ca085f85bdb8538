//! The qemu backend's guest for tests: `deploy/guest/build.sh` around this workspace's
//! demo app, under the target directory. Needs qemu-system-x86, busybox-static and
//! cpio (`.ci/run` installs them); the script downloads Debian's kernel package once.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::workspace_bin;

/// Builds the guest (once per test process: tests that run side by side share it, and
/// a build must not rewrite the files a VM of another test is booting from) and
/// returns its directory, for `form-vmm-service --guest-dir`. Panics naming the
/// missing package when a tool is missing.
pub fn build() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT.get_or_init(build_now).clone()
}

fn build_now() -> PathBuf {
    for (tool, package) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("busybox", "busybox-static"),
        ("cpio", "cpio"),
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "{tool} is missing: apt-get install qemu-system-x86 busybox-static cpio ({package})"
        );
    }
    // A statically linked build when one is given (CI builds it), else this build of the
    // demo app with its libraries.
    let demo = std::env::var_os("FORM_GUEST_WORKLOAD")
        .map_or_else(|| workspace_bin("form-demo-app"), PathBuf::from);
    let out = workspace_bin("form-demo-app")
        .parent()
        .expect("target dir")
        .join("form-guest");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/guest/build.sh");
    let status = Command::new("bash")
        .arg(&script)
        .arg(&demo)
        .arg(&out)
        .status()
        .expect("run build.sh");
    assert!(status.success(), "deploy/guest/build.sh failed");
    out
}
