//! Loading a cluster of many members into a replica, with concurrent writers (group
//! commit makes them fast together).

use form_proto::state::v1 as pb;
use form_testkit::replicas::Replicas;

/// Concurrent writers.
const LOADERS: usize = 32;

/// The instance id of member `m`.
pub(crate) fn member_id(m: usize) -> String {
    format!("i-{m:06}")
}

/// Creates cluster `big` on replica 0 and adds `members` members to it.
pub(crate) async fn big_cluster(replicas: &Replicas, members: usize) -> anyhow::Result<()> {
    let mut c = replicas.client(0).await;
    c.put_cluster(pb::PutClusterRequest {
        cluster_id: "big".into(),
        ..Default::default()
    })
    .await?;
    let mut loaders = Vec::new();
    for l in 0..LOADERS {
        let mut c = replicas.client(0).await;
        loaders.push(tokio::spawn(async move {
            for m in (l..members).step_by(LOADERS) {
                let member = pb::Member {
                    instance_id: member_id(m),
                    node_id: "node-1".into(),
                    addresses: vec![format!("10.0.{}.{}:8080", m / 250, m % 250)],
                    ..Default::default()
                };
                c.add_member(pb::AddMemberRequest {
                    cluster_id: "big".into(),
                    member: Some(member),
                })
                .await?;
            }
            anyhow::Ok(())
        }));
    }
    for l in loaders {
        l.await??;
    }
    Ok(())
}
