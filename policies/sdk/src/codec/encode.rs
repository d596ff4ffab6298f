//! The writer: the snapshot and a policy's answer, field by field.
//!
//! Every struct is destructured with all its fields named and no `..`, so a
//! field added to a snapshot type does not compile until it is written here
//! (the tests then hold the bytes to rmp_serde's). Map lengths are written
//! by hand next to the fields they count. `verdicts` and `params` are small
//! and richly typed, and go through rmp_serde, whose derives follow any
//! field added to `Verdict`, `Action` or `Param` by themselves.

use crate::{Action, Decision, Domain, DomainMemory, Host, HostCpu, HostMemory, Snapshot, Vcpu};

/// Writes the snapshot exactly as `rmp_serde::encode::write_named` would.
pub fn encode(s: &Snapshot, buf: &mut Vec<u8>) {
    let Snapshot { schema_version, quantum, quantum_ms, host, domains, verdicts, params } = s;
    map(buf, 7);
    key(buf, "schema_version");
    uint(buf, (*schema_version).into());
    key(buf, "quantum");
    uint(buf, *quantum);
    key(buf, "quantum_ms");
    uint(buf, (*quantum_ms).into());
    key(buf, "host");
    let Host { cpus, memory } = host;
    map(buf, 2);
    key(buf, "cpus");
    array(buf, cpus.len());
    for c in cpus {
        let HostCpu { id, online, reserved, usage, node } = c;
        map(buf, 5);
        key(buf, "id");
        uint(buf, (*id).into());
        key(buf, "online");
        boolean(buf, *online);
        key(buf, "reserved");
        boolean(buf, *reserved);
        key(buf, "usage");
        float(buf, *usage);
        key(buf, "node");
        uint(buf, (*node).into());
    }
    let HostMemory { total_kib, available_kib, reserve_kib } = memory;
    key(buf, "memory");
    map(buf, 3);
    key(buf, "total_kib");
    uint(buf, *total_kib);
    key(buf, "available_kib");
    uint(buf, *available_kib);
    key(buf, "reserve_kib");
    uint(buf, *reserve_kib);
    key(buf, "domains");
    array(buf, domains.len());
    for d in domains {
        encode_domain(d, buf);
    }
    key(buf, "verdicts");
    serde_value(buf, verdicts);
    key(buf, "params");
    serde_value(buf, params);
}

fn encode_domain(d: &Domain, buf: &mut Vec<u8>) {
    let Domain { name, uuid, tags, vcpus, memory, not_answering_ms } = d;
    map(buf, 4 + usize::from(!tags.is_empty()) + usize::from(*not_answering_ms != 0));
    key(buf, "name");
    string(buf, name);
    key(buf, "uuid");
    string(buf, uuid);
    if !tags.is_empty() {
        key(buf, "tags");
        array(buf, tags.len());
        for t in tags {
            string(buf, t);
        }
    }
    key(buf, "vcpus");
    array(buf, vcpus.len());
    for v in vcpus {
        if v.affinity.len() <= STACK_AFFINITY {
            // Most of a snapshot's bytes: each vCPU is written into a
            // buffer on the stack, whose length stays in a register, and
            // copied once (a push into the Vec reloads and stores its
            // length and checks its capacity every time).
            let mut stack = Stack { bytes: [0; STACK_BYTES], len: 0 };
            encode_vcpu(v, &mut stack);
            buf.extend_from_slice(&stack.bytes[..stack.len]);
        } else {
            encode_vcpu(v, buf);
        }
    }
    let DomainMemory {
        max_kib,
        target_kib,
        unused_kib,
        available_kib,
        usable_kib,
        rss_kib,
        swap_in_kib,
        swap_out_kib,
        major_faults,
        autodeflate,
        free_page_reporting,
        age_ms,
    } = memory;
    let optional = [
        ("unused_kib", *unused_kib),
        ("available_kib", *available_kib),
        ("usable_kib", *usable_kib),
        ("rss_kib", *rss_kib),
        ("swap_in_kib", *swap_in_kib),
        ("swap_out_kib", *swap_out_kib),
        ("major_faults", *major_faults),
    ];
    key(buf, "memory");
    map(buf, 3 + optional.iter().filter(|(_, v)| v.is_some()).count() + usize::from(*free_page_reporting) + usize::from(*age_ms != 0));
    key(buf, "max_kib");
    uint(buf, *max_kib);
    key(buf, "target_kib");
    uint(buf, *target_kib);
    for (name, value) in optional {
        if let Some(value) = value {
            key(buf, name);
            uint(buf, value);
        }
    }
    key(buf, "autodeflate");
    boolean(buf, *autodeflate);
    if *free_page_reporting {
        key(buf, "free_page_reporting");
        boolean(buf, true);
    }
    if *age_ms != 0 {
        key(buf, "age_ms");
        uint(buf, *age_ms);
    }
    if *not_answering_ms != 0 {
        key(buf, "not_answering_ms");
        uint(buf, *not_answering_ms);
    }
}

/// Longest affinity list written through the stack buffer.
const STACK_AFFINITY: usize = 16;
/// The largest vCPU written through it: the map's header and five keys (29
/// bytes), two u32s (5 each), the affinity's header (3 at 16 items) and
/// its u32s, two f32s (5 each). A test writes that vCPU.
pub(super) const STACK_BYTES: usize = 29 + 5 * 2 + 3 + 5 * STACK_AFFINITY + 5 * 2;

#[inline(always)]
fn encode_vcpu(v: &Vcpu, buf: &mut impl Sink) {
    let Vcpu { id, cpu, affinity, usage, steal } = v;
    map(buf, 4 + usize::from(steal.is_some()));
    key(buf, "id");
    uint(buf, (*id).into());
    key(buf, "cpu");
    uint(buf, (*cpu).into());
    key(buf, "affinity");
    array(buf, affinity.len());
    for c in affinity {
        uint(buf, (*c).into());
    }
    key(buf, "usage");
    float(buf, *usage);
    if let Some(steal) = steal {
        key(buf, "steal");
        float(buf, *steal);
    }
}

/// Where the writers below put bytes: the output `Vec`, or a small buffer
/// on the stack for one vCPU.
trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for Vec<u8> {
    #[inline(always)]
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// A vCPU's bytes, before they are copied into the output in one go.
struct Stack {
    bytes: [u8; STACK_BYTES],
    len: usize,
}

impl Sink for Stack {
    #[inline(always)]
    fn put(&mut self, bytes: &[u8]) {
        // Sized for the largest vCPU that is written here (see STACK_BYTES).
        self.bytes[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }
}

/// Writes a policy's answer, `{ "actions": [...] }`, exactly as
/// `rmp_serde::to_vec_named(&Decision { actions })` would (a test holds it
/// to that): serde's path for the internally tagged `Action` is a visible
/// share of a quantum in wasm when a policy sets hundreds of targets.
pub fn encode_decision(actions: &[Action], buf: &mut Vec<u8>) {
    // The answer is a `Decision` written from its one field; a field added
    // to it breaks this pattern, and must then be written here too.
    let _: fn(Decision) = |Decision { actions: _ }| ();
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

// Every integer and length takes the same (smallest) form rmp_serde gives
// it, written inline, byte by byte: through rmp's `io::Write` path every
// byte was a call returning a `Result`, and the encode took about a fifth of
// the whole decide call at 1,000 domains, natively and in wasm alike.
#[inline(always)]
fn map(buf: &mut impl Sink, len: usize) {
    container(buf, len, 0x80, 0xde);
}

#[inline(always)]
fn array(buf: &mut impl Sink, len: usize) {
    container(buf, len, 0x90, 0xdc);
}

/// A map or array header: the fix form below 16 items, else 16 or 32 bits.
#[inline(always)]
fn container(buf: &mut impl Sink, len: usize, fix: u8, marker16: u8) {
    if len < 16 {
        buf.put(&[fix | len as u8]);
    } else if len < 65_536 {
        let b = (len as u16).to_be_bytes();
        buf.put(&[marker16, b[0], b[1]]);
    } else {
        let b = (len as u32).to_be_bytes();
        buf.put(&[marker16 + 1, b[0], b[1], b[2], b[3]]);
    }
}

#[inline(always)]
fn key(buf: &mut impl Sink, name: &str) {
    string(buf, name);
}

#[inline(always)]
fn string(buf: &mut impl Sink, s: &str) {
    let len = s.len();
    if len < 32 {
        buf.put(&[0xa0 | len as u8]);
    } else if len < 256 {
        buf.put(&[0xd9, len as u8]);
    } else if len < 65_536 {
        let b = (len as u16).to_be_bytes();
        buf.put(&[0xda, b[0], b[1]]);
    } else {
        let b = (len as u32).to_be_bytes();
        buf.put(&[0xdb, b[0], b[1], b[2], b[3]]);
    }
    buf.put(s.as_bytes());
}

#[inline(always)]
fn uint(buf: &mut impl Sink, v: u64) {
    if v < 128 {
        buf.put(&[v as u8]);
    } else if v < 256 {
        buf.put(&[0xcc, v as u8]);
    } else if v < 65_536 {
        let b = (v as u16).to_be_bytes();
        buf.put(&[0xcd, b[0], b[1]]);
    } else if v <= u64::from(u32::MAX) {
        let b = (v as u32).to_be_bytes();
        buf.put(&[0xce, b[0], b[1], b[2], b[3]]);
    } else {
        let b = v.to_be_bytes();
        buf.put(&[0xcf, b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    }
}

#[inline(always)]
fn float(buf: &mut impl Sink, v: f32) {
    let b = v.to_be_bytes();
    buf.put(&[0xca, b[0], b[1], b[2], b[3]]);
}

#[inline(always)]
fn boolean(buf: &mut impl Sink, v: bool) {
    buf.put(&[if v { 0xc3 } else { 0xc2 }]);
}

fn serde_value<T: serde::Serialize>(buf: &mut Vec<u8>, value: &T) {
    rmp_serde::encode::write_named(buf, value).expect("verdicts and params always encode");
}
