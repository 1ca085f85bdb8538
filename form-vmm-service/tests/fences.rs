//! A vmm node keeps the fences it has seen across a restart (docs/fencing.md): once a
//! call of a newer epoch reached it, a call of an older one is refused after the node
//! restarted, both for a cluster's instances and for an id the newer call found
//! absent. Without them, a stale controller could make instances on a node that had
//! just restarted, which nothing would then delete.

use form_proto::types::v1 as types;
use form_proto::vmm::v1 as pb;
use form_proto::vmm::v1::vmm_service_client::VmmServiceClient;
use form_runtime::fence::{Fence, HEADER, is_stale};
use form_testkit::conformance::stop_gracefully;
use form_testkit::{ChildService, TestDir, workspace_bin};
use tonic::transport::Channel;

mod common;

/// A node on `dir`'s data directory (the same one at each start), named `name`.
async fn node(dir: &TestDir, name: &str) -> (ChildService, VmmServiceClient<Channel>) {
    let allowed = workspace_bin("form-demo-app").display().to_string();
    common::node(dir, name, &allowed).await
}

fn fenced<T>(msg: T, fence: &Fence) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert(HEADER, fence.header().parse().expect("header"));
    r
}

fn demo(id: &str, cluster: &str) -> pb::CreateInstanceRequest {
    pb::CreateInstanceRequest {
        instance_id: id.into(),
        cluster_id: cluster.into(),
        workload: Some(types::Workload {
            command: workspace_bin("form-demo-app").display().to_string(),
            health_path: "/healthz".into(),
            ..Default::default()
        }),
        resources: None,
    }
}

fn gone(id: &str) -> pb::InstanceRef {
    pb::InstanceRef {
        instance_id: id.into(),
    }
}

#[tokio::test]
async fn a_restarted_node_refuses_what_it_refused_before() {
    let dir = TestDir::new("vmm-fences");
    let old = Fence::next(0, "ctl-old");
    let new = Fence::next(old.epoch, "ctl-new");
    let (mut svc, mut c) = node(&dir, "vmm").await;
    c.create_instance(fenced(demo("a", "web"), &old))
        .await
        .expect("create under the old epoch");
    // The new owner deletes it, and deletes a clone the old one has not made yet.
    c.delete_instance(fenced(gone("a"), &new))
        .await
        .expect("delete under the new epoch");
    let absent = c
        .delete_instance(fenced(gone("web-late"), &new))
        .await
        .expect_err("absent");
    assert_eq!(absent.code(), tonic::Code::NotFound, "{absent:?}");
    stop_gracefully(&mut svc).await;

    let (mut svc, mut c) = node(&dir, "vmm-again").await;
    let e = c
        .create_instance(fenced(demo("b", "web"), &old))
        .await
        .expect_err("the cluster's fence outlived the restart");
    assert!(is_stale(&e), "{e:?}");
    assert!(e.message().contains("ctl-new"), "{}", e.message());
    let e = c
        .create_instance(fenced(demo("web-late", "other"), &old))
        .await
        .expect_err("the absent id's fence outlived the restart");
    assert!(is_stale(&e), "{e:?}");
    assert!(e.message().contains("web-late"), "{}", e.message());
    let listed = c
        .list_instances(pb::ListInstancesRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(listed.instances.is_empty(), "{listed:?}");
    // The owner's epoch still passes.
    c.create_instance(fenced(demo("b", "web"), &new))
        .await
        .expect("create under the new epoch");
    stop_gracefully(&mut svc).await;
}
