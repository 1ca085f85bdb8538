//! Helpers of the form-state end-to-end tests, over `form_testkit::replicas`.

#![allow(dead_code, unreachable_pub, unused_imports)]

use std::path::Path;

use form_proto::state::v1 as pb;
use form_proto::state::v1::state_service_client::StateServiceClient;
pub use form_testkit::replicas::{ReplicaOptions, Replicas, digest, metric_sum};
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_form-state");

/// Fast gossip for tests.
pub fn fast_gossip() -> Vec<String> {
    [
        "--sync-interval-ms",
        "50",
        "--anti-entropy-interval-ms",
        "200",
    ]
    .map(String::from)
    .to_vec()
}

/// `count` replicas with fast gossip, proxied or not.
pub async fn replicas(label: &str, count: usize, proxied: bool) -> Replicas {
    let opts = ReplicaOptions {
        count,
        proxied,
        extra_args: fast_gossip(),
        extra_peers: Vec::new(),
    };
    Replicas::start(Path::new(BIN), label, opts).await
}

pub fn cluster(id: &str) -> pb::PutClusterRequest {
    pb::PutClusterRequest {
        cluster_id: id.into(),
        ..Default::default()
    }
}

pub fn member(cluster: &str, instance: &str) -> pb::AddMemberRequest {
    pb::AddMemberRequest {
        cluster_id: cluster.into(),
        member: Some(pb::Member {
            instance_id: instance.into(),
            node_id: "node-1".into(),
            addresses: vec!["127.0.0.1:9".into()],
            ..Default::default()
        }),
    }
}

pub async fn members(client: &mut StateServiceClient<Channel>, cluster: &str) -> Vec<String> {
    match client
        .get_cluster(pb::GetClusterRequest {
            cluster_id: cluster.into(),
        })
        .await
    {
        Ok(c) => {
            let mut m: Vec<String> = c.into_inner().members.into_keys().collect();
            m.sort();
            m
        }
        Err(_) => Vec::new(),
    }
}
