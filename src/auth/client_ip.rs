//! The client's address: the TCP peer, or — only when the peer is a trusted proxy — the
//! nearest untrusted hop of `X-Forwarded-For`. Used for sessions, rate limits and audit.

use std::net::IpAddr;

/// Walks `X-Forwarded-For` from the right (the hops our proxies appended), skipping
/// trusted proxies; the first untrusted address is the client. Garbage ends the walk.
pub fn client_ip(peer: IpAddr, x_forwarded_for: Option<&str>, trusted: &[ipnet::IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let Some(xff) = x_forwarded_for else {
        return peer;
    };
    let mut client = peer;
    for hop in xff.rsplit(',') {
        let Ok(ip) = hop.trim().parse::<IpAddr>() else {
            break;
        };
        client = ip;
        if !is_trusted(&ip) {
            break;
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(s: &[&str]) -> Vec<ipnet::IpNet> {
        s.iter().map(|n| n.parse().expect("cidr")).collect()
    }

    #[test]
    fn table() {
        let trusted = nets(&["10.0.0.0/8", "127.0.0.1/32"]);
        let peer: IpAddr = "10.0.0.5".parse().expect("ip");
        let cases: &[(&str, Option<&str>, &str)] = &[
            // Untrusted peer: XFF ignored.
            ("203.0.113.9", Some("1.2.3.4"), "203.0.113.9"),
            // Trusted peer without XFF.
            ("10.0.0.5", None, "10.0.0.5"),
            // Trusted peer: the rightmost untrusted hop wins, not a spoofed leftmost one.
            ("10.0.0.5", Some("6.6.6.6, 198.51.100.7"), "198.51.100.7"),
            ("10.0.0.5", Some("198.51.100.7, 10.0.0.9"), "198.51.100.7"),
            // Garbage stops the walk at the last good hop.
            ("10.0.0.5", Some("nonsense, 198.51.100.7"), "198.51.100.7"),
            ("10.0.0.5", Some("nonsense"), "10.0.0.5"),
        ];
        for (p, xff, want) in cases {
            let p: IpAddr = p.parse().expect("ip");
            let _ = peer;
            assert_eq!(
                client_ip(p, *xff, &trusted).to_string(),
                *want,
                "{p} {xff:?}"
            );
        }
    }
}
