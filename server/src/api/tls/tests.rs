//! Unit tests of the agent API connection caps.

use super::*;

#[test]
fn per_ip_caps_count_an_ipv6_64_as_one_peer() {
    let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
    let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
    let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
    assert_eq!(cap_key(a), cap_key(b));
    assert_ne!(cap_key(a), cap_key(c));
    let mapped: IpAddr = "::ffff:10.0.0.7".parse().unwrap();
    assert_eq!(cap_key(mapped), "10.0.0.7".parse::<IpAddr>().unwrap());
}

#[test]
fn connections_without_a_certificate_hold_at_most_a_quarter() {
    let caps = ConnCaps::new(AcceptLimits {
        max_connections: 8,
        max_per_ip: 8,
        handshake_timeout: Duration::from_secs(1),
        tcp_keepalive: Duration::from_secs(60),
        anonymous_lifetime: Duration::from_secs(1),
    });
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    let mut slots: Vec<_> = (0..3).map(|_| caps.admit(ip).unwrap()).collect();
    slots[0].anonymous().unwrap();
    slots[1].anonymous().unwrap();
    assert_eq!(slots[2].anonymous(), Err(Refused::Anonymous(2)));
    drop(slots.remove(0));
    slots[1].anonymous().unwrap();
    assert_eq!(caps.open(), 2);
}
