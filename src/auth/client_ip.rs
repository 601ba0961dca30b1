//! Which IP address a request came from, for rate limits, sessions and the audit log.
//!
//! Owns: the rule for believing `X-Forwarded-For`. Must not: trust the header unless the
//! TCP peer is a configured proxy, or fail on garbage — any client can send any header,
//! so the worst a bad header may do is make us fall back to an address a trusted hop saw.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

/// Entries looked at, from the right. Real chains are a few hops; this only bounds the
/// work a huge header can cause.
const MAX_HOPS: usize = 32;

/// The client's address. `X-Forwarded-For` is believed only when `peer` is trusted; it is
/// then walked from the right (each proxy appends the address it saw) past trusted hops,
/// and the first untrusted address is the client. If every hop is trusted, the leftmost
/// one is. A garbage entry stops the walk at the last trusted address reached, since
/// only a trusted hop can have written it.
pub fn client_ip(peer: IpAddr, x_forwarded_for: Option<&str>, trusted: &[IpNet]) -> IpAddr {
    // An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d; compare and report
    // it as the IPv4 address so `10.0.0.0/8` and the logs mean what they say.
    let peer = peer.to_canonical();
    let is_trusted = |ip: IpAddr| trusted.iter().any(|net| net.contains(&ip));
    if !is_trusted(peer) {
        return peer;
    }
    let Some(header) = x_forwarded_for else {
        return peer;
    };
    let mut client = peer;
    for entry in header.rsplit(',').take(MAX_HOPS) {
        let entry = entry.trim();
        if entry.is_empty() {
            // `a, , b` or a trailing comma: no information, not an attack.
            continue;
        }
        let Some(ip) = parse_entry(entry) else {
            return client;
        };
        client = ip;
        if !is_trusted(ip) {
            return ip;
        }
    }
    client
}

/// An address as proxies write it: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`,
/// `[2001:db8::1]`, `[2001:db8::1]:443`, possibly quoted.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim_matches('"');
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(sock) = entry.parse::<SocketAddr>() {
        return Some(sock.ip().to_canonical());
    }
    let inner = entry.strip_prefix('[')?.strip_suffix(']')?;
    inner.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn table() {
        let proxies = nets(&["10.0.0.0/8", "127.0.0.1/32", "::1/128", "fd00::/8"]);
        // (peer, X-Forwarded-For, trusted, expected)
        let cases: &[(&str, Option<&str>, &[IpNet], &str)] = &[
            // Untrusted peer: the header is ignored whatever it says.
            ("203.0.113.9", Some("198.51.100.1"), &proxies, "203.0.113.9"),
            ("203.0.113.9", Some("10.0.0.1"), &proxies, "203.0.113.9"),
            // No trusted proxies configured at all.
            ("10.0.0.2", Some("198.51.100.1"), &[], "10.0.0.2"),
            // Trusted peer, no header: the proxy itself (health checks, internal calls).
            ("10.0.0.2", None, &proxies, "10.0.0.2"),
            ("10.0.0.2", Some(""), &proxies, "10.0.0.2"),
            // One proxy.
            ("10.0.0.2", Some("198.51.100.1"), &proxies, "198.51.100.1"),
            // Client-supplied entries left of the real one are not believed.
            (
                "10.0.0.2",
                Some("1.1.1.1, 8.8.8.8, 198.51.100.1"),
                &proxies,
                "198.51.100.1",
            ),
            // Several trusted hops are skipped.
            (
                "10.0.0.2",
                Some("1.1.1.1, 198.51.100.1, 10.0.0.7, 127.0.0.1"),
                &proxies,
                "198.51.100.1",
            ),
            // Every hop trusted: the leftmost.
            (
                "127.0.0.1",
                Some("10.1.1.1, 10.0.0.3"),
                &proxies,
                "10.1.1.1",
            ),
            // A client pretending to be a trusted hop is just skipped over.
            (
                "10.0.0.2",
                Some("10.9.9.9, 198.51.100.1"),
                &proxies,
                "198.51.100.1",
            ),
            // Garbage where the client's entry should be: stop at the last trusted hop.
            ("10.0.0.2", Some("unknown"), &proxies, "10.0.0.2"),
            (
                "10.0.0.2",
                Some("198.51.100.1, <script>, 10.0.0.5"),
                &proxies,
                "10.0.0.5",
            ),
            ("10.0.0.2", Some("999.1.1.1"), &proxies, "10.0.0.2"),
            ("10.0.0.2", Some("\u{0}\u{7f}é"), &proxies, "10.0.0.2"),
            // Garbage left of the first untrusted address is never reached.
            (
                "10.0.0.2",
                Some("garbage, 198.51.100.1"),
                &proxies,
                "198.51.100.1",
            ),
            // Empty entries and odd spacing.
            (
                "10.0.0.2",
                Some(" 198.51.100.1 ,, "),
                &proxies,
                "198.51.100.1",
            ),
            // Ports, brackets, quotes, IPv6.
            (
                "10.0.0.2",
                Some("198.51.100.1:4711"),
                &proxies,
                "198.51.100.1",
            ),
            ("::1", Some("2001:db8::7"), &proxies, "2001:db8::7"),
            ("::1", Some("[2001:db8::7]:443"), &proxies, "2001:db8::7"),
            ("::1", Some("[2001:db8::7]"), &proxies, "2001:db8::7"),
            (
                "::1",
                Some("\"[2001:db8::7]:443\""),
                &proxies,
                "2001:db8::7",
            ),
            (
                "fd00::5",
                Some("2001:db8::7, fd00::9"),
                &proxies,
                "2001:db8::7",
            ),
            // IPv4-mapped IPv6 peer and entries are treated as IPv4.
            (
                "::ffff:10.0.0.2",
                Some("198.51.100.1"),
                &proxies,
                "198.51.100.1",
            ),
            (
                "::ffff:203.0.113.9",
                Some("198.51.100.1"),
                &proxies,
                "203.0.113.9",
            ),
            (
                "10.0.0.2",
                Some("::ffff:198.51.100.1"),
                &proxies,
                "198.51.100.1",
            ),
        ];
        for (peer, xff, trusted, want) in cases {
            let peer: IpAddr = peer.parse().unwrap();
            let want: IpAddr = want.parse().unwrap();
            assert_eq!(
                client_ip(peer, *xff, trusted),
                want,
                "peer {peer}, xff {xff:?}"
            );
        }
    }

    #[test]
    fn a_huge_header_is_bounded_and_still_answers() {
        let proxies = nets(&["10.0.0.0/8"]);
        let header = vec!["10.0.0.1"; 10_000].join(", ");
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        // Only the rightmost MAX_HOPS entries are considered; all trusted → leftmost seen.
        assert_eq!(
            client_ip(peer, Some(&header), &proxies),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
        let mut spoof = vec!["10.0.0.1"; 100];
        spoof.insert(0, "198.51.100.1");
        let peer_seen = client_ip(peer, Some(&spoof.join(",")), &proxies);
        assert_eq!(peer_seen, "10.0.0.1".parse::<IpAddr>().unwrap());
    }
}
