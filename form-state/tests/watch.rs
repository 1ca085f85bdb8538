//! A quiet `Watch` stream carries progress marks, and a follower
//! (`form_runtime::watch::follow`) takes a replica that hangs as lost and opens
//! another stream once it answers again.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use form_proto::state::v1 as pb;
use form_runtime::shutdown;
use form_runtime::watch::{self, Follower};
use form_testkit::replicas::{ReplicaOptions, Replicas};
use nix::sys::signal::Signal;
use tokio::time::{Instant, timeout};

const BIN: &str = env!("CARGO_BIN_EXE_form-state");

#[tokio::test]
async fn a_quiet_stream_gets_progress_marks() {
    let mut replicas = Replicas::start(Path::new(BIN), "watch-marks", ReplicaOptions::new(1)).await;
    let mut client = replicas.client(0).await;
    let mut stream = client
        .watch(watch::from_start())
        .await
        .expect("watch")
        .into_inner();
    let deadline = Duration::from_secs(10);
    let synced = loop {
        let ev = timeout(deadline, stream.message())
            .await
            .expect("the snapshot comes")
            .expect("stream")
            .expect("event");
        if matches!(ev.change, Some(pb::watch_event::Change::Synced(_))) {
            break ev.sequence;
        }
    };
    // Nothing the stream carries changes, though the replica does: a controller's
    // heartbeats every 200 ms. What comes next is a mark, at the sequence last sent.
    let mut writer = client.clone();
    let beats = tokio::spawn(async move {
        loop {
            let beat = pb::ControllerHeartbeatRequest {
                controller_id: "c1".into(),
                ..Default::default()
            };
            writer.controller_heartbeat(beat).await.expect("heartbeat");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let mark = timeout(deadline, stream.message())
        .await
        .expect("a quiet stream still sends within 10 s")
        .expect("stream")
        .expect("event");
    beats.abort();
    assert_eq!(mark.change, None, "a progress mark carries no change");
    assert_eq!(mark.sequence, synced);
    replicas.stop().await;
}

/// What a follower saw: snapshots completed, progress marks and streams lost.
#[derive(Default)]
struct Seen {
    synced: usize,
    marks: usize,
    lost: usize,
}

struct Counting(Arc<Mutex<Seen>>);

impl Follower for Counting {
    fn event(&mut self, ev: pb::WatchEvent) {
        let mut seen = self.0.lock().expect("not poisoned");
        match ev.change {
            Some(pb::watch_event::Change::Synced(_)) => seen.synced += 1,
            None => seen.marks += 1,
            _ => {}
        }
    }

    fn lost(&mut self) {
        self.0.lock().expect("not poisoned").lost += 1;
    }
}

async fn wait_for(seen: &Arc<Mutex<Seen>>, what: &str, cond: impl Fn(&Seen) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond(&seen.lock().expect("not poisoned")) {
        assert!(Instant::now() < deadline, "{what} within 20 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_follower_leaves_a_hung_replica_and_comes_back_when_it_answers() {
    let mut replicas = Replicas::start(Path::new(BIN), "watch-stall", ReplicaOptions::new(1)).await;
    let client = replicas.client(0).await;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (stop, stopped) = shutdown::channel();
    let follower = {
        let seen = seen.clone();
        tokio::spawn(async move {
            let open = || {
                let mut c = client.clone();
                async move { Ok(c.watch(watch::from_start()).await?.into_inner()) }
            };
            watch::follow("test", open, &mut Counting(seen), stopped).await;
        })
    };
    wait_for(&seen, "a first snapshot", |s| s.synced == 1).await;
    // Quiet, not stalled: marks (one a second) keep the stream alive past the stall
    // timeout.
    let marks = watch::STALLED.as_secs() as usize + 1;
    wait_for(&seen, "marks for longer than the stall timeout", |s| {
        s.marks >= marks
    })
    .await;
    assert_eq!(
        seen.lock().expect("not poisoned").lost,
        0,
        "a quiet stream is not lost"
    );

    let proc = replicas.procs[0].as_ref().expect("replica 0 runs");
    proc.signal(Signal::SIGSTOP).expect("SIGSTOP");
    let stopped_at = Instant::now();
    wait_for(&seen, "the hung stream taken as lost", |s| s.lost >= 1).await;
    assert!(
        stopped_at.elapsed() >= watch::STALLED - Duration::from_millis(100),
        "lost only after {:?} of silence",
        watch::STALLED
    );
    proc.signal(Signal::SIGCONT).expect("SIGCONT");
    wait_for(&seen, "a new snapshot once the replica answers", |s| {
        s.synced >= 2
    })
    .await;

    stop.trigger(shutdown::ShutdownKind::Fast);
    follower.await.expect("the follower stops");
    replicas.stop().await;
}
