//! Two trust domains for federation tests: a server (and optionally an agent) whose trust
//! domain is not the default `example.org`.

use std::path::Path;

use crate::agent::TestAgent;
use crate::server::{ServerOptions, TRUST_DOMAIN, TestServer};

/// Rewrites the `trust_domain` line of the TOML file at `path` to `td`.
fn set_trust_domain(path: &Path, td: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    let old = format!("trust_domain = \"{TRUST_DOMAIN}\"");
    assert!(text.contains(&old), "{} has no {old}", path.display());
    std::fs::write(
        path,
        text.replacen(&old, &format!("trust_domain = \"{td}\""), 1),
    )
    .unwrap();
}

/// Starts a server of trust domain `td` in `dir` and waits until it answers.
pub fn server_in(dir: &Path, td: &str, opts: ServerOptions) -> TestServer {
    let mut s = TestServer::configure(dir, opts);
    set_trust_domain(&dir.join("server.toml"), td);
    s.spawn();
    s
}

/// Starts an agent of trust domain `td` in `dir`, attested to `server` with a join token
/// aliased to `alias`, with `extra` TOML.
pub fn agent_in(dir: &Path, td: &str, server: &TestServer, alias: &str, extra: &str) -> TestAgent {
    let token = server.token(Some(alias));
    let mut a = TestAgent::configure(dir, server, &token, extra);
    set_trust_domain(&dir.join("agent.toml"), td);
    a.spawn();
    a
}
