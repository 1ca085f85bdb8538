//! Acknowledged writes survive `kill -9`; a removed member stays removed after a
//! restart; a torn last log record is dropped while a corrupt one in the middle stops
//! start-up with an error naming the file and offset.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use form_proto::state::v1 as pb;
use form_testkit::{ChildService, Signal, probe};

async fn client(
    p: &ChildService,
) -> form_proto::state::v1::state_service_client::StateServiceClient<tonic::transport::Channel> {
    let ch = probe::channel(p.addr("grpc").expect("grpc"))
        .await
        .expect("connect");
    form_proto::state::v1::state_service_client::StateServiceClient::new(ch)
}

#[tokio::test]
async fn acknowledged_writes_survive_kill_9_and_removed_members_stay_removed() {
    let mut solo = replicas("kill9", 1, false).await;
    let mut p = solo.procs[0].take().expect("running");
    let mut c = client(&p).await;
    c.put_cluster(cluster("web")).await.expect("cluster");
    c.add_member(member("web", "gone")).await.expect("add");
    c.remove_member(pb::RemoveMemberRequest {
        cluster_id: "web".into(),
        instance_id: "gone".into(),
    })
    .await
    .expect("remove");

    // Writers as fast as they can; every acknowledged id is recorded.
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut writers = Vec::new();
    for w in 0..8 {
        let (mut c, acked) = (client(&p).await, acked.clone());
        writers.push(tokio::spawn(async move {
            for n in 0.. {
                let id = format!("m-{w}-{n}");
                match c.add_member(member("web", &id)).await {
                    Ok(_) => acked.lock().expect("lock").push(id),
                    Err(_) => return,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    p.signal(Signal::SIGKILL).expect("kill -9");
    for w in writers {
        w.await.expect("writer");
    }
    p.wait_timeout(Duration::from_secs(5))
        .await
        .expect("wait")
        .expect("exited");
    let acked = acked.lock().expect("lock").clone();
    assert!(
        acked.len() > 20,
        "only {} writes were acknowledged",
        acked.len()
    );

    let p = solo.launch(0).await;
    let mut c = client(&p).await;
    let present = members(&mut c, "web").await;
    let missing: Vec<&String> = acked.iter().filter(|id| !present.contains(id)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged writes lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(
        !present.contains(&"gone".to_owned()),
        "a removed member came back"
    );
}

fn segment(solo: &Replicas) -> std::path::PathBuf {
    let wal = solo.data_dir(0).join("wal");
    let mut segs: Vec<_> = std::fs::read_dir(&wal)
        .expect("wal dir")
        .map(|e| e.expect("entry").path())
        .collect();
    segs.sort();
    segs.pop().expect("a segment")
}

#[tokio::test]
async fn a_torn_tail_is_dropped_and_a_corrupt_middle_stops_start_up() {
    let mut solo = replicas("torn", 1, false).await;
    let mut p = solo.procs[0].take().expect("running");
    let mut c = client(&p).await;
    c.put_cluster(cluster("web")).await.expect("cluster");
    for i in 0..5 {
        c.add_member(member("web", &format!("m{i}")))
            .await
            .expect("add");
    }
    form_testkit::conformance::stop_gracefully(&mut p).await;

    // A record cut short at the end: dropped with a warning, everything else kept.
    let seg = segment(&solo);
    let mut bytes = std::fs::read(&seg).expect("read");
    let good_len = bytes.len();
    bytes.extend_from_slice(b"FWAL\x01\x01\x40\x00\x00\x00partial");
    std::fs::write(&seg, &bytes).expect("write");
    let mut p = solo.launch(0).await;
    let mut c = client(&p).await;
    assert_eq!(members(&mut c, "web").await.len(), 5);
    assert!(
        p.log_tail().contains("torn"),
        "warning expected:\n{}",
        p.log_tail()
    );
    form_testkit::conformance::stop_gracefully(&mut p).await;
    assert_eq!(
        std::fs::metadata(&seg).expect("stat").len() as usize,
        good_len,
        "the torn tail was cut off"
    );

    // A flipped byte in the middle: start-up stops, naming file and offset.
    let mut bytes = std::fs::read(&seg).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&seg, &bytes).expect("write");
    match ChildService::start(solo.spec(0)).await {
        Err(form_testkit::ChildError::ExitedEarly {
            status, log_tail, ..
        }) => {
            assert_eq!(status.code(), Some(1));
            assert!(
                log_tail.contains(&seg.display().to_string()) && log_tail.contains("offset"),
                "{log_tail}"
            );
        }
        Ok(_) => panic!("started on a corrupt log"),
        Err(e) => panic!("unexpected: {e}"),
    }
}
