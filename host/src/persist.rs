//! What outlives one daemon process, in its state dir: the single-instance
//! lock and each domain's **originals** (the pins and balloon target it had
//! before the daemon first changed them).
//!
//! Why it is built this way:
//! - **One daemon per hypervisor.** Two daemons on one host fight over the
//!   same pins, each undoing the other. `run` takes an exclusive `flock` on
//!   `STATE_DIR/<uri>.lock` (one per libvirt URI) and writes its pid there;
//!   a second start exits 2 naming that pid. The kernel drops the lock when
//!   the process dies, however it dies, so no stale lock is ever left.
//! - **Originals on disk, not only in memory.** After a SIGKILL (OOM killer,
//!   `systemctl kill`) a restarted daemon would otherwise take its own pins
//!   for the originals and "restore" to them. The backend writes each
//!   domain's originals, keyed by UUID, as it learns them, atomically (a
//!   temporary file, fsync, rename): a crash mid-write leaves the previous
//!   file whole. The domain id is stored too, so a domain that restarted in
//!   between (its live state is new) is not restored to an old incarnation.
//! - **Trusted like the binary.** The state dir must be owned by the daemon's
//!   user and writable by nobody else, and so must every file read from it;
//!   an originals file that fails that check, is too big, or does not parse
//!   is ignored with a warning (the daemon then learns the originals again):
//!   whoever could write it could pin every VM anywhere.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Largest originals file read: 100,000 domains of 64 vCPUs fit well under it.
const MAX_ORIGINALS_BYTES: u64 = 64 * 1024 * 1024;

/// Errors of the state dir; each names the path involved.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The state dir (or a file in it) may be written by someone else.
    #[error("refusing state path {path}: {why}")]
    Unsafe {
        /// The path.
        path: PathBuf,
        /// What is wrong, and how to fix it.
        why: String,
    },
    /// Another daemon holds the lock for this URI.
    #[error("another vm-balancer (pid {pid}) is already running for {uri} (lock {path}); stop it first")]
    Locked {
        /// The URI.
        uri: String,
        /// The lock file.
        path: PathBuf,
        /// The pid written in it, or "unknown".
        pid: String,
    },
    /// The state dir itself is unsafe or cannot be made.
    #[error("state dir: {0}")]
    Dir(#[from] crate::policy::cache::PrivateDirError),
    /// A filesystem call failed.
    #[error("state file {path}: {operation} failed")]
    Io {
        /// The path.
        path: PathBuf,
        /// What was being done.
        operation: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(path: &'a Path, operation: &'static str) -> impl FnOnce(std::io::Error) -> StateError + 'a {
    move |source| StateError::Io { path: path.to_path_buf(), operation, source }
}

/// Refuses `meta` of `path` unless it is owned by this process's user and
/// not writable by group or others (and, for a directory, not a symlink).
pub fn check_private(path: &Path, meta: &std::fs::Metadata) -> Result<(), StateError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let euid = crate::ffi::effective_uid();
    let mode = meta.permissions().mode() & 0o7777;
    let why = if meta.file_type().is_symlink() {
        Some("it is a symlink".to_string())
    } else if meta.uid() != euid {
        Some(format!("it is owned by uid {}, and this daemon runs as uid {euid} (run: chown {euid} {})", meta.uid(), path.display()))
    } else if mode & 0o022 != 0 {
        Some(format!("mode {mode:04o} is writable by group or others (run: chmod go-w {})", path.display()))
    } else {
        None
    };
    why.map_or(Ok(()), |why| Err(StateError::Unsafe { path: path.to_path_buf(), why }))
}

/// The daemon's state dir, checked.
#[derive(Clone, Debug)]
pub struct StateDir {
    path: PathBuf,
}

impl StateDir {
    /// Creates `path` (mode 0700) if missing, and refuses it unless it is
    /// this user's and writable by nobody else (the compile cache's rule:
    /// [`check_private_dir`](crate::policy::cache::check_private_dir)).
    pub fn open(path: &Path) -> Result<Self, StateError> {
        crate::policy::cache::check_private_dir(path)?;
        Ok(StateDir { path: path.to_path_buf() })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the single-instance lock of `uri`, or says who holds it.
    pub fn lock(&self, uri: &str) -> Result<InstanceLock, StateError> {
        let path = self.path.join(format!("{}.lock", uri_key(uri)));
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io(&path, "open"))?;
        let meta = file.metadata().map_err(io(&path, "stat"))?;
        check_private(&path, &meta)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim().to_string();
                return Err(StateError::Locked { uri: uri.to_string(), path, pid: if pid.is_empty() { "unknown".into() } else { pid } });
            }
            Err(std::fs::TryLockError::Error(source)) => return Err(StateError::Io { path, operation: "flock", source }),
        }
        file.set_len(0).map_err(io(&path, "truncate"))?;
        file.write_all(format!("{}\n", std::process::id()).as_bytes()).map_err(io(&path, "write"))?;
        Ok(InstanceLock { _file: file, path })
    }

    /// The originals file of `uri`.
    pub fn originals(&self, uri: &str) -> OriginalsFile {
        OriginalsFile { path: self.path.join(format!("{}.originals.json", uri_key(uri))) }
    }
}

/// A file name for `uri`: its safe characters, and a hash so that two URIs
/// never share one (`qemu:///system` → `qemu-system-1a2b3c4d`).
pub(crate) fn uri_key(uri: &str) -> String {
    let mut readable: String = uri.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    while readable.contains("--") {
        readable = readable.replace("--", "-");
    }
    readable.truncate(48);
    let digest = Sha256::digest(uri.as_bytes());
    format!("{}-{:02x}{:02x}{:02x}{:02x}", readable.trim_matches('-'), digest[0], digest[1], digest[2], digest[3])
}

/// The held lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
    path: PathBuf,
}

impl InstanceLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// One domain's originals: what restore puts back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredDomain {
    /// Its name when last seen (for the log; UUID is the key).
    pub name: String,
    /// Its domain id then: another id means it restarted since.
    pub id: Option<u32>,
    /// Original affinity of each vCPU the daemon pinned, by vCPU.
    pub vcpus: BTreeMap<u32, Vec<u32>>,
    /// Balloon target at first sight, KiB.
    pub target_kib: Option<u64>,
}

/// Every domain's originals, by UUID.
pub type Originals = BTreeMap<String, StoredDomain>;

/// The on-disk file of one URI's originals.
#[derive(Clone, Debug)]
pub struct OriginalsFile {
    path: PathBuf,
}

impl OriginalsFile {
    /// A file at `path` (tests; the daemon's comes from [`StateDir::originals`]).
    pub fn at(path: &Path) -> Self {
        OriginalsFile { path: path.to_path_buf() }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads it. Missing: empty. Unsafe owner or mode, too big, or not
    /// parseable: an error (the caller warns and starts empty).
    pub fn load(&self) -> Result<Originals, StateError> {
        let path = &self.path;
        let mut file = match OpenOptions::new().read(true).custom_flags_nofollow().open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Originals::new()),
            Err(source) => return Err(StateError::Io { path: path.clone(), operation: "open", source }),
        };
        let meta = file.metadata().map_err(io(path, "stat"))?;
        check_private(path, &meta)?;
        if !meta.is_file() || meta.len() > MAX_ORIGINALS_BYTES {
            return Err(StateError::Unsafe {
                path: path.clone(),
                why: format!("not a regular file of at most {MAX_ORIGINALS_BYTES} bytes"),
            });
        }
        let mut text = String::new();
        Read::by_ref(&mut file).take(MAX_ORIGINALS_BYTES).read_to_string(&mut text).map_err(io(path, "read"))?;
        parse_originals(&text).map_err(|e| StateError::Io {
            path: path.clone(),
            operation: "parse",
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
    }

    /// Writes it atomically: a temporary file in the same directory, fsync,
    /// rename over the old one, fsync of the directory.
    pub fn save(&self, originals: &Originals) -> Result<(), StateError> {
        let path = &self.path;
        let dir = path.parent().unwrap_or(Path::new("."));
        let tmp = dir.join(format!(".{}.{}.tmp", path.file_name().map_or("originals".into(), |n| n.to_string_lossy()), std::process::id()));
        let text = serde_json::to_vec_pretty(originals).expect("originals serialize");
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io(&tmp, "create"))?;
            file.write_all(&text).map_err(io(&tmp, "write"))?;
            file.sync_all().map_err(io(&tmp, "fsync"))?;
        }
        std::fs::rename(&tmp, path).map_err(io(path, "rename"))?;
        if let Ok(dir) = File::open(dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

/// Decodes an originals file (untrusted bytes: a property test feeds it
/// garbage).
pub fn parse_originals(text: &str) -> Result<Originals, serde_json::Error> {
    serde_json::from_str(text)
}

/// `O_NOFOLLOW` on open: a symlink planted in place of a state file is an
/// error, not followed.
trait NoFollow {
    fn custom_flags_nofollow(&mut self) -> &mut Self;
}

impl NoFollow for OpenOptions {
    fn custom_flags_nofollow(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NOFOLLOW)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_keys_are_readable_and_distinct() {
        assert!(uri_key("qemu:///system").starts_with("qemu-system-"), "{}", uri_key("qemu:///system"));
        assert_ne!(uri_key("qemu:///system"), uri_key("qemu:///system/"));
        assert!(uri_key(&"x".repeat(500)).len() < 64);
    }

    #[test]
    fn originals_round_trip_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(&dir.path().join("state")).unwrap();
        let file = state.originals("qemu:///system");
        assert_eq!(file.load().unwrap(), Originals::new(), "missing is empty");
        let mut o = Originals::new();
        o.insert(
            "u1".into(),
            StoredDomain { name: "a".into(), id: Some(3), vcpus: BTreeMap::from([(0, vec![0, 1])]), target_kib: Some(262144) },
        );
        file.save(&o).unwrap();
        assert_eq!(file.load().unwrap(), o);
        let leftovers: Vec<_> = std::fs::read_dir(state.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn unsafe_state_dirs_and_files_are_refused_by_name() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = StateDir::open(&open).unwrap_err().to_string();
        assert!(e.contains("open") && e.contains("0777"), "{e}");
        let state = StateDir::open(&dir.path().join("ok")).unwrap();
        let file = state.originals("test:///default");
        file.save(&Originals::new()).unwrap();
        std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(file.load().unwrap_err().to_string().contains("0666"));
        std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::chown(file.path(), Some(65534), None).unwrap();
        assert!(file.load().unwrap_err().to_string().contains("owned by uid 65534"));
        std::fs::remove_file(file.path()).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", file.path()).unwrap();
        assert!(file.load().is_err(), "a symlink is not followed");
    }

    #[test]
    fn a_second_lock_names_the_holder_and_the_lock_dies_with_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let held = state.lock("qemu:///system").unwrap();
        let e = state.lock("qemu:///system").unwrap_err().to_string();
        assert!(e.contains(&format!("pid {}", std::process::id())) && e.contains("qemu:///system"), "{e}");
        state.lock("qemu:///session").expect("another URI has its own lock");
        drop(held);
        state.lock("qemu:///system").expect("released on drop");
    }

    /// Untrusted input: random bytes and mutations of a valid file never
    /// panic the decoder.
    #[test]
    fn the_originals_decoder_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let valid = br#"{"u1":{"name":"a","id":3,"vcpus":{"0":[0,1]},"target_kib":262144}}"#;
        for _ in 0..20_000 {
            let mut bytes = valid.to_vec();
            for _ in 0..rng.gen_range(1..6) {
                let i = rng.gen_range(0..bytes.len());
                match rng.gen_range(0..3) {
                    0 => bytes[i] = rng.gen(),
                    1 => {
                        bytes.remove(i);
                    }
                    _ => bytes.insert(i, b"{}[]\":,0-9e"[rng.gen_range(0..11)]),
                }
            }
            let _ = parse_originals(&String::from_utf8_lossy(&bytes));
        }
    }
}
