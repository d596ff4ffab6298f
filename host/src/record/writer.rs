//! The recording side: segments created 0600 in a checked directory, one
//! `write(2)` and one `fdatasync` per frame, rotated by size.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::{encode_body, file_header, frame_bytes, Frame, Header, RecordError, EXTENSION, KIND_HEADER, KIND_QUANTUM};
use crate::config::GuardConfig;
use crate::pipeline::Trace;

/// Where and how much to record.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordOptions {
    /// The record directory (created 0700 if missing; must be owned by
    /// the daemon's uid and not writable by group or others).
    pub dir: PathBuf,
    /// A segment is closed once it reaches this size, bytes.
    pub segment_max_bytes: u64,
    /// Segments kept; the oldest go first. The record's size is bounded
    /// by about `segment_max_bytes × keep_segments`.
    pub keep_segments: usize,
}

impl RecordOptions {
    /// `dir` with the defaults: 64 MiB segments, 16 kept (1 GiB: about
    /// 2.5 days of a 100-domain host at a 1 s quantum, 6 hours of a
    /// 1,000-domain one; `cargo bench --bench record`).
    pub fn new(dir: PathBuf) -> RecordOptions {
        RecordOptions { dir, segment_max_bytes: 64 << 20, keep_segments: 16 }
    }
}

/// An open segment.
struct Segment {
    path: PathBuf,
    file: File,
    bytes: u64,
}

/// Appends one frame per quantum to the record directory.
pub struct Recorder {
    options: RecordOptions,
    session: u64,
    next_segment: u64,
    connect: String,
    dry_run: bool,
    guard: GuardConfig,
    current: Option<Segment>,
    frames: u64,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Recorder {
    /// Checks (or creates) the directory. Nothing is written until the
    /// first quantum.
    pub fn open(options: RecordOptions, connect: &str, dry_run: bool, guard: GuardConfig) -> Result<Recorder, RecordError> {
        crate::policy::cache::check_private_dir(&options.dir).map_err(|source| RecordError::Dir { path: options.dir.clone(), source })?;
        // A session id that sorts after every segment already there, even
        // if the clock went back.
        let newest = segment_files(&options.dir)?.iter().filter_map(|p| session_of(p)).max().unwrap_or(0);
        let session = unix_ms().max(newest + 1);
        Ok(Recorder { options, session, next_segment: 0, connect: connect.to_string(), dry_run, guard, current: None, frames: 0 })
    }

    /// Frames written so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.options.dir
    }

    /// Appends the quantum's frame; `slots` are the slot names now (for
    /// the header of a segment that begins with this frame).
    pub fn write(&mut self, trace: &Trace, slots: &[String]) -> Result<(), RecordError> {
        let frame = Frame::from_trace(trace, unix_ms());
        let bytes = frame_bytes(&encode_body(KIND_QUANTUM, &frame)?);
        let full = self.current.as_ref().is_some_and(|s| s.bytes + bytes.len() as u64 > self.options.segment_max_bytes);
        if self.current.is_none() || full {
            self.current = None;
            self.start_segment(slots)?;
        }
        let segment = self.current.as_mut().expect("started above");
        append(segment, &bytes)?;
        self.frames += 1;
        Ok(())
    }

    fn start_segment(&mut self, slots: &[String]) -> Result<(), RecordError> {
        let path = self.options.dir.join(format!("{:016}-{:06}.{EXTENSION}", self.session, self.next_segment));
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|source| RecordError::Io { operation: "cannot create record file", path: path.clone(), source })?;
        let header = Header {
            session: self.session,
            segment: self.next_segment,
            version: env!("CARGO_PKG_VERSION").to_string(),
            connect: self.connect.clone(),
            dry_run: self.dry_run,
            guard: self.guard.clone(),
            slots: slots.to_vec(),
        };
        let mut segment = Segment { path, file, bytes: 0 };
        let mut first = file_header();
        first.extend_from_slice(&frame_bytes(&encode_body(KIND_HEADER, &header)?));
        append(&mut segment, &first)?;
        self.next_segment += 1;
        self.current = Some(segment);
        self.rotate()
    }

    /// Deletes the oldest segments beyond `keep_segments`.
    fn rotate(&self) -> Result<(), RecordError> {
        let files = segment_files(&self.options.dir)?;
        let excess = files.len().saturating_sub(self.options.keep_segments.max(1));
        for old in &files[..excess] {
            std::fs::remove_file(old).map_err(|source| RecordError::Io {
                operation: "cannot delete old record file",
                path: old.clone(),
                source,
            })?;
            tracing::debug!(file = %old.display(), "record: deleted the oldest segment");
        }
        Ok(())
    }
}

/// One write of the whole frame, then its data to disk: a crash loses at
/// most this frame, and a reader sees it as a short tail.
fn append(segment: &mut Segment, bytes: &[u8]) -> Result<(), RecordError> {
    let io = |operation, source| RecordError::Io { operation, path: segment.path.clone(), source };
    segment.file.write_all(bytes).map_err(|e| io("cannot write record file", e))?;
    segment.file.sync_data().map_err(|e| io("cannot sync record file", e))?;
    segment.bytes += bytes.len() as u64;
    Ok(())
}

/// The segment files of `dir`, oldest first (names sort by session, then
/// segment).
pub(super) fn segment_files(dir: &Path) -> Result<Vec<PathBuf>, RecordError> {
    let entries =
        std::fs::read_dir(dir).map_err(|source| RecordError::Io { operation: "cannot list record directory", path: dir.into(), source })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == EXTENSION) && p.file_name().is_some_and(|n| !n.to_string_lossy().starts_with('.')))
        .collect();
    files.sort();
    Ok(files)
}

/// The session a segment's name says.
fn session_of(path: &Path) -> Option<u64> {
    path.file_stem()?.to_str()?.split('-').next()?.parse().ok()
}
