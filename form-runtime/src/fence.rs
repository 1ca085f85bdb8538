//! Fencing tokens of cluster ownership (docs/fencing.md). The controller that owns a
//! cluster claims an epoch in form-state and passes it, in the `form-fence` header, on
//! every call that changes the cluster's instances, members or routes; a vmm node, a
//! balancer or a form-state replica refuses a call whose epoch is lower than the
//! highest it has seen for that cluster, and raises its highest to any higher one a
//! call carries.
//!
//! An epoch is one `u64`: a counter in the high 44 bits, and 20 bits of a hash of the
//! owner's id in the low ones, so that two controllers that claim at once (a partition)
//! never claim the same epoch (one of a million pairs of ids collide: they then hold
//! the same epoch, and the refusal falls back on the counter).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// The gRPC metadata key that carries a fence: `<epoch>/<owner>`.
pub const HEADER: &str = "form-fence";

/// Bits of the epoch that hold the owner's hash.
const OWNER_BITS: u32 = 20;

/// A cluster's epoch, with the controller that claimed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The epoch: higher is newer.
    pub epoch: u64,
    /// The controller that claimed it.
    pub owner: String,
}

impl Fence {
    /// The epoch after `highest` (0: none yet) claimed by `owner`.
    pub fn next(highest: u64, owner: &str) -> Self {
        let counter = (highest >> OWNER_BITS) + 1;
        let h = Sha256::digest(owner.as_bytes());
        let low = u64::from_be_bytes([0, 0, 0, 0, 0, h[0], h[1], h[2]]) & ((1 << OWNER_BITS) - 1);
        Self {
            epoch: (counter << OWNER_BITS) | low,
            owner: owner.to_owned(),
        }
    }

    /// The header value.
    pub fn header(&self) -> String {
        format!("{}/{}", self.epoch, self.owner)
    }

    /// Parses a header value; an error names what is accepted.
    pub fn parse(v: &str) -> Result<Self, String> {
        let (epoch, owner) = v
            .split_once('/')
            .ok_or_else(|| format!("'{v}' is not EPOCH/OWNER"))?;
        let epoch = epoch
            .parse()
            .map_err(|_| format!("'{v}': the epoch is not a number"))?;
        crate::ids::check(owner).map_err(|e| format!("'{v}': the owner {e}"))?;
        Ok(Self {
            epoch,
            owner: owner.to_owned(),
        })
    }

    /// The fence a request carries, if any; a malformed one is an error.
    pub fn of<T>(req: &tonic::Request<T>) -> Result<Option<Self>, tonic::Status> {
        let Some(v) = req.metadata().get(HEADER) else {
            return Ok(None);
        };
        let v = v
            .to_str()
            .map_err(|_| tonic::Status::invalid_argument(format!("{HEADER} is not text")))?;
        Self::parse(v)
            .map(Some)
            .map_err(|e| tonic::Status::invalid_argument(format!("{HEADER}: {e}")))
    }
}

/// Why a call was refused: its fence is older than one seen for the cluster.
pub fn stale(cluster: &str, call: &Fence, seen: &Fence) -> tonic::Status {
    tonic::Status::failed_precondition(format!(
        "stale fence: epoch {} of {} for cluster {cluster} is older than epoch {} of {} seen here; another controller owns the cluster now",
        call.epoch, call.owner, seen.epoch, seen.owner
    ))
}

/// Whether `s` is a refusal for a stale fence.
pub fn is_stale(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::FailedPrecondition && s.message().starts_with("stale fence")
}

/// The highest fence seen per cluster, by a vmm node or a balancer; kept in a file
/// when given one, so a restart does not forget it.
#[derive(Debug, Default)]
pub struct Fences {
    seen: Mutex<HashMap<String, Fence>>,
    file: Option<PathBuf>,
    /// The fences of calls that found an id absent, newest last (see
    /// [`Fences::saw_absent`]).
    absent: Mutex<(HashMap<String, Fence>, std::collections::VecDeque<String>)>,
}

/// How many absent ids [`Fences`] remembers.
const ABSENT_KEPT: usize = 4096;

impl Fences {
    /// Fences kept in `file`, and the fences of absent ids in `file` with the
    /// extension `absent` (each read now when it exists; an unreadable or malformed
    /// file is an error that names it).
    pub fn in_file(file: PathBuf) -> Result<Self, String> {
        let seen = read(&file, "CLUSTER")?.into_iter().collect();
        let mut absent = (HashMap::new(), std::collections::VecDeque::new());
        for (id, f) in read(&absent_file(&file), "ID")? {
            if absent.0.insert(id.clone(), f).is_none() {
                absent.1.push_back(id);
            }
        }
        Ok(Self {
            seen: Mutex::new(seen),
            file: Some(file),
            absent: Mutex::new(absent),
        })
    }

    /// Checks a call on `cluster` carrying `fence` (none: not fenced, as an operator's
    /// call): refused when older than the highest seen, else raises the highest.
    pub fn check(&self, cluster: &str, fence: Option<&Fence>) -> Result<(), tonic::Status> {
        let Some(f) = fence else {
            return Ok(());
        };
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match seen.get(cluster) {
            Some(s) if s.epoch > f.epoch => return Err(stale(cluster, f, s)),
            Some(s) if s.epoch == f.epoch => return Ok(()),
            _ => {}
        }
        let before = seen.insert(cluster.to_owned(), f.clone());
        if let Some(file) = &self.file {
            let mut lines: Vec<String> = seen
                .iter()
                .map(|(c, f)| format!("{c} {}", f.header()))
                .collect();
            lines.sort();
            if let Err(e) = keep(file, &lines) {
                // Not kept, not raised: a restart would forget it.
                match before {
                    Some(b) => seen.insert(cluster.to_owned(), b),
                    None => seen.remove(cluster),
                };
                return Err(unkept(file, &e));
            }
        }
        Ok(())
    }

    /// Notes that a call carrying `fence` found nothing named `id` (an instance or a
    /// snapshot), so could not tell its cluster: an undo deleting what a stale run has
    /// not made yet. A later creation of `id` under an older epoch is refused
    /// ([`Fences::check_absent`]), so that run cannot leave it behind. The newest
    /// 4,096 ids are kept (in their file too, when the fences have one).
    /// An error when it cannot be kept in the file (the call is then refused: a
    /// restart would forget it).
    pub fn saw_absent(&self, id: &str, fence: &Fence) -> Result<(), tonic::Status> {
        let mut guard = self
            .absent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (fences, order) = &mut *guard;
        match fences.get_mut(id) {
            Some(f) if f.epoch >= fence.epoch => return Ok(()),
            Some(f) => *f = fence.clone(),
            None => {
                fences.insert(id.to_owned(), fence.clone());
                order.push_back(id.to_owned());
                if order.len() > ABSENT_KEPT
                    && let Some(old) = order.pop_front()
                {
                    fences.remove(&old);
                }
            }
        }
        if let Some(file) = &self.file {
            let lines: Vec<String> = order
                .iter()
                .filter_map(|id| fences.get(id).map(|f| format!("{id} {}", f.header())))
                .collect();
            let file = absent_file(file);
            // Kept in memory all the same: it only ever refuses more.
            keep(&file, &lines).map_err(|e| unkept(&file, &e))?;
        }
        Ok(())
    }

    /// Checks the creation of `id` by a call carrying `fence`: refused when a call of
    /// a newer epoch found `id` absent before ([`Fences::saw_absent`]).
    pub fn check_absent(&self, id: &str, fence: Option<&Fence>) -> Result<(), tonic::Status> {
        let Some(f) = fence else {
            return Ok(());
        };
        let guard = self
            .absent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match guard.0.get(id) {
            Some(seen) if seen.epoch > f.epoch => Err(tonic::Status::failed_precondition(format!(
                "stale fence: epoch {} of {} may not make {id}: a call of epoch {} of {} found it absent here before (it undid what {id} was for); another controller owns its cluster now",
                f.epoch, f.owner, seen.epoch, seen.owner
            ))),
            _ => Ok(()),
        }
    }

    /// The highest fence seen for `cluster`.
    pub fn highest(&self, cluster: &str) -> Option<Fence> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(cluster)
            .cloned()
    }
}

/// Where the fences of absent ids are kept beside `file` (`<file>.absent`).
fn absent_file(file: &std::path::Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".absent");
    PathBuf::from(name)
}

/// The refusal of a call whose fence could not be kept.
fn unkept(file: &std::path::Path, e: &std::io::Error) -> tonic::Status {
    tonic::Status::unavailable(format!(
        "cannot keep the fence in {}: {e}; the call is refused rather than forgotten at a restart",
        file.display()
    ))
}

/// The `KEY EPOCH/OWNER` lines of `file` (none when it does not exist).
fn read(file: &std::path::Path, key: &str) -> Result<Vec<(String, Fence)>, String> {
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", file.display())),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (k, f) = l
                .split_once(' ')
                .ok_or_else(|| format!("{}: '{l}' is not {key} EPOCH/OWNER", file.display()))?;
            let f = Fence::parse(f).map_err(|e| format!("{}: {e}", file.display()))?;
            Ok((k.to_owned(), f))
        })
        .collect()
}

/// Writes `lines` to `file` durably: a synced temporary file renamed over it, then
/// the directory synced (the rename itself survives a machine crash).
fn keep(file: &std::path::Path, lines: &[String]) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = file.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all((lines.join("\n") + "\n").as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, file)?;
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_grow_and_differ_by_owner() {
        let a = Fence::next(0, "scaler-a");
        let b = Fence::next(0, "scaler-b");
        assert_ne!(a.epoch, b.epoch, "two claims at once differ");
        let c = Fence::next(a.epoch.max(b.epoch), "scaler-a");
        assert!(c.epoch > a.epoch && c.epoch > b.epoch);
        assert_eq!(Fence::parse(&c.header()), Ok(c));
        for bad in ["12", "x/scaler", "12/", "12/../x"] {
            assert!(Fence::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn older_fences_are_refused_newer_ones_raise_and_survive_a_restart() {
        let dir = std::env::temp_dir().join(format!("fences-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("fences");
        let f = Fences::in_file(file.clone()).expect("fences");
        let old = Fence::next(0, "a");
        let new = Fence::next(old.epoch, "b");
        assert!(f.check("web", None).is_ok(), "unfenced calls pass");
        assert!(f.check("web", Some(&old)).is_ok());
        assert!(f.check("web", Some(&new)).is_ok());
        let e = f.check("web", Some(&old)).expect_err("stale");
        assert!(is_stale(&e), "{e:?}");
        assert!(
            e.message().contains("another controller owns"),
            "{}",
            e.message()
        );
        assert!(f.check("other", Some(&old)).is_ok(), "per cluster");
        f.saw_absent("web-9", &new).expect("kept");
        let again = Fences::in_file(file.clone()).expect("read back");
        assert!(
            again.check_absent("web-9", Some(&old)).is_err(),
            "an absent id's fence is kept across a restart"
        );
        assert!(again.check_absent("web-8", Some(&old)).is_ok());
        assert!(
            again.check("web", Some(&old)).is_err(),
            "kept across a restart"
        );
        assert_eq!(again.highest("web"), Some(new));
        std::fs::write(&file, "web 12\n").expect("write");
        let e = Fences::in_file(file).expect_err("malformed");
        assert!(e.contains("fences") && e.contains("EPOCH/OWNER"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn an_id_found_absent_under_a_newer_epoch_is_not_made_under_an_older_one() {
        let f = Fences::default();
        let (old, new) = (Fence::next(0, "c-1"), Fence::next(1 << 30, "c-2"));
        assert!(
            f.check_absent("web-1", Some(&old)).is_ok(),
            "nothing seen yet"
        );
        f.saw_absent("web-1", &new).expect("kept");
        let refused = f.check_absent("web-1", Some(&old)).expect_err("stale");
        assert!(is_stale(&refused), "{refused:?}");
        assert!(refused.message().contains("web-1"), "{refused:?}");
        assert!(
            f.check_absent("web-1", Some(&new)).is_ok(),
            "the newer epoch may"
        );
        assert!(
            f.check_absent("web-1", None).is_ok(),
            "an operator's call may"
        );
        assert!(
            f.check_absent("web-2", Some(&old)).is_ok(),
            "another id may"
        );
        // An older absence does not lower what was seen.
        f.saw_absent("web-1", &old).expect("kept");
        assert!(f.check_absent("web-1", Some(&old)).is_err());
        // Bounded: the oldest ids are forgotten.
        for i in 0..ABSENT_KEPT {
            f.saw_absent(&format!("x-{i}"), &new).expect("kept");
        }
        assert!(f.check_absent("web-1", Some(&old)).is_ok(), "forgotten");
        assert!(f.check_absent("x-1", Some(&old)).is_err());
    }
}
