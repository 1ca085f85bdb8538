//! A compose project of the repository's docker-compose.yml for the Docker tests: the
//! image built from the project's binaries, host ports and a subnet of its own, and
//! helpers to reach containers and services.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use form_testkit::probe;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds form-platform:local from this tree (debug binaries).
pub fn build_image() {
    let out = Command::new("bash")
        .current_dir(repo())
        .args(["deploy/docker/build.sh", "debug"])
        .output()
        .expect("build.sh");
    assert!(
        out.status.success(),
        "deploy/docker/build.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A compose project, removed with its volumes on drop.
pub struct Compose {
    pub project: String,
    pub env: Vec<(String, String)>,
    pub files: Vec<String>,
    /// The certs volume's directory, holding the tests' CA.
    pub certs: form_testkit::TestDir,
}

impl Compose {
    /// A project named after `label` and this process, on a /24 of its own.
    pub fn new(label: &str, files: &[&str]) -> Self {
        let n = (std::process::id() + label.len() as u32 * 37) % 250 + 1;
        let mut all = vec![
            "docker-compose.yml".to_owned(),
            "form-cli/tests/compose-certs.yml".to_owned(),
        ];
        all.extend(files.iter().map(|f| (*f).to_owned()));
        let certs = form_testkit::TestDir::new(&format!("compose-certs-{label}"));
        form_testkit::pki::ca()
            .save(&certs.path().join("ca"))
            .unwrap_or_else(|e| panic!("{e}"));
        // A directory per certificate volume (compose-certs.yml binds them).
        for holder in [
            "formctl", "state-1", "state-2", "state-3", "vmm-1", "rplb-1", "rplb-2", "scaler-1",
            "mcp-1",
        ] {
            std::fs::create_dir_all(certs.path().join(holder)).expect("certs dir");
        }
        // form-certs runs as the image's unprivileged user.
        chown_tree(certs.path(), SERVICE_UID);
        Self {
            project: format!("form{label}{}", std::process::id()),
            env: vec![
                ("FORM_HTTP_PORT".into(), "127.0.0.1:".into()),
                ("FORM_HTTP_PORT_2".into(), "127.0.0.1:".into()),
                ("FORM_API_PORT".into(), "127.0.0.1:".into()),
                ("FORM_SUBNET".into(), format!("172.30.{n}.0/24")),
                ("FORM_VMM_IP".into(), format!("172.30.{n}.20")),
                ("FORM_VMM_IP_2".into(), format!("172.30.{n}.21")),
                ("FORM_TEST_CERTS".into(), certs.path().display().to_string()),
            ],
            files: all,
            certs,
        }
    }

    /// Runs docker-compose with `args` (and extra environment).
    pub fn cmd_env(&self, args: &[&str], extra: &[(&str, &str)]) -> std::process::Output {
        let mut c = Command::new("docker-compose");
        c.current_dir(repo()).arg("-p").arg(&self.project);
        for f in &self.files {
            c.arg("-f").arg(f);
        }
        c.args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(extra.iter().copied())
            .output()
            .expect("docker-compose")
    }

    /// Runs docker-compose with `args`; its stdout, or a panic with its stderr.
    pub fn ok(&self, args: &[&str]) -> String {
        self.ok_env(args, &[])
    }

    /// Like [`Compose::ok`] with extra environment.
    pub fn ok_env(&self, args: &[&str], extra: &[(&str, &str)]) -> String {
        let out = self.cmd_env(args, extra);
        assert!(
            out.status.success(),
            "docker-compose {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The host address a container port is published on.
    pub fn port(&self, service: &str, port: u16) -> SocketAddr {
        let out = self.ok(&["port", service, &port.to_string()]);
        let hp = out.trim().rsplit(':').next().expect("port").to_owned();
        format!("127.0.0.1:{hp}").parse().expect("addr")
    }

    /// The container id of `service`.
    pub fn container(&self, service: &str) -> String {
        self.ok(&["ps", "-q", service]).trim().to_owned()
    }

    /// The address of `service` on network `net` of the project (`form`, ...).
    pub fn ip(&self, service: &str, net: &str) -> String {
        let fmt = format!(
            "{{{{(index .NetworkSettings.Networks \"{}_{net}\").IPAddress}}}}",
            self.project
        );
        docker(&["inspect", "-f", &fmt, &self.container(service)])
            .trim()
            .to_owned()
    }

    /// `service:port` on the compose network, from the host.
    pub fn addr(&self, service: &str, port: u16) -> SocketAddr {
        format!("{}:{port}", self.ip(service, "form"))
            .parse()
            .expect("addr")
    }

    /// Starts the stack and waits until the demo answers through the balancer.
    pub async fn up_with_demo(&self) -> SocketAddr {
        self.ok(&["up", "-d"]);
        let lb = self.port("form-rplb", 8080);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
        loop {
            if let Ok((200, _, _)) = probe::http_call(lb, "GET", "/whoami", &DEMO_HOST, b"").await {
                return lb;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the demo never answered on {lb}: {}",
                self.ok(&["logs", "--tail", "20"])
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The API's admin token (`formctl tokens`; the logs do not show it).
    pub fn token(&self) -> String {
        assert!(
            !self
                .ok(&["logs", "form-keys"])
                .contains(&self.admin_token()),
            "the admin token is in form-keys' log"
        );
        self.admin_token()
    }

    fn admin_token(&self) -> String {
        self.ok(&[
            "run",
            "--rm",
            "--no-deps",
            "form-keys",
            "tokens",
            "--tokens-dir",
            "/tokens",
        ])
        .trim()
        .to_owned()
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What the controllers and nodes said, for the failure's reader.
            let logs = self.cmd_env(
                &[
                    "logs",
                    "--no-color",
                    "--tail",
                    "150",
                    "form-scaler",
                    "form-scaler-2",
                    "form-vmm",
                    "form-vmm-2",
                ],
                &[],
            );
            eprintln!(
                "the stack's last logs:\n{}{}",
                String::from_utf8_lossy(&logs.stdout),
                String::from_utf8_lossy(&logs.stderr)
            );
        }
        let _ = self.cmd_env(&["down", "-v", "--remove-orphans", "-t", "5"], &[]);
    }
}

/// The user the stack's containers run as (all but form-vmm).
pub const SERVICE_UID: u32 = 65532;

fn chown_tree(path: &std::path::Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(uid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    if path.is_dir() {
        for e in std::fs::read_dir(path).expect("read_dir").flatten() {
            chown_tree(&e.path(), uid);
        }
    }
}

/// What the kernel says of a container's main process: its real, effective, saved
/// and file-system uids (`Uid:`), effective capabilities (`CapEff:`, hex) and
/// `NoNewPrivs:`, read from the host's /proc.
pub fn process_status(container: &str) -> (Vec<u32>, u64, bool) {
    let pid = docker(&["inspect", "-f", "{{.State.Pid}}", container]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim()))
        .unwrap_or_else(|e| panic!("status of {container}: {e}"));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {status}"))
            .trim()
            .to_owned()
    };
    let uids = field("Uid:")
        .split_whitespace()
        .map(|u| u.parse().expect("uid"))
        .collect();
    let caps = u64::from_str_radix(&field("CapEff:"), 16).expect("CapEff");
    (uids, caps, field("NoNewPrivs:") == "1")
}

/// Runs `docker` with `args`; its stdout.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().expect("docker");
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The demo cluster's Host header.
pub const DEMO_HOST: [(&str, &str); 1] = [("Host", "demo.localhost")];

/// A JSON call to the API.
pub async fn api(
    api: SocketAddr,
    token: &str,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let auth = format!("Bearer {token}");
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
    ];
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let (code, _, text) = probe::http_call(api, method, path, &headers, body.as_bytes())
        .await
        .expect("API call");
    (
        code,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

/// Waits until operation `id` ends; its final JSON.
pub async fn wait_op(addr: SocketAddr, token: &str, id: &str) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (_, op) = api(
            addr,
            token,
            "GET",
            &format!("/api/v1/operations/{id}"),
            None,
        )
        .await;
        if ["completed", "failed", "rolled_back"].contains(&op["status"].as_str().unwrap_or("")) {
            return op;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "operation {id}: {op}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
