//! Reading one policy file, for the drop-in directory and `run --policy FILE`.
//!
//! A policy controls every VM on the host, so the daemon applies sshd's
//! `StrictModes` rule for `authorized_keys` to it: the file, and every
//! directory from it up to `/`, must be owned by root or the daemon's user
//! and not writable by group or others. Whoever could write any of them
//! could put their own policy in place. One exception: a directory above
//! that is root's, world-writable and sticky (`/tmp`) is accepted, because
//! the sticky bit stops anyone but an entry's owner renaming or removing it,
//! and the entry below it is checked in turn (it must be root's or ours,
//! not writable by others): an entry planted there by someone else fails
//! that check.
//!
//! The file is opened once and everything is checked on that descriptor
//! (`fstat`), so what is checked is what is read. It is opened
//! non-blocking, so a FIFO cannot hang the loader; anything but a regular
//! file is refused before a byte is read. The size comes from `fstat` and is
//! bounded (`policy_max_file_mib`), then the 8-byte header (the wasm magic
//! `\0asm` and a component's version/layer) is read and checked before the
//! rest: neither a huge file nor a file that is not a component is read whole.
//!
//! The offline commands (`simulate`, `policy check`) keep the size bound and
//! the header-first read but not the owner rule: they run an author's own
//! file on the author's behalf and control no VM.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::sandbox::{check_header, PolicyError};
use crate::config::Config;

/// Length of the header checked before the rest is read: magic + version/layer.
pub const HEADER_BYTES: usize = 8;

/// How policy files are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileRules {
    /// Largest file accepted, bytes (`policy_max_file_mib`).
    pub max_file_bytes: u64,
    /// The owner, mode and ancestor rule (the daemon). Off for the offline
    /// commands.
    pub strict: bool,
}

impl FileRules {
    /// The daemon's rules: bounded and strict.
    pub fn daemon(config: &Config) -> Self {
        FileRules { max_file_bytes: config.policy_max_file_mib * 1024 * 1024, strict: true }
    }

    /// The offline commands' rules: bounded, not strict.
    pub fn offline(config: &Config) -> Self {
        FileRules { strict: false, ..FileRules::daemon(config) }
    }
}

impl Default for FileRules {
    /// [`offline`](Self::offline) with the default bound.
    fn default() -> Self {
        FileRules::offline(&Config::default())
    }
}

/// Why a policy file (or a directory on the way to it) was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyFileError {
    /// Writable by group or others.
    #[error("refusing policy path {path}: mode {mode:04o} is writable by group or others (run: chmod go-w {path})")]
    Unsafe {
        /// The path.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Owned by somebody who is neither root nor the daemon's user.
    #[error("refusing policy path {path}: owned by uid {owner_uid}, but a policy controls every VM, so only root or the daemon's user (uid {euid}) may own it (run: chown root {path})")]
    Owner {
        /// The path.
        path: PathBuf,
        /// Its owner.
        owner_uid: u32,
        /// The daemon's effective uid.
        euid: u32,
    },
    /// A directory above the policy is owned by somebody else.
    #[error("refusing policy path {path}: the directory {ancestor} above it is owned by uid {owner_uid}; every directory up to / must be owned by root or the daemon's user (uid {euid})")]
    AncestorOwner {
        /// The policy path.
        path: PathBuf,
        /// The directory above it.
        ancestor: PathBuf,
        /// Its owner.
        owner_uid: u32,
        /// The daemon's effective uid.
        euid: u32,
    },
    /// A directory above the policy is writable by group or others.
    #[error("refusing policy path {path}: the directory {ancestor} above it has mode {mode:04o}, writable by group or others{sticky}")]
    AncestorWritable {
        /// The policy path.
        path: PathBuf,
        /// The directory above it.
        ancestor: PathBuf,
        /// Its permission bits.
        mode: u32,
        /// Why the sticky bit does not help, when it is set.
        sticky: &'static str,
    },
    /// Cannot be opened or read.
    #[error("cannot read policy file {path}")]
    Read {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A FIFO, device, socket or directory.
    #[error("refusing policy file {path}: it is a {kind}, not a regular file")]
    NotRegular {
        /// The path.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// Over `policy_max_file_mib`.
    #[error("refusing policy file {path}: {size_bytes} bytes, over policy_max_file_mib = {max_mib} (raise it in the config if this policy really is that big)")]
    TooLarge {
        /// The path.
        path: PathBuf,
        /// Its size (or what was read before it passed the bound).
        size_bytes: u64,
        /// The bound, MiB.
        max_mib: u64,
    },
    /// Not a component (wrong magic, a core module, too short).
    #[error(transparent)]
    Header(#[from] PolicyError),
}

const STICKY_NOTE: &str = " (sticky, but not root's: its owner can replace what is in it; keep policies under directories only root can write, e.g. /etc/vm-balancer/policies)";

/// The file type's name, for messages.
pub(crate) fn kind_of(file_type: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_dir() {
        "directory"
    } else if file_type.is_fifo() {
        "FIFO"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_block_device() || file_type.is_char_device() {
        "device"
    } else if file_type.is_symlink() {
        "symlink"
    } else {
        "regular file"
    }
}

/// The owner and mode rule of one policy path (a file or the directory).
pub fn check_path(path: &Path, meta: &std::fs::Metadata) -> Result<(), PolicyFileError> {
    use std::os::unix::fs::MetadataExt;
    let euid = crate::ffi::effective_uid();
    if meta.uid() != 0 && meta.uid() != euid {
        return Err(PolicyFileError::Owner { path: path.into(), owner_uid: meta.uid(), euid });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(PolicyFileError::Unsafe { path: path.into(), mode });
    }
    Ok(())
}

fn check_ancestor(path: &Path, ancestor: &Path, meta: &std::fs::Metadata) -> Result<(), PolicyFileError> {
    use std::os::unix::fs::MetadataExt;
    let euid = crate::ffi::effective_uid();
    if meta.uid() != 0 && meta.uid() != euid {
        return Err(PolicyFileError::AncestorOwner { path: path.into(), ancestor: ancestor.into(), owner_uid: meta.uid(), euid });
    }
    let mode = meta.mode() & 0o7777;
    let root_sticky = meta.uid() == 0 && mode & 0o1000 != 0;
    if mode & 0o022 != 0 && !root_sticky {
        let sticky = if mode & 0o1000 != 0 { STICKY_NOTE } else { "" };
        return Err(PolicyFileError::AncestorWritable { path: path.into(), ancestor: ancestor.into(), mode, sticky });
    }
    Ok(())
}

/// Checks every directory above `path` up to `/`: those of the path as
/// given (a symlinked component's own directory is among them) and those of
/// its real location (where a symlink leads).
pub fn check_ancestors(path: &Path) -> Result<(), PolicyFileError> {
    let read_error = |source| PolicyFileError::Read { path: path.into(), source };
    let given = std::path::absolute(path).map_err(read_error)?;
    for ancestor in given.ancestors().skip(1) {
        let meta = std::fs::symlink_metadata(ancestor).map_err(read_error)?;
        if !meta.file_type().is_symlink() {
            check_ancestor(path, ancestor, &meta)?;
        }
    }
    let real = std::fs::canonicalize(path).map_err(read_error)?;
    if real != given {
        for ancestor in real.ancestors().skip(1) {
            check_ancestor(path, ancestor, &std::fs::metadata(ancestor).map_err(read_error)?)?;
        }
    }
    Ok(())
}

/// Reads the policy file at `path` under `rules`: one open (non-blocking,
/// so a FIFO cannot hang), type, owner, mode and size checked on that
/// descriptor, the ancestors checked (strict rules), then the header, then
/// the rest.
pub fn read_policy_file(path: &Path, rules: &FileRules) -> Result<Vec<u8>, PolicyFileError> {
    use std::os::unix::fs::OpenOptionsExt;
    let read_error = |source| PolicyFileError::Read { path: path.into(), source };
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(read_error)?;
    let meta = file.metadata().map_err(read_error)?;
    if !meta.is_file() {
        return Err(PolicyFileError::NotRegular { path: path.into(), kind: kind_of(meta.file_type()) });
    }
    if rules.strict {
        check_path(path, &meta)?;
        check_ancestors(path)?;
    }
    read_bounded(path, file, meta.len(), rules.max_file_bytes)
}

/// Reads a policy of `size_bytes` (as `fstat` said) from `reader`: refused
/// over `max_bytes` before any read, then the header alone is read and
/// checked, then the rest, still bounded (the file may grow meanwhile).
fn read_bounded(path: &Path, reader: impl Read, size_bytes: u64, max_bytes: u64) -> Result<Vec<u8>, PolicyFileError> {
    let too_large = |size_bytes| PolicyFileError::TooLarge { path: path.into(), size_bytes, max_mib: max_bytes.div_ceil(1024 * 1024) };
    if size_bytes > max_bytes {
        return Err(too_large(size_bytes));
    }
    let read_error = |source| PolicyFileError::Read { path: path.into(), source };
    let mut reader = reader.take(max_bytes + 1);
    let mut header = Vec::with_capacity(HEADER_BYTES);
    (&mut reader).take(HEADER_BYTES as u64).read_to_end(&mut header).map_err(read_error)?;
    check_header(&path.display().to_string(), &header)?;
    let mut bytes = Vec::with_capacity(size_bytes as usize);
    bytes.extend_from_slice(&header);
    reader.read_to_end(&mut bytes).map_err(read_error)?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader of `len` bytes that counts what was taken from it.
    struct Counting<'a> {
        first: &'a [u8],
        len: u64,
        served: u64,
    }

    impl Read for Counting<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let left = self.len - self.served;
            let n = (buf.len() as u64).min(left) as usize;
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = self.first.get(self.served as usize + i).copied().unwrap_or(0);
            }
            self.served += n as u64;
            Ok(n)
        }
    }

    #[test]
    fn an_oversized_file_is_refused_before_any_read() {
        let mut r = Counting { first: b"\0asm\x0d\0\x01\0", len: 1 << 40, served: 0 };
        let e = read_bounded(Path::new("/p/big.wasm"), &mut r, 1 << 40, 64 << 20).unwrap_err();
        assert!(matches!(e, PolicyFileError::TooLarge { .. }), "{e}");
        let text = e.to_string();
        assert!(text.contains("/p/big.wasm") && text.contains("policy_max_file_mib = 64"), "{text}");
        assert_eq!(r.served, 0, "not a byte read");
    }

    #[test]
    fn a_wrong_magic_is_refused_after_reading_only_the_header() {
        let mut r = Counting { first: b"MZ\x90\0not wasm", len: 32 << 20, served: 0 };
        let e = read_bounded(Path::new("/p/x.wasm"), &mut r, 32 << 20, 64 << 20).unwrap_err();
        assert!(matches!(e, PolicyFileError::Header(PolicyError::NotWasm { .. })), "{e}");
        assert!(e.to_string().contains("/p/x.wasm"), "{e}");
        assert_eq!(r.served, HEADER_BYTES as u64, "only the header was read");
        let mut core = Counting { first: b"\0asm\x01\0\0\0", len: 1 << 20, served: 0 };
        let e = read_bounded(Path::new("/p/core.wasm"), &mut core, 1 << 20, 64 << 20).unwrap_err();
        assert!(matches!(e, PolicyFileError::Header(PolicyError::CoreModule { .. })), "{e}");
        assert_eq!(core.served, HEADER_BYTES as u64);
    }

    #[test]
    fn a_file_that_grows_past_the_bound_while_read_is_refused() {
        // fstat said 1 KiB; the file then turns out to be 2 MiB.
        let mut r = Counting { first: b"\0asm\x0d\0\x01\0", len: 2 << 20, served: 0 };
        let e = read_bounded(Path::new("/p/grows.wasm"), &mut r, 1024, 1 << 20).unwrap_err();
        assert!(matches!(e, PolicyFileError::TooLarge { .. }), "{e}");
        assert!(r.served <= (1 << 20) + 1, "read at most the bound and one byte: {}", r.served);
        let mut ok = Counting { first: b"\0asm\x0d\0\x01\0", len: 4096, served: 0 };
        assert_eq!(read_bounded(Path::new("/p/ok.wasm"), &mut ok, 4096, 1 << 20).unwrap().len(), 4096);
    }
}
