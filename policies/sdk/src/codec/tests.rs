//! The codec held to rmp_serde: hand-picked cases for each rule, then a
//! seeded property test over random snapshots (bytes equal to rmp_serde's,
//! rmp_serde's bytes read back equal, and mutated bytes never a panic).

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::reader::{decode, memory_as_written, same_bytes, Reader};
use super::{decode_decision, decode_into, encode, encode_decision};
use crate::builder::{DomainBuilder, SnapshotBuilder};
use crate::{
    Action, CpuList, Decision, Domain, DomainMemory, Host, HostCpu, HostMemory, Outcome, Param, Reads, Rule, Snapshot, Vcpu, Verdict,
};

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
    snap.domains[0].memory.free_page_reporting = true;
    snap.verdicts.push(Verdict {
        slot: "cpu".into(),
        action: Action::pin("db", 0, vec![3], "why"),
        outcome: Outcome::Rejected,
        reason: "no".into(),
        rule: Rule::BadCpu,
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

// ------------------------------------------------- random snapshots --

/// Random inputs drawn per property; `VMB_CODEC_CASES=100000` runs a
/// longer fuzzing session. Each case seeds its own generator and the run is
/// deterministic, so a failure names its case and reproduces on every run.
fn cases() -> u64 {
    std::env::var("VMB_CODEC_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(4_000)
}

/// Draws snapshot parts across the encoding's classes: integers of every
/// width and at their edges, strings and lists of every length class,
/// optional fields absent and present, and names that repeat across cases
/// (the decoder keeps an equal name without copying it).
struct Gen {
    rng: ChaCha8Rng,
    chars: Vec<char>,
}

/// Characters at UTF-8's width boundaries, and a few that names really hold.
const CHARS: &str = "azZ0-_. \0\u{7f}\u{80}üé\u{7ff}\u{800}日本\u{ffff}\u{10000}😀\u{10ffff}";

/// Names drawn again and again, so consecutive snapshots share some.
const NAMES: &[&str] = &["vm-0", "vm-1", "vm-2", "vm-ü", "", "5b6e0cf2-1f1a-4bd2-9a4e-2f1c0a7d9e11"];

/// The unsigned integer encodings, by range: fixint, uint8, 16, 32, 64.
const WIDTHS: [(u64, u64); 5] = [(0, 0x7f), (0x80, 0xff), (0x100, 0xffff), (0x1_0000, 0xffff_ffff), (0x1_0000_0000, u64::MAX)];

impl Gen {
    fn new(case: u64) -> Gen {
        Gen { rng: ChaCha8Rng::seed_from_u64(0x766d_6263_6f64_6563 ^ case), chars: CHARS.chars().collect() }
    }

    fn chance(&mut self, p: f64) -> bool {
        self.rng.gen_bool(p)
    }

    /// An integer of one of the first `widths` encodings, often at an edge.
    fn uint(&mut self, widths: usize) -> u64 {
        let (lo, hi) = WIDTHS[self.rng.gen_range(0..widths)];
        match self.rng.gen_range(0..4) {
            0 => lo,
            1 => hi,
            _ => self.rng.gen_range(lo..=hi),
        }
    }

    fn u64(&mut self) -> u64 {
        self.uint(5)
    }

    fn u32(&mut self) -> u32 {
        self.uint(4) as u32
    }

    /// A CPU or vCPU number: mostly what the daemon writes (below 256, the
    /// straight-line readers' case), sometimes any.
    fn cpu(&mut self) -> u32 {
        if self.chance(0.8) {
            self.rng.gen_range(0..256)
        } else {
            self.u32()
        }
    }

    /// Any float but NaN (which is not equal to itself), specials included.
    fn f32(&mut self) -> f32 {
        let specials = [0.0, -0.0, 1.0, -1.5, f32::MAX, f32::MIN, f32::MIN_POSITIVE, 1e-45, f32::INFINITY, f32::NEG_INFINITY];
        match self.rng.gen_range(0..6) {
            0 => *specials.choose(&mut self.rng).unwrap(),
            1 => Some(f32::from_bits(self.rng.gen())).filter(|f| !f.is_nan()).unwrap_or(0.5),
            _ => self.rng.gen(),
        }
    }

    fn f64(&mut self) -> f64 {
        match self.rng.gen_range(0..4) {
            0 => *[0.0, -0.0, 1.0, f64::MAX, f64::MIN_POSITIVE, 5e-324, f64::INFINITY].choose(&mut self.rng).unwrap(),
            1 => Some(f64::from_bits(self.rng.gen())).filter(|f| !f.is_nan()).unwrap_or(0.25),
            _ => self.rng.gen_range(-1e6..1e6),
        }
    }

    /// A string of any length class (fixstr, str8, str16, rarely str32),
    /// ASCII or not.
    fn string(&mut self) -> String {
        self.text(true)
    }

    /// A string for the parts rmp_serde reads (`verdicts`, `params`): no
    /// str32, which is the hand reader's business. (An untagged `Param`
    /// string costs serde a formatted error per variant tried before `Str`,
    /// each quoting the whole string: 30 ms at 170 KB.)
    fn serde_string(&mut self) -> String {
        self.text(false)
    }

    fn text(&mut self, str32: bool) -> String {
        let len = match self.rng.gen_range(0..1000) {
            0..=599 => self.rng.gen_range(0..32),
            600..=899 => self.rng.gen_range(0..6),
            900..=997 => self.rng.gen_range(32..300),
            _ if str32 => self.rng.gen_range(65_536..66_000),
            _ => self.rng.gen_range(300..1000),
        };
        if self.chance(0.5) {
            (0..len).map(|_| self.rng.gen_range(b' '..=b'~') as char).collect()
        } else {
            (0..len).map(|_| *self.chars.choose(&mut self.rng).unwrap()).collect()
        }
    }

    fn name(&mut self) -> String {
        self.pooled(true)
    }

    fn serde_name(&mut self) -> String {
        self.pooled(false)
    }

    fn pooled(&mut self, str32: bool) -> String {
        if self.chance(0.4) {
            NAMES.choose(&mut self.rng).unwrap().to_string()
        } else {
            self.text(str32)
        }
    }

    /// A list length: mostly up to `short`, sometimes past a fixarray's 15.
    fn len(&mut self, short: usize) -> usize {
        if self.chance(0.05) {
            self.rng.gen_range(16..40)
        } else {
            self.rng.gen_range(0..=short)
        }
    }

    fn option<T>(&mut self, value: impl FnOnce(&mut Gen) -> T) -> Option<T> {
        if self.chance(0.5) {
            Some(value(self))
        } else {
            None
        }
    }

    fn snapshot(&mut self) -> Snapshot {
        Snapshot {
            schema_version: self.u32(),
            quantum: self.u64(),
            quantum_ms: self.u32(),
            host: Host {
                cpus: (0..self.len(8)).map(|_| self.host_cpu()).collect(),
                memory: HostMemory { total_kib: self.u64(), available_kib: self.u64(), reserve_kib: self.u64() },
            },
            domains: (0..self.len(4)).map(|_| self.domain()).collect(),
            verdicts: (0..self.len(2)).map(|_| self.verdict()).collect(),
            params: (0..self.rng.gen_range(0..4)).map(|_| (self.serde_name(), self.param(2))).collect(),
        }
    }

    fn host_cpu(&mut self) -> HostCpu {
        HostCpu { id: self.cpu(), online: self.rng.gen(), reserved: self.rng.gen(), usage: self.f32(), node: self.cpu() }
    }

    fn domain(&mut self) -> Domain {
        let tags = if self.chance(0.5) { 0 } else { self.len(3) };
        Domain {
            name: self.name(),
            uuid: self.name(),
            tags: (0..tags).map(|_| self.string()).collect(),
            vcpus: (0..self.len(4)).map(|_| self.vcpu()).collect(),
            memory: DomainMemory {
                max_kib: self.u64(),
                target_kib: self.u64(),
                unused_kib: self.option(Gen::u64),
                available_kib: self.option(Gen::u64),
                usable_kib: self.option(Gen::u64),
                rss_kib: self.option(Gen::u64),
                swap_in_kib: self.option(Gen::u64),
                swap_out_kib: self.option(Gen::u64),
                major_faults: self.option(Gen::u64),
                autodeflate: self.rng.gen(),
                free_page_reporting: self.rng.gen(),
                age_ms: if self.chance(0.7) { 0 } else { self.u64() },
            },
            not_answering_ms: if self.chance(0.7) { 0 } else { self.u64() },
        }
    }

    /// Affinity lists of 0 to 8 CPUs (the straight-line reader takes up to
    /// four), sometimes a long one, and very rarely one past 65,535 (array32).
    fn vcpu(&mut self) -> Vcpu {
        let cpus = match self.rng.gen_range(0..2000) {
            0 => 65_536 + self.rng.gen_range(0..64),
            1..=60 => self.rng.gen_range(16..300),
            _ => self.rng.gen_range(0..=8),
        };
        Vcpu {
            id: self.cpu(),
            cpu: self.cpu(),
            affinity: (0..cpus).map(|_| self.cpu()).collect(),
            usage: self.f32(),
            steal: self.option(Gen::f32),
        }
    }

    fn action(&mut self) -> Action {
        if self.chance(0.5) {
            Action::Pin {
                domain: self.serde_name(),
                vcpu: self.u32(),
                cpus: (0..self.len(8)).map(|_| self.cpu()).collect(),
                reason: self.serde_string(),
            }
        } else {
            Action::SetMemory { domain: self.serde_name(), target_kib: self.u64(), reason: self.serde_string() }
        }
    }

    fn verdict(&mut self) -> Verdict {
        let outcome = *[Outcome::Accepted, Outcome::Clamped, Outcome::Rejected].choose(&mut self.rng).unwrap();
        let rule = *Rule::ALL.choose(&mut self.rng).unwrap();
        Verdict { slot: self.serde_name(), action: self.action(), outcome, reason: self.serde_string(), rule }
    }

    /// A parameter of every kind, nested up to `depth` lists and tables.
    fn param(&mut self, depth: u32) -> Param {
        match self.rng.gen_range(0..if depth == 0 { 4 } else { 6 }) {
            0 => Param::Bool(self.rng.gen()),
            1 if self.chance(0.5) => Param::Int(-self.rng.gen_range(0..100)),
            1 => Param::Int(self.u64() as i64),
            2 => Param::Float(self.f64()),
            3 => Param::Str(self.serde_string()),
            4 => Param::List((0..self.len(3)).map(|_| self.param(depth - 1)).collect()),
            _ => Param::Map((0..self.len(3)).map(|_| (self.serde_name(), self.param(depth - 1))).collect()),
        }
    }

    fn reads(&mut self) -> Reads {
        Reads { vcpus: self.rng.gen(), domain_memory: self.rng.gen() }
    }

    /// `bytes` damaged one to three times: a bit flipped, a byte replaced
    /// (by any value or by a marker that changes a length's width), a cut,
    /// a hole, a piece copied elsewhere, or bytes inserted.
    fn mutate(&mut self, bytes: &[u8]) -> Vec<u8> {
        const MARKERS: &[u8] =
            &[0xc0, 0xc1, 0xc4, 0xc7, 0xca, 0xcb, 0xcf, 0xd3, 0xd9, 0xda, 0xdb, 0xdc, 0xdd, 0xde, 0xdf, 0x8f, 0x9f, 0xbf, 0xff];
        let mut out = bytes.to_vec();
        for _ in 0..self.rng.gen_range(1..=3) {
            let at = self.rng.gen_range(0..=out.len());
            let end = (at + self.rng.gen_range(0..=16)).min(out.len());
            match self.rng.gen_range(0..7) {
                0 if at < out.len() => out[at] ^= 1 << self.rng.gen_range(0..8),
                1 if at < out.len() => out[at] = self.rng.gen(),
                2 if at < out.len() => out[at] = *MARKERS.choose(&mut self.rng).unwrap(),
                3 => out.truncate(at),
                4 => drop(out.drain(at..end)),
                5 => {
                    let piece = out[at..end].to_vec();
                    let to = self.rng.gen_range(0..=out.len());
                    out.splice(to..to, piece);
                }
                _ => {
                    let piece: Vec<u8> = (0..self.rng.gen_range(1..=8)).map(|_| self.rng.gen()).collect();
                    out.splice(at..at, piece);
                }
            }
        }
        out
    }
}

/// `snap` as decoded with only `reads`: the parts left out are empty.
fn as_read(snap: &Snapshot, reads: Reads) -> Snapshot {
    let mut want = snap.clone();
    for d in &mut want.domains {
        if !reads.vcpus {
            d.vcpus.clear();
        }
        if !reads.domain_memory {
            d.memory = DomainMemory::default();
        }
    }
    want
}

#[test]
fn random_snapshots_encode_as_rmp_serde_does_and_decode_what_it_writes() {
    // One snapshot decoded into across all cases, as a policy's is across
    // quanta: each decode must replace all of the last (a failed one too).
    let mut reused = Snapshot::default();
    for case in 0..cases() {
        let mut g = Gen::new(case);
        let snap = g.snapshot();
        let theirs = rmp_serde::to_vec_named(&snap).unwrap();
        assert!(ours(&snap) == theirs, "case {case}: the bytes differ from rmp_serde's for {snap:?}");
        assert_eq!(rmp_serde::from_slice::<Snapshot>(&theirs).unwrap(), snap, "case {case}: rmp_serde's own round trip");
        assert_eq!(decode(&theirs).unwrap(), snap, "case {case}");
        let reads = g.reads();
        decode_into(&theirs, &mut reused, reads).unwrap();
        assert_eq!(reused, as_read(&snap, reads), "case {case}, decoded into the last case's snapshot with {reads:?}");
        // Damaged bytes: an error or a value, never a panic, and an error's
        // offset is inside the input. (Fewer of the rare large snapshots,
        // which would otherwise take most of the time.)
        let mutants = if theirs.len() > 1 << 16 { 3 } else { 8 };
        for mutant in 0..mutants {
            let bytes = if mutant == 0 { (0..g.rng.gen_range(0..64)).map(|_| g.rng.gen()).collect() } else { g.mutate(&theirs) };
            let _context = NamesInputOnPanic { case, mutant, input: &bytes };
            if let Err(e) = decode(&bytes) {
                assert!(e.offset <= bytes.len(), "case {case}, mutant {mutant}: offset {} past the {} bytes", e.offset, bytes.len());
            }
            let reads = g.reads();
            let _ = decode_into(&bytes, &mut reused, reads);
        }
    }
}

#[test]
fn verdict_rules_encode_by_name_and_an_unknown_or_missing_one_reads_as_other() {
    for rule in Rule::ALL {
        let bytes = rmp_serde::to_vec_named(&rule).unwrap();
        assert_eq!(rmp_serde::from_slice::<String>(&bytes).unwrap(), rule.name());
        assert_eq!(rmp_serde::from_slice::<Rule>(&bytes).unwrap(), rule);
    }
    let newer = rmp_serde::to_vec_named("a_rule_from_a_newer_daemon").unwrap();
    assert_eq!(rmp_serde::from_slice::<Rule>(&newer).unwrap(), Rule::Other);
    // A verdict without the field (an older daemon's) decodes, as Other.
    let old = serde_json::json!({"slot": "cpu", "action": {"kind": "pin", "domain": "a", "vcpu": 0, "cpus": [1]}, "outcome": "rejected", "reason": "no"});
    let v: Verdict = rmp_serde::from_slice(&rmp_serde::to_vec_named(&old).unwrap()).unwrap();
    assert_eq!(v.rule, Rule::Other);
}

#[test]
fn the_largest_vcpu_written_on_the_stack_fits_and_encodes_as_rmp_serde_does() {
    for len in [15, 16, 17] {
        let vcpu = Vcpu { id: u32::MAX, cpu: u32::MAX, affinity: (0..len).map(|_| u32::MAX).collect(), usage: 1.5, steal: Some(0.5) };
        let snap = SnapshotBuilder::new(1, 1 << 20).build();
        let mut snap = snap;
        snap.domains.push(Domain { name: "a".into(), vcpus: vec![vcpu.clone(), vcpu], ..Domain::default() });
        assert!(ours(&snap) == rmp_serde::to_vec_named(&snap).unwrap(), "{len} CPUs");
    }
    let biggest = rmp_serde::to_vec_named(&Vcpu {
        id: u32::MAX,
        cpu: u32::MAX,
        affinity: (0..16).map(|_| u32::MAX).collect(),
        usage: 1.0,
        steal: Some(1.0),
    })
    .unwrap();
    assert_eq!(biggest.len(), super::encode::STACK_BYTES, "the stack buffer is exactly the largest vCPU written there");
}

#[test]
fn the_straight_line_memory_reader_reads_every_memory_the_daemon_writes() {
    // Every random domain memory, as written, is read by the fast path
    // (not only by the general reader behind it), to the same value; and
    // another order falls back.
    for case in 0..cases() {
        let mut g = Gen::new(case);
        let m = g.domain().memory;
        let bytes = rmp_serde::to_vec_named(&m).unwrap();
        let mut r = Reader { input: &bytes, pos: 0 };
        assert_eq!(memory_as_written(&mut r), Some(m.clone()), "case {case}: {bytes:02x?}");
        assert_eq!(r.pos, bytes.len(), "case {case}");
        let mut reordered = std::collections::BTreeMap::new();
        reordered.insert("target_kib", m.target_kib);
        reordered.insert("max_kib", m.max_kib);
        let bytes = rmp_serde::to_vec_named(&reordered).unwrap();
        let mut r = Reader { input: &bytes, pos: 0 };
        assert_eq!(memory_as_written(&mut r), None, "case {case}: another order");
        assert_eq!(r.pos, 0, "case {case}: a fallback consumes nothing");
    }
}

/// Says which input a decode panicked on (what the property rules out).
struct NamesInputOnPanic<'a> {
    case: u64,
    mutant: u32,
    input: &'a [u8],
}

impl Drop for NamesInputOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let shown = &self.input[..self.input.len().min(4096)];
            eprintln!("case {}, mutant {}: decoding {} bytes panicked: {shown:02x?}", self.case, self.mutant, self.input.len());
        }
    }
}

#[test]
fn random_answers_encode_as_rmp_serde_does_and_the_fast_reader_reads_them_as_serde_does() {
    for case in 0..cases() {
        let mut g = Gen::new(case);
        let actions: Vec<Action> = (0..g.len(6)).map(|_| g.action()).collect();
        let mut ours = Vec::new();
        encode_decision(&actions, &mut ours);
        assert!(ours == rmp_serde::to_vec_named(&Decision { actions: actions.clone() }).unwrap(), "case {case}: {actions:?}");
        assert_eq!(decode_decision(&ours).as_ref(), Some(&actions), "case {case}: the fast reader");
        // Damaged answers: the fast reader gives up, or gives what serde gives.
        for mutant in 0..8 {
            let bytes = if mutant == 0 { (0..g.rng.gen_range(0..64)).map(|_| g.rng.gen()).collect() } else { g.mutate(&ours) };
            let _context = NamesInputOnPanic { case, mutant, input: &bytes };
            if let Some(fast) = decode_decision(&bytes) {
                let serde = rmp_serde::from_slice::<Decision>(&bytes).map(|d| d.actions).map_err(|e| e.to_string());
                assert_eq!(serde, Ok(fast), "case {case}, mutant {mutant}: {bytes:02x?}");
            }
        }
    }
}

#[test]
fn the_fast_answer_reader_gives_up_on_what_is_not_plain() {
    let plain = |v: serde_json::Value| rmp_serde::to_vec_named(&v).unwrap();
    // Fields in any order, integers in a wider form than needed: read.
    let reordered = plain(serde_json::json!({"actions": [{"cpus": [3, 70000], "vcpu": 1, "domain": "a", "kind": "pin"}]}));
    assert_eq!(
        decode_decision(&reordered),
        Some(vec![Action::Pin { domain: "a".into(), vcpu: 1, cpus: vec![3, 70000], reason: String::new() }])
    );
    let mut wide = Vec::new();
    rmp::encode::write_map_len(&mut wide, 1).unwrap();
    rmp::encode::write_str(&mut wide, "actions").unwrap();
    rmp::encode::write_array_len(&mut wide, 1).unwrap();
    rmp::encode::write_map_len(&mut wide, 3).unwrap();
    for (k, v) in [("kind", "set-memory"), ("domain", "b")] {
        rmp::encode::write_str(&mut wide, k).unwrap();
        rmp::encode::write_str(&mut wide, v).unwrap();
    }
    rmp::encode::write_str(&mut wide, "target_kib").unwrap();
    rmp::encode::write_u64(&mut wide, 5).unwrap();
    assert_eq!(decode_decision(&wide), Some(vec![Action::SetMemory { domain: "b".into(), target_kib: 5, reason: String::new() }]));
    // Not plain: left to serde, which may still accept it (first two) or refuse it.
    for not_plain in [
        serde_json::json!({"actions": [{"kind": "pin", "domain": "a", "vcpu": 1, "cpus": [1], "extra": 1}]}),
        serde_json::json!({"actions": [{"kind": "pin", "domain": "a", "vcpu": 1, "cpus": [1], "target_kib": 1}]}),
        serde_json::json!({"actions": [{"kind": "pin", "domain": "a", "vcpu": -1, "cpus": [1]}]}),
        serde_json::json!({"actions": [{"kind": "pin", "domain": "a", "vcpu": 4294967296u64, "cpus": [1]}]}),
        serde_json::json!({"actions": [{"kind": "pin", "domain": "a", "cpus": [1]}]}),
        serde_json::json!({"actions": [{"kind": "unpin", "domain": "a"}]}),
        serde_json::json!({"actions": [{"kind": "set-memory", "domain": "a", "target_kib": 1.5}]}),
        serde_json::json!({"actions": [], "more": 1}),
        serde_json::json!({"actions": {}}),
        serde_json::json!([]),
    ] {
        assert_eq!(decode_decision(&plain(not_plain.clone())), None, "{not_plain}");
    }
    // A repeated key, and trailing bytes.
    let mut repeated = Vec::new();
    rmp::encode::write_map_len(&mut repeated, 1).unwrap();
    rmp::encode::write_str(&mut repeated, "actions").unwrap();
    rmp::encode::write_array_len(&mut repeated, 1).unwrap();
    rmp::encode::write_map_len(&mut repeated, 4).unwrap();
    for (k, v) in [("kind", "set-memory"), ("domain", "b"), ("domain", "c")] {
        rmp::encode::write_str(&mut repeated, k).unwrap();
        rmp::encode::write_str(&mut repeated, v).unwrap();
    }
    rmp::encode::write_str(&mut repeated, "target_kib").unwrap();
    rmp::encode::write_u64(&mut repeated, 5).unwrap();
    assert_eq!(decode_decision(&repeated), None);
    let mut trailing = reordered.clone();
    trailing.push(0xc0);
    assert_eq!(decode_decision(&trailing), None);
    // A hostile count reserves nothing and fails.
    assert_eq!(decode_decision(&[0x81, 0xa7, b'a', b'c', b't', b'i', b'o', b'n', b's', 0xdd, 0xff, 0xff, 0xff, 0xff]), None);
}
