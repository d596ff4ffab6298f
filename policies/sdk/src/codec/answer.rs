//! A policy's answer, read fast when it is laid out plainly.
//!
//! Why: the daemon decoded every answer with rmp_serde, and the internally
//! tagged [`Action`] goes through serde's buffered `Content` path, string by
//! string: at 1,000 set-memory actions that was about a tenth of the whole
//! decide call. The answers the SDK writes ([`super::encode_decision`]), and
//! any plain writer's, are a map `{"actions": [...]}` of maps with known
//! keys, in any order, and unsigned integers; those are read here in one
//! pass, with no intermediate values.
//!
//! Anything else (an unknown or repeated key, a signed or float integer, a
//! struct written as an array, trailing bytes, invalid UTF-8, ...) makes
//! this reader give up, and the caller falls back to serde, which also words
//! the error. So this reader never accepts what serde would refuse, and
//! gives what serde would give for what it accepts: a property test holds
//! it to that on random and damaged answers.

use crate::Action;

/// The actions of a plainly laid out MessagePack answer, or `None` (then
/// decode it with serde: it is laid out otherwise, or not valid).
pub fn decode_decision(bytes: &[u8]) -> Option<Vec<Action>> {
    let mut r = Cursor { bytes, pos: 0 };
    if r.map_len()? != 1 || r.str()? != "actions" {
        return None;
    }
    let count = r.array_len()?;
    // Each action is at least one byte: a hostile count reserves nothing.
    if count > bytes.len() - r.pos {
        return None;
    }
    let mut actions = Vec::with_capacity(count);
    for _ in 0..count {
        actions.push(r.action()?);
    }
    (r.pos == bytes.len()).then_some(actions)
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

/// An action's fields as read, before its kind says which it needs.
#[derive(Default)]
struct Fields<'a> {
    kind: Option<&'a str>,
    domain: Option<&'a str>,
    vcpu: Option<u32>,
    cpus: Option<Vec<u32>>,
    target_kib: Option<u64>,
    reason: Option<&'a str>,
}

impl<'a> Cursor<'a> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(len)?;
        let out = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }

    fn be(&mut self, len: usize) -> Option<u64> {
        Some(self.take(len)?.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    fn map_len(&mut self) -> Option<usize> {
        match self.byte()? {
            b @ 0x80..=0x8f => Some(usize::from(b & 0x0f)),
            0xde => Some(self.be(2)? as usize),
            0xdf => Some(self.be(4)? as usize),
            _ => None,
        }
    }

    fn array_len(&mut self) -> Option<usize> {
        match self.byte()? {
            b @ 0x90..=0x9f => Some(usize::from(b & 0x0f)),
            0xdc => Some(self.be(2)? as usize),
            0xdd => Some(self.be(4)? as usize),
            _ => None,
        }
    }

    fn str(&mut self) -> Option<&'a str> {
        let len = match self.byte()? {
            b @ 0xa0..=0xbf => usize::from(b & 0x1f),
            0xd9 => self.be(1)? as usize,
            0xda => self.be(2)? as usize,
            0xdb => self.be(4)? as usize,
            _ => return None,
        };
        std::str::from_utf8(self.take(len)?).ok()
    }

    /// An unsigned integer in any of MessagePack's unsigned forms.
    fn uint(&mut self) -> Option<u64> {
        match self.byte()? {
            b @ 0x00..=0x7f => Some(u64::from(b)),
            0xcc => self.be(1),
            0xcd => self.be(2),
            0xce => self.be(4),
            0xcf => self.be(8),
            _ => None,
        }
    }

    fn u32(&mut self) -> Option<u32> {
        u32::try_from(self.uint()?).ok()
    }

    fn action(&mut self) -> Option<Action> {
        let len = self.map_len()?;
        let mut f = Fields::default();
        for _ in 0..len {
            // A repeated key is serde's error: give up on it.
            match self.str()? {
                "kind" if f.kind.is_none() => f.kind = Some(self.str()?),
                "domain" if f.domain.is_none() => f.domain = Some(self.str()?),
                "vcpu" if f.vcpu.is_none() => f.vcpu = Some(self.u32()?),
                "target_kib" if f.target_kib.is_none() => f.target_kib = Some(self.uint()?),
                "reason" if f.reason.is_none() => f.reason = Some(self.str()?),
                "cpus" if f.cpus.is_none() => {
                    let n = self.array_len()?;
                    if n > self.bytes.len() - self.pos {
                        return None;
                    }
                    f.cpus = Some((0..n).map(|_| self.u32()).collect::<Option<Vec<u32>>>()?);
                }
                _ => return None,
            }
        }
        let reason = f.reason.unwrap_or_default().to_owned();
        // A field of the other kind would be ignored by serde; here it
        // gives up (the answer is not plain).
        match f.kind? {
            "pin" if f.target_kib.is_none() => Some(Action::Pin { domain: f.domain?.to_owned(), vcpu: f.vcpu?, cpus: f.cpus?, reason }),
            "set-memory" if f.vcpu.is_none() && f.cpus.is_none() => {
                Some(Action::SetMemory { domain: f.domain?.to_owned(), target_kib: f.target_kib?, reason })
            }
            _ => None,
        }
    }
}
