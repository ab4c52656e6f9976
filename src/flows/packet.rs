//! The sampled packet header: Ethernet (with up to two VLAN tags), IPv4 or IPv6 (with extension
//! headers), then TCP or UDP. By hand, bounds-checked: a header cut short by the sampler yields what
//! it holds (addresses without ports, or no payload), never a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::sflow::HeaderProtocol;

/// What a sampled header says about its packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet<'a> {
    pub source: IpAddr,
    pub destination: IpAddr,
    pub transport: Option<Transport<'a>>,
}

/// The transport header and, for TCP, the bytes of its payload present in the sampled header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transport<'a> {
    pub protocol: TransportProtocol,
    pub source_port: u16,
    pub destination_port: u16,
    /// TCP payload as far as it was sampled (empty for UDP: nothing of it is read).
    pub payload: &'a [u8],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportProtocol {
    Tcp,
    Udp,
}

impl TransportProtocol {
    /// The `network.transport` attribute value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const VLAN_TAGS: [u16; 3] = [0x8100, 0x88a8, 0x9100];
const TCP: u8 = 6;
const UDP: u8 = 17;
/// IPv6 extension headers followed at most (more is not a packet worth reading).
const MAX_EXTENSION_HEADERS: usize = 8;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Parses a sampled header of the given `header_protocol`; `None` when it is not IP.
pub fn parse(protocol: u32, header: &[u8]) -> Option<Packet<'_>> {
    match protocol {
        HeaderProtocol::ETHERNET => ethernet(header),
        HeaderProtocol::IPV4 => ipv4(header),
        HeaderProtocol::IPV6 => ipv6(header),
        _ => None,
    }
}

fn ethernet(frame: &[u8]) -> Option<Packet<'_>> {
    let mut at = 12;
    let mut ethertype = u16_at(frame, at)?;
    for _ in 0..2 {
        if !VLAN_TAGS.contains(&ethertype) {
            break;
        }
        at += 4;
        ethertype = u16_at(frame, at)?;
    }
    let rest = frame.get(at + 2..)?;
    match ethertype {
        ETHERTYPE_IPV4 => ipv4(rest),
        ETHERTYPE_IPV6 => ipv6(rest),
        _ => None,
    }
}

fn ipv4(ip: &[u8]) -> Option<Packet<'_>> {
    let first = *ip.first()?;
    let header_length = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || header_length < 20 || ip.len() < 20 {
        return None;
    }
    let total = usize::from(u16_at(ip, 2)?);
    let fragment_offset = u16_at(ip, 6)? & 0x1fff;
    let source = IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]));
    let destination = IpAddr::V4(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]));
    // The sampled bytes end where the packet does (an Ethernet frame may be padded) or earlier.
    let end = ip.len().min(total.max(header_length));
    let transport = match ip.get(header_length..end) {
        Some(rest) if fragment_offset == 0 => transport(ip[9], rest),
        _ => None,
    };
    Some(Packet { source, destination, transport })
}

fn ipv6(ip: &[u8]) -> Option<Packet<'_>> {
    if ip.len() < 40 || ip[0] >> 4 != 6 {
        return None;
    }
    let octets = |at: usize| -> Option<[u8; 16]> { ip.get(at..at + 16)?.try_into().ok() };
    let source = IpAddr::V6(Ipv6Addr::from(octets(8)?));
    let destination = IpAddr::V6(Ipv6Addr::from(octets(24)?));
    let end = ip.len().min(40 + usize::from(u16_at(ip, 4)?));
    let mut next = ip[6];
    let mut at = 40;
    let mut transport_found = None;
    for _ in 0..=MAX_EXTENSION_HEADERS {
        match next {
            TCP | UDP => {
                transport_found = ip.get(at..end).and_then(|rest| transport(next, rest));
                break;
            }
            // Hop-by-hop, routing, destination options: (length + 1) * 8 bytes.
            0 | 43 | 60 => {
                let length = (usize::from(*ip.get(at + 1)?) + 1) * 8;
                next = *ip.get(at)?;
                at += length;
            }
            // Fragment: only the first fragment holds the transport header.
            44 => {
                let offset = u16_at(ip, at + 2)? >> 3;
                if offset != 0 {
                    break;
                }
                next = *ip.get(at)?;
                at += 8;
            }
            // Authentication header: (length + 2) * 4 bytes.
            51 => {
                let length = (usize::from(*ip.get(at + 1)?) + 2) * 4;
                next = *ip.get(at)?;
                at += length;
            }
            _ => break,
        }
    }
    Some(Packet { source, destination, transport: transport_found })
}

fn transport(protocol: u8, segment: &[u8]) -> Option<Transport<'_>> {
    let source_port = u16_at(segment, 0)?;
    let destination_port = u16_at(segment, 2)?;
    match protocol {
        TCP => {
            let data_offset = usize::from(*segment.get(12)? >> 4) * 4;
            if data_offset < 20 {
                return None;
            }
            // A header cut inside its options still names the ports; its payload is not there.
            let payload = segment.get(data_offset..).unwrap_or_default();
            Some(Transport { protocol: TransportProtocol::Tcp, source_port, destination_port, payload })
        }
        UDP => Some(Transport { protocol: TransportProtocol::Udp, source_port, destination_port, payload: &[] }),
        _ => None,
    }
}

/// Builds frames for tests.
#[cfg(test)]
pub(crate) mod build {
    /// An Ethernet/IPv4/TCP frame from 10.0.0.1:40000 to 10.0.0.2:80 carrying `payload`.
    pub fn tcp4(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
        let total = u16::try_from(40 + payload.len()).unwrap();
        f.extend_from_slice(&[0x45, 0, (total >> 8) as u8, total as u8, 0, 1, 0x40, 0, 64, 6, 0, 0]);
        f.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        f.extend_from_slice(&40000u16.to_be_bytes());
        f.extend_from_slice(&80u16.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
        f.extend_from_slice(payload);
        f
    }

    /// An Ethernet/VLAN/IPv6/hop-by-hop/TCP frame from [fd00::1]:40000 to [fd00::2]:8080.
    pub fn tcp6(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x81, 0x00, 0, 5, 0x86, 0xdd];
        let length = u16::try_from(8 + 20 + payload.len()).unwrap();
        f.extend_from_slice(&[0x60, 0, 0, 0, (length >> 8) as u8, length as u8, 0, 64]);
        let mut a = [0u8; 16];
        a[0] = 0xfd;
        a[15] = 1;
        f.extend_from_slice(&a);
        a[15] = 2;
        f.extend_from_slice(&a);
        f.extend_from_slice(&[6, 0, 1, 4, 0, 0, 0, 0]); // hop-by-hop: next TCP, 8 bytes
        f.extend_from_slice(&40000u16.to_be_bytes());
        f.extend_from_slice(&8080u16.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
        f.extend_from_slice(payload);
        f
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;

    #[test]
    fn ipv4_tcp_gives_addresses_ports_and_payload() {
        let frame = tcp4(b"GET / HTTP/1.1\r\n");
        let p = parse(HeaderProtocol::ETHERNET, &frame).unwrap();
        assert_eq!((p.source.to_string(), p.destination.to_string()), ("10.0.0.1".into(), "10.0.0.2".into()));
        let t = p.transport.unwrap();
        assert_eq!((t.protocol, t.source_port, t.destination_port), (TransportProtocol::Tcp, 40000, 80));
        assert_eq!(t.payload, b"GET / HTTP/1.1\r\n");
        // Raw IPv4 (header protocol 11) too; Ethernet padding beyond the IP length is not payload.
        let mut padded = frame.clone();
        padded.extend_from_slice(&[0; 6]);
        let p = parse(HeaderProtocol::IPV4, &padded[14..]).unwrap();
        assert_eq!(p.transport.unwrap().payload, b"GET / HTTP/1.1\r\n");
    }

    #[test]
    fn vlan_ipv6_with_an_extension_header() {
        let frame = tcp6(b"x");
        let p = parse(HeaderProtocol::ETHERNET, &frame).unwrap();
        assert_eq!(p.destination.to_string(), "fd00::2");
        let t = p.transport.unwrap();
        assert_eq!((t.destination_port, t.payload), (8080, &b"x"[..]));
    }

    #[test]
    fn later_fragments_have_no_transport() {
        let mut frame = tcp4(b"GET / HTTP/1.1\r\n");
        frame[14 + 7] = 8; // fragment offset 8 (x 8 bytes)
        assert_eq!(parse(HeaderProtocol::ETHERNET, &frame).unwrap().transport, None);
    }

    #[test]
    fn every_truncation_parses_or_not_without_panicking() {
        for frame in [tcp4(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), tcp6(b"GET / HTTP/1.1\r\n")] {
            for end in 0..=frame.len() {
                let p = parse(HeaderProtocol::ETHERNET, &frame[..end]);
                if let Some(t) = p.and_then(|p| p.transport) {
                    assert!(t.payload.len() <= end);
                }
            }
        }
        for bytes in [&[0x45u8][..], &[0x4f; 64], &[0x60; 40], &[0xff; 100]] {
            let _ = parse(HeaderProtocol::IPV4, bytes);
            let _ = parse(HeaderProtocol::IPV6, bytes);
            let _ = parse(HeaderProtocol::ETHERNET, bytes);
        }
    }

    #[test]
    fn an_endless_chain_of_extension_headers_stops() {
        let mut ip = vec![0x60, 0, 0, 0, 0x01, 0x00, 0, 64];
        ip.extend_from_slice(&[0; 32]);
        for _ in 0..32 {
            ip.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]); // hop-by-hop pointing to another
        }
        assert_eq!(parse(HeaderProtocol::IPV6, &ip).unwrap().transport, None);
    }
}
