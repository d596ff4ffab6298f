//! The writer: the snapshot and a policy's answer, field by field.
//!
//! Every struct is destructured with all its fields named and no `..`, so a
//! field added to a snapshot type does not compile until it is written here
//! (the tests then hold the bytes to rmp_serde's). Map lengths are written
//! by hand next to the fields they count. `verdicts` and `params` are small
//! and richly typed, and go through rmp_serde, whose derives follow any
//! field added to `Verdict`, `Action` or `Param` by themselves.

use rmp::encode as put;

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

// Writing into a Vec cannot fail. Every integer and length takes the same
// (smallest) form rmp_serde gives it: the small forms that nearly every
// value of a snapshot takes (keys of under 32 bytes, integers, fixmaps and
// fixarrays, floats) are pushed inline, and only long strings and large
// containers go through rmp's writers. Through rmp's `io::Write` path every byte was
// a call returning a `Result`: the encode took about a fifth of the whole
// decide call at 1,000 domains, natively and in wasm alike.
#[inline]
fn map(buf: &mut Vec<u8>, len: usize) {
    if len < 16 {
        buf.push(0x80 | len as u8);
    } else {
        put::write_map_len(buf, len as u32).expect("writing to a Vec");
    }
}

#[inline]
fn array(buf: &mut Vec<u8>, len: usize) {
    if len < 16 {
        buf.push(0x90 | len as u8);
    } else {
        put::write_array_len(buf, len as u32).expect("writing to a Vec");
    }
}

#[inline]
fn key(buf: &mut Vec<u8>, name: &str) {
    string(buf, name);
}

#[inline]
fn string(buf: &mut Vec<u8>, s: &str) {
    if s.len() < 32 {
        buf.push(0xa0 | s.len() as u8);
        buf.extend_from_slice(s.as_bytes());
    } else {
        put::write_str(buf, s).expect("writing to a Vec");
    }
}

#[inline]
fn uint(buf: &mut Vec<u8>, v: u64) {
    if v < 128 {
        buf.push(v as u8);
    } else if v < 256 {
        buf.extend_from_slice(&[0xcc, v as u8]);
    } else if v < 65_536 {
        let b = (v as u16).to_be_bytes();
        buf.extend_from_slice(&[0xcd, b[0], b[1]]);
    } else if v <= u64::from(u32::MAX) {
        let b = (v as u32).to_be_bytes();
        buf.extend_from_slice(&[0xce, b[0], b[1], b[2], b[3]]);
    } else {
        buf.push(0xcf);
        buf.extend_from_slice(&v.to_be_bytes());
    }
}

#[inline]
fn float(buf: &mut Vec<u8>, v: f32) {
    let b = v.to_be_bytes();
    buf.extend_from_slice(&[0xca, b[0], b[1], b[2], b[3]]);
}

#[inline]
fn boolean(buf: &mut Vec<u8>, v: bool) {
    buf.push(if v { 0xc3 } else { 0xc2 });
}

fn serde_value<T: serde::Serialize>(buf: &mut Vec<u8>, value: &T) {
    rmp_serde::encode::write_named(buf, value).expect("verdicts and params always encode");
}
