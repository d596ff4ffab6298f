//! The drop-in policy directory: every `*.wasm` in it is a policy slot, in
//! file-name order (`10-cpu.wasm` before `20-mem.wasm`).
//!
//! A policy controls every VM on the host, so a directory (or a policy file
//! in it) that group or others can write is refused, naming the path and
//! its mode: whoever can write there owns the host.

use std::path::{Path, PathBuf};

/// Why the directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// Writable by group or others.
    #[error("refusing policy path {path}: mode {mode:04o} is writable by group or others (run: chmod go-w {path})")]
    Unsafe {
        /// The path.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Unreadable.
    #[error("cannot read policy directory {path}")]
    Read {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// True for names the directory treats as policies.
pub fn is_policy_name(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "wasm") && path.file_name().is_some_and(|n| !n.to_string_lossy().starts_with('.'))
}

fn check_mode(path: &Path, meta: &std::fs::Metadata) -> Result<(), DirError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o022 != 0 {
            return Err(DirError::Unsafe { path: path.to_path_buf(), mode });
        }
    }
    Ok(())
}

/// Lists the policy files, in order. A missing directory is empty (the
/// embedded defaults run); an unsafe one is an error.
pub fn scan(dir: &Path) -> Result<Vec<PathBuf>, DirError> {
    let meta = match std::fs::metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(DirError::Read { path: dir.into(), source }),
    };
    check_mode(dir, &meta)?;
    let mut files = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|source| DirError::Read { path: dir.into(), source })?;
    for entry in entries {
        let entry = entry.map_err(|source| DirError::Read { path: dir.into(), source })?;
        let path = entry.path();
        if !is_policy_name(&path) {
            continue;
        }
        let Ok(meta) = std::fs::metadata(&path) else { continue }; // vanished meanwhile
        if !meta.is_file() {
            continue;
        }
        check_mode(&path, &meta)?;
        files.push(path);
    }
    files.sort();
    Ok(files)
}
