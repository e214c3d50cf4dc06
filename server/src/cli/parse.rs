//! Value parsers: clap refuses a malformed argument, naming the valid values, before any request
//! is made. Durations stay parsed by the handlers ([`seconds`]) so their messages are unchanged.

use std::str::FromStr;

use continuity_proto::types;

use super::error::CliError;
/// The domain enums the admin commands take, parsed with their own `FromStr`.
pub use crate::model::engine::{Algorithm, Custody, Purpose};

/// Parses with the domain type's `FromStr`, whose message lists the valid spellings
/// (`custody "x" is not one of hsm, transit, kv`).
pub fn domain<T: FromStr<Err = String>>(s: &str) -> Result<T, String> {
    s.parse()
}

/// A `TYPE:VALUE` selector (the server validates the type and the value).
pub fn selector(s: &str) -> Result<types::Selector, String> {
    let (t, v) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} must be TYPE:VALUE, e.g. unix:uid:1000"))?;
    Ok(types::Selector {
        r#type: t.into(),
        value: v.into(),
    })
}

/// A duration flag ("90", "10m") in seconds; 0 (the server's default) when absent.
pub fn seconds(flag: &str, v: Option<&str>) -> Result<i64, CliError> {
    match v {
        None => Ok(0),
        Some(s) => continuity_common::duration::parse(s)
            .map(|d| d.as_secs() as i64)
            .map_err(|e| CliError::Argument(format!("{flag}: {e}"))),
    }
}
