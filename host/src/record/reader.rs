//! The reading side: every file checked for owner and mode before it is
//! read, every frame bounded and checksummed. A short tail (the daemon
//! stopped mid-write) is skipped with a [`Damage`] note; a checksum, bound
//! or decode failure stops the read with an error naming the spot.

use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;

use super::writer::segment_files;
use super::{
    Frame, Header, RecordError, CODEC_PLAIN, CODEC_ZSTD, FILE_HEADER_BYTES, FORMAT_VERSION, FRAME_PREFIX_BYTES, KIND_HEADER, KIND_QUANTUM,
    MAGIC, MAX_DECODED_BYTES, MAX_FRAME_BYTES,
};

/// What a frame holds.
#[derive(Clone, Debug, PartialEq)]
pub enum RecordItem {
    /// A segment's header.
    Header(Header),
    /// A quantum (boxed: a snapshot is large).
    Quantum(Box<Frame>),
}

/// A frame and where it was.
#[derive(Clone, Debug, PartialEq)]
pub struct Positioned {
    /// The segment file.
    pub path: Arc<PathBuf>,
    /// Byte offset of its prefix in the file.
    pub offset: u64,
    /// Frame number in the file (0 is the header).
    pub frame: u64,
    /// The frame.
    pub item: RecordItem,
}

/// A frame cut short at the end of a file: the daemon stopped (or the
/// machine went down) while writing it. Skipped; the read goes on with the
/// next file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// The file.
    pub path: PathBuf,
    /// Byte offset of the cut frame.
    pub offset: u64,
    /// Its frame number in the file.
    pub frame: u64,
    /// Bytes present from that offset on.
    pub have_bytes: u64,
    /// Bytes the frame needs (prefix included), when its prefix was whole.
    pub need_bytes: Option<u64>,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "record file {}: frame {} at offset {} is cut short ({} bytes",
            self.path.display(),
            self.frame,
            self.offset,
            self.have_bytes
        )?;
        if let Some(need) = self.need_bytes {
            write!(f, " of {need}")?;
        }
        write!(f, "): skipped (the recording daemon stopped while writing it)")
    }
}

/// Checks an opened record file: a regular file, owned by this process's
/// uid or root, not writable by group or others. (The daemon writes them
/// 0600; a replay then trusts their snapshots as it would its own.)
pub fn check_record_file(file: &File, path: &Path) -> Result<(), RecordError> {
    let meta = file.metadata().map_err(|source| RecordError::Io { operation: "cannot stat record file", path: path.into(), source })?;
    let unsafe_because = |why: String| Err(RecordError::Unsafe { path: path.into(), why });
    if !meta.is_file() {
        return unsafe_because("not a regular file".into());
    }
    let euid = crate::ffi::effective_uid();
    if meta.uid() != euid && meta.uid() != 0 {
        return unsafe_because(format!("owned by uid {}, not by uid {euid} or root", meta.uid()));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return unsafe_because(format!("mode {mode:04o} is writable by group or others"));
    }
    Ok(())
}

/// One step of a segment.
enum Step {
    Item(Positioned),
    Cut(Damage),
    End,
}

/// Frames of one segment, from any reader (a file, or bytes in a test).
struct SegmentReader<R> {
    path: Arc<PathBuf>,
    input: R,
    offset: u64,
    frame: u64,
}

impl<R: Read> SegmentReader<R> {
    /// Checks the file header.
    fn start(path: &Path, mut input: R) -> Result<Self, RecordError> {
        let bad = |why: String| RecordError::BadFile { path: path.into(), why };
        let mut head = [0u8; FILE_HEADER_BYTES as usize];
        let got = read_full(&mut input, &mut head).map_err(|source| RecordError::Io {
            operation: "cannot read record file",
            path: path.into(),
            source,
        })?;
        if got < head.len() || &head[..8] != MAGIC {
            return Err(bad(format!("not a vm-balancer record (first bytes {:02x?}, expected {:02x?})", &head[..got.min(8)], MAGIC)));
        }
        let version = u16::from_le_bytes([head[8], head[9]]);
        if version != FORMAT_VERSION {
            return Err(bad(format!("record format version {version}; this vm-balancer reads version {FORMAT_VERSION}")));
        }
        Ok(SegmentReader { path: Arc::new(path.into()), input, offset: FILE_HEADER_BYTES, frame: 0 })
    }

    fn next(&mut self) -> Result<Step, RecordError> {
        let io = |source| RecordError::Io { operation: "cannot read record file", path: (*self.path).clone(), source };
        let (offset, frame) = (self.offset, self.frame);
        let mut prefix = [0u8; FRAME_PREFIX_BYTES as usize];
        let got = read_full(&mut self.input, &mut prefix).map_err(io)?;
        if got == 0 {
            return Ok(Step::End);
        }
        let cut = |have: u64, need: Option<u64>| Damage { path: (*self.path).clone(), offset, frame, have_bytes: have, need_bytes: need };
        if got < prefix.len() {
            return Ok(Step::Cut(cut(got as u64, None)));
        }
        let length = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
        let stored = u32::from_le_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]);
        if length > MAX_FRAME_BYTES {
            return Err(RecordError::TooLarge { path: (*self.path).clone(), offset, frame, length });
        }
        // Grown as it is read, not allocated from the claimed length.
        let mut body = Vec::with_capacity((length as usize).min(1 << 20));
        (&mut self.input).take(u64::from(length)).read_to_end(&mut body).map_err(io)?;
        if body.len() < length as usize {
            return Ok(Step::Cut(cut(FRAME_PREFIX_BYTES + body.len() as u64, Some(FRAME_PREFIX_BYTES + u64::from(length)))));
        }
        let found = crc32fast::hash(&body);
        if found != stored {
            return Err(RecordError::Checksum { path: (*self.path).clone(), offset, frame, found, stored });
        }
        let decode_error = |why: String| RecordError::Decode { path: (*self.path).clone(), offset, frame, why };
        let item = match body.first() {
            Some(&KIND_HEADER) if frame == 0 => RecordItem::Header(decode_value(&body).map_err(decode_error)?),
            Some(&KIND_QUANTUM) if frame > 0 => RecordItem::Quantum(Box::new(decode_value(&body).map_err(decode_error)?)),
            Some(kind) => return Err(decode_error(format!("unexpected frame kind {kind:#04x} as frame {frame}"))),
            None => return Err(decode_error("empty frame".into())),
        };
        self.offset += FRAME_PREFIX_BYTES + u64::from(length);
        self.frame += 1;
        Ok(Step::Item(Positioned { path: self.path.clone(), offset, frame, item }))
    }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Decodes a frame body (kind byte, codec byte, data), bounded.
fn decode_value<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    let (codec, data) = match body {
        [_, codec, data @ ..] => (*codec, data),
        _ => return Err("frame body shorter than its kind and codec bytes".into()),
    };
    let plain: std::borrow::Cow<[u8]> = match codec {
        CODEC_PLAIN => data.into(),
        CODEC_ZSTD => {
            let decoder = zstd::stream::read::Decoder::new(data).map_err(|e| format!("zstd: {e}"))?;
            let mut out = Vec::new();
            decoder.take(MAX_DECODED_BYTES as u64 + 1).read_to_end(&mut out).map_err(|e| format!("zstd: {e}"))?;
            if out.len() > MAX_DECODED_BYTES {
                return Err(format!("decompresses past the limit of {MAX_DECODED_BYTES} bytes"));
            }
            out.into()
        }
        other => return Err(format!("unknown codec byte {other:#04x}")),
    };
    rmp_serde::from_slice(&plain).map_err(|e| format!("MessagePack: {e}"))
}

/// [`decode_value`], for the unit tests.
#[cfg(test)]
pub(super) fn decode_value_for_tests<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    decode_value(body)
}

/// Decodes a whole segment held in memory: its frames, then how it ended
/// (a cut tail, an error, or cleanly). For the fuzz test and tools.
pub fn decode_segment(path: &Path, bytes: &[u8]) -> (Vec<Positioned>, Result<Option<Damage>, RecordError>) {
    let mut items = Vec::new();
    let mut reader = match SegmentReader::start(path, bytes) {
        Ok(r) => r,
        Err(e) => return (items, Err(e)),
    };
    loop {
        match reader.next() {
            Ok(Step::Item(item)) => items.push(item),
            Ok(Step::Cut(damage)) => return (items, Ok(Some(damage))),
            Ok(Step::End) => return (items, Ok(None)),
            Err(e) => return (items, Err(e)),
        }
    }
}

/// Every frame of a record directory, oldest first. Cut tails are skipped
/// and noted in [`damage`](Self::damage); the first checksum, bound or
/// decode error ends the iteration (it is its last item).
pub struct RecordReader {
    files: std::vec::IntoIter<PathBuf>,
    current: Option<SegmentReader<BufReader<File>>>,
    damage: Vec<Damage>,
    stopped: bool,
    total_bytes: u64,
}

impl RecordReader {
    /// Lists the directory's segments; the directory must exist and be
    /// private to this uid (the rule of the compile cache and state dir).
    pub fn open(dir: &Path) -> Result<RecordReader, RecordError> {
        if std::fs::symlink_metadata(dir).is_err() {
            return Err(RecordError::NoDir { path: dir.into() });
        }
        crate::policy::cache::check_private_dir(dir).map_err(|source| RecordError::Dir { path: dir.into(), source })?;
        let files = segment_files(dir)?;
        if files.is_empty() {
            return Err(RecordError::Empty { path: dir.into() });
        }
        let total_bytes = files.iter().filter_map(|f| std::fs::symlink_metadata(f).ok()).map(|m| m.len()).sum();
        Ok(RecordReader { files: files.into_iter(), current: None, damage: Vec::new(), stopped: false, total_bytes })
    }

    /// Bytes of all its segments when it was opened (a progress bar's total).
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// The cut tails skipped so far.
    pub fn damage(&self) -> &[Damage] {
        &self.damage
    }

    fn open_file(path: &Path) -> Result<SegmentReader<BufReader<File>>, RecordError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(path)
            .map_err(|source| RecordError::Io { operation: "cannot open record file", path: path.into(), source })?;
        check_record_file(&file, path)?;
        SegmentReader::start(path, BufReader::with_capacity(1 << 20, file))
    }
}

impl Iterator for RecordReader {
    type Item = Result<Positioned, RecordError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.stopped {
            let Some(current) = self.current.as_mut() else {
                let path = self.files.next()?;
                match Self::open_file(&path) {
                    Ok(reader) => self.current = Some(reader),
                    Err(e) => {
                        self.stopped = true;
                        return Some(Err(e));
                    }
                }
                continue;
            };
            match current.next() {
                Ok(Step::Item(item)) => return Some(Ok(item)),
                Ok(Step::Cut(damage)) => {
                    tracing::warn!(%damage, "record: cut-short frame skipped");
                    self.damage.push(damage);
                    self.current = None;
                }
                Ok(Step::End) => self.current = None,
                Err(e) => {
                    self.stopped = true;
                    return Some(Err(e));
                }
            }
        }
        None
    }
}
