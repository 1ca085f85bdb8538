//! `formctl up`: start the stack's processes in order, print where they listen, watch
//! them, and on Ctrl-C (or SIGTERM) stop them in reverse order with SIGTERM.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use form_runtime::child::{self, ChildError, ChildService, LaunchSpec};
use form_runtime::ready::{self, ReadyInfo};
use form_runtime::shutdown;
use nix::sys::signal::Signal;

use crate::UpArgs;
use crate::plan::{self, DEFAULT_PORTS, Ports, Process};

/// Time each service gets to stop after SIGTERM (the services promise 5 s).
const STOP_DEADLINE: Duration = Duration::from_secs(6);
/// Starts of the stack on fresh free ports (`--auto-ports`) when one chosen for it was
/// taken by another process before its service bound it.
const PORT_ATTEMPTS: usize = 5;
/// How often children are checked for an unexpected exit.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);
/// How often the stack's certificates are checked for renewal.
const CERT_CHECK_INTERVAL: Duration = Duration::from_secs(60);

pub(crate) async fn run(args: UpArgs) -> anyhow::Result<ExitCode> {
    let data_dir = match args.data_dir.clone() {
        Some(d) => d,
        None => default_data_dir()?,
    };
    let bin_dir = match args.bin_dir.clone() {
        Some(d) => d,
        None => std::env::current_exe()?
            .parent()
            .context("formctl has no parent directory")?
            .to_owned(),
    };
    let ports = if args.auto_ports {
        free_ports(args.host)?
    } else {
        DEFAULT_PORTS
    };
    let mut plan = stack_plan(&args, &ports, &data_dir)?;
    check_binaries(&bin_dir, &plan)?;
    if !args.no_demo && !bin_dir.join("form-demo-app").is_file() {
        bail!(
            "form-demo-app (the demo cluster's program) not found in {}; build it with `cargo build --release` or pass --no-demo",
            bin_dir.display()
        );
    }
    let run_dir = data_dir.join("run");
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;

    // Mutual TLS: a local CA, and a certificate for each process and for formctl.
    let lifetime = std::time::Duration::from_secs(args.cert_lifetime_hours * 3600);
    crate::certs::issue_all(&data_dir, &holders(&plan, &data_dir)?, lifetime)?;
    write_authorized_keys(&bin_dir, &plan, &data_dir)?;
    let tokens = crate::tokens::ensure(&data_dir)?;
    crate::cookie_key::ensure(&crate::cookie_key::path(&data_dir))?;

    let (handle, mut stop) = shutdown::channel();
    shutdown::spawn_signal_listener(handle)?;

    // With --auto-ports another process can take a chosen port before its service
    // binds it: then stop, choose new ports and start again.
    let attempts = if args.auto_ports { PORT_ATTEMPTS } else { 1 };
    let in_use = |e: &anyhow::Error| {
        e.downcast_ref::<ChildError>()
            .is_some_and(ChildError::is_addr_in_use)
    };
    let started = child::retry_while(attempts, in_use, async |attempt| {
        if attempt > 1 {
            plan = stack_plan(&args, &free_ports(args.host)?, &data_dir)?;
        }
        let started = start_all(&plan, &bin_dir, &run_dir, &mut stop).await;
        if let Err(e) = &started
            && e.is_addr_in_use()
            && attempt < attempts
        {
            eprintln!("formctl: {e}\nformctl: starting again on other free ports");
        }
        Ok(started?)
    })
    .await;
    let mut children = match started {
        Ok(Some(children)) => children,
        Ok(None) => return Ok(ExitCode::SUCCESS),
        Err(e) if in_use(&e) && !args.auto_ports => {
            bail!("{e}\na documented port is taken: stop what listens there, or pass --auto-ports")
        }
        Err(e) => return Err(e),
    };
    let api_addr = children
        .iter()
        .find(|c| c.name() == "form-mcp")
        .and_then(|c| c.addr("http"))
        .context("form-mcp has no HTTP address")?;
    let balancer = children
        .iter()
        .find(|c| c.name() == "form-rplb")
        .and_then(|c| c.addr("http"))
        .context("form-rplb has no HTTP address")?;
    let api = crate::client::Api::new(&format!("http://{api_addr}"), Some(tokens.admin.clone()));
    if !args.no_demo {
        println!("formctl: creating the demo cluster");
        tokio::select! {
            made = crate::demo::ensure(&api, &bin_dir, balancer) => {
                if let Err(e) = made {
                    stop_all(&mut children).await;
                    bail!("{e:#}");
                }
            }
            _ = stop.requested() => {
                stop_all(&mut children).await;
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
    print_summary(&plan, &children, &data_dir);
    println!(
        "API: {}  (token: {}, read-only: {})",
        api.base(),
        tokens.admin,
        tokens.read
    );
    println!(
        "  export FORM_API={} FORM_TOKEN={}",
        api.base(),
        tokens.admin
    );
    if !args.no_demo {
        println!(
            "Demo: curl http://{}:{}/whoami   (or curl -H 'Host: {}' http://{balancer}/whoami)",
            crate::demo::DEMO_DOMAIN,
            balancer.port(),
            crate::demo::DEMO_DOMAIN
        );
        println!(
            "  formctl scale demo --to 3; formctl status demo; formctl demo --balancer http://{balancer}"
        );
    }
    println!("Press Ctrl-C to stop.");
    if let Some(path) = &args.ready_file {
        ready::write(path, &summary(&children))?;
    }
    // Where the stack listens, for formctl commands without --api (its ports may be
    // chosen at run time with --auto-ports).
    let addresses = stack_file(&data_dir);
    ready::write(&addresses, &summary(&children))?;

    let mut failed = false;
    let mut certs_checked = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.requested() => break,
            _ = tokio::time::sleep(WATCH_INTERVAL) => {
                // Renewed in place: each process takes its new files in by itself.
                if certs_checked.elapsed() >= CERT_CHECK_INTERVAL
                    && crate::certs::due(&crate::certs::operator_dir(&data_dir), lifetime)
                {
                    match holders(&plan, &data_dir).and_then(|h| crate::certs::issue_all(&data_dir, &h, lifetime)) {
                        Ok(()) => println!("formctl: certificates renewed"),
                        Err(e) => eprintln!("formctl: renewing the certificates: {e:#}"),
                    }
                }
                if certs_checked.elapsed() >= CERT_CHECK_INTERVAL {
                    certs_checked = std::time::Instant::now();
                }
                if let Some(name) = exited(&mut children) {
                    eprintln!("formctl: {name} exited unexpectedly; stopping the stack");
                    failed = true;
                    break;
                }
            }
        }
    }
    println!("formctl: stopping");
    drop(std::fs::remove_file(&addresses));
    failed |= !stop_all(&mut children).await;
    if let Some(path) = &args.ready_file {
        drop(std::fs::remove_file(path));
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The stack's processes on `ports`, with the flags `args` ask for.
fn stack_plan(args: &UpArgs, ports: &Ports, data_dir: &Path) -> anyhow::Result<Vec<Process>> {
    // With free ports the balancer's data plane takes port 0 (its ready file tells).
    let http_port = if args.auto_ports {
        0
    } else {
        plan::DEFAULT_HTTP_PORT
    };
    let mut plan = plan::stack(args.host, ports, http_port, data_dir);
    if args.backend == "qemu" {
        let guest = args
            .guest_dir
            .as_ref()
            .context("--backend qemu needs --guest-dir (make one with deploy/guest/build.sh)")?;
        if let Some(vmm) = plan.iter_mut().find(|p| p.bin == "form-vmm-service") {
            vmm.args.extend([
                "--backend".into(),
                "qemu".into(),
                "--guest-dir".into(),
                guest.clone().into_os_string(),
            ]);
        }
    }
    for p in &mut plan {
        p.args.extend([
            "--tls-dir".into(),
            crate::certs::process_dir(data_dir, &p.name).into_os_string(),
        ]);
    }
    Ok(plan)
}

/// Every certificate holder of `plan`'s stack.
fn holders(
    plan: &[Process],
    data_dir: &Path,
) -> anyhow::Result<Vec<(PathBuf, form_runtime::tls::Identity)>> {
    let named: Vec<(String, &'static str)> = plan.iter().map(|p| (p.name.clone(), p.bin)).collect();
    crate::certs::holders(data_dir, &named)
}

/// Starts the processes of `plan` in order, each once the one before is ready. None if
/// a stop was asked for meanwhile; on an error the ones started are stopped.
async fn start_all(
    plan: &[Process],
    bin_dir: &Path,
    run_dir: &Path,
    stop: &mut shutdown::Shutdown,
) -> Result<Option<Vec<ChildService>>, ChildError> {
    let mut children: Vec<ChildService> = Vec::new();
    for p in plan {
        let spec =
            LaunchSpec::new(&p.name, bin_dir.join(p.bin), run_dir).args(p.args.iter().cloned());
        tokio::select! {
            started = ChildService::start(spec) => match started {
                Ok(c) => children.push(c),
                Err(e) => {
                    stop_all(&mut children).await;
                    return Err(e);
                }
            },
            _ = stop.requested() => {
                stop_all(&mut children).await;
                return Ok(None);
            }
        }
    }
    Ok(Some(children))
}

/// Creates each state replica's node key (if missing) and writes the authorized keys
/// file that lets the replicas accept each other's deltas.
fn write_authorized_keys(bin_dir: &Path, plan: &[Process], data_dir: &Path) -> anyhow::Result<()> {
    let mut lines = String::from("# form-state replicas started by formctl up\n");
    for p in plan.iter().filter(|p| p.bin == "form-state") {
        let out = std::process::Command::new(bin_dir.join(p.bin))
            .args(&p.args)
            .arg("--print-public-key")
            .output()
            .with_context(|| format!("running {} --print-public-key", p.bin))?;
        if !out.status.success() {
            bail!(
                "{} --print-public-key: {}",
                p.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        lines.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    let path = plan::authorized_keys(data_dir);
    std::fs::write(&path, lines).with_context(|| format!("writing {}", path.display()))
}

pub(crate) fn default_data_dir() -> anyhow::Result<PathBuf> {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("form"));
    }
    let home =
        std::env::var_os("HOME").context("neither --data-dir, XDG_DATA_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".local/share/form"))
}

fn check_binaries(bin_dir: &Path, plan: &[Process]) -> anyhow::Result<()> {
    let missing: Vec<&str> = plan
        .iter()
        .map(|p| p.bin)
        .filter(|b| !bin_dir.join(b).is_file())
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} not found in {}; build them with `cargo build --release` (or pass --bin-dir)",
            missing.join(", "),
            bin_dir.display()
        );
    }
    Ok(())
}

/// The file where a running stack of `data_dir` lists its addresses.
pub(crate) fn stack_file(data_dir: &Path) -> PathBuf {
    data_dir.join("stack.json")
}

/// The API a stack of `data_dir` serves, if one runs (its addresses file exists).
pub(crate) fn running_api(data_dir: &Path) -> Option<String> {
    let info = ready::read(&stack_file(data_dir)).ok()??;
    let addr = info.addresses.get("form-mcp/http")?;
    Some(format!("http://{addr}"))
}

/// Free ports on `host` for every listener (see `form_runtime::ports`).
fn free_ports(host: IpAddr) -> anyhow::Result<Ports> {
    let ports = form_runtime::ports::choose_many(host, DEFAULT_PORTS.len() * 2)
        .with_context(|| format!("choosing free ports on {host}"))?;
    let mut out = DEFAULT_PORTS;
    for (i, pair) in out.iter_mut().enumerate() {
        *pair = (ports[2 * i], ports[2 * i + 1]);
    }
    Ok(out)
}

fn summary(children: &[ChildService]) -> ReadyInfo {
    let mut addresses = BTreeMap::new();
    for c in children {
        for (listener, addr) in &c.info().addresses {
            addresses.insert(format!("{}/{listener}", c.name()), *addr);
        }
    }
    ReadyInfo {
        service: "formctl".into(),
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").into(),
        addresses,
    }
}

fn print_summary(plan: &[Process], children: &[ChildService], data_dir: &Path) {
    println!(
        "formctl: the stack is up; data and logs in {}",
        data_dir.display()
    );
    println!(
        "  {:<18} {:<22} {:<22} log",
        "service", "listens on", "metrics"
    );
    for (p, c) in plan.iter().zip(children) {
        println!(
            "  {:<18} {:<22} {:<22} {}",
            p.name,
            p.listen.to_string(),
            p.metrics.to_string(),
            c.log_path().display()
        );
    }
    if let Some(http) = children
        .iter()
        .find(|c| c.name() == "form-rplb")
        .and_then(|c| c.addr("http"))
    {
        println!("Balancer (HTTP): http://{http}/");
    }
}

fn exited(children: &mut [ChildService]) -> Option<String> {
    children.iter_mut().find_map(|c| match c.try_wait() {
        Ok(Some(status)) => Some(format!(
            "{} ({status}; log {})",
            c.name(),
            c.log_path().display()
        )),
        Ok(None) => None,
        Err(e) => Some(e.to_string()),
    })
}

/// Stops children in reverse start order; true if every one exited with code 0.
async fn stop_all(children: &mut Vec<ChildService>) -> bool {
    let mut clean = true;
    while let Some(mut c) = children.pop() {
        match c.stop(Signal::SIGTERM, STOP_DEADLINE).await {
            Ok(status) if status.success() => println!("  stopped {}", c.name()),
            Ok(status) => {
                clean = false;
                eprintln!(
                    "  {} exited with {status}; log {}",
                    c.name(),
                    c.log_path().display()
                );
            }
            Err(e) => {
                clean = false;
                eprintln!("  {e}");
            }
        }
    }
    clean
}
