//! The reader: a cursor over the bytes, and the snapshot's readers built on
//! it.
//!
//! The hot structs, vCPUs and host CPUs, have two readers each. One takes
//! the layout the daemon writes in a straight line (`*_as_written`) and
//! returns `None` at the first byte that differs; the general one, field by
//! field in any order and width, starts again from the same place. Every length and count is checked against the
//! bytes left before it is used, so hostile input is an error, not a panic.

use super::{DecodeError, Result};
use crate::{CpuList, Domain, DomainMemory, Host, HostCpu, HostMemory, Reads, Snapshot, Vcpu};

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
pub(super) fn decode(bytes: &[u8]) -> Result<Snapshot> {
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
    d.not_answering_ms = 0;
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
                // Stepped over by the straight-line reader too (out of
                // line, as the vCPUs are).
                r.out_of_line(|r| if memory_as_written(r).is_none() { r.skip() } else { Ok(()) })?;
                seen.set(3, ());
            }
            b"memory" => {
                match r.out_of_line(|r| Ok(memory_as_written(r)))? {
                    Some(m) => d.memory = m,
                    None => domain_memory(r, &mut d.memory)?,
                }
                seen.set(3, ());
            }
            b"not_answering_ms" => d.not_answering_ms = r.u64("not_answering_ms")?,
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

/// A domain's memory laid out exactly as the daemon writes it (`max_kib`,
/// `target_kib`, the optional figures in their order, `autodeflate`, then
/// `free_page_reporting` and `age_ms` when written; unsigned integers and
/// plain booleans), read in a straight line like [`vcpu_as_written`]: no
/// loop over keys, no key dispatch. Anything else returns `None`, and the
/// general reader, starting again at the same place, handles it.
#[inline(always)]
pub(super) fn memory_as_written(r: &mut Reader<'_>) -> Option<DomainMemory> {
    let mut q = *r;
    let fields = match q.input.get(q.pos) {
        Some(&b @ 0x83..=0x8f) => usize::from(b & 0x0f),
        _ => return None,
    };
    q.pos += 1;
    let mut m = DomainMemory::default();
    q.literal(b"\xa7max_kib")?;
    m.max_kib = q.plain_uint()?;
    q.literal(b"\xaatarget_kib")?;
    m.target_kib = q.plain_uint()?;
    let mut left = fields - 2;
    // A macro, not a closure: each key a constant, so its check folds to
    // one masked compare (a closure taking the key as a slice was not
    // inlined, and copied the key and built its mask on every call).
    macro_rules! optional {
        ($key:literal) => {
            if left > 0 && q.literal($key).is_some() {
                left -= 1;
                Some(q.plain_uint()?)
            } else {
                None
            }
        };
    }
    m.unused_kib = optional!(b"\xaaunused_kib");
    m.available_kib = optional!(b"\xadavailable_kib");
    m.usable_kib = optional!(b"\xaausable_kib");
    m.rss_kib = optional!(b"\xa7rss_kib");
    m.swap_in_kib = optional!(b"\xabswap_in_kib");
    m.swap_out_kib = optional!(b"\xacswap_out_kib");
    m.major_faults = optional!(b"\xacmajor_faults");
    if left == 0 {
        return None;
    }
    q.literal(b"\xabautodeflate")?;
    m.autodeflate = q.plain_bool()?;
    left -= 1;
    // 20 bytes with its length: longer than one literal check.
    if left > 0 && q.literal(b"\xb3free_page_").is_some() {
        q.literal(b"reporting")?;
        m.free_page_reporting = q.plain_bool()?;
        left -= 1;
    }
    if left > 0 {
        q.literal(b"\xa6age_ms")?;
        m.age_ms = q.plain_uint()?;
        left -= 1;
    }
    if left != 0 {
        return None;
    }
    *r = q;
    Some(m)
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
pub(super) fn same_bytes(a: &[u8], b: &[u8]) -> bool {
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
            b"free_page_reporting" => m.free_page_reporting = r.bool("free_page_reporting")?,
            b"age_ms" => m.age_ms = r.u64("age_ms")?,
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
pub(super) struct Reader<'de> {
    pub(super) input: &'de [u8],
    pub(super) pos: usize,
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

    /// An unsigned integer of any width, or `None`.
    #[inline(always)]
    fn plain_uint(&mut self) -> Option<u64> {
        let input = self.input;
        let at = self.pos;
        let b = |k: usize| input.get(at + k).copied().map(u64::from);
        let (value, width) = match input.get(at) {
            Some(&v @ 0x00..=0x7f) => (u64::from(v), 1),
            Some(0xcc) => (b(1)?, 2),
            Some(0xcd) => ((b(1)? << 8) | b(2)?, 3),
            Some(0xce) => ((b(1)? << 24) | (b(2)? << 16) | (b(3)? << 8) | b(4)?, 5),
            Some(0xcf) => (u64::from_be_bytes(input.get(at + 1..at + 9)?.try_into().ok()?), 9),
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
    pub(super) fn skip(&mut self) -> Result<()> {
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
                    // Saturating: on wasm32 an ext32 of length 0xffffffff + 1
                    // would wrap to 0 and skip nothing; saturated, `take` fails.
                    self.take(len.saturating_add(ext))?;
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
