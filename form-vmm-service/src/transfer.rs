//! Snapshots from node to node (docs/transfer.md). The node that has a snapshot
//! serves its files as streams of chunks, each with its SHA-256 ([`serve`]); the node
//! that needs it pulls them into `.incoming/<id>` ([`pull`]): every chunk is checked
//! against its hash (a wrong one is refused and fetched again), every file against the
//! manifest, and the manifest against the files the controller was told of at the
//! snapshot. A broken stream is opened again where the file stopped, and a later pull
//! of the same id resumes from what an earlier one left. The whole moves into the store
//! with one rename, so a snapshot is there whole or not at all.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Component, Path};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use form_proto::vmm::v1 as pb;
use form_proto::vmm::v1::vmm_service_client::VmmServiceClient;
use form_runtime::addr::HostPort;
use form_runtime::tls::Kind;
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::VmmError;
use crate::snapshots::{FORMAT_VERSION, MANIFEST, Manifest, SnapshotStore, file_digest};

/// Chunk size when the reader asks for none.
const DEFAULT_CHUNK: u32 = 1024 * 1024;
/// Largest chunk a reader may ask for.
const MAX_CHUNK: u32 = 4 * 1024 * 1024;
/// Largest gRPC message of a pull: a chunk and its framing.
pub const MAX_MESSAGE: usize = MAX_CHUNK as usize + 64 * 1024;
/// HTTP/2 flow-control window of a pull: two chunks.
const WINDOW: u32 = 2 * DEFAULT_CHUNK;
/// Largest manifest accepted from another node.
const MAX_MANIFEST: u64 = 4 * 1024 * 1024;
/// A pull gives up when no byte arrived for this long (the source gone for good).
const STALL: Duration = Duration::from_secs(30);
/// Chunks refused in a row before a pull gives up (a source that keeps sending damage).
const MAX_REFUSED: u32 = 8;

/// How this node takes part in transfers.
#[derive(Debug, Default)]
pub struct Settings {
    /// Bytes per second a pull may take at most; 0: no limit.
    pub max_bytes_per_second: u64,
    /// Bytes the snapshot store may hold at most; 0: what the disk has.
    pub store_max_bytes: u64,
    /// Test only: the chunk with this number (1-based, counted over every stream this
    /// node serves) goes out with one byte changed after its hash was taken.
    pub corrupt_chunk: u64,
    /// Chunks served so far.
    served: AtomicU64,
    /// A channel per source node pulled from, kept: a pull from a node pulled from
    /// before needs no new connection (and TLS handshake); a broken one reconnects.
    sources: std::sync::Mutex<std::collections::HashMap<HostPort, tonic::transport::Channel>>,
}

impl Settings {
    /// Settings with these limits and fault.
    pub fn new(max_bytes_per_second: u64, store_max_bytes: u64, corrupt_chunk: u64) -> Self {
        Self {
            max_bytes_per_second,
            store_max_bytes,
            corrupt_chunk,
            ..Default::default()
        }
    }
}

/// The stream of chunks of one file of a snapshot, as `ReadSnapshot` answers it.
pub type ChunkStream = ReceiverStream<Result<pb::SnapshotChunk, tonic::Status>>;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Serves one file of snapshot `r.snapshot_id` from `r.offset`: the manifest, or a
/// file it lists (no other path of the node can be read this way).
pub fn serve(
    store: &SnapshotStore,
    settings: std::sync::Arc<Settings>,
    r: pb::ReadSnapshotRequest,
) -> Result<ChunkStream, VmmError> {
    crate::spec::id("snapshot_id", &r.snapshot_id)?;
    let m = store.manifest(&r.snapshot_id)?;
    if r.path != MANIFEST && !m.files.iter().any(|f| f.path == r.path) {
        return Err(VmmError::invalid(
            "path",
            format!(
                "'{}' is not a file of snapshot {}; expected {MANIFEST} or a path its manifest lists",
                r.path, r.snapshot_id
            ),
        ));
    }
    let chunk = match r.chunk_bytes {
        0 => DEFAULT_CHUNK,
        n if (4096..=MAX_CHUNK).contains(&n) => n,
        n => {
            return Err(VmmError::invalid(
                "chunk_bytes",
                format!(
                    "{n} is out of range; expected 4096 to {MAX_CHUNK}, or 0 for {DEFAULT_CHUNK}"
                ),
            ));
        }
    };
    let path = store.dir(&r.snapshot_id).join(&r.path);
    let mut file =
        std::fs::File::open(&path).map_err(VmmError::io(format!("opening {}", path.display())))?;
    let size = file
        .metadata()
        .map_err(VmmError::io(format!("reading {}", path.display())))?
        .len();
    if r.offset > size {
        return Err(VmmError::invalid(
            "offset",
            format!("{} is past the end of {} ({size} bytes)", r.offset, r.path),
        ));
    }
    file.seek(SeekFrom::Start(r.offset))
        .map_err(VmmError::io(format!("seeking in {}", path.display())))?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut offset = r.offset;
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; chunk as usize];
        while offset < size {
            let want = (size - offset).min(u64::from(chunk)) as usize;
            if let Err(e) = file.read_exact(&mut buf[..want]) {
                let _ = tx.blocking_send(Err(tonic::Status::internal(format!(
                    "reading {} at {offset}: {e}",
                    path.display()
                ))));
                return;
            }
            let mut data = buf[..want].to_vec();
            let sha256 = hex(&Sha256::digest(&data));
            let n = settings.served.fetch_add(1, Ordering::Relaxed) + 1;
            if n == settings.corrupt_chunk {
                tracing::warn!(chunk = n, "test fault: a damaged chunk goes out");
                data[0] ^= 0xff;
            }
            let msg = pb::SnapshotChunk {
                offset,
                data,
                sha256,
                file_size: size,
            };
            if tx.blocking_send(Ok(msg)).is_err() {
                return; // the reader went away
            }
            offset += want as u64;
        }
    });
    Ok(ReceiverStream::new(rx))
}

/// What a pull did, counted as it goes.
#[derive(Debug, Default)]
struct Progress {
    received: u64,
    resumed: u64,
    reconnects: u32,
    refused: u32,
    /// When the last byte arrived (or the pull began).
    last_byte: Option<Instant>,
}

/// Keeps a pull under its rate: after `n` more bytes, sleeps as long as it got ahead.
struct Pace {
    rate: u64,
    start: Instant,
    bytes: u64,
}

impl Pace {
    async fn take(&mut self, n: u64) {
        if self.rate == 0 {
            return;
        }
        self.bytes += n;
        let due = Duration::from_secs_f64(self.bytes as f64 / self.rate as f64);
        let spent = self.start.elapsed();
        if due > spent {
            tokio::time::sleep(due - spent).await;
        }
    }
}

/// Whether `p` is a plain relative path inside a snapshot (no `..`, no root).
fn safe_path(p: &str) -> bool {
    !p.is_empty()
        && p != MANIFEST
        && Path::new(p)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

impl Settings {
    /// These settings, with the channel to the source node at `address` given (an
    /// in-memory network in tests) instead of dialled.
    pub fn with_source(self, address: HostPort, channel: tonic::transport::Channel) -> Self {
        self.sources
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(address, channel);
        self
    }
}

/// Pulls from one source that get a full window each on their shared connection.
const PULLS_SHARING: u32 = 4;

/// The channel to source node `from`, dialled the first time (one per source node of
/// the fleet; tonic redials a broken one at the next call).
fn source(settings: &Settings, from: HostPort) -> Result<tonic::transport::Channel, VmmError> {
    let mut sources = settings
        .sources
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(c) = sources.get(&from) {
        return Ok(c.clone());
    }
    let channel = form_runtime::tls::client::channel(Kind::Vmm, std::slice::from_ref(&from), |e| {
        e.connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            // Small windows keep the source close to the rate this node reads at, so
            // little is in flight when a link breaks. The connection is shared by the
            // pulls from one source: its window holds several streams' worth, so a
            // paced or slow pull does not hold the others back.
            .initial_stream_window_size(WINDOW)
            .initial_connection_window_size(WINDOW * PULLS_SHARING)
    })
    .map_err(|e| VmmError::invalid("from_address", e))?;
    sources.insert(from, channel.clone());
    Ok(channel)
}

/// Pulls snapshot `r.snapshot_id` from the node at `r.from_address` into `store`.
pub async fn pull(
    store: &SnapshotStore,
    settings: &Settings,
    r: pb::PullSnapshotRequest,
) -> Result<(Manifest, pb::PullSnapshotReply), VmmError> {
    let started = Instant::now();
    crate::spec::id("snapshot_id", &r.snapshot_id)?;
    let id = r.snapshot_id.clone();
    if let Ok(m) = store.manifest(&id) {
        let reply = pb::PullSnapshotReply {
            already_present: true,
            duration_ms: started.elapsed().as_millis() as u64,
            ..Default::default()
        };
        return Ok((m, reply));
    }
    let from: HostPort = r.from_address.parse().map_err(|e| {
        VmmError::invalid(
            "from_address",
            format!(
                "'{}': {e}; expected the source node's HOST:PORT",
                r.from_address
            ),
        )
    })?;
    let channel = source(settings, from)?;
    let client = VmmServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
    let rate = match (settings.max_bytes_per_second, r.max_bytes_per_second) {
        (0, n) | (n, 0) => n,
        (a, b) => a.min(b),
    };
    let mut pace = Pace {
        rate,
        start: Instant::now(),
        bytes: 0,
    };
    let mut progress = Progress {
        last_byte: Some(Instant::now()),
        ..Default::default()
    };
    let dir = store.incoming(&id);
    std::fs::create_dir_all(&dir).map_err(VmmError::io(format!("creating {}", dir.display())))?;
    // The manifest first, whole, then checked before a byte of the files is asked for.
    let raw = fetch_manifest(&client, &id, &mut progress).await?;
    let m = check_manifest(&id, &raw, &r.expected_files)?;
    if let Err(e) = check_room(store, settings, &dir, &m) {
        // No room: what an earlier pull left only takes space.
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e);
    }
    for f in &m.files {
        let path = dir.join(&f.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(VmmError::io(format!("creating {}", parent.display())))?;
        }
        fetch_file(&client, &id, f, &path, &mut progress, &mut pace).await?;
    }
    let path = dir.join(MANIFEST);
    write_synced(&path, &raw)?;
    store.install(&id)?;
    tracing::info!(snapshot = %id, from = %r.from_address, bytes = progress.received, resumed = progress.resumed, reconnects = progress.reconnects, refused = progress.refused, "snapshot pulled");
    let reply = pb::PullSnapshotReply {
        snapshot: None,
        bytes_received: progress.received,
        bytes_resumed: progress.resumed,
        reconnects: progress.reconnects,
        chunks_refused: progress.refused,
        duration_ms: started.elapsed().as_millis() as u64,
        already_present: false,
    };
    Ok((m, reply))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), VmmError> {
    let mut f = std::fs::File::create(path)
        .map_err(VmmError::io(format!("creating {}", path.display())))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(VmmError::io(format!("writing {}", path.display())))
}

/// The source's manifest, as it has it.
async fn fetch_manifest(
    client: &VmmServiceClient<tonic::transport::Channel>,
    id: &str,
    progress: &mut Progress,
) -> Result<Vec<u8>, VmmError> {
    loop {
        let mut out = Vec::new();
        match read_stream(client, id, MANIFEST, 0, |c| {
            if c.offset != out.len() as u64 || c.file_size > MAX_MANIFEST {
                return Err(format!(
                    "a manifest chunk at {} of {} bytes does not follow {} bytes (at most {MAX_MANIFEST})",
                    c.offset,
                    c.file_size,
                    out.len()
                ));
            }
            out.extend_from_slice(&c.data);
            Ok(())
        })
        .await
        {
            Ok(()) => return Ok(out),
            Err(Broken::Refused(why)) => return Err(why),
            Err(b) => again(progress, id, MANIFEST, b).await?,
        }
    }
}

/// Why a stream stopped before the end of its file.
enum Broken {
    /// The source said no (no such snapshot, a bad request): no point asking again.
    Refused(VmmError),
    /// The connection broke: ask again from where it stopped.
    Again(String),
    /// A chunk did not match its hash: refused, and asked for again.
    Damaged(String),
}

/// Reads one file from `offset` and hands each checked chunk to `take`.
async fn read_stream(
    client: &VmmServiceClient<tonic::transport::Channel>,
    id: &str,
    path: &str,
    offset: u64,
    mut take: impl FnMut(pb::SnapshotChunk) -> Result<(), String>,
) -> Result<(), Broken> {
    let req = pb::ReadSnapshotRequest {
        snapshot_id: id.to_owned(),
        path: path.to_owned(),
        offset,
        chunk_bytes: 0,
    };
    let mut stream = match client.clone().read_snapshot(req).await {
        Ok(s) => s.into_inner(),
        Err(s) => return Err(status_broken(id, s)),
    };
    loop {
        let chunk = match tokio::time::timeout(STALL, stream.next()).await {
            Err(_) => return Err(Broken::Again(format!("no chunk within {STALL:?}"))),
            Ok(None) => return Ok(()),
            Ok(Some(Err(s))) => return Err(status_broken(id, s)),
            Ok(Some(Ok(c))) => c,
        };
        let got = hex(&Sha256::digest(&chunk.data));
        if got != chunk.sha256 {
            return Err(Broken::Damaged(format!(
                "the chunk of {path} at {} has SHA-256 {got}, its hash says {}",
                chunk.offset, chunk.sha256
            )));
        }
        take(chunk).map_err(|why| Broken::Refused(VmmError::Backend(why)))?;
    }
}

fn status_broken(id: &str, s: tonic::Status) -> Broken {
    use tonic::Code;
    match s.code() {
        Code::NotFound | Code::InvalidArgument | Code::PermissionDenied | Code::Unimplemented => {
            Broken::Refused(VmmError::FailedPrecondition(format!(
                "the source node cannot give snapshot {id}: {} ({:?})",
                s.message(),
                s.code()
            )))
        }
        _ => Broken::Again(format!("{} ({:?})", s.message(), s.code())),
    }
}

/// Counts a broken stream and waits a little before it is opened again; gives up when
/// nothing arrived for [`STALL`] or too many chunks were refused in a row.
async fn again(progress: &mut Progress, id: &str, path: &str, b: Broken) -> Result<(), VmmError> {
    let why = match b {
        Broken::Refused(e) => return Err(e),
        Broken::Damaged(why) => {
            progress.refused += 1;
            metrics::counter!("form_vmm_transfer_chunks_refused_total").increment(1);
            tracing::warn!(snapshot = %id, file = %path, %why, "chunk refused; fetched again");
            why
        }
        Broken::Again(why) => {
            progress.reconnects += 1;
            metrics::counter!("form_vmm_transfer_reconnects_total").increment(1);
            tracing::info!(snapshot = %id, file = %path, %why, "transfer broken; resuming");
            why
        }
    };
    let idle = progress.last_byte.map_or(Duration::ZERO, |t| t.elapsed());
    if idle >= STALL || progress.refused >= MAX_REFUSED {
        return Err(VmmError::Unavailable(format!(
            "pulling snapshot {id}: {path}: {why} (nothing received for {idle:?}, {} chunks refused); what arrived is kept for a later pull",
            progress.refused
        )));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

/// The manifest `raw` of snapshot `id`, checked: its format, its id, safe paths, and
/// the files the controller expects.
fn check_manifest(
    id: &str,
    raw: &[u8],
    expected: &[pb::SnapshotFile],
) -> Result<Manifest, VmmError> {
    let bad = |message: String| {
        VmmError::FailedPrecondition(format!(
            "the source's manifest of snapshot {id} is refused: {message}"
        ))
    };
    let m: Manifest = serde_json::from_slice(raw).map_err(|e| bad(e.to_string()))?;
    if m.format_version != FORMAT_VERSION {
        return Err(bad(format!(
            "format version {}; this build reads {FORMAT_VERSION}",
            m.format_version
        )));
    }
    if m.snapshot_id != id {
        return Err(bad(format!("it names snapshot {}", m.snapshot_id)));
    }
    if let Some(f) = m.files.iter().find(|f| !safe_path(&f.path)) {
        return Err(bad(format!(
            "file path '{}' leaves the snapshot's directory",
            f.path
        )));
    }
    if !expected.is_empty() {
        let listed: Vec<(&str, u64, &str)> = m
            .files
            .iter()
            .map(|f| (f.path.as_str(), f.size_bytes, f.sha256.as_str()))
            .collect();
        let wanted: Vec<(&str, u64, &str)> = expected
            .iter()
            .map(|f| (f.path.as_str(), f.size_bytes, f.sha256.as_str()))
            .collect();
        if listed != wanted {
            return Err(bad(
                "its files, sizes or hashes differ from those reported when it was taken".into(),
            ));
        }
    }
    Ok(m)
}

/// Refuses a pull the store has no room for: what is still missing must fit in the
/// disk's free space and in the store's limit.
fn check_room(
    store: &SnapshotStore,
    settings: &Settings,
    dir: &Path,
    m: &Manifest,
) -> Result<(), VmmError> {
    let present: u64 = m
        .files
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(&f.path)).ok())
        .map(|md| md.len())
        .sum();
    let missing = m.size_bytes().saturating_sub(present);
    let free = store.free_bytes()?;
    if missing > free {
        return Err(VmmError::ResourceExhausted(format!(
            "snapshot {} needs {missing} more bytes; the disk of this node's snapshot store has {free} free",
            m.snapshot_id
        )));
    }
    let limit = settings.store_max_bytes;
    let used = store.usage_bytes();
    if limit > 0 && used + missing > limit {
        return Err(VmmError::ResourceExhausted(format!(
            "snapshot {} needs {missing} more bytes; this node's snapshot store holds {used} of its {limit} (--snapshot-store-max-mib)",
            m.snapshot_id
        )));
    }
    Ok(())
}

/// Fetches file `f` into `path`, from the end of what is there already; the whole is
/// then checked against the manifest (a file that fails is fetched again from zero
/// once).
async fn fetch_file(
    client: &VmmServiceClient<tonic::transport::Channel>,
    id: &str,
    f: &crate::snapshots::FileEntry,
    path: &Path,
    progress: &mut Progress,
    pace: &mut Pace,
) -> Result<(), VmmError> {
    let mut restarted = false;
    loop {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(VmmError::io(format!("opening {}", path.display())))?;
        let mut have = file
            .metadata()
            .map_err(VmmError::io(format!("reading {}", path.display())))?
            .len();
        if have > f.size_bytes {
            file.set_len(0)
                .map_err(VmmError::io(format!("truncating {}", path.display())))?;
            have = 0;
        }
        progress.resumed += have;
        while have < f.size_bytes {
            let mut got = 0u64;
            let r = read_stream(client, id, &f.path, have, |c| {
                if c.offset != have + got || c.file_size != f.size_bytes {
                    return Err(format!(
                        "a chunk of {} at {} (file of {} bytes) does not follow {} bytes of {}",
                        f.path,
                        c.offset,
                        c.file_size,
                        have + got,
                        f.size_bytes
                    ));
                }
                file.write_all(&c.data)
                    .map_err(|e| format!("writing {}: {e}", path.display()))?;
                got += c.data.len() as u64;
                Ok(())
            })
            .await;
            have += got;
            progress.received += got;
            if got > 0 {
                progress.last_byte = Some(Instant::now());
                pace.take(got).await;
            }
            match r {
                Ok(()) if have >= f.size_bytes => {}
                Ok(()) => {
                    let b = Broken::Again("the stream ended before the file did".into());
                    again(progress, id, &f.path, b).await?
                }
                Err(b) => again(progress, id, &f.path, b).await?,
            }
        }
        file.sync_all()
            .map_err(VmmError::io(format!("syncing {}", path.display())))?;
        drop(file);
        let (p, rel) = (path.to_path_buf(), std::path::PathBuf::from(&f.path));
        let (size, sha) = form_runtime::clock::blocking(move || file_digest(&p, &rel))
            .await
            .map_err(|e| VmmError::Backend(e.to_string()))?
            .map_err(VmmError::io(format!("hashing {}", path.display())))?;
        if size == f.size_bytes && sha == f.sha256 {
            return Ok(());
        }
        std::fs::remove_file(path).map_err(VmmError::io(format!("removing {}", path.display())))?;
        if restarted {
            return Err(VmmError::CorruptSnapshot {
                snapshot: id.to_owned(),
                file: path.to_path_buf(),
                message: "fetched twice, and twice its SHA-256 does not match the manifest".into(),
            });
        }
        tracing::warn!(snapshot = %id, file = %f.path, "the whole file does not match the manifest; fetched again from the start");
        restarted = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_leave_the_snapshot_are_refused() {
        for ok in ["memory.bin", "state/data.json", "workdir/a/b"] {
            assert!(safe_path(ok), "{ok}");
        }
        for bad in ["", "../x", "/etc/passwd", "state/../../x", "./x", MANIFEST] {
            assert!(!safe_path(bad), "{bad}");
        }
    }

    #[test]
    fn a_manifest_must_match_what_the_controller_was_told() {
        let m = Manifest {
            format_version: FORMAT_VERSION,
            snapshot_id: "s1".into(),
            backend: "process".into(),
            source_instance_id: "i".into(),
            cluster_id: "c".into(),
            generation: 0,
            workload: String::new(),
            vcpus: 1,
            memory_mib: 64,
            machine_args: vec![],
            created_at_ms: 1,
            files: vec![crate::snapshots::FileEntry {
                path: "state/a".into(),
                size_bytes: 3,
                sha256: "ab".into(),
            }],
            state_cursor: String::new(),
        };
        let raw = serde_json::to_vec(&m).expect("json");
        let same = vec![pb::SnapshotFile {
            path: "state/a".into(),
            size_bytes: 3,
            sha256: "ab".into(),
        }];
        assert!(check_manifest("s1", &raw, &same).is_ok());
        assert!(check_manifest("s1", &raw, &[]).is_ok());
        let other = vec![pb::SnapshotFile {
            sha256: "cd".into(),
            ..same[0].clone()
        }];
        let e = check_manifest("s1", &raw, &other).expect_err("other hash");
        assert!(e.to_string().contains("differ"), "{e}");
        let e = check_manifest("s2", &raw, &[]).expect_err("other id");
        assert!(e.to_string().contains("names snapshot s1"), "{e}");
        let mut evil = m.clone();
        evil.files[0].path = "../../etc/cron.d/x".into();
        let raw = serde_json::to_vec(&evil).expect("json");
        let e = check_manifest("s1", &raw, &[]).expect_err("traversal");
        assert!(e.to_string().contains("leaves"), "{e}");
    }
}
