//! A compile cache for policy components.
//!
//! Compiling a 200 KB Rust component takes 0.1–0.2 s here, and a 12–18 MB
//! Python or JavaScript one 8–10 s; deserializing a cached one takes well
//! under a millisecond. Entries are keyed by the SHA-256 of the component
//! bytes **and** a hash of the engine's version and settings, so a cache
//! written by another wasmtime or another configuration is never used
//! (`Component::deserialize` would refuse it anyway; such a file is counted
//! as `rejected` and recompiled). The directory is bounded in size: the
//! oldest entries go first.

use std::hash::{Hash, Hasher};
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
    /// Cache files that did not deserialize (other engine, corrupt): recompiled.
    pub rejected: AtomicU64,
    /// Entries removed to respect the size bound.
    pub evicted: AtomicU64,
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
    /// Refused (an error naming the directory) when `dir` is a symlink or is
    /// not owned by the user running this: a cache entry is native code that
    /// is run as is, so only its owner may ever have written it.
    pub fn new(dir: &Path, max_bytes: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::{MetadataExt, PermissionsExt};
            let meta = std::fs::symlink_metadata(dir)?;
            let euid = crate::ffi::effective_uid();
            if meta.file_type().is_symlink() || meta.uid() != euid {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!(
                        "compile cache {} is {} (owner uid {}, this process runs as uid {euid}); refusing to run native code from it",
                        dir.display(),
                        if meta.file_type().is_symlink() { "a symlink" } else { "owned by another user" },
                        meta.uid()
                    ),
                ));
            }
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
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
                tracing::warn!(dir = %dir.display(), %error, "no compile cache: policies are compiled at every load");
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

    /// The compiled component for `bytes`: from the cache, or compiled and stored.
    pub fn component(&self, source_name: &str, bytes: &[u8]) -> Result<Component, PolicyError> {
        super::sandbox::check_header(source_name, bytes)?;
        let entry = self.entry(bytes);
        if entry.exists() {
            // The trust argument is in `ffi::deserialize_cached_component`.
            match crate::ffi::deserialize_cached_component(engine(), &entry) {
                Ok(component) => {
                    self.stats.hits.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(source = source_name, entry = %entry.display(), "compile cache hit");
                    return Ok(component);
                }
                Err(error) => {
                    self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(source = source_name, entry = %entry.display(), %error, "compile cache entry rejected; recompiling");
                    let _ = std::fs::remove_file(&entry);
                }
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

    fn store(&self, entry: &Path, component: &Component) -> std::io::Result<()> {
        let bytes = component.serialize().map_err(|e| std::io::Error::other(e.to_string()))?;
        // A temporary name of this process and call alone: two processes
        // sharing a cache (two `simulate` runs of one file) must never write
        // into the same file, or a torn entry could be renamed into place.
        static STORES: AtomicU64 = AtomicU64::new(0);
        let n = STORES.fetch_add(1, Ordering::Relaxed);
        let tmp = entry.with_extension(format!("tmp.{}.{n}", std::process::id()));
        std::fs::write(&tmp, &bytes)?;
        if let Err(error) = std::fs::rename(&tmp, entry) {
            let _ = std::fs::remove_file(&tmp);
            return Err(error);
        }
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
            total -= size;
            self.stats.evicted.fetch_add(1, Ordering::Relaxed);
            tracing::info!(entry = %path.display(), "compile cache entry evicted (size bound)");
        }
        Ok(())
    }
}
