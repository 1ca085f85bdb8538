//! What the process tests of form-vmm-service share.
// Each test crate includes this module and uses only some of it.
#![allow(dead_code)]

use std::path::Path;

use form_proto::types::v1 as types;
use form_proto::vmm::v1 as pb;
use form_proto::vmm::v1::vmm_service_client::VmmServiceClient;
use form_testkit::conformance::PORT0_ARGS;
use form_testkit::{ChildService, TestDir, probe, start, workspace_bin};
use tonic::transport::Channel;

/// The service's binary.
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_form-vmm-service");

/// A process-backend node named `name` on `dir`'s data directory (the same one at
/// each start), allowing `allowed` (commands, comma-separated), and a client of it.
pub(crate) async fn node(
    dir: &TestDir,
    name: &str,
    allowed: &str,
) -> (ChildService, VmmServiceClient<Channel>) {
    let data = dir.path().join("vmm-data");
    let args = [
        PORT0_ARGS,
        &[
            "--data-dir",
            data.to_str().expect("utf-8"),
            "--allowed-commands",
            allowed,
        ],
    ]
    .concat();
    let svc = start(dir, name, Path::new(BIN), &args).await;
    let client = VmmServiceClient::new(
        probe::channel(svc.addr("grpc").expect("grpc"))
            .await
            .expect("connect"),
    );
    (svc, client)
}

/// Instance `id` of cluster `web` whose shell runs `script` (a line of its own, so it
/// may end in `&`), then becomes the demo app (`exec`), checked on `/healthz`.
pub(crate) fn shell_then_demo(id: &str, script: &str) -> pb::CreateInstanceRequest {
    pb::CreateInstanceRequest {
        instance_id: id.into(),
        cluster_id: "web".into(),
        workload: Some(types::Workload {
            command: "/bin/sh".into(),
            args: vec![
                "-c".into(),
                format!(
                    "{script}\nexec {}",
                    workspace_bin("form-demo-app").display()
                ),
            ],
            health_path: "/healthz".into(),
            ..Default::default()
        }),
        resources: None,
    }
}
