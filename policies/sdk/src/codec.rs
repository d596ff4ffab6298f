//! The snapshot's MessagePack encoding, written out by hand for the hot parts.
//!
//! Why not just `rmp_serde` (which the daemon still uses for the small,
//! untrusted action lists, and which this module still uses for the small
//! `verdicts` and `params`): the snapshot is the hot path. At 1,000 domains
//! (350 KB, 4,000 vCPUs) rmp_serde took 0.19 ms to encode and 0.65 ms to
//! decode, natively, of a 1 ms budget for the whole decide call, and more
//! inside wasm: every value goes through serde's visitor machinery and every
//! map key is UTF-8 validated. Here the host CPUs and domains are read and
//! written field by field, in place (0.11 ms each way at 1,000 domains):
//! - the snapshot is decoded into last quantum's, reusing its memory, and a
//!   name or UUID equal to last quantum's is neither checked nor copied;
//! - parts a policy does not read ([`Reads`]) are skipped, not stored;
//! - a vCPU or host CPU laid out as the daemon writes it is read (or
//!   stepped over) in a straight line, and anything else falls back to the
//!   general, field-by-field reader;
//! - a policy's answer is written by hand too ([`encode_decision`]).
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

use std::fmt;

use rmp::encode as put;

use crate::{Action, CpuList, Domain, DomainMemory, Host, HostCpu, HostMemory, Reads, Snapshot, Vcpu};

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

// ---------------------------------------------------------------- encode --

/// Writes the snapshot exactly as `rmp_serde::encode::write_named` would.
pub fn encode(s: &Snapshot, buf: &mut Vec<u8>) {
    map(buf, 7);
    key(buf, "schema_version");
    uint(buf, s.schema_version.into());
    key(buf, "quantum");
    uint(buf, s.quantum);
    key(buf, "quantum_ms");
    uint(buf, s.quantum_ms.into());
    key(buf, "host");
    map(buf, 2);
    key(buf, "cpus");
    array(buf, s.host.cpus.len());
    for c in &s.host.cpus {
        map(buf, 5);
        key(buf, "id");
        uint(buf, c.id.into());
        key(buf, "online");
        boolean(buf, c.online);
        key(buf, "reserved");
        boolean(buf, c.reserved);
        key(buf, "usage");
        float(buf, c.usage);
        key(buf, "node");
        uint(buf, c.node.into());
    }
    key(buf, "memory");
    map(buf, 3);
    key(buf, "total_kib");
    uint(buf, s.host.memory.total_kib);
    key(buf, "available_kib");
    uint(buf, s.host.memory.available_kib);
    key(buf, "reserve_kib");
    uint(buf, s.host.memory.reserve_kib);
    key(buf, "domains");
    array(buf, s.domains.len());
    for d in &s.domains {
        encode_domain(d, buf);
    }
    key(buf, "verdicts");
    serde_value(buf, &s.verdicts);
    key(buf, "params");
    serde_value(buf, &s.params);
}

fn encode_domain(d: &Domain, buf: &mut Vec<u8>) {
    map(buf, 4 + usize::from(!d.tags.is_empty()));
    key(buf, "name");
    string(buf, &d.name);
    key(buf, "uuid");
    string(buf, &d.uuid);
    if !d.tags.is_empty() {
        key(buf, "tags");
        array(buf, d.tags.len());
        for t in &d.tags {
            string(buf, t);
        }
    }
    key(buf, "vcpus");
    array(buf, d.vcpus.len());
    for v in &d.vcpus {
        map(buf, 4 + usize::from(v.steal.is_some()));
        key(buf, "id");
        uint(buf, v.id.into());
        key(buf, "cpu");
        uint(buf, v.cpu.into());
        key(buf, "affinity");
        array(buf, v.affinity.len());
        for c in &v.affinity {
            uint(buf, (*c).into());
        }
        key(buf, "usage");
        float(buf, v.usage);
        if let Some(steal) = v.steal {
            key(buf, "steal");
            float(buf, steal);
        }
    }
    let m = &d.memory;
    let optional = [
        ("unused_kib", m.unused_kib),
        ("available_kib", m.available_kib),
        ("usable_kib", m.usable_kib),
        ("rss_kib", m.rss_kib),
        ("swap_in_kib", m.swap_in_kib),
        ("swap_out_kib", m.swap_out_kib),
        ("major_faults", m.major_faults),
    ];
    key(buf, "memory");
    map(buf, 3 + optional.iter().filter(|(_, v)| v.is_some()).count());
    key(buf, "max_kib");
    uint(buf, m.max_kib);
    key(buf, "target_kib");
    uint(buf, m.target_kib);
    for (name, value) in optional {
        if let Some(value) = value {
            key(buf, name);
            uint(buf, value);
        }
    }
    key(buf, "autodeflate");
    boolean(buf, m.autodeflate);
}

/// Writes a policy's answer, `{ "actions": [...] }`, exactly as
/// `rmp_serde::to_vec_named(&Decision { actions })` would (a test holds it
/// to that): serde's path for the internally tagged `Action` is a visible
/// share of a quantum in wasm when a policy sets hundreds of targets.
pub fn encode_decision(actions: &[Action], buf: &mut Vec<u8>) {
    map(buf, 1);
    key(buf, "actions");
    array(buf, actions.len());
    for action in actions {
        match action {
            Action::Pin { domain, vcpu, cpus, reason } => {
                map(buf, 5);
                key(buf, "kind");
                string(buf, "pin");
                key(buf, "domain");
                string(buf, domain);
                key(buf, "vcpu");
                uint(buf, (*vcpu).into());
                key(buf, "cpus");
                array(buf, cpus.len());
                for cpu in cpus {
                    uint(buf, (*cpu).into());
                }
                key(buf, "reason");
                string(buf, reason);
            }
            Action::SetMemory { domain, target_kib, reason } => {
                map(buf, 4);
                key(buf, "kind");
                string(buf, "set-memory");
                key(buf, "domain");
                string(buf, domain);
                key(buf, "target_kib");
                uint(buf, *target_kib);
                key(buf, "reason");
                string(buf, reason);
            }
        }
    }
}

// Writing into a Vec cannot fail; rmp's writers are used so every integer
// and length takes the same (smallest) form rmp_serde gives it.
fn map(buf: &mut Vec<u8>, len: usize) {
    put::write_map_len(buf, len as u32).expect("writing to a Vec");
}

fn array(buf: &mut Vec<u8>, len: usize) {
    put::write_array_len(buf, len as u32).expect("writing to a Vec");
}

fn key(buf: &mut Vec<u8>, name: &str) {
    string(buf, name);
}

fn string(buf: &mut Vec<u8>, s: &str) {
    put::write_str(buf, s).expect("writing to a Vec");
}

fn uint(buf: &mut Vec<u8>, v: u64) {
    put::write_uint(buf, v).expect("writing to a Vec");
}

fn float(buf: &mut Vec<u8>, v: f32) {
    put::write_f32(buf, v).expect("writing to a Vec");
}

fn boolean(buf: &mut Vec<u8>, v: bool) {
    put::write_bool(buf, v).expect("writing to a Vec");
}

fn serde_value<T: serde::Serialize>(buf: &mut Vec<u8>, value: &T) {
    rmp_serde::encode::write_named(buf, value).expect("verdicts and params always encode");
}

// ---------------------------------------------------------------- decode --

/// Reads a snapshot into `s`, replacing all of it. Trailing bytes are an error.
///
/// `s` is normally last quantum's snapshot: its lists and strings are
/// cleared and refilled in place, so a host whose domains did not change
/// decodes without allocating. (On error `s` is left partly filled; the next
/// call resets it.)
///
/// Parts that `reads` leaves out are skipped, not stored: they stay empty.
pub fn decode_into(bytes: &[u8], s: &mut Snapshot, reads: Reads) -> Result<()> {
    let mut r = Reader { input: bytes, pos: 0 };
    s.schema_version = 0;
    s.quantum = 0;
    s.quantum_ms = 0;
    s.host.cpus.clear();
    s.host.memory = HostMemory::default();
    s.verdicts.clear();
    s.params.clear();
    let mut seen = Seen::default();
    for _ in 0..r.map_len("snapshot")? {
        match r.key()? {
            b"schema_version" => s.schema_version = seen.set(0, r.u32("schema_version")?),
            b"quantum" => s.quantum = seen.set(1, r.u64("quantum")?),
            b"quantum_ms" => s.quantum_ms = seen.set(2, r.u32("quantum_ms")?),
            b"host" => {
                host(&mut r, &mut s.host)?;
                seen.set(3, ());
            }
            b"domains" => {
                let n = r.array_len("domains")?;
                s.domains.resize_with(n, Domain::default);
                for d in &mut s.domains {
                    domain(&mut r, d, reads)?;
                }
                seen.set(4, ());
            }
            b"verdicts" => s.verdicts = r.serde("verdicts")?,
            b"params" => s.params = r.serde("params")?,
            _ => r.skip()?,
        }
    }
    r.require(seen, &["schema_version", "quantum", "quantum_ms", "host", "domains"], "snapshot")?;
    if r.pos != bytes.len() {
        return Err(r.error(format!("{} trailing bytes after the snapshot", bytes.len() - r.pos)));
    }
    Ok(())
}

/// Reads a snapshot into a fresh value.
#[cfg(test)]
fn decode(bytes: &[u8]) -> Result<Snapshot> {
    let mut s = Snapshot::default();
    decode_into(bytes, &mut s, Reads::ALL).map(|()| s)
}

#[inline(always)]
fn host(r: &mut Reader<'_>, h: &mut Host) -> Result<()> {
    let mut seen = Seen::default();
    for _ in 0..r.map_len("host")? {
        match r.key()? {
            b"cpus" => {
                // Out of line: once per snapshot, and inlining it here
                // slowed the rest of the decoder in wasm.
                r.out_of_line(|r| {
                    let n = r.array_len("host.cpus")?;
                    h.cpus.reserve(n);
                    for _ in 0..n {
                        let cpu = match host_cpu_as_written(r) {
                            Some(cpu) => cpu,
                            None => host_cpu(r)?,
                        };
                        h.cpus.push(cpu);
                    }
                    Ok(())
                })?;
                seen.set(0, ());
            }
            b"memory" => h.memory = seen.set(1, host_memory(r)?),
            _ => r.skip()?,
        }
    }
    r.require(seen, &["cpus", "memory"], "host")
}

/// A host CPU laid out exactly as the daemon writes it (`id`, `online`,
/// `reserved`, `usage` as f32, `node`; numbers below 65,536), read in a
/// straight line like [`vcpu_as_written`]: a 256-CPU host is most of a
/// small snapshot. Anything else returns `None` for the general reader.
#[inline(always)]
fn host_cpu_as_written(r: &mut Reader<'_>) -> Option<HostCpu> {
    let mut q = *r;
    q.literal(b"\x85\xa2id")?;
    let id = q.small_uint()?;
    q.literal(b"\xa6online")?;
    let online = q.plain_bool()?;
    q.literal(b"\xa8reserved")?;
    let reserved = q.plain_bool()?;
    q.literal(b"\xa5usage")?;
    let usage = q.raw_f32()?;
    q.literal(b"\xa4node")?;
    let node = q.small_uint()?;
    *r = q;
    Some(HostCpu { id, online, reserved, usage, node })
}

#[inline(always)]
fn host_cpu(r: &mut Reader<'_>) -> Result<HostCpu> {
    let mut c = HostCpu::default();
    let mut seen = Seen::default();
    for _ in 0..r.map_len("host cpu")? {
        match r.key()? {
            b"id" => c.id = seen.set(0, r.u32("id")?),
            b"online" => c.online = seen.set(1, r.bool("online")?),
            b"usage" => c.usage = seen.set(2, r.f32("usage")?),
            b"reserved" => c.reserved = r.bool("reserved")?,
            b"node" => c.node = r.u32("node")?,
            _ => r.skip()?,
        }
    }
    r.require(seen, &["id", "online", "usage"], "host cpu")?;
    Ok(c)
}

#[inline(always)]
fn host_memory(r: &mut Reader<'_>) -> Result<HostMemory> {
    let mut m = HostMemory::default();
    let mut seen = Seen::default();
    for _ in 0..r.map_len("host.memory")? {
        match r.key()? {
            b"total_kib" => m.total_kib = seen.set(0, r.u64("total_kib")?),
            b"available_kib" => m.available_kib = seen.set(1, r.u64("available_kib")?),
            b"reserve_kib" => m.reserve_kib = seen.set(2, r.u64("reserve_kib")?),
            _ => r.skip()?,
        }
    }
    r.require(seen, &["total_kib", "available_kib", "reserve_kib"], "host.memory")?;
    Ok(m)
}

/// Refills `d` in place, keeping its strings' and lists' capacity.
#[inline(always)]
fn domain(r: &mut Reader<'_>, d: &mut Domain, reads: Reads) -> Result<()> {
    // `name` and `uuid` are required, so they are always overwritten below
    // (compared first: on a steady host they are last quantum's, and an
    // equal string is not copied again).
    d.tags.clear();
    d.vcpus.clear();
    d.memory = DomainMemory::default();
    let mut seen = Seen::default();
    for _ in 0..r.map_len("domain")? {
        match r.key()? {
            b"name" => {
                r.str_into(&mut d.name, "name")?;
                seen.set(0, ());
            }
            b"uuid" => {
                r.str_into(&mut d.uuid, "uuid")?;
                seen.set(1, ());
            }
            b"tags" => {
                let n = r.array_len("tags")?;
                for _ in 0..n {
                    d.tags.push(r.str("tags")?.to_owned());
                }
            }
            b"vcpus" if !reads.vcpus => {
                // Most of a snapshot's bytes: vCPUs as the daemon writes
                // them are stepped over by the straight-line reader, which
                // is faster than the general skip. (Out of line: a second
                // copy of that reader inlined here slowed the decoding of
                // everything else in wasm.)
                r.out_of_line(|r| {
                    for _ in 0..r.array_len("vcpus")? {
                        if vcpu_as_written(r).is_none() {
                            r.skip()?;
                        }
                    }
                    Ok(())
                })?;
                seen.set(2, ());
            }
            b"vcpus" => {
                let n = r.array_len("vcpus")?;
                d.vcpus.reserve(n);
                for _ in 0..n {
                    let v = match vcpu_as_written(r) {
                        Some(v) => v,
                        None => vcpu(r)?,
                    };
                    d.vcpus.push(v);
                }
                seen.set(2, ());
            }
            b"memory" if !reads.domain_memory => {
                r.skip()?;
                seen.set(3, ());
            }
            b"memory" => {
                domain_memory(r, &mut d.memory)?;
                seen.set(3, ());
            }
            _ => r.skip()?,
        }
    }
    r.require(seen, &["name", "uuid", "vcpus", "memory"], "domain")
}

/// A vCPU laid out exactly as the daemon writes it (`id`, `cpu`, `affinity`
/// of up to four CPUs, numbers below 65,536, `usage` and optional `steal` as
/// f32), read in a straight line: no loop over keys, no key dispatch, each
/// key checked as one masked load. This is the hottest part of a large
/// snapshot, and straight-line code is what wasm runs best. Anything else
/// (another writer's order, a wider number, a longer affinity, a new field)
/// returns `None` and the general reader, starting again at the same place,
/// handles it.
#[inline(always)]
fn vcpu_as_written(r: &mut Reader<'_>) -> Option<Vcpu> {
    let mut q = *r;
    let fields = match q.input.get(q.pos) {
        Some(0x84) => 4,
        Some(0x85) => 5,
        _ => return None,
    };
    q.pos += 1;
    q.literal(b"\xa2id")?;
    let id = q.small_uint()?;
    q.literal(b"\xa3cpu")?;
    let cpu = q.small_uint()?;
    q.literal(b"\xa8affinity")?;
    let n = match q.input.get(q.pos) {
        Some(&b @ 0x90..=0x94) => (b & 0x0f) as usize,
        _ => return None,
    };
    q.pos += 1;
    // Filled as a plain array and made a list at once: pushing one CPU at a
    // time kept the list in memory, and copying it into the vCPU then
    // stalled on the narrow stores just made (store-to-load forwarding).
    // Unrolled by hand: a loop here is a loop header in wasm, where the
    // engine's interruption check forces the reader's values out of registers.
    let mut cpus = [0u32; 4];
    if n > 0 {
        cpus[0] = q.small_uint()?;
    }
    if n > 1 {
        cpus[1] = q.small_uint()?;
    }
    if n > 2 {
        cpus[2] = q.small_uint()?;
    }
    if n > 3 {
        cpus[3] = q.small_uint()?;
    }
    q.literal(b"\xa5usage")?;
    let usage = q.raw_f32()?;
    let steal = if fields == 5 {
        q.literal(b"\xa5steal")?;
        Some(q.raw_f32()?)
    } else {
        None
    };
    *r = q;
    Some(Vcpu { id, cpu, affinity: CpuList::from_buf_and_len(cpus, n), usage, steal })
}

/// `bytes` as a `str`, or an error naming the field and where it starts.
#[inline(always)]
fn utf8<'de>(bytes: &'de [u8], start: usize, field: &str) -> Result<&'de str> {
    if bytes.is_ascii() {
        // SAFETY: ASCII is valid UTF-8. (Domain names and UUIDs are
        // ASCII; this skips `from_utf8`'s setup, which showed up in wasm.)
        return Ok(unsafe { std::str::from_utf8_unchecked(bytes) });
    }
    std::str::from_utf8(bytes).map_err(|e| DecodeError { offset: start, message: format!("{field}: string is not UTF-8: {e}") })
}

/// `a == b` for short byte strings (names, uuids), eight bytes at a time.
/// Slice equality is a `memcmp` call, and wasm's libc compares byte by byte.
#[inline(always)]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut words_a = a.chunks_exact(8);
    let mut words_b = b.chunks_exact(8);
    let word = |w: &[u8]| u64::from_le_bytes(w.try_into().expect("chunks of 8"));
    if !words_a.by_ref().zip(words_b.by_ref()).all(|(x, y)| word(x) == word(y)) {
        return false;
    }
    words_a.remainder().iter().zip(words_b.remainder()).all(|(x, y)| x == y)
}

#[inline(always)]
fn vcpu(r: &mut Reader<'_>) -> Result<Vcpu> {
    let mut v = Vcpu::default();
    let mut seen = Seen::default();
    for _ in 0..r.map_len("vcpu")? {
        match r.key()? {
            b"id" => v.id = seen.set(0, r.u32("id")?),
            b"cpu" => v.cpu = seen.set(1, r.u32("cpu")?),
            b"usage" => v.usage = seen.set(2, r.f32("usage")?),
            b"steal" => v.steal = r.option(|r| r.f32("steal"))?,
            b"affinity" => {
                let n = r.array_len("affinity")?;
                // (No reserve: up to four CPUs fit inline, and reserving is a call.)
                for _ in 0..n {
                    v.affinity.push(r.u32("affinity")?);
                }
            }
            _ => r.skip()?,
        }
    }
    r.require(seen, &["id", "cpu", "usage"], "vcpu")?;
    Ok(v)
}

#[inline(always)]
fn domain_memory(r: &mut Reader<'_>, m: &mut DomainMemory) -> Result<()> {
    let mut seen = Seen::default();
    for _ in 0..r.map_len("domain memory")? {
        match r.key()? {
            b"max_kib" => m.max_kib = seen.set(0, r.u64("max_kib")?),
            b"target_kib" => m.target_kib = seen.set(1, r.u64("target_kib")?),
            b"unused_kib" => m.unused_kib = r.option(|r| r.u64("unused_kib"))?,
            b"available_kib" => m.available_kib = r.option(|r| r.u64("available_kib"))?,
            b"usable_kib" => m.usable_kib = r.option(|r| r.u64("usable_kib"))?,
            b"rss_kib" => m.rss_kib = r.option(|r| r.u64("rss_kib"))?,
            b"swap_in_kib" => m.swap_in_kib = r.option(|r| r.u64("swap_in_kib"))?,
            b"swap_out_kib" => m.swap_out_kib = r.option(|r| r.u64("swap_out_kib"))?,
            b"major_faults" => m.major_faults = r.option(|r| r.u64("major_faults"))?,
            b"autodeflate" => m.autodeflate = r.bool("autodeflate")?,
            _ => r.skip()?,
        }
    }
    r.require(seen, &["max_kib", "target_kib"], "domain memory")
}

/// Which required fields a map has shown, by bit.
#[derive(Default, Clone, Copy)]
struct Seen(u32);

impl Seen {
    #[inline]
    fn set<T>(&mut self, bit: u32, value: T) -> T {
        self.0 |= 1 << bit;
        value
    }
}

/// The decoder's cursor. Hot reads are inlined; every out-of-line step runs
/// on a copy (see [`Reader::out_of_line`]), so the cursor's address never
/// escapes and its position stays in a register (a local, in wasm) instead
/// of being stored and reloaded around every write into the snapshot.
#[derive(Clone, Copy)]
struct Reader<'de> {
    input: &'de [u8],
    pos: usize,
}

impl<'de> Reader<'de> {
    /// Runs a rarely taken step on a copy of the cursor, out of line, and
    /// takes back its position.
    #[inline(always)]
    fn out_of_line<T>(&mut self, step: impl FnOnce(&mut Reader<'de>) -> Result<T>) -> Result<T> {
        let (value, pos) = run_out_of_line(*self, step)?;
        self.pos = pos;
        Ok(value)
    }

    fn error(self, message: impl Into<String>) -> DecodeError {
        DecodeError { offset: self.pos, message: message.into() }
    }

    /// Consumes `lit` (at most 16 bytes) if the input continues with it.
    /// One 16-byte load and a constant mask where the input allows (a
    /// byte-slice comparison is a `memcmp` call in wasm).
    #[inline(always)]
    fn literal(&mut self, lit: &[u8]) -> Option<()> {
        let len = lit.len();
        let found = match self.input.get(self.pos..self.pos + 16) {
            Some(window) => {
                let mut want = [0u8; 16];
                want[..len].copy_from_slice(lit);
                let mask = if len >= 16 { u128::MAX } else { (1u128 << (8 * len)) - 1 };
                let have = u128::from_le_bytes(window.try_into().expect("16 bytes"));
                have & mask == u128::from_le_bytes(want)
            }
            None => self.input.get(self.pos..self.pos + len) == Some(lit),
        };
        if found {
            self.pos += len;
            Some(())
        } else {
            None
        }
    }

    /// An unsigned integer below 65,536 (fixint, uint8 or uint16), or `None`.
    #[inline(always)]
    fn small_uint(&mut self) -> Option<u32> {
        let input = self.input;
        let at = self.pos;
        let (value, width) = match input.get(at) {
            Some(&b @ 0x00..=0x7f) => (u32::from(b), 1),
            Some(0xcc) => (u32::from(*input.get(at + 1)?), 2),
            Some(0xcd) => (u32::from(u16::from_be_bytes([*input.get(at + 1)?, *input.get(at + 2)?])), 3),
            _ => return None,
        };
        self.pos = at + width;
        Some(value)
    }

    /// A boolean, or `None`.
    #[inline(always)]
    fn plain_bool(&mut self) -> Option<bool> {
        let value = match self.input.get(self.pos) {
            Some(0xc2) => false,
            Some(0xc3) => true,
            _ => return None,
        };
        self.pos += 1;
        Some(value)
    }

    /// An f32 (marker 0xca), or `None`.
    #[inline(always)]
    fn raw_f32(&mut self) -> Option<f32> {
        match self.input.get(self.pos..self.pos + 5) {
            Some([0xca, a, b, c, d]) => {
                self.pos += 5;
                Some(f32::from_be_bytes([*a, *b, *c, *d]))
            }
            _ => None,
        }
    }

    /// All `required` fields (by bit, in order) were seen.
    #[inline(always)]
    fn require(self, seen: Seen, required: &[&str], what: &str) -> Result<()> {
        let all = (1u32 << required.len()) - 1;
        if seen.0 & all == all {
            return Ok(());
        }
        self.missing(seen, required, what)
    }

    #[inline(never)]
    fn missing(self, seen: Seen, required: &[&str], what: &str) -> Result<()> {
        match required.iter().enumerate().find(|(bit, _)| seen.0 & (1 << bit) == 0) {
            Some((_, name)) => Err(self.error(format!("{what}: missing field `{name}`"))),
            None => Ok(()),
        }
    }

    #[inline]
    fn peek(self) -> Result<u8> {
        self.input.get(self.pos).copied().ok_or_else(|| self.error("unexpected end of input"))
    }

    #[inline]
    fn byte(&mut self) -> Result<u8> {
        let b = self.peek()?;
        self.pos += 1;
        Ok(b)
    }

    #[inline]
    fn take(&mut self, len: usize) -> Result<&'de [u8]> {
        match self.pos.checked_add(len) {
            Some(end) if end <= self.input.len() => {
                let bytes = &self.input[self.pos..end];
                self.pos = end;
                Ok(bytes)
            }
            _ => Err(self.error(format!("length {len} runs past the end of input"))),
        }
    }

    #[inline]
    fn be<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// The value at `pos` is not what `field` needs (`pos` is in bounds: peeked).
    fn unexpected(self, field: &str, expected: &str) -> DecodeError {
        self.error(format!("{field}: expected {expected}, found marker 0x{:02x}", self.input[self.pos]))
    }

    /// Every element takes at least one byte: a count larger than what is
    /// left is corrupt, and refusing it bounds what `reserve` asks for.
    fn count(self, count: usize, per_item: usize, what: &str) -> Result<usize> {
        if count.saturating_mul(per_item) > self.input.len() - self.pos {
            return Err(self.error(format!("{what}: count {count} is larger than the {} bytes left", self.input.len() - self.pos)));
        }
        Ok(count)
    }

    #[inline(always)]
    fn map_len(&mut self, what: &str) -> Result<usize> {
        // fixmap, inline: every struct in the snapshot has fewer than 16 fields.
        if let Some(&b @ 0x80..=0x8f) = self.input.get(self.pos) {
            let n = (b & 0x0f) as usize;
            if 2 * n < self.input.len() - self.pos {
                self.pos += 1;
                return Ok(n);
            }
        }
        self.out_of_line(|r| r.container_len(what, [0x80, 0xde, 0xdf], 2, "a map"))
    }

    #[inline(always)]
    fn array_len(&mut self, what: &str) -> Result<usize> {
        // fixarray, inline: vCPU and affinity lists.
        if let Some(&b @ 0x90..=0x9f) = self.input.get(self.pos) {
            let n = (b & 0x0f) as usize;
            if n < self.input.len() - self.pos {
                self.pos += 1;
                return Ok(n);
            }
        }
        self.out_of_line(|r| r.container_len(what, [0x90, 0xdc, 0xdd], 1, "an array"))
    }

    /// Any length encoding of a map or array (`markers`: fix base, 16-bit, 32-bit).
    #[inline(never)]
    fn container_len(&mut self, what: &str, markers: [u8; 3], per_item: usize, expected: &str) -> Result<usize> {
        let marker = self.peek()?;
        let (n, header) = if marker & 0xf0 == markers[0] {
            ((marker & 0x0f) as usize, 1)
        } else if marker == markers[1] {
            (u16::from_be_bytes(self.at(1)?) as usize, 3)
        } else if marker == markers[2] {
            (u32::from_be_bytes(self.at(1)?) as usize, 5)
        } else {
            return Err(self.unexpected(what, expected));
        };
        self.pos += header;
        self.count(n, per_item, what)
    }

    /// `N` bytes starting `skip` bytes ahead, without consuming.
    fn at<const N: usize>(self, skip: usize) -> Result<[u8; N]> {
        let start = self.pos + skip;
        let bytes = self.input.get(start..start + N).ok_or_else(|| self.error("unexpected end of input"))?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    /// A string's bytes, unvalidated (map keys are only compared).
    #[inline(always)]
    fn str_bytes(&mut self, what: &str) -> Result<&'de [u8]> {
        // fixstr and str8, inline: every key and most names are shorter
        // than 32 bytes, and a UUID is 36.
        let at = self.pos;
        let (start, len) = match self.input.get(at) {
            Some(&b @ 0xa0..=0xbf) => (at + 1, (b & 0x1f) as usize),
            Some(0xd9) if at + 1 < self.input.len() => (at + 2, self.input[at + 1] as usize),
            _ => return self.out_of_line(|r| r.long_str_bytes(what)),
        };
        match self.input.get(start..start + len) {
            Some(bytes) => {
                self.pos = start + len;
                Ok(bytes)
            }
            None => self.out_of_line(|r| r.long_str_bytes(what)),
        }
    }

    #[inline(never)]
    fn long_str_bytes(&mut self, what: &str) -> Result<&'de [u8]> {
        let len = match self.peek()? {
            b @ 0xa0..=0xbf => {
                self.pos += 1;
                (b & 0x1f) as usize
            }
            0xd9 => {
                self.pos += 1;
                self.byte()? as usize
            }
            0xda => {
                self.pos += 1;
                u16::from_be_bytes(self.be()?) as usize
            }
            0xdb => {
                self.pos += 1;
                u32::from_be_bytes(self.be()?) as usize
            }
            _ => return Err(self.unexpected(what, "a string")),
        };
        self.take(len)
    }

    #[inline]
    fn key(&mut self) -> Result<&'de [u8]> {
        self.str_bytes("map key")
    }

    #[inline(always)]
    fn str(&mut self, field: &str) -> Result<&'de str> {
        let start = self.pos;
        let bytes = self.str_bytes(field)?;
        utf8(bytes, start, field)
    }

    /// Sets `to` to the string at the cursor. One equal to `to` (last
    /// quantum's name or UUID, on a steady host) is neither checked nor
    /// copied again: `to` is valid UTF-8 already.
    #[inline(always)]
    fn str_into(&mut self, to: &mut String, field: &str) -> Result<()> {
        let start = self.pos;
        let bytes = self.str_bytes(field)?;
        if !same_bytes(to.as_bytes(), bytes) {
            let s = utf8(bytes, start, field)?;
            to.clear();
            to.push_str(s);
        }
        Ok(())
    }

    /// Unsigned integers of any width inline (KiB figures are mostly
    /// uint32); signed encodings of non-negative values out of line.
    #[inline(always)]
    fn u64(&mut self, field: &str) -> Result<u64> {
        let at = self.pos;
        let input = self.input;
        let (value, width) = match input.get(at) {
            Some(&b @ 0x00..=0x7f) => (u64::from(b), 0),
            Some(0xcc) if at + 2 <= input.len() => (u64::from(input[at + 1]), 1),
            Some(0xcd) if at + 3 <= input.len() => (u64::from(u16::from_be_bytes([input[at + 1], input[at + 2]])), 2),
            Some(0xce) if at + 5 <= input.len() => {
                (u64::from(u32::from_be_bytes([input[at + 1], input[at + 2], input[at + 3], input[at + 4]])), 4)
            }
            _ => return self.out_of_line(|r| r.other_u64(field)),
        };
        self.pos = at + 1 + width;
        Ok(value)
    }

    #[inline(never)]
    fn other_u64(&mut self, field: &str) -> Result<u64> {
        let marker = self.peek()?;
        let (value, width): (i64, usize) = match marker {
            0xcf => {
                let value = u64::from_be_bytes(self.at(1)?);
                self.pos += 9;
                return Ok(value);
            }
            0xcc => (self.at::<1>(1)?[0].into(), 1),
            0xcd => (u16::from_be_bytes(self.at(1)?).into(), 2),
            0xce => (u32::from_be_bytes(self.at(1)?).into(), 4),
            0xd0 => (i8::from_be_bytes(self.at(1)?).into(), 1),
            0xd1 => (i16::from_be_bytes(self.at(1)?).into(), 2),
            0xd2 => (i32::from_be_bytes(self.at(1)?).into(), 4),
            0xd3 => (i64::from_be_bytes(self.at(1)?), 8),
            0x00..=0x7f => (marker.into(), 0),
            0xe0..=0xff => ((marker as i8).into(), 0),
            _ => return Err(self.unexpected(field, "an unsigned integer")),
        };
        let value = u64::try_from(value).map_err(|_| self.error(format!("{field}: {value} is negative")))?;
        self.pos += 1 + width;
        Ok(value)
    }

    #[inline(always)]
    fn u32(&mut self, field: &str) -> Result<u32> {
        let value = self.u64(field)?;
        u32::try_from(value).map_err(|_| self.error(format!("{field}: {value} does not fit in 32 bits")))
    }

    #[inline(always)]
    fn f32(&mut self, field: &str) -> Result<f32> {
        if let Some([0xca, a, b, c, d]) = self.input.get(self.pos..self.pos + 5) {
            self.pos += 5;
            return Ok(f32::from_be_bytes([*a, *b, *c, *d]));
        }
        match self.peek()? {
            0xca => {
                self.pos += 1;
                Ok(f32::from_be_bytes(self.be()?))
            }
            0xcb => {
                self.pos += 1;
                Ok(f64::from_be_bytes(self.be()?) as f32)
            }
            0xe0..=0xff => Ok(self.byte()? as i8 as f32),
            0xd0..=0xd3 => Err(self.error(format!("{field}: negative integers are not valid here"))),
            _ => self.u64(field).map(|v| v as f32),
        }
    }

    #[inline]
    fn bool(&mut self, field: &str) -> Result<bool> {
        match self.peek()? {
            0xc2 => {
                self.pos += 1;
                Ok(false)
            }
            0xc3 => {
                self.pos += 1;
                Ok(true)
            }
            _ => Err(self.unexpected(field, "a boolean")),
        }
    }

    /// `nil` is `None`.
    #[inline(always)]
    fn option<T>(&mut self, read: impl FnOnce(&mut Self) -> Result<T>) -> Result<Option<T>> {
        if self.peek()? == 0xc0 {
            self.pos += 1;
            Ok(None)
        } else {
            read(self).map(Some)
        }
    }

    /// One value of any shape, decoded by rmp_serde (for the small,
    /// richly-typed parts: verdicts and params).
    fn serde<T: serde::de::DeserializeOwned>(&mut self, field: &str) -> Result<T> {
        self.out_of_line(|r| {
            let start = r.pos;
            r.skip_here()?;
            rmp_serde::from_slice(&r.input[start..r.pos]).map_err(|e| DecodeError { offset: start, message: format!("{field}: {e}") })
        })
    }

    /// Skips one value of any shape without recursion: a table gives each
    /// marker byte its payload and child count, so skipping the parts a
    /// policy does not read is a short loop per token.
    fn skip(&mut self) -> Result<()> {
        self.out_of_line(Reader::skip_here)
    }

    #[inline(never)]
    fn skip_here(&mut self) -> Result<()> {
        let mut pending: usize = 1;
        while pending > 0 {
            pending -= 1;
            let marker = self.byte()?;
            let (kind, size) = SKIP[marker as usize];
            match kind {
                SKIP_BYTES => {
                    self.take(size as usize)?;
                }
                SKIP_LEN => {
                    // str/bin/ext 8/16/32: a big-endian length of `size` bytes (+1 type byte for ext).
                    let len = match size {
                        1 => self.byte()? as usize,
                        2 => u16::from_be_bytes(self.be()?) as usize,
                        _ => u32::from_be_bytes(self.be()?) as usize,
                    };
                    let ext = usize::from(matches!(marker, 0xc7..=0xc9));
                    self.take(len + ext)?;
                }
                SKIP_ITEMS => {
                    // Arrays (per item 1) and maps (2): count inline or in `size` bytes.
                    let per_item = if matches!(marker, 0x80..=0x8f | 0xde | 0xdf) { 2 } else { 1 };
                    let count = match size {
                        0 => (marker & 0x0f) as usize,
                        2 => u16::from_be_bytes(self.be()?) as usize,
                        _ => u32::from_be_bytes(self.be()?) as usize,
                    };
                    let what = if per_item == 2 { "skipped map" } else { "skipped array" };
                    pending += per_item * self.count(count, per_item, what)?;
                }
                _ => {
                    self.pos -= 1;
                    return Err(self.error("reserved MessagePack marker 0xc1"));
                }
            }
        }
        Ok(())
    }
}

#[inline(never)]
fn run_out_of_line<'de, T>(mut reader: Reader<'de>, step: impl FnOnce(&mut Reader<'de>) -> Result<T>) -> Result<(T, usize)> {
    let value = step(&mut reader)?;
    Ok((value, reader.pos))
}

/// How to skip a value, by marker byte: `(kind, size)`.
const SKIP_BYTES: u8 = 0; // `size` payload bytes follow
const SKIP_LEN: u8 = 1; // a `size`-byte length follows, then that many bytes
const SKIP_ITEMS: u8 = 2; // children follow; their count is in the marker (`size` 0) or the next `size` bytes
const SKIP_RESERVED: u8 = 3;

const SKIP: [(u8, u8); 256] = {
    let mut table = [(SKIP_BYTES, 0u8); 256];
    let mut b = 0;
    while b < 256 {
        table[b] = match b as u8 {
            0x80..=0x9f => (SKIP_ITEMS, 0),
            0xa0..=0xbf => (SKIP_BYTES, b as u8 & 0x1f),
            0xc1 => (SKIP_RESERVED, 0),
            0xc4 | 0xc7 | 0xd9 => (SKIP_LEN, 1),
            0xc5 | 0xc8 | 0xda => (SKIP_LEN, 2),
            0xc6 | 0xc9 | 0xdb => (SKIP_LEN, 4),
            0xca | 0xce | 0xd2 => (SKIP_BYTES, 4),
            0xcb | 0xcf | 0xd3 => (SKIP_BYTES, 8),
            0xcc | 0xd0 => (SKIP_BYTES, 1),
            0xcd | 0xd1 => (SKIP_BYTES, 2),
            0xd4 => (SKIP_BYTES, 2),
            0xd5 => (SKIP_BYTES, 3),
            0xd6 => (SKIP_BYTES, 5),
            0xd7 => (SKIP_BYTES, 9),
            0xd8 => (SKIP_BYTES, 17),
            0xdc | 0xde => (SKIP_ITEMS, 2),
            0xdd | 0xdf => (SKIP_ITEMS, 4),
            _ => (SKIP_BYTES, 0), // fixint, nil, bool
        };
        b += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::{DomainBuilder, SnapshotBuilder};
    use crate::{Decision, Outcome, Param, Verdict};

    /// Every optional field both present and absent, strings of every
    /// length class, integers of every width.
    fn rich_snapshot() -> Snapshot {
        let mut snap = SnapshotBuilder::new(8, 16 << 20)
            .host_memory(8 << 20, 1 << 20)
            .reserve_cpu(7)
            .quantum(u64::MAX)
            .param("cpu", Param::Map([("min_gain".to_string(), Param::Float(0.1)), ("max_moves".to_string(), Param::Int(-3))].into()))
            .param("tags", Param::List(vec![Param::Str("a".into()), Param::Bool(true)]))
            .domain(DomainBuilder::new("web-ü").vcpu(1, 0.5).vcpu_with_steal(2, 1.0, 0.25).memory_mib(2048, 1024, Some(300)))
            .domain(DomainBuilder::new(&"x".repeat(40)).vcpu(3, 0.0).memory_mib(4096, 4096, None).tag("latency"))
            .domain(DomainBuilder::new(&"y".repeat(300)).vcpu(200, 0.1).pressure(70_000, 1).tag(&"z".repeat(70_000)))
            .build();
        snap.host.cpus[3].node = 1;
        snap.domains[1].vcpus[0].affinity = CpuList::new();
        snap.domains[2].vcpus[0].affinity = (0..300).collect();
        snap.domains[2].vcpus[0].id = 70_000;
        snap.domains[0].memory.swap_in_kib = Some(u64::MAX);
        snap.domains[0].memory.rss_kib = Some(5);
        snap.domains[0].memory.swap_out_kib = Some(0);
        snap.domains[0].memory.autodeflate = true;
        snap.verdicts.push(Verdict {
            slot: "cpu".into(),
            action: Action::pin("db", 0, vec![3], "why"),
            outcome: Outcome::Rejected,
            reason: "no".into(),
        });
        snap
    }

    fn ours(snap: &Snapshot) -> Vec<u8> {
        let mut buf = Vec::new();
        encode(snap, &mut buf);
        buf
    }

    #[test]
    fn encodes_the_same_bytes_as_rmp_serde() {
        for snap in [rich_snapshot(), Snapshot::default()] {
            assert_eq!(ours(&snap), rmp_serde::to_vec_named(&snap).unwrap());
        }
    }

    #[test]
    fn answers_encode_the_same_bytes_as_rmp_serde() {
        let actions = vec![
            Action::pin("web-ü", 3, vec![0, 255, 70_000], "busiest pCPU load 1.50 -> 1.00"),
            Action::pin("x".repeat(40), u32::MAX, vec![], ""),
            Action::set_memory("db", u64::MAX, "r".repeat(300)),
            Action::set_memory("", 0, "starved: +64 MiB"),
        ];
        for actions in [vec![], actions.clone(), actions.iter().cycle().take(20).cloned().collect()] {
            let mut ours = Vec::new();
            encode_decision(&actions, &mut ours);
            assert_eq!(ours, rmp_serde::to_vec_named(&Decision { actions }).unwrap());
        }
    }

    #[test]
    fn decodes_what_rmp_serde_decodes() {
        let snap = rich_snapshot();
        let bytes = ours(&snap);
        assert_eq!(decode(&bytes).unwrap(), snap);
        assert_eq!(rmp_serde::from_slice::<Snapshot>(&bytes).unwrap(), snap);
    }

    #[test]
    fn decoding_into_last_quantums_snapshot_replaces_all_of_it() {
        let rich = rich_snapshot();
        let small = SnapshotBuilder::new(2, 1 << 20).domain(DomainBuilder::new("only").vcpu(1, 0.25)).build();
        let mut reused = Snapshot::default();
        for snap in [&rich, &small, &rich, &Snapshot::default(), &small] {
            decode_into(&ours(snap), &mut reused, Reads::ALL).unwrap();
            assert_eq!(&reused, snap);
        }
    }

    #[test]
    fn parts_not_read_are_skipped_and_left_empty() {
        let snap = rich_snapshot();
        let bytes = ours(&snap);
        let mut got = Snapshot::default();
        decode_into(&bytes, &mut got, Reads { vcpus: false, domain_memory: true }).unwrap();
        let mut want = snap.clone();
        want.domains.iter_mut().for_each(|d| d.vcpus.clear());
        assert_eq!(got, want);
        decode_into(&bytes, &mut got, Reads { vcpus: true, domain_memory: false }).unwrap();
        let mut want = snap.clone();
        want.domains.iter_mut().for_each(|d| d.memory = DomainMemory::default());
        assert_eq!(got, want);
        // Skipped parts are still checked for shape: a truncation is an error.
        assert!(decode_into(&bytes[..bytes.len() / 2], &mut got, Reads { vcpus: false, domain_memory: false }).is_err());
    }

    #[test]
    fn vcpus_off_the_fast_path_decode_the_same() {
        let mut snap = SnapshotBuilder::new(300, 1 << 20)
            .domain(
                DomainBuilder::new("a")
                    .vcpu(0, 0.5)
                    .vcpu(129, 0.25)
                    .vcpu_with_steal(299, 1.0, 0.5)
                    .vcpu(7, 0.0)
                    .vcpu(8, 0.0)
                    .vcpu(9, 0.0)
                    .vcpu(10, 0.0),
            )
            .build();
        let vcpus = &mut snap.domains[0].vcpus;
        vcpus[1].id = 70_000; // uint32 id
        vcpus[3].affinity = (0..20).collect(); // array16
        vcpus[4].affinity = CpuList::new();
        vcpus[5].affinity = (0..4).collect(); // the most the fast path takes
        vcpus[6].affinity = (0..5).collect(); // one more: a fixarray, read by the general path
        snap.host.cpus[1].id = 70_000; // a host CPU with a uint32 id, read by the general path too
        let bytes = ours(&snap);
        assert_eq!(decode(&bytes).unwrap(), snap);
        // And a vCPU whose usage another writer sent as float64.
        let usage = [&[0xa5][..], b"usage", &[0xca], &0.25f32.to_be_bytes()].concat();
        let at = bytes.windows(usage.len()).position(|w| w == usage).unwrap();
        let wide = [&bytes[..at], &[0xa5][..], b"usage", &[0xcb], &0.25f64.to_be_bytes(), &bytes[at + usage.len()..]].concat();
        assert_eq!(decode(&wide).unwrap(), snap);
    }

    #[test]
    fn same_bytes_is_slice_equality() {
        let a: Vec<u8> = (1..=20).collect();
        for len in 0..=a.len() {
            assert!(same_bytes(&a[..len], &a[..len]));
            for at in 0..len {
                let mut b = a[..len].to_vec();
                b[at] ^= 0x80;
                assert!(!same_bytes(&a[..len], &b), "differs at {at} of {len}");
            }
            if len > 0 {
                assert!(!same_bytes(&a[..len], &a[..len - 1]));
            }
        }
    }

    #[test]
    fn unknown_fields_of_any_shape_are_skipped() {
        /// A future snapshot: one more field, of every shape at once.
        #[derive(serde::Serialize)]
        #[allow(clippy::type_complexity)]
        struct Future<'a> {
            added: (u64, Vec<Option<Vec<&'a str>>>, std::collections::BTreeMap<&'a str, f64>, &'a serde_bytes_like::Bytes),
            #[serde(flatten)]
            snap: &'a Snapshot,
        }
        mod serde_bytes_like {
            /// Serializes as MessagePack bin.
            pub struct Bytes(pub Vec<u8>);
            impl serde::Serialize for Bytes {
                fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                    s.serialize_bytes(&self.0)
                }
            }
        }
        let snap = rich_snapshot();
        let bin = serde_bytes_like::Bytes(vec![7; 300]);
        let extra = (u64::MAX, vec![None, Some(vec!["x"; 40])], [("k", -1.5)].into(), &bin);
        let bytes = rmp_serde::to_vec_named(&Future { added: extra, snap: &snap }).unwrap();
        assert_eq!(decode(&bytes).unwrap(), snap);
    }

    #[test]
    fn numbers_are_read_in_any_width_that_fits() {
        // Another writer's float64 usage and 64-bit integer id still decode.
        let snap = SnapshotBuilder::new(1, 1 << 20).domain(DomainBuilder::new("a").vcpu(0, 0.5)).build();
        let bytes = ours(&snap);
        let usage = [&[0xa5][..], b"usage", &[0xca], &0.5f32.to_be_bytes()].concat();
        let wide_usage = [&[0xa5][..], b"usage", &[0xcb], &0.5f64.to_be_bytes()].concat();
        let id = [&[0xa2][..], b"id", &[0x00]].concat();
        let wide_id = [&[0xa2][..], b"id", &[0xcf], &0u64.to_be_bytes()].concat();
        let mut wide = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i..].starts_with(&usage) {
                wide.extend_from_slice(&wide_usage);
                i += usage.len();
            } else if bytes[i..].starts_with(&id) {
                wide.extend_from_slice(&wide_id);
                i += id.len();
            } else {
                wide.push(bytes[i]);
                i += 1;
            }
        }
        assert!(wide.len() > bytes.len() + 10);
        assert_eq!(decode(&wide).unwrap(), snap);
        // Out of range is an error naming the field.
        let too_big = [&[0xa2][..], b"id", &[0xcf], &u64::MAX.to_be_bytes()].concat();
        let bad: Vec<u8> = wide
            .windows(wide_id.len())
            .position(|w| w == wide_id)
            .map(|at| [&wide[..at], &too_big, &wide[at + wide_id.len()..]].concat())
            .unwrap();
        assert!(decode(&bad).unwrap_err().message.contains("id: 18446744073709551615 does not fit in 32 bits"));
    }

    #[test]
    fn missing_required_fields_are_named() {
        let mut snap = rich_snapshot();
        snap.domains.truncate(1);
        let mut bytes = ours(&snap);
        // Rename the first vCPU's "usage" key to "usagf": an unknown field, so `usage` is missing.
        let vcpu_at = bytes.windows(8).position(|w| w == b"affinity").unwrap();
        let at = vcpu_at + bytes[vcpu_at..].windows(5).position(|w| w == b"usage").unwrap();
        bytes[at + 4] = b'f';
        let err = decode(&bytes).unwrap_err();
        assert!(err.message.contains("vcpu: missing field `usage`"), "{err}");
    }

    #[test]
    fn every_truncation_is_an_error_with_an_offset_never_a_panic() {
        let bytes = ours(&rich_snapshot());
        for len in 0..bytes.len() {
            let err = decode(&bytes[..len]).unwrap_err();
            assert!(err.offset <= len, "offset {} past the {len} bytes given", err.offset);
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = ours(&rich_snapshot());
        bytes.push(0xc0);
        assert!(decode(&bytes).unwrap_err().message.contains("1 trailing bytes"));
    }

    #[test]
    fn huge_counts_are_refused_before_reserving() {
        // `domains` claiming 2^32-1 elements in a tiny buffer.
        let mut bytes = vec![0x81, 0xa7];
        bytes.extend_from_slice(b"domains");
        bytes.extend_from_slice(&[0xdd, 0xff, 0xff, 0xff, 0xff]);
        let err = decode(&bytes).unwrap_err();
        assert!(err.message.contains("domains: count 4294967295"), "{err}");
        // The same inside an unknown field, which is skipped rather than read.
        let err = decode(&[0x81, 0xa1, b'z', 0xdf, 0xff, 0xff, 0xff, 0xff]).unwrap_err();
        assert!(err.message.contains("skipped map: count"), "{err}");
    }

    #[test]
    fn skip_knows_every_marker() {
        let values: Vec<Vec<u8>> = vec![
            vec![0x05],
            vec![0xe0],
            vec![0xc0],
            vec![0xc2],
            vec![0xc3],
            vec![0xcc, 1],
            vec![0xcd, 1, 2],
            vec![0xce, 1, 2, 3, 4],
            vec![0xcf, 1, 2, 3, 4, 5, 6, 7, 8],
            vec![0xd0, 1],
            vec![0xd1, 1, 2],
            vec![0xd2, 1, 2, 3, 4],
            vec![0xd3, 1, 2, 3, 4, 5, 6, 7, 8],
            vec![0xca, 1, 2, 3, 4],
            vec![0xcb, 1, 2, 3, 4, 5, 6, 7, 8],
            vec![0xa2, b'h', b'i'],
            [&[0xd9, 3][..], b"abc"].concat(),
            [&[0xda, 0, 3][..], b"abc"].concat(),
            [&[0xdb, 0, 0, 0, 3][..], b"abc"].concat(),
            vec![0xc4, 2, 9, 9],
            vec![0xc5, 0, 2, 9, 9],
            vec![0xc6, 0, 0, 0, 2, 9, 9],
            vec![0xd4, 1, 9],
            vec![0xd5, 1, 9, 9],
            vec![0xd6, 1, 9, 9, 9, 9],
            [&[0xd7, 1][..], &[9; 8]].concat(),
            [&[0xd8, 1][..], &[9; 16]].concat(),
            vec![0xc7, 2, 1, 9, 9],
            vec![0xc8, 0, 2, 1, 9, 9],
            vec![0xc9, 0, 0, 0, 2, 1, 9, 9],
            vec![0x92, 0x01, 0x91, 0xc0],
            vec![0xdc, 0, 2, 0x01, 0x02],
            vec![0xdd, 0, 0, 0, 1, 0x01],
            vec![0x81, 0xa1, b'k', 0x90],
            vec![0xde, 0, 1, 0x01, 0x80],
            vec![0xdf, 0, 0, 0, 1, 0x01, 0x02],
        ];
        for value in &values {
            let mut r = Reader { input: value, pos: 0 };
            r.skip().unwrap_or_else(|e| panic!("{value:02x?}: {e}"));
            assert_eq!(r.pos, value.len(), "{value:02x?}");
            for len in 0..value.len() {
                assert!(Reader { input: &value[..len], pos: 0 }.skip().is_err(), "{value:02x?} cut at {len}");
            }
        }
        assert!(Reader { input: &[0xc1], pos: 0 }.skip().unwrap_err().message.contains("reserved"));
    }

    #[test]
    fn deep_unknown_fields_are_skipped_without_recursion() {
        let mut bytes = vec![0x81, 0xa1, b'z'];
        bytes.extend(std::iter::repeat_n(0x91, 100_000));
        bytes.push(0xc0);
        assert!(decode(&bytes).unwrap_err().message.contains("snapshot: missing field `schema_version`"));
    }

    #[test]
    fn wrong_types_bad_utf8_and_reserved_markers_are_errors_naming_the_field() {
        let mut snap = rich_snapshot();
        snap.domains.truncate(1);
        snap.domains[0].name = "ab".into();
        let bytes = ours(&snap);
        let name_at = bytes.windows(3).position(|w| w == [0xa2, b'a', b'b']).unwrap();
        let mut bad = bytes.clone();
        bad[name_at + 1] = 0xff;
        let err = decode(&bad).unwrap_err();
        assert_eq!(err.offset, name_at);
        assert!(err.message.contains("name: string is not UTF-8"), "{err}");
        let mut bad = bytes.clone();
        bad[name_at] = 0xc1;
        assert!(decode(&bad).unwrap_err().message.contains("name: expected a string, found marker 0xc1"));
        let mut bad = bytes;
        bad[name_at] = 0x05;
        bad.remove(name_at + 1);
        bad.remove(name_at + 1);
        assert!(decode(&bad).unwrap_err().message.contains("name: expected a string"));
        assert!(decode(&[0xc1]).unwrap_err().message.contains("snapshot: expected a map"));
    }
}
