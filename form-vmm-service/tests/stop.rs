//! A node's stop deletes its instances even while a client holds the gRPC server's
//! drain: an HTTP/2 client that never answers the server's goodbye kept the drain
//! busy until the service's graceful deadline, and the node exited without deleting
//! anything (its workloads were killed when its runtime was torn down, their
//! directories and cgroups left behind).

use form_proto::types::v1 as types;
use form_proto::vmm::v1 as pb;
use form_proto::vmm::v1::vmm_service_client::VmmServiceClient;
use form_testkit::conformance::stop_gracefully;
use form_testkit::{TestDir, probe, workspace_bin};

mod common;

#[tokio::test]
async fn a_client_that_never_answers_does_not_keep_the_instances_from_being_deleted() {
    let dir = TestDir::new("vmm-stop");
    let allowed = workspace_bin("form-demo-app").display().to_string();
    let (mut svc, mut c) = common::node(&dir, "vmm", &allowed).await;
    let id = format!("kept-{}", std::process::id());
    c.create_instance(pb::CreateInstanceRequest {
        instance_id: id.clone(),
        cluster_id: "web".into(),
        workload: Some(types::Workload {
            command: allowed.clone(),
            health_path: "/healthz".into(),
            ..Default::default()
        }),
        resources: None,
    })
    .await
    .expect("create");
    let instance_dir = dir.path().join("vmm-data/instances").join(&id);
    assert!(instance_dir.exists());

    // A client on a runtime of its own, which is then blocked: its connection is open
    // and answers nothing (as a client whose thread sleeps in a test's drop).
    let at = svc.addr("grpc").expect("grpc");
    let (connected, is_connected) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let mute = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let mut c = VmmServiceClient::new(probe::channel(at).await.expect("connect"));
            c.list_instances(pb::ListInstancesRequest::default())
                .await
                .expect("list");
            connected.send(()).expect("send");
            let _ = released.recv();
        });
    });
    is_connected.recv().expect("the mute client connected");

    stop_gracefully(&mut svc).await;
    assert!(
        !instance_dir.exists(),
        "the node stopped without deleting {id}; log:\n{}",
        svc.log_tail()
    );
    drop(release);
    mute.join().expect("the mute client");
}
