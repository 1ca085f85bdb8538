//! The gateway in front of the real platform for the API's tests: one form-state
//! replica, form-vmm-service (process backend), form-rplb, form-scaler and form-mcp
//! with a tokens file, each a process on free ports.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::time::Duration;

use form_testkit::conformance::PORT0_ARGS;
use form_testkit::replicas::{ReplicaOptions, Replicas};
use form_testkit::{ChildService, Signal, TestDir, probe, start, workspace_bin};
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_form-mcp");
pub const ADMIN: &str = "admin-token-for-tests-0001";
pub const READER: &str = "read-token-for-tests-00001";

/// The running platform with its gateway.
pub struct Gateway {
    pub dir: TestDir,
    pub replicas: Replicas,
    pub services: Vec<ChildService>,
    pub http: SocketAddr,
    pub balancer: SocketAddr,
}

impl Gateway {
    /// Starts everything; `scaler_extra` goes to form-scaler.
    pub async fn start(label: &str, scaler_extra: &[&str]) -> Self {
        let replicas = Replicas::start(
            &workspace_bin("form-state"),
            &format!("{label}-state"),
            ReplicaOptions::new(1),
        )
        .await;
        let state = replicas.addrs[0].to_string();
        let dir = TestDir::new(label);
        let data = dir.path().join("vmm");
        let with = |extra: &[&str]| -> Vec<String> {
            PORT0_ARGS
                .iter()
                .chain(extra)
                .map(|s| (*s).to_owned())
                .collect()
        };
        let vmm_args = with(&[
            "--state",
            &state,
            "--heartbeat-interval-ms",
            "200",
            "--data-dir",
            data.to_str().expect("utf-8"),
        ]);
        let vmm = start(
            &dir,
            "vmm",
            workspace_bin("form-vmm-service"),
            &run(&vmm_args),
        )
        .await;
        let vmm_addr = vmm.addr("grpc").expect("grpc").to_string();
        let rplb_args = with(&["--listen-http", "127.0.0.1:0", "--state", &state]);
        let rplb = start(&dir, "rplb", workspace_bin("form-rplb"), &run(&rplb_args)).await;
        let balancer = rplb.addr("http").expect("http");
        let rplb_addr = rplb.addr("grpc").expect("grpc").to_string();
        let mut scaler_args = with(&[
            "--state",
            &state,
            "--vmm",
            &vmm_addr,
            "--rplb",
            &rplb_addr,
            "--autoscale",
            "false",
        ]);
        scaler_args.extend(scaler_extra.iter().map(|s| (*s).to_owned()));
        let scaler = start(
            &dir,
            "scaler",
            workspace_bin("form-scaler"),
            &run(&scaler_args),
        )
        .await;
        let scaler_addr = scaler.addr("grpc").expect("grpc").to_string();
        let tokens = dir.path().join("tokens");
        std::fs::write(
            &tokens,
            format!("{ADMIN} admin tests\n{READER} read viewer\n"),
        )
        .expect("tokens");
        let mcp_args = with(&[
            "--state",
            &state,
            "--scaler",
            &scaler_addr,
            "--tokens-file",
            tokens.to_str().expect("utf-8"),
        ]);
        let mcp = start(&dir, "mcp", BIN, &run(&mcp_args)).await;
        let http = mcp.addr("http").expect("http");
        Self {
            dir,
            replicas,
            services: vec![mcp, scaler, rplb, vmm],
            http,
            balancer,
        }
    }

    /// A request with `token` (if any); returns the status and the JSON body.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (u16, Value) {
        self.call_with(
            method,
            path,
            token,
            &[],
            body.map(|b| b.to_string()).as_deref(),
        )
        .await
    }

    /// A request with extra headers and a raw body.
    pub async fn call_with(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> (u16, Value) {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut h: Vec<(&str, &str)> = headers.to_vec();
        if let Some(a) = &auth {
            h.push(("Authorization", a));
        }
        if body.is_some() {
            h.push(("Content-Type", "application/json"));
        }
        let (code, _, text) =
            probe::http_call(self.http, method, path, &h, body.unwrap_or("").as_bytes())
                .await
                .expect("request");
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (code, v)
    }

    /// Waits for operation `id` to end; returns its final JSON.
    pub async fn wait_op(&self, id: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (code, op) = self
                .call(
                    "GET",
                    &format!("/api/v1/operations/{id}"),
                    Some(READER),
                    None,
                )
                .await;
            if code == 200
                && ["completed", "failed", "rolled_back"]
                    .contains(&op["status"].as_str().unwrap_or(""))
            {
                return op;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "operation {id}: {code} {op}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops every process (the vmm node gracefully, so it deletes its instances).
    pub async fn stop(&mut self) {
        for s in &mut self.services {
            let _ = s.stop(Signal::SIGTERM, Duration::from_secs(20)).await;
        }
        self.replicas.stop().await;
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(vmm) = self.services.last_mut()
            && vmm.signal(Signal::SIGTERM).is_ok()
        {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while std::time::Instant::now() < deadline && matches!(vmm.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn run(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// A demo cluster's creation body.
pub fn demo_cluster(id: &str) -> Value {
    serde_json::json!({
        "cluster_id": id,
        "domain": format!("{id}.test"),
        "workload": {
            "command": workspace_bin("form-demo-app").display().to_string(),
            "health_path": "/healthz"
        },
        "policy": {
            "min_instances": 1,
            "max_instances": 4,
            "target_cpu_utilization": 0.5
        },
        "affinity": { "method": "cookie", "name": "FORM_SESSION", "ttl_seconds": 3600 }
    })
}
