//! Which processes make up the local stack, on which addresses, with which flags.
//! Pure: no process is started here.

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

/// One process of the stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Process {
    /// Name in messages, logs and the ready file, e.g. `form-state-2`.
    pub(crate) name: String,
    /// Binary name.
    pub(crate) bin: &'static str,
    /// Main listener (gRPC, or HTTP for form-mcp).
    pub(crate) listen: SocketAddr,
    /// Metrics listener.
    pub(crate) metrics: SocketAddr,
    /// Every flag but `--ready-file`.
    pub(crate) args: Vec<OsString>,
}

/// Ports of the stack: the main and metrics port of each process, in plan order.
pub(crate) type Ports = [(u16, u16); 7];

/// The documented default ports.
pub(crate) const DEFAULT_PORTS: Ports = [
    (3004, 9004),
    (3014, 9014),
    (3024, 9024),
    (3002, 9002),
    (3005, 9005),
    (3006, 9006),
    (3010, 9010),
];

const STATE_REPLICAS: usize = 3;
/// Where `formctl up`'s instances serve (its vmm node's instance host is loopback).
const LOOPBACK_NETWORKS: &str = "127.0.0.0/8,::1/128";

/// The authorized keys file the state replicas share.
pub(crate) fn authorized_keys(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("authorized_keys")
}

/// The stack: 3 state replicas that gossip with each other, then vmm, rplb, scaler and
/// the gateway, each pointed at the services it talks to. Order = start order.
/// The balancer's HTTP port when ports are the documented defaults.
pub(crate) const DEFAULT_HTTP_PORT: u16 = 8080;

pub(crate) fn stack(host: IpAddr, ports: &Ports, http_port: u16, data_dir: &Path) -> Vec<Process> {
    let addr = |i: usize| SocketAddr::new(host, ports[i].0);
    let metrics = |i: usize| SocketAddr::new(host, ports[i].1);
    let list = |idx: &[usize]| {
        idx.iter()
            .map(|i| addr(*i).to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let states: Vec<usize> = (0..STATE_REPLICAS).collect();
    let state_list = list(&states);
    let base = |i: usize| -> Vec<OsString> {
        vec![
            "--listen".into(),
            addr(i).to_string().into(),
            "--metrics-listen".into(),
            metrics(i).to_string().into(),
        ]
    };
    let mut out = Vec::new();
    for i in states.iter().copied() {
        let peers: Vec<usize> = states.iter().copied().filter(|j| *j != i).collect();
        let name = format!("form-state-{}", i + 1);
        let mut args = base(i);
        args.extend([
            "--peers".into(),
            list(&peers).into(),
            "--data-dir".into(),
            data_dir.join(&name).into_os_string(),
            "--replica-id".into(),
            format!("state-{}", i + 1).into(),
            "--authorized-keys".into(),
            authorized_keys(data_dir).into_os_string(),
            // Instances serve on this host's loopback, and nowhere else.
            "--member-networks".into(),
            LOOPBACK_NETWORKS.into(),
        ]);
        out.push(Process {
            name,
            bin: "form-state",
            listen: addr(i),
            metrics: metrics(i),
            args,
        });
    }
    let (vmm, rplb, scaler, mcp) = (3, 4, 5, 6);
    let mut with = |i: usize, bin: &'static str, extra: Vec<(&str, String)>| {
        let mut args = base(i);
        for (flag, value) in extra {
            args.push(flag.into());
            args.push(value.into());
        }
        out.push(Process {
            name: bin.to_owned(),
            bin,
            listen: addr(i),
            metrics: metrics(i),
            args,
        });
    };
    with(
        vmm,
        "form-vmm-service",
        vec![
            ("--state", state_list.clone()),
            ("--node-id", "node-1".into()),
            ("--data-dir", data_dir.join("vmm").display().to_string()),
        ],
    );
    with(
        rplb,
        "form-rplb",
        vec![
            ("--state", state_list.clone()),
            (
                "--listen-http",
                SocketAddr::new(host, http_port).to_string(),
            ),
            ("--backend-networks", LOOPBACK_NETWORKS.into()),
            // Kept in the data directory: sessions stay pinned across restarts.
            (
                "--cookie-key-file",
                crate::cookie_key::path(data_dir).display().to_string(),
            ),
        ],
    );
    with(
        scaler,
        "form-scaler",
        vec![
            ("--state", state_list.clone()),
            ("--vmm", list(&[vmm])),
            ("--rplb", list(&[rplb])),
        ],
    );
    with(
        mcp,
        "form-mcp",
        vec![
            ("--state", state_list),
            ("--scaler", list(&[scaler])),
            (
                "--tokens-file",
                crate::tokens::path(data_dir).display().to_string(),
            ),
        ],
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_peer_with_each_other_and_services_find_their_upstreams() {
        let host: IpAddr = "127.0.0.1".parse().expect("ip");
        let plan = stack(host, &DEFAULT_PORTS, DEFAULT_HTTP_PORT, Path::new("/d"));
        let names: Vec<&str> = plan.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "form-state-1",
                "form-state-2",
                "form-state-3",
                "form-vmm-service",
                "form-rplb",
                "form-scaler",
                "form-mcp"
            ]
        );
        let arg = |p: &Process, flag: &str| {
            let i = p
                .args
                .iter()
                .position(|a| a == flag)
                .unwrap_or_else(|| panic!("{} lacks {flag}", p.name));
            p.args[i + 1].to_string_lossy().into_owned()
        };
        assert_eq!(arg(&plan[0], "--peers"), "127.0.0.1:3014,127.0.0.1:3024");
        assert_eq!(arg(&plan[1], "--peers"), "127.0.0.1:3004,127.0.0.1:3024");
        assert_eq!(arg(&plan[2], "--data-dir"), "/d/form-state-3");
        assert_eq!(arg(&plan[2], "--replica-id"), "state-3");
        assert_eq!(arg(&plan[0], "--authorized-keys"), "/d/authorized_keys");
        assert_eq!(arg(&plan[4], "--cookie-key-file"), "/d/cookie.key");
        assert_eq!(arg(&plan[5], "--rplb"), "127.0.0.1:3005");
        assert_eq!(arg(&plan[6], "--scaler"), "127.0.0.1:3006");
        assert_eq!(arg(&plan[6], "--listen"), "127.0.0.1:3010");
        assert_eq!(arg(&plan[6], "--tokens-file"), "/d/tokens");
        let mut all: Vec<SocketAddr> = plan.iter().flat_map(|p| [p.listen, p.metrics]).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 14, "every listener has its own address");
    }
}
