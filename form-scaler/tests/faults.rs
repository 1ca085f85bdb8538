//! A fault injected at every step of every operation, against the real platform: a
//! step before the commit rolls the operation back, a step after it is retried and the
//! operation completes; either way members, instances, balancer backends agree and no
//! snapshot is left.

mod common;

use std::time::Duration;

use common::*;
use form_proto::scaler::v1 as pb;
use form_proto::scaler::v1::scaler_service_client::ScalerServiceClient;
use form_proto::types::v1::{OperationKind, Resources};
use form_scaler::ops::plan;
use form_testkit::assert_eventually;
use tonic::transport::Channel;

const OP_DEADLINE: Duration = Duration::from_secs(60);

async fn run(scaler: &mut ScalerServiceClient<Channel>, req: pb::ScaleRequest) -> String {
    let reply = scaler.scale(req).await.expect("accepted").into_inner();
    status(&wait_op(scaler, &reply.operation_id, OP_DEADLINE).await)
}

/// Brings the cluster to `n` members with a controller without faults.
async fn prepare(stack: &mut Stack, n: usize) {
    let have = stack.members().await.len();
    if have == n {
        return;
    }
    let mut scaler = stack.start_scaler(&[]).await;
    let kind = if have < n {
        OperationKind::ScaleOut
    } else {
        OperationKind::ScaleIn
    };
    let s = run(&mut scaler, scale(kind, n as u32)).await;
    assert_eq!(s, "completed", "preparing {n} members");
    stack.stop_scaler().await;
}

fn request(kind: OperationKind, stack_members: &[String]) -> pb::ScaleRequest {
    match kind {
        OperationKind::ScaleOut => scale(kind, 3),
        OperationKind::ScaleIn => scale(kind, 1),
        OperationKind::ReplaceInstance => pb::ScaleRequest {
            instance_id: stack_members
                .iter()
                .find(|m| *m != TEMPLATE)
                .expect("a non-template member")
                .clone(),
            ..scale(kind, 0)
        },
        _ => pb::ScaleRequest {
            target_resources: Some(Resources {
                vcpus: 1,
                memory_mib: 128,
            }),
            ..scale(kind, 0)
        },
    }
}

#[tokio::test]
async fn a_fault_at_every_step_rolls_back_or_completes_and_leaks_nothing() {
    let mut stack = Stack::start("faults").await;
    for kind in [
        OperationKind::ScaleOut,
        OperationKind::ScaleIn,
        OperationKind::ReplaceInstance,
        OperationKind::Resize,
    ] {
        for step in plan::steps(kind) {
            let before = if kind == OperationKind::ScaleOut {
                1
            } else {
                2
            };
            prepare(&mut stack, before).await;
            let members = stack.members().await;
            let previous = stack.cluster().await.resources;
            let fault = step.name();
            let mut scaler = stack.start_scaler(&["--inject-fault", fault]).await;
            let outcome = run(&mut scaler, request(kind, &members)).await;
            let what = format!("{kind:?} with a fault at {fault}");
            let after = stack.members().await;
            if step.commits() {
                assert_eq!(outcome, "completed", "{what}");
            } else {
                assert!(outcome.starts_with("rolled_back"), "{what}: {outcome}");
                if kind != OperationKind::Resize {
                    assert_eq!(after, members, "{what}: members changed");
                }
                assert_eq!(
                    stack.cluster().await.resources,
                    previous,
                    "{what}: resources"
                );
            }
            assert_eventually!(
                deadline = Duration::from_secs(20),
                stack.agree(),
                "{what}: members {:?}, instances {:?}, backends {:?}, snapshots {:?}",
                stack.members().await,
                stack.instances().await,
                stack.backends().await,
                stack.snapshots().await
            );
            stack.stop_scaler().await;
        }
    }
    // Replacing the template: a fault before the commit restores it as the template.
    for step in plan::steps(OperationKind::ReplaceInstance) {
        if step.commits() {
            continue;
        }
        prepare(&mut stack, 2).await;
        let members = stack.members().await;
        assert!(members.contains(&TEMPLATE.to_owned()));
        let mut scaler = stack.start_scaler(&["--inject-fault", step.name()]).await;
        let req = pb::ScaleRequest {
            instance_id: TEMPLATE.into(),
            ..scale(OperationKind::ReplaceInstance, 0)
        };
        let outcome = run(&mut scaler, req).await;
        let what = format!("replacing the template with a fault at {}", step.name());
        assert!(outcome.starts_with("rolled_back"), "{what}: {outcome}");
        assert_eq!(
            stack.cluster().await.template_instance_id,
            TEMPLATE,
            "{what}"
        );
        assert_eq!(stack.members().await, members, "{what}");
        assert_eventually!(stack.agree(), "{what}: nothing leaked");
        stack.stop_scaler().await;
    }
    stack.stop().await;
}
