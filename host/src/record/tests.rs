use std::path::Path;

use rand::Rng;

use super::*;
use crate::backend::sim::Scenario;
use crate::config::Config;

/// A few quanta of a shipped scenario as a written segment's bytes, with
/// the frames that went in.
fn recorded(name: &str, quanta: u64) -> (tempfile::TempDir, Vec<Frame>, Vec<u8>) {
    let text = crate::fuzz::SHIPPED.iter().find(|(n, _)| *n == name).expect("shipped").1;
    let scenario = Scenario::parse(text, Path::new(name)).unwrap();
    let mut pipeline = crate::simulate::pipeline(&scenario, &[], &Config::default(), None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rec_dir = dir.path().join("rec");
    let mut recorder = Recorder::open(RecordOptions::new(rec_dir.clone()), "sim:test", false, Default::default()).unwrap();
    let mut frames = Vec::new();
    for _ in 0..quanta {
        let (_, trace) = pipeline.step_traced().unwrap();
        recorder.write(&trace, &["cpu".into(), "mem".into()]).unwrap();
        frames.push(Frame::from_trace(&trace, 0));
    }
    let files = writer::segment_files(&rec_dir).unwrap();
    assert_eq!(files.len(), 1);
    let bytes = std::fs::read(&files[0]).unwrap();
    (dir, frames, bytes)
}

fn quanta(items: &[Positioned]) -> Vec<&Frame> {
    items
        .iter()
        .filter_map(|p| match &p.item {
            RecordItem::Quantum(f) => Some(&**f),
            RecordItem::Header(_) => None,
        })
        .collect()
}

#[test]
fn frames_round_trip_exactly() {
    let (_dir, frames, bytes) = recorded("churn", 8);
    let (items, end) = decode_segment(Path::new("x"), &bytes);
    assert_eq!(end.unwrap(), None);
    assert!(matches!(items[0].item, RecordItem::Header(_)));
    let back = quanta(&items);
    assert_eq!(back.len(), frames.len());
    for (a, b) in back.iter().zip(&frames) {
        assert_eq!(a.snapshot, b.snapshot, "the snapshot comes back bit for bit");
        assert_eq!((&a.proposals, &a.verdicts, &a.applied), (&b.proposals, &b.verdicts, &b.applied));
    }
}

#[test]
fn a_cut_tail_is_skipped_and_named() {
    let (_dir, frames, bytes) = recorded("churn", 5);
    let cut = &bytes[..bytes.len() - 7];
    let (items, end) = decode_segment(Path::new("seg.vmbrec"), cut);
    let damage = end.unwrap().expect("the cut is noticed");
    assert_eq!(quanta(&items).len(), frames.len() - 1, "all but the last frame");
    assert_eq!(damage.frame, frames.len() as u64);
    let text = damage.to_string();
    assert!(text.contains("seg.vmbrec") && text.contains(&format!("offset {}", damage.offset)) && text.contains("cut short"), "{text}");
}

#[test]
fn a_flipped_byte_stops_the_read_there() {
    let (_dir, _frames, mut bytes) = recorded("churn", 5);
    let (items, _) = decode_segment(Path::new("x"), &bytes);
    let third = items[3].offset as usize;
    bytes[third + 20] ^= 0x10;
    let (items, end) = decode_segment(Path::new("seg.vmbrec"), &bytes);
    assert_eq!(items.len(), 3, "header and two quanta before the damage");
    let error = end.unwrap_err();
    assert!(matches!(error, RecordError::Checksum { frame: 3, .. }), "{error}");
    assert!(error.to_string().contains(&format!("offset {third}")), "{error}");
}

#[test]
fn segments_rotate_and_stay_bounded() {
    let text = crate::fuzz::SHIPPED.iter().find(|(n, _)| *n == "churn").unwrap().1;
    let scenario = Scenario::parse(text, Path::new("churn")).unwrap();
    let mut pipeline = crate::simulate::pipeline(&scenario, &[], &Config::default(), None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let options = RecordOptions { dir: dir.path().join("rec"), segment_max_bytes: 4096, keep_segments: 3 };
    let mut recorder = Recorder::open(options.clone(), "sim:test", false, Default::default()).unwrap();
    for _ in 0..40 {
        let (_, trace) = pipeline.step_traced().unwrap();
        recorder.write(&trace, &[]).unwrap();
    }
    let files = writer::segment_files(&options.dir).unwrap();
    assert_eq!(files.len(), 3, "{files:?}");
    use std::os::unix::fs::PermissionsExt;
    for f in &files {
        assert_eq!(std::fs::metadata(f).unwrap().permissions().mode() & 0o777, 0o600, "{}", f.display());
    }
    // What is left reads back, in order, ending at the last quantum.
    let read: Vec<u64> = RecordReader::open(&options.dir)
        .unwrap()
        .map(|p| p.unwrap())
        .filter_map(|p| match p.item {
            RecordItem::Quantum(f) => Some(f.quantum),
            RecordItem::Header(_) => None,
        })
        .collect();
    assert_eq!(*read.last().unwrap(), 39);
    assert!(read.windows(2).all(|w| w[1] == w[0] + 1), "{read:?}");
}

#[test]
fn an_unsafe_file_or_directory_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, _, _) = recorded("churn", 2);
    let rec = dir.path().join("rec");
    let file = writer::segment_files(&rec).unwrap().remove(0);
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o622)).unwrap();
    let error = RecordReader::open(&rec).unwrap().next().unwrap().unwrap_err();
    assert!(error.to_string().contains("writable by group or others"), "{error}");
    std::fs::set_permissions(&rec, std::fs::Permissions::from_mode(0o777)).unwrap();
    assert!(matches!(RecordReader::open(&rec), Err(RecordError::Dir { .. })));
}

/// Random damage to a real segment: decoding never panics, never returns a
/// frame past the damage that differs from the original, and always ends.
#[test]
fn fuzz_record_frames() {
    let (_dir, _, bytes) = recorded("churn", 6);
    let bytes = std::sync::Arc::new(bytes);
    crate::fuzz::Budget::from_env("record_frames", 300).run(
        |rng| {
            let mut b = (*bytes).clone();
            match rng.gen_range(0..5) {
                0 => {
                    let at = rng.gen_range(0..b.len());
                    b[at] ^= 1 << rng.gen_range(0..8);
                }
                1 => b.truncate(rng.gen_range(0..b.len())),
                2 => {
                    for _ in 0..rng.gen_range(1..16) {
                        let at = rng.gen_range(0..b.len());
                        b[at] = rng.gen();
                    }
                }
                3 => {
                    // A huge or bogus length in some frame's prefix.
                    let at = rng.gen_range(FILE_HEADER_BYTES as usize..b.len() - 4);
                    b[at..at + 4].copy_from_slice(&rng.gen::<u32>().to_le_bytes());
                }
                _ => {
                    let junk: Vec<u8> = (0..rng.gen_range(0..64)).map(|_| rng.gen()).collect();
                    let at = rng.gen_range(0..b.len());
                    b.splice(at..at, junk);
                }
            }
            b
        },
        |b| format!("{} bytes", b.len()),
        |b| {
            let (items, _end) = decode_segment(Path::new("fuzz.vmbrec"), b);
            let (clean, _) = decode_segment(Path::new("fuzz.vmbrec"), &bytes);
            // A frame that decodes is, with overwhelming odds (CRC-32), one
            // of the originals.
            for item in &items {
                assert!(clean.iter().any(|c| c.item == item.item), "a damaged frame decoded as something new");
            }
        },
    );
}

#[test]
fn params_of_every_kind_come_back_as_they_were() {
    use vm_balancer_sdk::Param;
    let (_dir, frames, _) = recorded("churn", 1);
    let mut frame = frames[0].clone();
    let table: std::collections::BTreeMap<String, Param> = [("x".to_string(), Param::Int(-3))].into();
    frame.snapshot.params = [
        ("b".to_string(), Param::Bool(true)),
        ("i".to_string(), Param::Int(7)),
        ("f".to_string(), Param::Float(5.0)),
        ("s".to_string(), Param::Str("web".into())),
        ("l".to_string(), Param::List(vec![Param::Float(0.5), Param::Int(1)])),
        ("m".to_string(), Param::Map(table)),
    ]
    .into();
    let body = encode_body(KIND_QUANTUM, &frame).unwrap();
    let back: Frame = reader::decode_value_for_tests(&body).unwrap();
    assert_eq!(back, frame);
}
