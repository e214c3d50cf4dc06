//! Arbitrary text as the agent's config file: a typed error or a config, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = continuity_agent::Config::parse(text, Path::new("/fuzz/agent.toml"));
});
