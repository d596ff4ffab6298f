//! `run --record DIR`: every quantum, one frame with what the daemon saw
//! and decided, so that `vm-balancer replay` can feed a candidate policy
//! the very snapshots a real host produced.
//!
//! The format (version [`FORMAT_VERSION`]) is documented in
//! `examples/RECORD.md`. In short: a directory of segment files
//! `STARTED_MS-INDEX.vmbrec`; each starts with the 8-byte magic
//! `VMBREC\r\n` and a little-endian u16 version and u16 flags (0), then
//! frames: `u32 LE body length`, `u32 LE CRC-32 of the body`, the body:
//! one kind byte (`H` header, `Q` quantum), one codec byte (`z` zstd,
//! `m` plain), then the named-MessagePack [`Header`] or [`Frame`].
//!
//! Why this shape:
//! - **A crash loses at most the frame being written**: a frame is one
//!   `write(2)` of its assembled bytes to a file opened for append, and
//!   it is `fdatasync`ed before the next quantum. A reader finds a short
//!   tail by its length and skips it, saying where.
//! - **A flipped byte is found, not replayed**: the CRC covers every body
//!   byte; a mismatch stops the read there, naming file, offset and frame.
//! - **Bounded, untrusted input**: a body over [`MAX_FRAME_BYTES`] or
//!   decompressing past [`MAX_DECODED_BYTES`] is refused before it is
//!   allocated, and every file is checked for owner and mode before it is
//!   read (the daemon runs as root; these files hold a host's layout).
//! - **Compact**: each body is compressed on its own (zstd level 3), so a
//!   frame can be read without its neighbours and a damaged one costs only
//!   itself. Named MessagePack keeps the snapshot's own field names: a
//!   frame decodes into today's types even after a field was added.
//! - **Size-bounded**: a segment is closed at `segment_max_bytes`, and the
//!   oldest segments are deleted past `keep_segments`.

mod reader;
mod writer;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vm_balancer_sdk::{Action, Snapshot, Verdict};

use crate::config::GuardConfig;

pub use reader::{check_record_file, decode_segment, Damage, Positioned, RecordItem, RecordReader};
pub use writer::{RecordOptions, Recorder};

/// The first 8 bytes of a segment file.
pub const MAGIC: &[u8; 8] = b"VMBREC\r\n";
/// The format version after the magic.
pub const FORMAT_VERSION: u16 = 1;
/// Bytes before the first frame: magic, version, flags.
pub const FILE_HEADER_BYTES: u64 = 12;
/// Bytes before a frame's body: length, CRC-32.
pub const FRAME_PREFIX_BYTES: u64 = 8;
/// Largest frame body accepted, bytes (a 1,000-domain frame is about
/// 0.1 MB compressed; 64 MiB is far past any real host and still bounded).
pub const MAX_FRAME_BYTES: u32 = 64 << 20;
/// Largest decompressed body accepted, bytes.
pub const MAX_DECODED_BYTES: usize = 256 << 20;
/// Segment file name extension.
pub const EXTENSION: &str = "vmbrec";

/// Frame kind byte: a segment header.
const KIND_HEADER: u8 = b'H';
/// Frame kind byte: one quantum.
const KIND_QUANTUM: u8 = b'Q';
/// Codec byte: zstd-compressed MessagePack.
const CODEC_ZSTD: u8 = b'z';
/// Codec byte: plain MessagePack.
const CODEC_PLAIN: u8 = b'm';

/// The first frame of every segment: what a replay needs to run the guard
/// the recording daemon ran.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// The daemon run: its start, Unix ms. A replay starts the candidate
    /// and the guard afresh when it changes (the daemon restarted, so did
    /// its policies' state and its guard's history).
    pub session: u64,
    /// Segment number within the session, from 0.
    pub segment: u64,
    /// vm-balancer's version.
    pub version: String,
    /// The connection URI.
    pub connect: String,
    /// Nothing was applied (`run --dry-run`).
    pub dry_run: bool,
    /// The guard's settings.
    pub guard: GuardConfig,
    /// The slots, in order, when the segment began.
    pub slots: Vec<String>,
}

/// One quantum.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Frame {
    /// Quantum number (the snapshot's).
    pub quantum: u64,
    /// When it was decided, Unix ms.
    pub unix_ms: u64,
    /// The snapshot exactly as the policies received it (its `verdicts`
    /// are the previous quantum's feedback).
    pub snapshot: Snapshot,
    /// Every slot's raw actions, before the guard.
    pub proposals: Vec<RecordedProposal>,
    /// Slots the fallback decided for.
    pub fell_back: Vec<String>,
    /// The guard's verdicts.
    pub verdicts: Vec<Verdict>,
    /// What went to the backend (in a dry run: what would have).
    pub applied: Vec<Action>,
}

/// A slot's action as proposed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordedProposal {
    /// The slot.
    pub slot: String,
    /// The built-in fallback decided for the slot.
    pub from_fallback: bool,
    /// The action.
    pub action: Action,
}

impl Frame {
    /// The frame of a quantum's trace.
    pub fn from_trace(trace: &crate::pipeline::Trace, unix_ms: u64) -> Frame {
        Frame {
            quantum: trace.snapshot.quantum,
            unix_ms,
            snapshot: (*trace.snapshot).clone(),
            proposals: trace
                .proposals
                .iter()
                .map(|p| RecordedProposal { slot: p.slot.clone(), from_fallback: p.from_fallback, action: p.action.clone() })
                .collect(),
            fell_back: trace.fell_back.clone(),
            verdicts: trace.checked.verdicts.clone(),
            applied: trace.checked.accepted.clone(),
        }
    }
}

/// Errors writing or reading a record. Each names the file, and for a
/// frame its offset and number (0 is the segment's header frame).
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The record directory is unsafe or cannot be made.
    #[error("record directory {path} cannot be used")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: crate::policy::cache::PrivateDirError,
    },
    /// The record directory does not exist (replay).
    #[error("record directory {path} does not exist")]
    NoDir {
        /// The directory.
        path: PathBuf,
    },
    /// The directory holds no segment file.
    #[error("record directory {path} holds no *.{EXTENSION} segment")]
    Empty {
        /// The directory.
        path: PathBuf,
    },
    /// A file operation failed.
    #[error("{operation} {path}")]
    Io {
        /// What was being done.
        operation: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A segment file is not safe to load.
    #[error("record file {path}: {why}; refused")]
    Unsafe {
        /// The file.
        path: PathBuf,
        /// Owner, mode or type, with its value.
        why: String,
    },
    /// Not a record file, or a version this build cannot read.
    #[error("record file {path}: {why}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A frame's checksum does not match: the file was damaged.
    #[error(
        "record file {path}: frame {frame} at offset {offset} is damaged (CRC-32 {found:08x}, stored {stored:08x}); replay stops here"
    )]
    Checksum {
        /// The file.
        path: PathBuf,
        /// Byte offset of the frame's prefix.
        offset: u64,
        /// Frame number in the file.
        frame: u64,
        /// CRC of what was read.
        found: u32,
        /// CRC stored with it.
        stored: u32,
    },
    /// A frame's length is over the bound.
    #[error("record file {path}: frame {frame} at offset {offset} claims {length} bytes, over the limit of {MAX_FRAME_BYTES}; replay stops here")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Byte offset of the frame's prefix.
        offset: u64,
        /// Frame number in the file.
        frame: u64,
        /// The claimed length.
        length: u32,
    },
    /// A frame's body does not decode.
    #[error("record file {path}: frame {frame} at offset {offset} does not decode: {why}; replay stops here")]
    Decode {
        /// The file.
        path: PathBuf,
        /// Byte offset of the frame's prefix.
        offset: u64,
        /// Frame number in the file.
        frame: u64,
        /// What is wrong.
        why: String,
    },
    /// A frame could not be encoded (a bug).
    #[error("cannot encode a record frame: {0}")]
    Encode(String),
}

/// Encodes a frame body: kind, codec, compressed named MessagePack.
fn encode_body(kind: u8, value: &impl Serialize) -> Result<Vec<u8>, RecordError> {
    let plain = rmp_serde::to_vec_named(value).map_err(|e| RecordError::Encode(e.to_string()))?;
    let packed = zstd::bulk::compress(&plain, 3).map_err(|e| RecordError::Encode(e.to_string()))?;
    let (codec, data) = if packed.len() < plain.len() { (CODEC_ZSTD, packed) } else { (CODEC_PLAIN, plain) };
    let mut body = Vec::with_capacity(data.len() + 2);
    body.push(kind);
    body.push(codec);
    body.extend_from_slice(&data);
    Ok(body)
}

/// A whole frame: prefix (length, CRC) and body.
fn frame_bytes(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + FRAME_PREFIX_BYTES as usize);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// The file header: magic, version, flags.
fn file_header() -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

/// Bytes one quantum takes in a record, for the size figures (`record
/// size` in the README): one frame, prefix included.
pub fn frame_size(frame: &Frame) -> Result<usize, RecordError> {
    Ok(encode_body(KIND_QUANTUM, frame)?.len() + FRAME_PREFIX_BYTES as usize)
}

#[cfg(test)]
mod tests;
