//! The drop-in policy directory: every `*.wasm` in it is a policy slot, in
//! file-name order (`10-cpu.wasm` before `20-mem.wasm`).
//!
//! A policy controls every VM on the host, so the directory, its policy
//! files and every directory above it are held to the rule of
//! [`super::file`] (owned by root or the daemon's user, not writable by
//! group or others, up to `/`); a breach refuses the whole directory, naming
//! the path: whoever can write there owns the host.
//!
//! The scan never opens an entry (opening a FIFO blocks). What it skips it
//! reports as a [`Note`]: symlinks that are followed (with their target),
//! FIFOs, sockets and devices named `*.wasm`, directories named `*.wasm`,
//! dangling links. The loader logs each once per path and change.
//!
//! More policy files than `policy_max_slots` refuse the whole directory,
//! like an unsafe one: the running policies stay, so a file too many never
//! pushes a running policy out (as taking the first N in name order would).

use std::path::{Path, PathBuf};

use super::file::{check_ancestors, check_path, kind_of, PolicyFileError};

/// Why the directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// The directory, a policy file in it or a directory above it breaks
    /// the owner/mode rule.
    #[error(transparent)]
    Unsafe(#[from] PolicyFileError),
    /// Unreadable.
    #[error("cannot read policy directory {path}")]
    Read {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// More policy files than `policy_max_slots`.
    #[error("refusing policy directory {path}: {count} policy files, over policy_max_slots = {max_slots} (remove some, or raise policy_max_slots in the config); the running policies stay")]
    TooManySlots {
        /// The directory.
        path: PathBuf,
        /// Policy files found.
        count: usize,
        /// The bound.
        max_slots: usize,
    },
}

/// Something in the directory worth one log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Note {
    /// A symlink to a regular file: followed (info).
    Symlink {
        /// What the link says.
        link: PathBuf,
        /// Where it leads.
        target: PathBuf,
    },
    /// A symlink to nothing: skipped (warn).
    Dangling {
        /// What the link says.
        link: PathBuf,
    },
    /// Not a regular file (FIFO, directory, socket, device): skipped, never opened (warn).
    NotRegular {
        /// What it is.
        kind: &'static str,
    },
}

impl Note {
    /// Logs the note for `path`.
    pub fn log(&self, path: &Path) {
        match self {
            Note::Symlink { link, target } => {
                tracing::info!(file = %path.display(), link = %link.display(), target = %target.display(), "policy file is a symlink; following it")
            }
            Note::Dangling { link } => {
                tracing::warn!(file = %path.display(), link = %link.display(), "policy file is a dangling symlink; skipped")
            }
            Note::NotRegular { kind } => {
                tracing::warn!(file = %path.display(), kind, "policy name is not a regular file; skipped, never opened")
            }
        }
    }
}

/// One scan: the policy files in order, and what is worth a log line.
#[derive(Debug, Default)]
pub struct Scan {
    /// Policy files (regular files, or links to them), in file-name order.
    pub files: Vec<PathBuf>,
    /// Per path, what the loader logs once.
    pub notes: Vec<(PathBuf, Note)>,
}

/// True for names the directory treats as policies.
pub fn is_policy_name(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "wasm") && path.file_name().is_some_and(|n| !n.to_string_lossy().starts_with('.'))
}

/// Lists the policy files, in order. A missing directory is empty (the
/// embedded defaults run); an unsafe one, or one with more than `max_slots`
/// policy files, is an error.
pub fn scan(dir: &Path, max_slots: usize) -> Result<Scan, DirError> {
    let meta = match std::fs::metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Scan::default()),
        Err(source) => return Err(DirError::Read { path: dir.into(), source }),
    };
    check_path(dir, &meta)?;
    check_ancestors(dir)?;
    let mut scan = Scan::default();
    let entries = std::fs::read_dir(dir).map_err(|source| DirError::Read { path: dir.into(), source })?;
    for entry in entries {
        let entry = entry.map_err(|source| DirError::Read { path: dir.into(), source })?;
        let path = entry.path();
        if !is_policy_name(&path) {
            continue;
        }
        let Ok(own_type) = entry.file_type() else { continue }; // vanished meanwhile
        let link = own_type.is_symlink().then(|| std::fs::read_link(&path).ok()).flatten();
        // stat(2), not open(2): follows a link, never blocks.
        let meta = match std::fs::metadata(&path) {
            Ok(meta) => meta,
            Err(_) => {
                if let Some(link) = link {
                    scan.notes.push((path, Note::Dangling { link }));
                }
                continue; // a dangling link, or vanished meanwhile
            }
        };
        if !meta.is_file() {
            scan.notes.push((path, Note::NotRegular { kind: kind_of(meta.file_type()) }));
            continue;
        }
        check_path(&path, &meta)?;
        if let Some(link) = link {
            let target = std::fs::canonicalize(&path).unwrap_or_else(|_| link.clone());
            scan.notes.push((path.clone(), Note::Symlink { link, target }));
        }
        scan.files.push(path);
    }
    if scan.files.len() > max_slots {
        return Err(DirError::TooManySlots { path: dir.into(), count: scan.files.len(), max_slots });
    }
    scan.files.sort();
    scan.notes.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(scan)
}
