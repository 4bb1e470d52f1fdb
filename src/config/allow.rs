//! Source addresses: the `--allow` list of networks that may connect (and
//! whose autodiscovery requests are answered), lists of networks such as
//! `--proxy-protocol`'s ([`Networks`]), and [`host_key`], under which the
//! per-address limits count a peer. Checked before the server sends
//! anything, so a refused peer learns nothing, not even the version.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The address under which per-address limits count `ip`: IPv4-mapped
/// IPv6 addresses (an IPv4 client of a listener on `::`) as the IPv4
/// address, and IPv6 addresses by their /64, since one host or home
/// network is handed a whole /64 and can pick any address in it.
pub(crate) fn host_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !(u128::MAX >> 64);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

/// One network of the allow-list: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    /// The network's first address (host bits cleared).
    base: IpAddr,
    /// Leading bits that must match: 0 to 32 for IPv4, 0 to 128 for IPv6.
    prefix: u8,
}

impl Network {
    /// Parses `10.0.0.0/8`, `2001:db8::/32`, or a plain address (a /32 or
    /// /128). Host bits after the prefix are ignored, as `10.1.2.3/8`
    /// means `10.0.0.0/8`.
    pub fn parse(text: &str) -> Result<Network, String> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr = addr.trim_start_matches('[').trim_end_matches(']');
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IPv4 or IPv6 address"))?;
        let ip = ip.to_canonical();
        let bits = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= bits => n,
                _ => return Err(format!("prefix length {p:?} is not 0 to {bits}")),
            },
        };
        Ok(Network {
            base: mask(ip, prefix),
            prefix,
        })
    }

    /// Whether `ip` is in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.base.is_ipv4() && mask(ip, self.prefix) == self.base
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

/// `ip` with every bit after the first `prefix` cleared.
fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let keep = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & keep))
        }
        IpAddr::V6(v6) => {
            let keep = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & keep))
        }
    }
}

/// A list of networks, as `--allow` and `--proxy-protocol` take them;
/// empty matches no address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Networks(Vec<Network>);

impl Networks {
    /// Adds the networks of `text`: one or more, separated by commas or
    /// spaces.
    pub fn extend_from(&mut self, text: &str) -> Result<(), String> {
        let mut any = false;
        for item in text.split([',', ' ', '\t']).filter(|s| !s.is_empty()) {
            self.0.push(Network::parse(item)?);
            any = true;
        }
        if !any {
            return Err("expected a network such as 10.0.0.0/8 or an address".into());
        }
        Ok(())
    }

    /// Forgets every network.
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// Whether `ip` is in one of the networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(ip))
    }

    /// Whether the list has no network.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The networks, as given.
    pub fn iter(&self) -> impl Iterator<Item = &Network> {
        self.0.iter()
    }
}

impl std::fmt::Display for Networks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        for (i, n) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{n}")?;
        }
        Ok(())
    }
}

/// The networks that may connect (`--allow`); empty means everyone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList(Networks);

impl AllowList {
    /// Adds the networks of `text`: one or more, separated by commas or
    /// spaces.
    pub fn extend_from(&mut self, text: &str) -> Result<(), String> {
        self.0.extend_from(text)
    }

    /// Forgets every network: everyone may connect again.
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// Whether a peer at `ip` may connect.
    pub fn permits(&self, ip: IpAddr) -> bool {
        self.0.is_empty() || self.0.contains(ip)
    }

    /// Whether everyone may connect (no `--allow` given).
    pub fn is_everyone(&self) -> bool {
        self.0.is_empty()
    }

    /// The networks, as given.
    pub fn networks(&self) -> impl Iterator<Item = &Network> {
        self.0.iter()
    }
}

impl std::fmt::Display for AllowList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("everyone");
        }
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn list(s: &str) -> AllowList {
        let mut l = AllowList::default();
        l.extend_from(s).unwrap();
        l
    }

    #[test]
    fn networks_and_plain_addresses() {
        let l = list("127.0.0.1/32, 10.0.0.0/8 2001:db8::/32,::1");
        assert!(l.permits(ip("127.0.0.1")));
        assert!(!l.permits(ip("127.0.0.3")));
        assert!(l.permits(ip("10.200.1.1")));
        assert!(!l.permits(ip("11.0.0.1")));
        assert!(l.permits(ip("2001:db8:ffff::1")));
        assert!(!l.permits(ip("2001:db9::1")));
        assert!(l.permits(ip("::1")));
        assert!(!l.permits(ip("::2")));
        assert_eq!(
            l.to_string(),
            "127.0.0.1/32, 10.0.0.0/8, 2001:db8::/32, ::1/128"
        );
    }

    #[test]
    fn ipv4_clients_of_an_ipv6_listener_match_ipv4_networks() {
        let l = list("192.0.2.0/24");
        assert!(l.permits(ip("::ffff:192.0.2.7")));
        assert!(!l.permits(ip("::ffff:198.51.100.7")));
        assert!(list("::ffff:192.0.2.7").permits(ip("192.0.2.7")));
    }

    #[test]
    fn everyone_by_default_and_zero_prefixes() {
        assert!(AllowList::default().permits(ip("203.0.113.9")));
        assert!(list("0.0.0.0/0").permits(ip("203.0.113.9")));
        assert!(!list("0.0.0.0/0").permits(ip("2001:db8::1")));
        assert!(list("::/0").permits(ip("2001:db8::1")));
    }

    #[test]
    fn host_bits_are_ignored_and_bad_input_refused() {
        assert_eq!(
            Network::parse("10.1.2.3/8").unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(Network::parse("[::1]").unwrap().to_string(), "::1/128");
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "host.example",
            "10.0.0.0/-1",
            "/8",
        ] {
            assert!(Network::parse(bad).is_err(), "{bad}");
        }
        assert!(AllowList::default().extend_from(" , ").is_err());
    }

    #[test]
    fn an_empty_network_list_matches_nobody() {
        let mut proxies = Networks::default();
        assert!(!proxies.contains(ip("127.0.0.1")));
        assert_eq!(proxies.to_string(), "none");
        proxies.extend_from("127.0.0.1, 10.0.0.0/8").unwrap();
        assert!(proxies.contains(ip("10.1.2.3")) && proxies.contains(ip("::ffff:127.0.0.1")));
        assert!(!proxies.contains(ip("127.0.0.2")));
        assert_eq!(proxies.to_string(), "127.0.0.1/32, 10.0.0.0/8");
    }

    #[test]
    fn an_ipv6_host_counts_by_its_64() {
        assert_eq!(host_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(host_key(ip("2001:db8:1:2:bbbb::9")), ip("2001:db8:1:2::"));
        assert_eq!(host_key(ip("::ffff:127.0.0.2")), ip("127.0.0.2"));
        assert_eq!(host_key(ip("127.0.0.2")), ip("127.0.0.2"));
    }
}
