//! A compile cache for policy components.
//!
//! Compiling a 200 KB Rust component takes 0.1–0.2 s here, and a 12–18 MB
//! Python or JavaScript one 8–10 s; loading a cached one takes a few
//! milliseconds. Entries are keyed by the SHA-256 of the component bytes
//! **and** a hash of the engine's version and settings, so a cache written
//! by another wasmtime or another configuration is never used
//! (`Component::deserialize` would refuse it anyway; such a file is counted
//! as `rejected` and recompiled). The directory is bounded in size: the
//! oldest entries go first.
//!
//! **The cache is as trusted as the binary**: an entry is native code that
//! the daemon maps and runs as is, so anyone who can write one owns the
//! daemon's uid. Hence:
//! - the cache directory (and the daemon's state directory, through
//!   [`check_private_dir`]) must be a real directory owned by this uid and
//!   not writable by group or others, else there is no cache (a warning);
//! - an entry is read with one `open(O_NOFOLLOW)` and checked on that
//!   descriptor (`fstat`: a regular file owned by this uid, no group or
//!   other permission bits; entries are written 0600), then its SHA-256 is
//!   compared with its digest file before the bytes, already in memory, are
//!   deserialized. Anything else is a warning naming the file, counted
//!   (`untrusted`, `corrupt`, and all of them in `rejected`), and the entry is
//!   recompiled and overwritten. Never loaded.
//!
//! The digest catches corruption and torn or foreign writes of an entry; it
//! is not a signature (whoever can write the directory can write both).
//!
//! **Why a digest file per entry** (`<entry>.sha256`) and not one index: the
//! daemon and the offline commands (`policy check`, `simulate`) may share a
//! cache, and a read-modify-write of one index file by two processes loses
//! the entries of one of them. Each digest file is written like its entry:
//! a temporary file of this process and call alone, fsync'd, renamed into
//! place. The digest is renamed first, then the entry: a reader between the
//! two renames sees a mismatch or no entry, and recompiles; it never loads
//! bytes that do not match.

use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;

use super::sandbox::{compile, engine, PolicyError};

/// Counters, readable while the daemon runs (and asserted by the tests).
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Served from the cache.
    pub hits: AtomicU64,
    /// Compiled (and then stored).
    pub misses: AtomicU64,
    /// Entries not used, for any reason (untrusted, corrupt, or they did not
    /// deserialize: another engine): recompiled.
    pub rejected: AtomicU64,
    /// Of `rejected`: a symlink, not a regular file, owned by another uid,
    /// or with group or other permission bits.
    pub untrusted: AtomicU64,
    /// Of `rejected`: the digest file is missing or does not match.
    pub corrupt: AtomicU64,
    /// Entries removed to respect the size bound.
    pub evicted: AtomicU64,
}

/// Why a directory the daemon keeps native code or state in is refused.
#[derive(Debug, thiserror::Error)]
pub enum PrivateDirError {
    /// Could not be created.
    #[error("cannot create directory {path}")]
    Create {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Could not be examined.
    #[error("cannot examine directory {path}")]
    Stat {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A symlink (it could lead anywhere, and be changed later).
    #[error("directory {path} is a symlink; refusing it (point the config at the real directory)")]
    Symlink {
        /// The path.
        path: PathBuf,
    },
    /// Not a directory.
    #[error("{path} is not a directory")]
    NotDir {
        /// The path.
        path: PathBuf,
    },
    /// Owned by another uid.
    #[error("directory {path} is owned by another user (owner uid {owner_uid}, this process runs as uid {euid}); refusing to run native code or keep state there (run: chown {euid} {path})")]
    Owner {
        /// The path.
        path: PathBuf,
        /// Its owner.
        owner_uid: u32,
        /// This process's effective uid.
        euid: u32,
    },
    /// Writable by group or others.
    #[error("directory {path} has mode {mode:04o}, writable by group or others; refusing to run native code or keep state there (run: chmod go-w {path})")]
    Writable {
        /// The path.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// Checks that `path` is a directory only this process's uid can write:
/// not a symlink, owned by the effective uid, not writable by group or
/// others. Created (mode 0700, with missing parents) if missing. For the
/// compile cache, and for the daemon's state directory (lock file,
/// persisted state): whatever is read back from there is trusted.
pub fn check_private_dir(path: &Path) -> Result<(), PrivateDirError> {
    use std::os::unix::fs::DirBuilderExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
                .map_err(|source| PrivateDirError::Create { path: path.into(), source })?;
            std::fs::symlink_metadata(path).map_err(|source| PrivateDirError::Stat { path: path.into(), source })?
        }
        Err(source) => return Err(PrivateDirError::Stat { path: path.into(), source }),
    };
    if meta.file_type().is_symlink() {
        return Err(PrivateDirError::Symlink { path: path.into() });
    }
    if !meta.is_dir() {
        return Err(PrivateDirError::NotDir { path: path.into() });
    }
    let euid = crate::ffi::effective_uid();
    if meta.uid() != euid {
        return Err(PrivateDirError::Owner { path: path.into(), owner_uid: meta.uid(), euid });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(PrivateDirError::Writable { path: path.into(), mode });
    }
    Ok(())
}

/// Why one cache entry was not used (it is then recompiled and overwritten).
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    /// A symlink (refused by `O_NOFOLLOW`).
    #[error("compile cache file {path} is a symlink; refusing to follow it")]
    Symlink {
        /// The file.
        path: PathBuf,
    },
    /// A FIFO, directory, device...
    #[error("compile cache file {path} is not a regular file")]
    NotFile {
        /// The file.
        path: PathBuf,
    },
    /// Owned by another uid.
    #[error("compile cache file {path} is owned by uid {owner_uid}, not this process's uid {euid}; refusing to run native code someone else wrote")]
    Owner {
        /// The file.
        path: PathBuf,
        /// Its owner.
        owner_uid: u32,
        /// This process's effective uid.
        euid: u32,
    },
    /// Group or other permission bits set.
    #[error("compile cache file {path} has mode {mode:04o}; an entry must have no group or other permission bits (they are written 0600)")]
    Mode {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The entry has no digest file.
    #[error("compile cache entry {path} has no digest file {digest_path}")]
    DigestMissing {
        /// The entry.
        path: PathBuf,
        /// Where its digest should be.
        digest_path: PathBuf,
    },
    /// The entry's SHA-256 is not the one recorded.
    #[error("compile cache entry {path} has SHA-256 {actual}, but {digest_path} records {expected}: corrupt or written by someone else")]
    DigestMismatch {
        /// The entry.
        path: PathBuf,
        /// Its digest file.
        digest_path: PathBuf,
        /// The recorded digest.
        expected: String,
        /// The entry's digest.
        actual: String,
    },
    /// Could not be read.
    #[error("cannot read compile cache file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// wasmtime refused it (another engine version or settings).
    #[error("compile cache entry {path} does not deserialize: {detail}")]
    Deserialize {
        /// The entry.
        path: PathBuf,
        /// wasmtime's reason.
        detail: String,
    },
}

impl EntryError {
    /// The counter it goes to, besides `rejected`.
    fn counter<'a>(&self, stats: &'a CacheStats) -> Option<&'a AtomicU64> {
        match self {
            EntryError::Symlink { .. } | EntryError::NotFile { .. } | EntryError::Owner { .. } | EntryError::Mode { .. } => {
                Some(&stats.untrusted)
            }
            EntryError::DigestMissing { .. } | EntryError::DigestMismatch { .. } => Some(&stats.corrupt),
            EntryError::Read { .. } | EntryError::Deserialize { .. } => None,
        }
    }
}

/// Where an entry's digest is kept.
fn digest_path(entry: &Path) -> PathBuf {
    let mut name = entry.as_os_str().to_os_string();
    name.push(".sha256");
    PathBuf::from(name)
}

/// The whole of a private file: one `open(O_NOFOLLOW)`, checked with
/// `fstat` on that descriptor, read from it. `None` when it does not exist.
fn read_private(path: &Path) -> Result<Option<Vec<u8>>, EntryError> {
    let file = match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(EntryError::Symlink { path: path.into() }),
        Err(source) => return Err(EntryError::Read { path: path.into(), source }),
    };
    let meta = file.metadata().map_err(|source| EntryError::Read { path: path.into(), source })?;
    if !meta.is_file() {
        return Err(EntryError::NotFile { path: path.into() });
    }
    let euid = crate::ffi::effective_uid();
    if meta.uid() != euid {
        return Err(EntryError::Owner { path: path.into(), owner_uid: meta.uid(), euid });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(EntryError::Mode { path: path.into(), mode });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    (&file).read_to_end(&mut bytes).map_err(|source| EntryError::Read { path: path.into(), source })?;
    Ok(Some(bytes))
}

/// Writes `bytes` to `path` atomically, mode 0600: a temporary name of this
/// process and call alone (two processes sharing a cache never write into
/// one file, so a torn file is never renamed into place), fsync, rename.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static STORES: AtomicU64 = AtomicU64::new(0);
    let n = STORES.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp.{}.{n}", std::process::id()));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// The on-disk compile cache.
#[derive(Debug)]
pub struct CompileCache {
    dir: PathBuf,
    max_bytes: u64,
    engine_tag: String,
    stats: CacheStats,
}

impl CompileCache {
    /// A cache in `dir` (created, mode 0700) holding at most `max_bytes`.
    ///
    /// Refused (an error naming the directory) unless [`check_private_dir`]
    /// accepts it: a cache entry is native code that is run as is, so only
    /// its owner may ever have written it.
    pub fn new(dir: &Path, max_bytes: u64) -> Result<Self, PrivateDirError> {
        check_private_dir(dir)?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine().precompile_compatibility_hash().hash(&mut hasher);
        let engine_tag = format!("{:016x}", hasher.finish());
        Ok(CompileCache { dir: dir.to_path_buf(), max_bytes, engine_tag, stats: CacheStats::default() })
    }

    /// [`new`](Self::new) for the daemon and the offline commands: a cache
    /// that cannot be opened (unwritable, refused owner) is a warning and no
    /// cache, never a reason not to run; policies then compile at each load.
    pub fn open_or_warn(dir: &Path, max_mib: u64) -> Option<std::sync::Arc<Self>> {
        match CompileCache::new(dir, max_mib * 1024 * 1024) {
            Ok(cache) => Some(std::sync::Arc::new(cache)),
            Err(error) => {
                tracing::warn!(dir = %dir.display(), error = %crate::error_chain(&error), "no compile cache: policies are compiled at every load");
                None
            }
        }
    }

    /// The per-user cache the offline commands (`simulate`, `policy check`)
    /// use: `$XDG_CACHE_HOME/vm-balancer/compile-cache`, else
    /// `~/.cache/vm-balancer/compile-cache`; `None` without either
    /// variable. Not the daemon's `/var/lib`: an author's run must not need
    /// root, nor write where the daemon reads.
    pub fn user_dir() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".cache")))?;
        Some(base.join("vm-balancer").join("compile-cache"))
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Counters.
    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// The content hash used as the key, hex.
    pub fn content_hash(bytes: &[u8]) -> String {
        let digest = Sha256::digest(bytes);
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn entry(&self, bytes: &[u8]) -> PathBuf {
        self.dir.join(format!("{}-{}.cwasm", Self::content_hash(bytes), self.engine_tag))
    }

    /// The compiled component for `bytes`: from the cache, or compiled and
    /// stored. An entry that is refused (see the module docs) is a warning
    /// naming the file, counted, and recompiled; it is never loaded.
    pub fn component(&self, source_name: &str, bytes: &[u8]) -> Result<Component, PolicyError> {
        super::sandbox::check_header(source_name, bytes)?;
        let entry = self.entry(bytes);
        match self.load(&entry) {
            Ok(Some(component)) => {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(source = source_name, entry = %entry.display(), "compile cache hit");
                return Ok(component);
            }
            Ok(None) => {}
            Err(error) => {
                self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                if let Some(counter) = error.counter(&self.stats) {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                tracing::warn!(source = source_name, entry = %entry.display(), error = %crate::error_chain(&error), "compile cache entry rejected; recompiling");
                // The store below renames over it; removing it first means a
                // failed store leaves no refused entry behind either.
                let _ = std::fs::remove_file(&entry);
            }
        }
        let started = std::time::Instant::now();
        let component = compile(source_name, bytes)?;
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        tracing::info!(source = source_name, compile_ms = started.elapsed().as_millis() as u64, "compiled policy (cache miss)");
        if let Err(error) = self.store(&entry, &component) {
            tracing::warn!(entry = %entry.display(), %error, "cannot write compile cache entry");
        }
        Ok(component)
    }

    /// The entry's component; `None` if there is no entry.
    fn load(&self, entry: &Path) -> Result<Option<Component>, EntryError> {
        let Some(artifact) = read_private(entry)? else { return Ok(None) };
        let digest_path = digest_path(entry);
        let recorded = read_private(&digest_path)?
            .ok_or_else(|| EntryError::DigestMissing { path: entry.into(), digest_path: digest_path.clone() })?;
        let expected = String::from_utf8_lossy(&recorded).trim().to_string();
        let actual = Self::content_hash(&artifact);
        if expected != actual {
            return Err(EntryError::DigestMismatch { path: entry.into(), digest_path, expected, actual });
        }
        // The trust argument is in `ffi::deserialize_cached_component`.
        crate::ffi::deserialize_cached_component(engine(), &artifact)
            .map(Some)
            .map_err(|e| EntryError::Deserialize { path: entry.into(), detail: format!("{e:#}") })
    }

    /// Stores the digest, then the entry (see the module docs for why in
    /// that order), then evicts.
    fn store(&self, entry: &Path, component: &Component) -> std::io::Result<()> {
        let bytes = component.serialize().map_err(|e| std::io::Error::other(e.to_string()))?;
        write_private(&digest_path(entry), format!("{}\n", Self::content_hash(&bytes)).as_bytes())?;
        write_private(entry, &bytes)?;
        self.evict()
    }

    /// Removes the oldest entries until the directory fits the bound.
    fn evict(&self) -> std::io::Result<()> {
        let mut entries: Vec<(std::time::SystemTime, u64, PathBuf)> = std::fs::read_dir(&self.dir)?
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                Some((meta.modified().ok()?, meta.len(), e.path()))
            })
            .collect();
        let mut total: u64 = entries.iter().map(|e| e.1).sum();
        entries.sort();
        for (_, size, path) in entries {
            if total <= self.max_bytes {
                break;
            }
            std::fs::remove_file(&path)?;
            let _ = std::fs::remove_file(digest_path(&path));
            total -= size;
            self.stats.evicted.fetch_add(1, Ordering::Relaxed);
            tracing::info!(entry = %path.display(), "compile cache entry evicted (size bound)");
        }
        Ok(())
    }
}
