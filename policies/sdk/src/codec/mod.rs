//! The snapshot's MessagePack encoding, written out by hand for the hot parts.
//!
//! Why not just `rmp_serde` (which the daemon still uses for the small,
//! untrusted action lists, and which this module still uses for the small
//! `verdicts` and `params`): the snapshot is the hot path. At 1,000 domains
//! (350 KB, 4,000 vCPUs) rmp_serde takes about 2.7x as long to encode and
//! 3-5x as long to decode as this module, natively, of a 1 ms budget for the
//! whole decide call, and more inside wasm: every value goes through serde's
//! visitor machinery and every map key is UTF-8 validated. (`cargo bench
//! --bench decide -- codec` runs rmp_serde beside this module, so the reason
//! can be re-checked: 0.37 vs 0.14 ms to encode, 0.72 vs 0.14-0.24 ms to
//! decode, at 1,000 domains on the development VM.) Here the host CPUs and
//! domains are read and written field by field, in place:
//! - the snapshot is decoded into last quantum's, reusing its memory, and a
//!   name or UUID equal to last quantum's is neither checked nor copied;
//! - parts a policy does not read ([`Reads`](crate::Reads)) are skipped, not stored;
//! - a vCPU or host CPU laid out as the daemon writes it is read (or
//!   stepped over) in a straight line, and anything else falls back to the
//!   general, field-by-field reader;
//! - a policy's answer is written by hand too ([`encode_decision`]), and
//!   read by hand on the daemon's side when it is laid out plainly
//!   ([`decode_decision`], with serde behind it for everything else).
//!
//! Code shape matters in wasm, where Cranelift compiles what LLVM wrote:
//! every loop header carries the engine's interruption check, whose slow
//! path is a call, so values live across a loop end up on the stack. Hence
//! straight-line readers, an unrolled affinity list, and the rarely taken or
//! once-per-snapshot steps kept out of line so that the hot function stays
//! small. Slice equality is avoided on the hot path (it is a `memcmp` call,
//! and wasm's libc compares byte by byte).
//!
//! One definition still rules: the serde derives on the snapshot types.
//! Tests hold this module to them: the encoder writes the same bytes as
//! `rmp_serde::to_vec_named`, and the decoder reads back what rmp_serde
//! reads, field for field, including unknown fields (skipped without being
//! visited) and missing required fields (an error naming them).
//!
//! Lengths are checked against the input before anything is reserved, and
//! skipping is iterative, so a hostile or truncated buffer is an error,
//! never a panic or an out-of-memory.
//!
//! The module is split by concern: [`encode`](mod@encode) holds the
//! writer (every struct destructured field by field, so a field added to
//! the snapshot types is a compile error there until it is written),
//! [`reader`](mod@reader) the cursor and the readers built on it, and
//! `tests` the tests that hold both to rmp_serde, among them a seeded
//! property test over random snapshots. `cargo bench --bench decide --
//! codec` times both codecs side by side, so the case for this one can be
//! re-checked.

use std::fmt;

mod answer;
mod encode;
mod reader;
#[cfg(test)]
mod tests;

pub use answer::decode_decision;
pub use encode::{encode, encode_decision};
pub use reader::decode_into;

/// Why a snapshot did not decode: what, and the byte offset where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// Byte offset into the buffer.
    pub offset: usize,
    /// What was wrong there, naming the field.
    pub message: String,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (at byte {})", self.message, self.offset)
    }
}

impl std::error::Error for DecodeError {}

type Result<T> = std::result::Result<T, DecodeError>;
