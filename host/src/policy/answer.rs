//! A policy's answer, decoded, with messages an author can act on.
//!
//! The fast path for a plain MessagePack answer is the SDK's hand-written
//! reader ([`vm_balancer_sdk::decode_actions`]); then serde straight into
//! [`Decision`]. Only when that fails
//! (or when `policy check` asks for warnings) is the answer walked as a
//! generic value, so that the message says what an author needs to hear:
//! "the answer must be a map `{"actions": [...]}`", "action 2 (pin): missing
//! field `cpus`", "empty answer: did you forget to encode it?", instead of
//! serde's "invalid length 0, expected struct Decision with 1 element".
//!
//! The answer crosses a trust boundary: it is fuzzed by the property tests
//! below (any bytes: an error or actions, never a panic).

use serde_json::Value;
use vm_balancer_sdk::{Action, Decision};

/// How a component's snapshot and answer are encoded: which world it targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// World `policy`: MessagePack bytes.
    MessagePack,
    /// World `policy-json`: JSON text.
    Json,
}

impl Encoding {
    /// The WIT world's name.
    pub fn world(self) -> &'static str {
        match self {
            Encoding::MessagePack => "policy",
            Encoding::Json => "policy-json",
        }
    }

    /// The format's name, for messages.
    pub fn format(self) -> &'static str {
        match self {
            Encoding::MessagePack => "MessagePack",
            Encoding::Json => "JSON",
        }
    }

    /// The snapshot as this world's policies receive it.
    pub fn encode(self, snapshot: &vm_balancer_sdk::Snapshot) -> Vec<u8> {
        match self {
            Encoding::MessagePack => vm_balancer_sdk::encode_snapshot(snapshot),
            // Serializing plain data to a Vec cannot fail: every map key is a
            // string and non-finite floats become null.
            Encoding::Json => serde_json::to_vec(snapshot).expect("a snapshot always serializes to JSON"),
        }
    }

    /// A MessagePack snapshot (what the daemon keeps for trial runs) in this
    /// encoding. `None` if the bytes do not decode (they always do when the
    /// daemon wrote them).
    pub fn reencode_msgpack(self, msgpack: &[u8]) -> Option<Vec<u8>> {
        match self {
            Encoding::MessagePack => Some(msgpack.to_vec()),
            Encoding::Json => {
                let snapshot: vm_balancer_sdk::Snapshot = rmp_serde::from_slice(msgpack).ok()?;
                Some(self.encode(&snapshot))
            }
        }
    }
}

/// Decodes an answer; the error is a sentence naming the action index and
/// field and saying what was expected.
pub fn decode(encoding: Encoding, bytes: &[u8]) -> Result<Vec<Action>, String> {
    // A plain MessagePack answer is read by hand (serde's tagged-enum path
    // was a tenth of a 1,000-domain call); anything else goes to serde.
    if encoding == Encoding::MessagePack {
        if let Some(actions) = vm_balancer_sdk::decode_actions(bytes) {
            return Ok(actions);
        }
    }
    let fast = match encoding {
        Encoding::MessagePack => rmp_serde::from_slice::<Decision>(bytes).map_err(|e| e.to_string()),
        Encoding::Json => serde_json::from_slice::<Decision>(bytes).map_err(|e| e.to_string()),
    };
    match fast {
        Ok(decision) => Ok(decision.actions),
        Err(serde_message) => Err(match explain(encoding, bytes) {
            Ok(_) => serde_message,
            Err(message) => message,
        }),
    }
}

/// Decodes an answer strictly: the actions, plus a warning for every key
/// the daemon does not know (a misspelt optional field is silently ignored
/// otherwise). For `policy check`.
pub fn decode_strict(encoding: Encoding, bytes: &[u8]) -> Result<(Vec<Action>, Vec<String>), String> {
    let warnings = explain(encoding, bytes)?;
    let actions = decode(encoding, bytes)?;
    Ok((actions, warnings))
}

fn generic(encoding: Encoding, bytes: &[u8]) -> Result<Value, String> {
    let format = encoding.format();
    if bytes.is_empty() {
        return Err(format!("the answer is empty (0 bytes): did you forget to encode it? Return {format} {{\"actions\": [...]}}"));
    }
    let parsed: Result<Value, String> = match encoding {
        Encoding::MessagePack => rmp_serde::from_slice(bytes).map_err(|e| e.to_string()),
        Encoding::Json => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
    };
    parsed.map_err(|e| format!("the answer ({} bytes) is not valid {format}: {e}; return {format} {{\"actions\": [...]}}", bytes.len()))
}

fn type_of(value: &Value) -> String {
    match value {
        Value::Null => "nil/null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) if s.len() > 40 => format!("a string ({} bytes)", s.len()),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(a) => format!("a list of {} item(s)", a.len()),
        Value::Object(_) => "a map".into(),
    }
}

/// Walks the answer; Ok(warnings) when it is well formed.
fn explain(encoding: Encoding, bytes: &[u8]) -> Result<Vec<String>, String> {
    let value = generic(encoding, bytes)?;
    let Value::Object(top) = &value else {
        return Err(format!("the answer must be a map {{\"actions\": [...]}}, got {}", type_of(&value)));
    };
    let mut warnings: Vec<String> =
        top.keys().filter(|k| *k != "actions").map(|k| format!("the answer has an unknown key `{k}` (ignored)")).collect();
    let Some(actions) = top.get("actions") else {
        return Err("the answer map has no `actions` key: return {\"actions\": [...]} (an empty list is fine)".into());
    };
    let Value::Array(actions) = actions else {
        return Err(format!("`actions` must be a list of actions, got {}", type_of(actions)));
    };
    for (i, action) in actions.iter().enumerate() {
        explain_action(i, action, &mut warnings)?;
    }
    Ok(warnings)
}

const PIN_FIELDS: &[(&str, Field)] = &[("domain", Field::Str), ("vcpu", Field::U32), ("cpus", Field::U32List), ("reason", Field::OptStr)];
const MEM_FIELDS: &[(&str, Field)] = &[("domain", Field::Str), ("target_kib", Field::U64), ("reason", Field::OptStr)];

#[derive(Clone, Copy)]
enum Field {
    Str,
    OptStr,
    U32,
    U64,
    U32List,
}

impl Field {
    fn expected(self) -> &'static str {
        match self {
            Field::Str => "a string",
            Field::OptStr => "a string",
            Field::U32 => "a non-negative integer (not a float, not a string)",
            Field::U64 => "a non-negative integer of KiB (not a float, not a string)",
            Field::U32List => "a list of non-negative integer pCPU ids (the guard rejects an empty one)",
        }
    }

    fn accepts(self, value: &Value) -> bool {
        match self {
            Field::Str | Field::OptStr => value.is_string(),
            Field::U32 => value.as_u64().is_some_and(|n| n <= u64::from(u32::MAX)),
            Field::U64 => value.is_u64(),
            Field::U32List => value.as_array().is_some_and(|a| a.iter().all(|c| Field::U32.accepts(c))),
        }
    }
}

fn explain_action(i: usize, action: &Value, warnings: &mut Vec<String>) -> Result<(), String> {
    let Value::Object(map) = action else {
        return Err(format!("action {i} must be a map with a `kind` (\"pin\" or \"set-memory\"), got {}", type_of(action)));
    };
    let kind = match map.get("kind") {
        Some(Value::String(k)) => k.as_str(),
        Some(other) => return Err(format!("action {i}: `kind` must be the string \"pin\" or \"set-memory\", got {}", type_of(other))),
        None => return Err(format!("action {i} has no `kind`: add \"kind\": \"pin\" or \"kind\": \"set-memory\"")),
    };
    let fields = match kind {
        "pin" => PIN_FIELDS,
        "set-memory" => MEM_FIELDS,
        other => return Err(format!("action {i}: unknown kind {other:?} (expected \"pin\" or \"set-memory\")")),
    };
    for (name, field) in fields {
        match map.get(*name) {
            None if matches!(field, Field::OptStr) => {}
            None => return Err(format!("action {i} ({kind}): missing field `{name}` ({})", field.expected())),
            Some(value) if !field.accepts(value) => {
                return Err(format!("action {i} ({kind}): field `{name}` must be {}, got {}", field.expected(), type_of(value)))
            }
            Some(_) => {}
        }
    }
    for key in map.keys().filter(|k| *k != "kind" && !fields.iter().any(|(f, _)| f == k)) {
        let known: Vec<&str> = fields.iter().map(|(f, _)| *f).collect();
        warnings.push(format!("action {i} ({kind}): unknown field `{key}` (ignored; {kind} has {})", known.join(", ")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgpack(value: &serde_json::Value) -> Vec<u8> {
        rmp_serde::to_vec_named(value).unwrap()
    }

    #[test]
    fn the_fast_path_decodes_both_encodings_the_same() {
        let json = br#"{"actions":[{"kind":"pin","domain":"a","vcpu":0,"cpus":[1]},{"kind":"set-memory","domain":"b","target_kib":1024,"reason":"r"}]}"#;
        let value: Value = serde_json::from_slice(json).unwrap();
        let a = decode(Encoding::Json, json).unwrap();
        let b = decode(Encoding::MessagePack, &msgpack(&value)).unwrap();
        assert_eq!(a, b);
        assert_eq!(a[0], Action::pin("a", 0, vec![1], ""));
    }

    #[test]
    fn messages_name_the_action_the_field_and_what_was_expected() {
        let cases: &[(&str, &str)] = &[
            ("[]", "the answer must be a map {\"actions\": [...]}, got a list of 0 item(s)"),
            ("{}", "no `actions` key"),
            (r#"{"actions": 3}"#, "`actions` must be a list of actions, got the number 3"),
            (r#"{"actions": [1]}"#, "action 0 must be a map"),
            (r#"{"actions": [{"domain": "a"}]}"#, "action 0 has no `kind`"),
            (r#"{"actions": [{"kind": "move"}]}"#, "action 0: unknown kind \"move\""),
            (
                r#"{"actions": [{"kind":"set-memory","domain":"a","target_kib":1}, {"kind":"pin","domain":"a","vcpu":0,"cpu":[1]}]}"#,
                "action 1 (pin): missing field `cpus`",
            ),
            (
                r#"{"actions": [{"kind":"pin","domain":"a","vcpu":0.5,"cpus":[1]}]}"#,
                "action 0 (pin): field `vcpu` must be a non-negative integer",
            ),
            (
                r#"{"actions": [{"kind":"pin","domain":"a","vcpu":0,"cpus":[1.0]}]}"#,
                "field `cpus` must be a list of non-negative integer pCPU ids",
            ),
            (
                r#"{"actions": [{"kind":"set-memory","domain":"a","target_kib":"1024"}]}"#,
                "field `target_kib` must be a non-negative integer of KiB (not a float, not a string), got the string \"1024\"",
            ),
            (r#"{"actions": [{"kind":"set-memory","domain":"a","target_kib":1048576.0}]}"#, "got the number 1048576.0"),
        ];
        for (json, want) in cases {
            let value: Value = serde_json::from_str(json).unwrap();
            for (encoding, bytes) in [(Encoding::Json, json.as_bytes().to_vec()), (Encoding::MessagePack, msgpack(&value))] {
                let e = decode(encoding, &bytes).map(|a| format!("decoded {a:?}")).unwrap_or_else(|e| e);
                assert!(!e.starts_with("decoded"), "{encoding:?} {json}: must fail: {e}");
                assert!(e.contains(want), "{encoding:?} {json}: {e}");
            }
        }
        let e = decode(Encoding::MessagePack, b"").unwrap_err();
        assert!(e.contains("empty (0 bytes): did you forget to encode it?"), "{e}");
        let e = decode(Encoding::Json, b"{\"actions\": [").unwrap_err();
        assert!(e.contains("not valid JSON"), "{e}");
    }

    #[test]
    fn strict_decoding_warns_of_unknown_keys() {
        let json = br#"{"actions":[{"kind":"pin","domain":"a","vcpu":0,"cpus":[1],"resaon":"x"}],"extra":1}"#;
        let (actions, warnings) = decode_strict(Encoding::Json, json).unwrap();
        assert_eq!(actions.len(), 1);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings.iter().any(|w| w.contains("action 0 (pin): unknown field `resaon`")), "{warnings:?}");
        assert!(warnings.iter().any(|w| w.contains("unknown key `extra`")), "{warnings:?}");
    }

    /// Property: arbitrary bytes, and arbitrary mutations of a valid answer,
    /// give actions or an error, never a panic, in both encodings; the
    /// MessagePack fast path gives what serde gives, or nothing. 20,000
    /// cases per encoding, or `VMB_FUZZ_SECONDS` of them (see [`crate::fuzz`]).
    #[test]
    fn fuzz_answer_bytes_decode_or_fail_without_panicking() {
        use rand::Rng;
        let json =
            br#"{"actions":[{"kind":"pin","domain":"a","vcpu":0,"cpus":[1,2]},{"kind":"set-memory","domain":"b","target_kib":1024}]}"#
                .to_vec();
        let packed = msgpack(&serde_json::from_slice(&json).unwrap());
        let _ = crate::fuzz::Budget::from_env("answer", 40_000).run(
            |rng| {
                let (encoding, seed) = if rng.gen() { (Encoding::Json, &json) } else { (Encoding::MessagePack, &packed) };
                let mut bytes =
                    if rng.gen_ratio(1, 4) { (0..rng.gen_range(0..64)).map(|_| rng.gen()).collect::<Vec<u8>>() } else { seed.clone() };
                for _ in 0..rng.gen_range(0..4) {
                    if bytes.is_empty() {
                        break;
                    }
                    let at = rng.gen_range(0..bytes.len());
                    match rng.gen_range(0..3) {
                        0 => bytes[at] = rng.gen(),
                        1 => bytes.truncate(at),
                        _ => bytes.insert(at, rng.gen()),
                    }
                }
                (encoding, bytes)
            },
            |(encoding, bytes)| {
                format!("{encoding:?} answer, {} bytes: {bytes:?}\nlossy text: {}", bytes.len(), String::from_utf8_lossy(bytes))
            },
            |(encoding, bytes)| {
                let _ = decode(*encoding, bytes);
                let _ = decode_strict(*encoding, bytes);
                // The hand-written fast path accepts only what serde
                // accepts, and reads it as serde does.
                if let Some(fast) = vm_balancer_sdk::decode_actions(bytes) {
                    let serde = rmp_serde::from_slice::<Decision>(bytes).map(|d| d.actions).map_err(|e| e.to_string());
                    assert_eq!(serde, Ok(fast), "the fast path and serde disagree");
                }
            },
        );
    }
}
