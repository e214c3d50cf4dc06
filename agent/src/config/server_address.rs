//! `server_address`: one `host:port`, or a TOML array of them. A host is an IP literal
//! (IPv6 in brackets) or a DNS name; every A/AAAA record of a name is a server of its own
//! (resolved by [`crate::client::servers`], not here: config parsing does no I/O).

use std::net::IpAddr;

use continuity_common::config::{ConfigError, invalid};

/// Most entries in `server_address` (a list longer than this is a mistake, not an HA set).
pub const MAX_SERVER_ADDRESSES: usize = 64;

/// The default `server_address`.
pub const DEFAULT_SERVER_ADDRESS: &str = "127.0.0.1:8081";

/// One `server_address` entry: an IP literal or a DNS name, and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerAddress {
    /// An IP address (without brackets) or a DNS name.
    pub host: String,
    /// The agent API port (1 to 65535).
    pub port: u16,
}

impl ServerAddress {
    /// The IP address, if the host is a literal (no resolution needed).
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }

    /// Parses `host:port` or `[v6]:port`; the error says what is wrong with `s`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, p) = rest
                .split_once("]:")
                .ok_or_else(|| format!("{s:?} is not [IPv6]:port"))?;
            h.parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("{s:?}: {h:?} is not an IPv6 address"))?;
            (h, p)
        } else {
            let (h, p) = s
                .rsplit_once(':')
                .ok_or_else(|| format!("{s:?} is not host:port (e.g. \"server.example:8081\")"))?;
            if h.contains(':') {
                return Err(format!(
                    "{s:?}: write an IPv6 address in brackets, e.g. \"[::1]:8081\""
                ));
            }
            if h.parse::<IpAddr>().is_err() {
                dns_name(h).map_err(|m| format!("{s:?}: {m}"))?;
            }
            (h, p)
        };
        let port = match p_u16(port) {
            Some(p) if p != 0 => p,
            _ => return Err(format!("{s:?}: {port:?} is not a port (1 to 65535)")),
        };
        Ok(Self {
            host: host.to_string(),
            port,
        })
    }
}

fn p_u16(p: &str) -> Option<u16> {
    // `u16::from_str` accepts a leading `+`; a port is digits only.
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse().ok()
}

/// Checks a DNS name: dot-separated labels of letters, digits, `-` and `_` (1 to 63 bytes,
/// no leading or trailing `-`), at most 253 bytes, an optional trailing dot.
fn dns_name(h: &str) -> Result<(), String> {
    let name = h.strip_suffix('.').unwrap_or(h);
    if name.is_empty() {
        return Err("the host is empty".into());
    }
    if name.len() > 253 {
        return Err("the host name is longer than 253 bytes".into());
    }
    for label in name.split('.') {
        let ok = (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!("{h:?} is not a host name or IP address"));
        }
    }
    Ok(())
}

impl std::fmt::Display for ServerAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.ip() {
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            _ => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

/// The typed `server_address`: absent → the default; a string → one entry; an array of
/// strings → each entry, at least one, at most [`MAX_SERVER_ADDRESSES`], no duplicates.
pub fn server_addresses(v: Option<toml::Value>) -> Result<Vec<ServerAddress>, ConfigError> {
    const KEY: &str = "server_address";
    let items = match v {
        None => vec![toml::Value::String(DEFAULT_SERVER_ADDRESS.into())],
        Some(toml::Value::String(s)) => vec![toml::Value::String(s)],
        Some(toml::Value::Array(a)) => a,
        Some(other) => {
            return Err(invalid(
                KEY,
                format!(
                    "must be \"host:port\" or an array of them, not {}",
                    other.type_str()
                ),
            ));
        }
    };
    if items.is_empty() {
        return Err(invalid(
            KEY,
            "the array is empty; list at least one host:port",
        ));
    }
    if items.len() > MAX_SERVER_ADDRESSES {
        return Err(invalid(
            KEY,
            format!(
                "lists {} addresses; at most {MAX_SERVER_ADDRESSES}",
                items.len()
            ),
        ));
    }
    let mut out: Vec<ServerAddress> = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let toml::Value::String(s) = item else {
            return Err(invalid(
                KEY,
                format!(
                    "entry {i} is not a \"host:port\" string (it is {})",
                    item.type_str()
                ),
            ));
        };
        let a = ServerAddress::parse(&s).map_err(|m| invalid(KEY, format!("entry {i}: {m}")))?;
        if out.contains(&a) {
            return Err(invalid(KEY, format!("entry {i}: {s:?} is listed twice")));
        }
        out.push(a);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_ports_and_ipv6_brackets() {
        for (s, host, port) in [
            ("127.0.0.1:8081", "127.0.0.1", 8081),
            ("[::1]:9", "::1", 9),
            ("server.example.org:443", "server.example.org", 443),
            ("localhost:8081", "localhost", 8081),
            (
                "continuity-server.ns.svc.cluster.local.:8081",
                "continuity-server.ns.svc.cluster.local.",
                8081,
            ),
        ] {
            let a = ServerAddress::parse(s).unwrap();
            assert_eq!((a.host.as_str(), a.port), (host, port), "{s}");
            assert_eq!(a.to_string(), s);
        }
        for bad in [
            "nope",
            "host:",
            "host:0",
            "host:65536",
            "host:+80",
            ":8081",
            "::1:8081",
            "[::1]8081",
            "[nope]:8081",
            "a b:8081",
            "-host:8081",
            "ho/st:8081",
            "a..b:8081",
        ] {
            assert!(ServerAddress::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn one_string_an_array_and_refusals_naming_the_key() {
        let v = |s: &str| -> toml::Value {
            let t: toml::Table = toml::from_str(&format!("x = {s}")).unwrap();
            t["x"].clone()
        };
        assert_eq!(
            server_addresses(None).unwrap(),
            vec![ServerAddress::parse(DEFAULT_SERVER_ADDRESS).unwrap()]
        );
        assert_eq!(server_addresses(Some(v("\"a:1\""))).unwrap().len(), 1);
        let many = server_addresses(Some(v("[\"a:1\", \"[::1]:2\", \"10.0.0.1:3\"]"))).unwrap();
        assert_eq!(many.len(), 3);
        for (bad, says) in [
            ("[]", "empty"),
            ("[\"a:1\", 5]", "entry 1 is not"),
            ("[\"a:1\", \"b\"]", "entry 1"),
            ("[\"a:1\", \"a:1\"]", "listed twice"),
            ("7", "integer"),
        ] {
            let e = server_addresses(Some(v(bad))).unwrap_err().to_string();
            assert!(
                e.contains("server_address") && e.contains(says),
                "{bad}: {e}"
            );
        }
        let long = format!(
            "[{}]",
            (0..=MAX_SERVER_ADDRESSES)
                .map(|i| format!("\"h{i}:1\""))
                .collect::<Vec<_>>()
                .join(",")
        );
        assert!(server_addresses(Some(v(&long))).is_err());
    }
}
