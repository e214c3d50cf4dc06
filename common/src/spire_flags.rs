//! SPIRE's single-dash flag spellings (`-spiffeID`, `-parentID`, `-selector`, ...) accepted as
//! aliases of our long options, so that runbooks written for SPIRE's CLI carry over. The
//! command line is rewritten before clap parses it: `-spiffeID X` and `-spiffeID=X` become
//! `--spiffe-id X` and `--spiffe-id=X`. Only the listed names are rewritten, nothing after a
//! `--`, and never a word in a value position (the argument after an option that takes one).

use std::ffi::OsString;

/// One alias: SPIRE's name (without the dash), our long option (without the dashes), and
/// whether the option takes a value.
pub type Alias = (&'static str, &'static str, bool);

/// The aliases both binaries accept.
pub const COMMON: &[Alias] = &[("spiffeID", "spiffe-id", true), ("output", "output", true)];

/// The `continuity-server` aliases (on top of [`COMMON`]).
pub const SERVER: &[Alias] = &[
    ("parentID", "parent-id", true),
    ("entryID", "id", true),
    ("id", "id", true),
    ("selector", "selector", true),
    ("dns", "dns-name", true),
    ("federatesWith", "federates-with", true),
    ("node", "node", false),
    ("admin", "admin", false),
    ("hint", "hint", true),
    ("ttl", "x509-svid-ttl", true),
    ("x509SVIDTTL", "x509-svid-ttl", true),
    ("jwtSVIDTTL", "jwt-svid-ttl", true),
    ("data", "data", true),
    ("socketPath", "socket", true),
    ("trustDomain", "trust-domain", true),
    ("bundleEndpointURL", "bundle-endpoint-url", true),
    ("bundleEndpointProfile", "bundle-endpoint-profile", true),
    ("endpointSpiffeID", "endpoint-spiffe-id", true),
    ("trustDomainBundlePath", "trust-domain-bundle-path", true),
    (
        "trustDomainBundleFormat",
        "trust-domain-bundle-format",
        true,
    ),
];

/// The `continuity-agent` aliases (on top of [`COMMON`]).
pub const AGENT: &[Alias] = &[
    ("socketPath", "socket-path", true),
    ("audience", "audience", true),
    ("svid", "svid", true),
    ("write", "write", true),
];

/// Our long options of either binary that take no value (besides the switch aliases).
const SWITCHES: &[&str] = &["help", "version", "insecure-bootstrap", "banned"];

/// `args` (program name first) with every SPIRE spelling in `tables` replaced by our long
/// option. A value that follows a rewritten or a `--long` option is passed through untouched.
pub fn translate(args: impl IntoIterator<Item = OsString>, tables: &[&[Alias]]) -> Vec<OsString> {
    let find = |name: &str| {
        tables
            .iter()
            .flat_map(|t| t.iter())
            .find(|(spire, _, _)| *spire == name)
    };
    let mut out = Vec::new();
    let mut args = args.into_iter();
    out.extend(args.next());
    let mut value_next = false;
    let mut rest_verbatim = false;
    for arg in args {
        if rest_verbatim || std::mem::take(&mut value_next) {
            out.push(arg);
            continue;
        }
        let Some(s) = arg.to_str() else {
            out.push(arg);
            continue;
        };
        if s == "--" {
            rest_verbatim = true;
            out.push(arg);
            continue;
        }
        if let Some(long) = s.strip_prefix("--") {
            // Our own long option: a value may follow it as the next word, unless it is a
            // switch.
            let switch = SWITCHES.contains(&long)
                || tables
                    .iter()
                    .flat_map(|t| t.iter())
                    .any(|(_, o, takes)| *o == long && !takes);
            value_next = !long.contains('=') && !long.is_empty() && !switch;
            out.push(arg);
            continue;
        }
        let Some(word) = s.strip_prefix('-') else {
            out.push(arg);
            continue;
        };
        let (name, value) = match word.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (word, None),
        };
        match find(name) {
            Some((_, ours, takes)) => {
                out.push(match value {
                    Some(v) => format!("--{ours}={v}").into(),
                    None => format!("--{ours}").into(),
                });
                value_next = *takes && value.is_none();
            }
            None => out.push(arg),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn run(args: &[&str]) -> Vec<String> {
        let args = std::iter::once("bin")
            .chain(args.iter().copied())
            .map(OsString::from);
        translate(args, &[COMMON, SERVER])
            .into_iter()
            .skip(1)
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn spire_spellings_become_long_options() {
        assert_eq!(
            run(&[
                "entry",
                "create",
                "-spiffeID",
                "spiffe://td/w",
                "-parentID=spiffe://td/a",
                "-selector",
                "unix:uid:1000",
                "-node",
                "-dns",
                "w.td",
                "-ttl",
                "60",
            ]),
            [
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://td/w",
                "--parent-id=spiffe://td/a",
                "--selector",
                "unix:uid:1000",
                "--node",
                "--dns-name",
                "w.td",
                "--x509-svid-ttl",
                "60",
            ]
        );
    }

    #[test]
    fn values_unknown_words_and_everything_after_a_double_dash_pass_through() {
        // A hint that happens to read like a SPIRE flag is a value, not a flag.
        assert_eq!(run(&["-hint", "-node"]), ["--hint", "-node"]);
        assert_eq!(run(&["--hint", "-node"]), ["--hint", "-node"]);
        assert_eq!(run(&["-h", "-x", "-spiffeid"]), ["-h", "-x", "-spiffeid"]);
        assert_eq!(run(&["--", "-node"]), ["--", "-node"]);
        assert_eq!(run(&["--admin=true", "-node"]), ["--admin=true", "--node"]);
        // A switch takes no value: the word after it is read as usual.
        assert_eq!(
            run(&["--node", "-spiffeID", "x"]),
            ["--node", "--spiffe-id", "x"]
        );
    }
}
