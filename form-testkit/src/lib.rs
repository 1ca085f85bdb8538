//! The platform's test harness: start any service binary on port 0 and read its ready
//! file, wait for health, probe reflection and HTTP endpoints, stop it with a signal and
//! a deadline; `assert_eventually!` for conditions that become true in time.

pub mod backend;
pub mod conformance;
pub mod dir;
pub mod guest;
pub mod memnet;
pub mod net;
pub mod pki;
pub mod probe;
pub mod replicas;

use std::path::PathBuf;
use std::time::Duration;

pub use dir::TestDir;
pub use form_runtime::child::{ChildError, ChildService, LaunchSpec};
pub use nix::sys::signal::Signal;

/// Default deadline of `assert_eventually!` and of waits in tests.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);

/// Path of a binary of this workspace (`target/<profile>/<name>`), found from the
/// running test executable (`target/<profile>/deps/<test>`).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap_or_else(|| panic!("unexpected test executable path {}", exe.display()));
    let bin = profile_dir.join(name);
    assert!(
        bin.exists(),
        "{} not built; run the tests with `cargo test --workspace`",
        bin.display()
    );
    bin
}

/// Starts `bin` with `args` plus `--ready-file` in `dir`, waits until it is ready.
pub async fn start(
    dir: &TestDir,
    name: &str,
    bin: impl Into<PathBuf>,
    args: &[&str],
) -> ChildService {
    let bin = bin.into();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let tls = pki::service_args(&bin, name, &args);
    let spec = LaunchSpec::new(name, bin, dir.path()).args(args.into_iter().chain(tls));
    ChildService::start(spec)
        .await
        .unwrap_or_else(|e| panic!("starting {name}: {e}"))
}

/// Polls an async condition until it holds or the deadline passes, then panics with
/// the message. `assert_eventually!(cond_async_block)`,
/// `assert_eventually!(cond_async_block, "message {}", arg)` or with a leading
/// `deadline = Duration` argument.
#[macro_export]
macro_rules! assert_eventually {
    (deadline = $deadline:expr, $cond:expr, $($msg:tt)+) => {{
        let deadline = ::std::time::Instant::now() + $deadline;
        loop {
            if $cond.await {
                break;
            }
            if ::std::time::Instant::now() > deadline {
                panic!("condition not met within {:?}: {}", $deadline, format!($($msg)+));
            }
            ::tokio::time::sleep(::std::time::Duration::from_millis(25)).await;
        }
    }};
    ($cond:expr, $($msg:tt)+) => {
        $crate::assert_eventually!(deadline = $crate::DEFAULT_DEADLINE, $cond, $($msg)+)
    };
    ($cond:expr) => {
        $crate::assert_eventually!($cond, "{}", stringify!($cond))
    };
}
