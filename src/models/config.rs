//! Helpers for the owners' config.json files: values that may be an int or a per-level list,
//! and keys whose non-default values this implementation rejects by name.

use crate::error::{Error, Result};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::path::Path;

/// diffusers allows several per-level settings as one int or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum IntOrList {
    Int(usize),
    List(Vec<usize>),
}

impl IntOrList {
    /// One value per level; a list must have exactly `levels` entries.
    pub fn per_level(&self, levels: usize, key: &str, file: &Path) -> Result<Vec<usize>> {
        match self {
            IntOrList::Int(v) => Ok(vec![*v; levels]),
            IntOrList::List(v) if v.len() == levels => Ok(v.clone()),
            IntOrList::List(v) => Err(Error::unsupported(
                file,
                key,
                format!("{v:?}"),
                &format!("a list must have one entry per level ({levels})"),
            )),
        }
    }
}

/// Rejects keys whose value differs from the one value this implementation supports.
/// A missing key or a JSON null counts as the default when `default` is null.
pub fn require_defaults(
    raw: &Map<String, Value>,
    file: &Path,
    keys: &[(&str, Value)],
) -> Result<()> {
    for (key, supported) in keys {
        let Some(value) = raw.get(*key) else { continue };
        if value.is_null() && supported.is_null() {
            continue;
        }
        let same = match (value, supported) {
            (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
            (Value::Array(items), Value::Bool(b)) => items.iter().all(|i| i == &Value::Bool(*b)),
            (a, b) => a == b,
        };
        if !same {
            return Err(Error::unsupported(
                file,
                key,
                value,
                &format!("only {supported} is supported"),
            ));
        }
    }
    Ok(())
}

/// Parses a config (as read from `file`) as both a typed struct and its raw key map.
pub fn parse_with_raw<T: serde::de::DeserializeOwned>(
    value: Value,
    file: &Path,
) -> Result<(T, Map<String, Value>)> {
    let Value::Object(raw) = value else {
        return Err(Error::file(file, "a config must be a JSON object"));
    };
    let typed: T = serde_json::from_value(Value::Object(raw.clone()))
        .map_err(|e| Error::file(file, format!("invalid config: {e}")))?;
    Ok((typed, raw))
}
