//! The PROXY protocol (HAProxy's `doc/proxy-protocol.txt`, versions 1 and
//! 2): how a proxy in front of the server (HAProxy in TCP mode with
//! `send-proxy` or `send-proxy-v2`) tells it which client a connection
//! relays, so that the client's address, not the proxy's, is the one
//! `--allow`, the budgets, the login delay, fair share, the log and the
//! metrics see.
//!
//! Only connections from a `--proxy-protocol` address are read for a
//! header, and they must begin with one: the spec forbids guessing, since
//! a header honoured from anyone would let every peer pick its address.
//! From another address the same bytes are the pp handshake's (and fail
//! it).
//!
//! The header is read before the server sends its version, within
//! [`HEADER_TIMEOUT`] and within the handshake's own timeout, which runs
//! from the accept. It is read byte-exact, never past its end, so the
//! client's first bytes after it are the handshake's: v1 a byte at a time
//! up to its CRLF (at most [`V1_MAX`] bytes; the pp client speaks only
//! after the server, so nothing follows the line until then), v2 its 16
//! fixed bytes, then exactly the length they announce, which is checked
//! against [`V2_MAX`] before a byte of it is read. Type-length-value
//! fields after the addresses are skipped.
//!
//! Admission, with [`crate::front::connections`]: the proxy's connection
//! is let in at accept whatever `--allow` says (the list is about
//! clients), holding a handshake place under the proxy's address while
//! the header comes; then the place is re-admitted under the client's
//! address: `--allow` is checked against it and the place moves to its
//! per-address share, exactly as if the client had connected itself. The
//! alternative, keeping the place under the proxy's address, would make
//! every client behind one proxy share one per-address share, which is
//! what the header is there to end. A v2 `LOCAL` header (the proxy's own
//! health check), v1 `UNKNOWN` and a v2 header without an IP address
//! (`AF_UNSPEC`, `AF_UNIX`) name no client: the connection is then served
//! as the proxy's own, `--allow` included.
//!
//! A listed peer that sends no header, a malformed one, or not all of it in
//! time is closed, logged (rate-limited) and counted among the refused
//! connections as `proxy_header`. One that closes before sending a byte is
//! only logged at debug level: that is how a TCP port check (HAProxy's
//! plain `check`) looks.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::front::connections::{Place, Refused};
use crate::logging::ratelimit::warn_limited;
use crate::ops::metrics::metrics;

/// How long a listed peer has to send its whole header, from the accept:
/// the spec's advice (at least 3 s, to cover a TCP retransmit).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest v1 header, CRLF included (`PROXY UNKNOWN` with two IPv6
/// addresses and two ports).
pub const V1_MAX: usize = 107;
/// The v2 signature, its first 12 bytes.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The v2 header's fixed part: signature, version and command, family and
/// transport, length.
const V2_FIXED: usize = 16;
/// The longest v2 header accepted, fixed part included: the spec's
/// recommended buffer, room for two `AF_UNIX` addresses (216 bytes) and
/// some type-length-value fields.
pub const V2_MAX: usize = 536;
/// How a v1 header begins.
const V1_PREFIX: &[u8] = b"PROXY ";

/// What a header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The proxy relays a connection from `source` (the client) to
    /// `destination` (the address the client connected to).
    Relayed {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// No client address: the connection is served as the proxy's own.
    /// Names the kind of header, for the log.
    Own(&'static str),
}

/// Why a listed peer's header was not taken.
#[derive(Debug)]
pub enum HeaderError {
    /// The peer closed the connection after this many bytes of it.
    Closed(usize),
    /// Reading failed.
    Io(io::Error),
    /// Not all of it came in time.
    Late,
    /// The first bytes are no PROXY header of either version.
    Missing,
    /// A header, but not a valid one: why.
    Malformed(&'static str),
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::Closed(n) => {
                write!(f, "closed the connection after {n} bytes of a PROXY header")
            }
            HeaderError::Io(e) => write!(f, "reading its PROXY header failed: {e}"),
            HeaderError::Late => f.write_str("no complete PROXY header in time"),
            HeaderError::Missing => f.write_str("sent no PROXY header"),
            HeaderError::Malformed(why) => write!(f, "malformed PROXY header: {why}"),
        }
    }
}

impl From<io::Error> for HeaderError {
    fn from(e: io::Error) -> Self {
        HeaderError::Io(e)
    }
}

/// Reads one header from `r`, and not a byte more, within
/// [`HEADER_TIMEOUT`].
pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<Header, HeaderError> {
    match tokio::time::timeout(HEADER_TIMEOUT, read_untimed(r)).await {
        Ok(read) => read,
        Err(_) => Err(HeaderError::Late),
    }
}

/// [`read_header`] without its time limit.
async fn read_untimed<R: AsyncRead + Unpin>(r: &mut R) -> Result<Header, HeaderError> {
    let mut buf = [0u8; V2_MAX];
    fill(r, &mut buf, 0, 1).await?;
    match buf[0] {
        b'P' => {
            let mut len = 1;
            loop {
                if len == V1_MAX {
                    return Err(HeaderError::Malformed("no CRLF within 107 bytes"));
                }
                fill(r, &mut buf, len, len + 1).await?;
                len += 1;
                if len <= V1_PREFIX.len() && buf[len - 1] != V1_PREFIX[len - 1] {
                    return Err(HeaderError::Missing);
                }
                if buf[len - 1] == b'\n' {
                    return parse_v1(&buf[..len]);
                }
            }
        }
        b'\r' => {
            fill(r, &mut buf, 1, V2_FIXED).await?;
            if buf[..V2_SIGNATURE.len()] != V2_SIGNATURE {
                return Err(HeaderError::Missing);
            }
            let total = V2_FIXED + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
            if total > V2_MAX {
                return Err(HeaderError::Malformed("longer than 536 bytes"));
            }
            fill(r, &mut buf, V2_FIXED, total).await?;
            parse_v2(&buf[..total])
        }
        _ => Err(HeaderError::Missing),
    }
}

/// Reads `buf[from..to]` exactly; the peer closing first is
/// [`HeaderError::Closed`] with the bytes it sent.
async fn fill<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    from: usize,
    to: usize,
) -> Result<(), HeaderError> {
    let mut at = from;
    while at < to {
        match r.read(&mut buf[at..to]).await? {
            0 => return Err(HeaderError::Closed(at)),
            n => at += n,
        }
    }
    Ok(())
}

/// Parses a whole v1 header, its CRLF included.
pub fn parse_v1(line: &[u8]) -> Result<Header, HeaderError> {
    let Some(body) = line.strip_suffix(b"\r\n") else {
        return Err(HeaderError::Malformed("the line does not end with CRLF"));
    };
    let Some(rest) = body.strip_prefix(V1_PREFIX) else {
        return Err(HeaderError::Missing);
    };
    if rest.iter().any(|&b| b == b'\r' || b == b'\n') {
        return Err(HeaderError::Malformed("a lone CR or LF in the line"));
    }
    // The spec: anything may follow UNKNOWN before the CRLF.
    if rest == b"UNKNOWN" || rest.starts_with(b"UNKNOWN ") {
        return Ok(Header::Own("v1 UNKNOWN"));
    }
    let rest = match std::str::from_utf8(rest) {
        Ok(text) if text.is_ascii() => text,
        _ => return Err(HeaderError::Malformed("not ASCII")),
    };
    let fields: Vec<&str> = rest.split(' ').collect();
    let [proto, src, dst, sport, dport] = fields[..] else {
        return Err(HeaderError::Malformed(
            "expected TCP4 or TCP6, two addresses and two ports, one space apart",
        ));
    };
    let (src, dst) = match proto {
        "TCP4" => (ipv4(src)?, ipv4(dst)?),
        "TCP6" => (ipv6(src)?, ipv6(dst)?),
        _ => {
            return Err(HeaderError::Malformed(
                "protocol neither TCP4, TCP6 nor UNKNOWN",
            ))
        }
    };
    Ok(Header::Relayed {
        source: SocketAddr::new(src, port(sport)?),
        destination: SocketAddr::new(dst, port(dport)?),
    })
}

/// A v1 IPv4 address: four decimal numbers, dotted, no leading zeros.
fn ipv4(text: &str) -> Result<IpAddr, HeaderError> {
    let bad = HeaderError::Malformed("bad IPv4 address");
    let well_formed = text.split('.').count() == 4
        && text
            .split('.')
            .all(|n| !n.is_empty() && n.len() <= 3 && !(n.len() > 1 && n.starts_with('0')));
    if !well_formed {
        return Err(bad);
    }
    text.parse::<Ipv4Addr>().map(IpAddr::V4).map_err(|_| bad)
}

/// A v1 IPv6 address.
fn ipv6(text: &str) -> Result<IpAddr, HeaderError> {
    text.parse::<Ipv6Addr>()
        .map(IpAddr::V6)
        .map_err(|_| HeaderError::Malformed("bad IPv6 address"))
}

/// A v1 port: 0 to 65535 in decimal, no leading zeros.
fn port(text: &str) -> Result<u16, HeaderError> {
    let bad = HeaderError::Malformed("bad port");
    if text.is_empty()
        || text.len() > 5
        || !text.bytes().all(|b| b.is_ascii_digit())
        || (text.len() > 1 && text.starts_with('0'))
    {
        return Err(bad);
    }
    text.parse().map_err(|_| bad)
}

/// Parses a whole v2 header: the 16 fixed bytes and the length they
/// announce, no more and no less.
pub fn parse_v2(header: &[u8]) -> Result<Header, HeaderError> {
    let Some((fixed, block)) = header.split_first_chunk::<V2_FIXED>() else {
        return Err(HeaderError::Malformed("shorter than 16 bytes"));
    };
    if fixed[..V2_SIGNATURE.len()] != V2_SIGNATURE {
        return Err(HeaderError::Missing);
    }
    if usize::from(u16::from_be_bytes([fixed[14], fixed[15]])) != block.len() {
        return Err(HeaderError::Malformed("length does not match the bytes"));
    }
    if fixed[12] >> 4 != 2 {
        return Err(HeaderError::Malformed("version is not 2"));
    }
    match fixed[12] & 0x0f {
        // The proxy's own connection: the spec has the family and the
        // addresses ignored.
        0 => return Ok(Header::Own("v2 LOCAL")),
        1 => {}
        _ => return Err(HeaderError::Malformed("command neither LOCAL nor PROXY")),
    }
    let (family, transport) = (fixed[13] >> 4, fixed[13] & 0x0f);
    if family > 3 || transport > 2 {
        return Err(HeaderError::Malformed(
            "unknown address family or transport",
        ));
    }
    if transport == 0 {
        return Ok(Header::Own("v2 PROXY, transport UNSPEC"));
    }
    match family {
        1 => {
            let Some((a, _)) = block.split_first_chunk::<12>() else {
                return Err(HeaderError::Malformed("IPv4 addresses cut short"));
            };
            let ip = |at: usize| IpAddr::V4(Ipv4Addr::new(a[at], a[at + 1], a[at + 2], a[at + 3]));
            Ok(relayed(ip(0), ip(4), [a[8], a[9]], [a[10], a[11]]))
        }
        2 => {
            let Some((a, _)) = block.split_first_chunk::<36>() else {
                return Err(HeaderError::Malformed("IPv6 addresses cut short"));
            };
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&a[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            Ok(relayed(ip(0), ip(16), [a[32], a[33]], [a[34], a[35]]))
        }
        3 => Ok(Header::Own("v2 PROXY, AF_UNIX")),
        _ => Ok(Header::Own("v2 PROXY, AF_UNSPEC")),
    }
}

fn relayed(src: IpAddr, dst: IpAddr, sport: [u8; 2], dport: [u8; 2]) -> Header {
    Header::Relayed {
        source: SocketAddr::new(src, u16::from_be_bytes(sport)),
        destination: SocketAddr::new(dst, u16::from_be_bytes(dport)),
    }
}

/// Takes what a `--proxy-protocol` peer's header said: re-admits `place`
/// under the client it names (or the proxy itself) and returns the
/// address the connection is served as; `None` when it is to be closed,
/// which is logged and counted here.
pub(crate) fn admit_client(
    header: Result<Header, HeaderError>,
    proxy: SocketAddr,
    place: &mut Place,
) -> Option<SocketAddr> {
    let client = match header {
        Ok(Header::Relayed {
            source,
            destination,
        }) => {
            log::debug!("{proxy}: PROXY header: client {source} to {destination}");
            source
        }
        Ok(Header::Own(kind)) => {
            log::debug!("{proxy}: PROXY header ({kind}): served as the proxy itself");
            proxy
        }
        Err(HeaderError::Closed(0)) => {
            log::debug!("{proxy}: closed before sending a PROXY header (a port check?)");
            return None;
        }
        Err(e) => {
            metrics().refused(Refused::ProxyHeader.label());
            warn_limited(format_args!(
                "{proxy}: {e}, but --proxy-protocol lists its address; closed"
            ));
            return None;
        }
    };
    match place.readmit(client.ip()) {
        Ok(()) => Some(client),
        Err(refused) => {
            refused.log(client);
            None
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    use proptest::prelude::*;
    use tokio::io::AsyncWriteExt;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn relayed(src: &str, dst: &str) -> Header {
        Header::Relayed {
            source: addr(src),
            destination: addr(dst),
        }
    }

    fn malformed(r: Result<Header, HeaderError>) -> bool {
        matches!(r, Err(HeaderError::Malformed(_)))
    }

    /// A v2 header: command, family/transport byte, address block.
    pub(in crate::front) fn v2(command: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend((block.len() as u16).to_be_bytes());
        h.extend(block);
        h
    }

    pub(in crate::front) fn v2_inet(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut block = [src, dst].concat();
        block.extend(sport.to_be_bytes());
        block.extend(dport.to_be_bytes());
        block
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        assert_eq!(
            parse_v1(b"PROXY TCP4 192.0.2.7 127.0.0.1 56324 60000\r\n").unwrap(),
            relayed("192.0.2.7:56324", "127.0.0.1:60000")
        );
        assert_eq!(
            parse_v1(b"PROXY TCP6 2001:db8::7 ::1 0 65535\r\n").unwrap(),
            relayed("[2001:db8::7]:0", "[::1]:65535")
        );
        let longest = format!(
            "PROXY UNKNOWN {0} {0} 65535 65535\r\n",
            ["ffff"; 8].join(":")
        );
        assert_eq!(longest.len(), V1_MAX);
        for unknown in [&b"PROXY UNKNOWN\r\n"[..], longest.as_bytes()] {
            assert_eq!(parse_v1(unknown).unwrap(), Header::Own("v1 UNKNOWN"));
        }
    }

    #[test]
    fn bad_v1_headers() {
        for bad in [
            &b"PROXY TCP4 192.0.2.7 127.0.0.1 56324 60000\n"[..],
            b"PROXY TCP4 192.0.2.7 127.0.0.1 56324 60000\r\r\n",
            b"PROXY TCP4 192.0.2.7  127.0.0.1 56324 60000\r\n",
            b"PROXY TCP4 192.0.2.7 127.0.0.1 56324\r\n",
            b"PROXY TCP4 192.0.2.7 127.0.0.1 56324 60000 1\r\n",
            b"PROXY TCP4 192.0.2.07 127.0.0.1 56324 60000\r\n",
            b"PROXY TCP4 192.0.2.256 127.0.0.1 56324 60000\r\n",
            b"PROXY TCP4 192.0.2 127.0.0.1 56324 60000\r\n",
            b"PROXY TCP4 2001:db8::7 127.0.0.1 56324 60000\r\n",
            b"PROXY TCP6 192.0.2.7 ::1 56324 60000\r\n",
            b"PROXY TCP6 2001:db8:::7 ::1 56324 60000\r\n",
            b"PROXY TCP4 192.0.2.7 127.0.0.1 65536 60000\r\n",
            b"PROXY TCP4 192.0.2.7 127.0.0.1 0443 60000\r\n",
            b"PROXY TCP4 192.0.2.7 127.0.0.1 +443 60000\r\n",
            b"PROXY TCP4 192.0.2.7 127.0.0.1 -1 60000\r\n",
            b"PROXY UDP4 192.0.2.7 127.0.0.1 1 2\r\n",
            b"PROXY tcp4 192.0.2.7 127.0.0.1 1 2\r\n",
            b"PROXY \r\n",
            b"PROXY UNKNOWN\xff\r\n",
            b"PROXY TCP4 \xc3\xa9 127.0.0.1 1 2\r\n",
        ] {
            assert!(
                malformed(parse_v1(bad)),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(
            parse_v1(b"PROXYTCP4 1.2.3.4 1.2.3.4 1 2\r\n"),
            Err(HeaderError::Missing)
        ));
    }

    #[test]
    fn v2_proxy_and_local() {
        let h = v2(
            1,
            0x11,
            &v2_inet([192, 0, 2, 7], [127, 0, 0, 1], 56324, 60000),
        );
        assert_eq!(
            parse_v2(&h).unwrap(),
            relayed("192.0.2.7:56324", "127.0.0.1:60000")
        );
        let mut block = Vec::new();
        block.extend("2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        block.extend(Ipv6Addr::LOCALHOST.octets());
        block.extend([0, 80, 1, 187]);
        assert_eq!(
            parse_v2(&v2(1, 0x21, &block)).unwrap(),
            relayed("[2001:db8::7]:80", "[::1]:443")
        );
        // Type-length-value fields after the addresses are skipped.
        let mut tlvs = v2_inet([10, 0, 0, 1], [10, 0, 0, 2], 1, 2);
        tlvs.extend([0x04, 0x00, 0x04, 0, 0, 0, 0]);
        assert_eq!(
            parse_v2(&v2(1, 0x11, &tlvs)).unwrap(),
            relayed("10.0.0.1:1", "10.0.0.2:2")
        );
        // LOCAL ignores the family and any addresses.
        assert_eq!(
            parse_v2(&v2(0, 0x00, &[])).unwrap(),
            Header::Own("v2 LOCAL")
        );
        assert_eq!(
            parse_v2(&v2(0, 0x11, &tlvs)).unwrap(),
            Header::Own("v2 LOCAL")
        );
        assert_eq!(
            parse_v2(&v2(0, 0xff, &[])).unwrap(),
            Header::Own("v2 LOCAL")
        );
        // PROXY without an IP address: the proxy's own.
        for family in [0x00, 0x01, 0x10, 0x31, 0x32] {
            assert!(
                matches!(parse_v2(&v2(1, family, &[0; 216])), Ok(Header::Own(_))),
                "{family:#x}"
            );
        }
    }

    #[test]
    fn bad_v2_headers() {
        let good = v2(1, 0x11, &v2_inet([192, 0, 2, 7], [127, 0, 0, 1], 1, 2));
        let mut version = good.clone();
        version[12] = 0x11;
        let mut command = good.clone();
        command[12] = 0x22;
        let mut family = good.clone();
        family[13] = 0x41;
        let mut transport = good.clone();
        transport[13] = 0x13;
        let mut length = good.clone();
        length[15] += 1;
        for bad in [
            version,
            command,
            family,
            transport,
            length,
            v2(1, 0x11, &[0; 11]),
            v2(1, 0x21, &[0; 35]),
            good[..15].to_vec(),
        ] {
            assert!(malformed(parse_v2(&bad)), "{bad:?}");
        }
        let mut signature = good.clone();
        signature[11] = b'X';
        assert!(matches!(parse_v2(&signature), Err(HeaderError::Missing)));
    }

    /// Reads a header from `bytes` (then the writer's end closed); returns
    /// it and what is left unread.
    async fn read_from(bytes: &[u8]) -> (Result<Header, HeaderError>, Vec<u8>) {
        let (mut client, mut server) = tokio::io::duplex(4096);
        client.write_all(bytes).await.unwrap();
        drop(client);
        let header = read_header(&mut server).await;
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        (header, rest)
    }

    #[tokio::test]
    async fn reads_the_header_and_not_a_byte_more() {
        let v1 = b"PROXY TCP4 192.0.2.7 127.0.0.1 56324 60000\r\nanswer";
        let (h, rest) = read_from(v1).await;
        assert_eq!(h.unwrap(), relayed("192.0.2.7:56324", "127.0.0.1:60000"));
        assert_eq!(rest, b"answer");
        let mut two = v2(1, 0x11, &v2_inet([192, 0, 2, 7], [127, 0, 0, 1], 1, 2));
        two.extend(b"\0\0\0\0\0\0\0\x28answer");
        let (h, rest) = read_from(&two).await;
        assert_eq!(h.unwrap(), relayed("192.0.2.7:1", "127.0.0.1:2"));
        assert_eq!(rest, b"\0\0\0\0\0\0\0\x28answer");
        let (h, rest) = read_from(b"PROXY UNKNOWN\r\n\r\n").await;
        assert_eq!(h.unwrap(), Header::Own("v1 UNKNOWN"));
        assert_eq!(rest, b"\r\n");
    }

    #[tokio::test]
    async fn bad_streams() {
        // The pp handshake's first frame, or anything else: no header.
        for missing in [&b"\0\0\0\0\0\0\0\x28"[..], b"GET / HTTP/1.0\r\n", b"PROXI"] {
            let (h, _) = read_from(missing).await;
            assert!(matches!(h, Err(HeaderError::Missing)), "{missing:?}: {h:?}");
        }
        let (h, _) = read_from(b"\r\n\r\n\0\r\nQUIX\n\x21\x11\0\x0c").await;
        assert!(matches!(h, Err(HeaderError::Missing)), "{h:?}");
        let (h, _) = read_from(b"").await;
        assert!(matches!(h, Err(HeaderError::Closed(0))), "{h:?}");
        let (h, _) = read_from(b"PROXY TCP4 192.0.2.7").await;
        assert!(matches!(h, Err(HeaderError::Closed(20))), "{h:?}");
        let cut = v2(1, 0x11, &[1, 2, 3]);
        let (h, _) = read_from(&cut[..cut.len() - 1]).await;
        assert!(matches!(h, Err(HeaderError::Closed(18))), "{h:?}");
        // Too long: refused at the line's 107th byte, or from the length
        // alone, before anything past it is read.
        let long = format!("PROXY UNKNOWN {}\r\n", "x".repeat(100));
        let (h, rest) = read_from(long.as_bytes()).await;
        assert!(malformed(h));
        assert_eq!(rest.len(), long.len() - V1_MAX);
        let mut huge = v2(1, 0x11, &[]);
        huge[14..16].copy_from_slice(&((V2_MAX - V2_FIXED + 1) as u16).to_be_bytes());
        huge.extend([7; 600]);
        let (h, rest) = read_from(&huge).await;
        assert!(malformed(h));
        assert_eq!(rest.len(), 600, "nothing read past the fixed part");
        let mut largest = v2(1, 0x11, &[0; V2_MAX - V2_FIXED]);
        largest.extend(b"x");
        let (h, rest) = read_from(&largest).await;
        assert!(h.is_ok(), "{h:?}");
        assert_eq!(rest, b"x");
    }

    #[tokio::test(start_paused = true)]
    async fn a_header_not_whole_in_time_is_late() {
        let (mut client, mut server) = tokio::io::duplex(4096);
        client.write_all(b"PROXY TCP4 192.0.2.7").await.unwrap();
        let started = tokio::time::Instant::now();
        let h = read_header(&mut server).await;
        assert!(matches!(h, Err(HeaderError::Late)), "{h:?}");
        assert_eq!(started.elapsed(), HEADER_TIMEOUT);
        drop(client);
    }

    proptest! {
        /// Whatever a listed peer sends, parsing neither panics nor reads
        /// past the header.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            let _ = parse_v1(&bytes);
            let _ = parse_v2(&bytes);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let (h, rest) = rt.block_on(read_from(&bytes));
            prop_assert!(bytes.len() - rest.len() <= V2_MAX);
            if h.is_ok() {
                let used = bytes.len() - rest.len();
                prop_assert!(parse_v1(&bytes[..used]).is_ok() || parse_v2(&bytes[..used]).is_ok());
            }
        }

        /// Any header the parser accepts is read exactly, whatever follows.
        #[test]
        fn headers_are_read_exactly(
            v1 in any::<bool>(),
            src in any::<[u8; 4]>(),
            sport in any::<u16>(),
            after in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let header = if v1 {
                format!("PROXY TCP4 {} 127.0.0.1 {sport} 60000\r\n", Ipv4Addr::from(src)).into_bytes()
            } else {
                v2(1, 0x11, &v2_inet(src, [127, 0, 0, 1], sport, 60000))
            };
            let mut bytes = header.clone();
            bytes.extend(&after);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let (h, rest) = rt.block_on(read_from(&bytes));
            prop_assert_eq!(h.unwrap(), Header::Relayed {
                source: SocketAddr::new(IpAddr::V4(Ipv4Addr::from(src)), sport),
                destination: addr("127.0.0.1:60000"),
            });
            prop_assert_eq!(rest, after);
        }
    }
}
