//! Policy parameters: the daemon's `[params]` config table, passed through.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A parameter value: TOML values map onto these one to one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Param {
    /// `true` / `false`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A string.
    Str(String),
    /// A list.
    List(Vec<Param>),
    /// A table.
    Map(BTreeMap<String, Param>),
}

impl Param {
    /// The value as a number, for `Int` and `Float`.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Param::Int(i) => Some(*i as f64),
            Param::Float(f) => Some(*f),
            _ => None,
        }
    }

    /// The value as a string, for `Str`.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Param::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The strings of a `List` (other elements skipped).
    pub fn as_str_list(&self) -> Vec<&str> {
        match self {
            Param::List(items) => items.iter().filter_map(Param::as_str).collect(),
            _ => Vec::new(),
        }
    }
}
