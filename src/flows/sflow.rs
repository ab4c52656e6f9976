//! sFlow version 5 datagrams (sflow.org/sflow_version_5.txt), decoded by hand: only what the flows
//! receiver uses (the agent, the flow samples in their compact and expanded forms, their
//! `sampled_header` records). Everything is read through a bounds-checked reader over the received
//! bytes: a truncated or hostile datagram is an error (counted and dropped by the receiver), never a
//! panic, and no count in a datagram sizes an allocation or a loop beyond the bytes that are there.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why a datagram was dropped; the `reason` label of `crosstrace_flows_dropped_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not sFlow version 5")]
    Version,
    #[error("unknown agent address type")]
    AddressType,
    #[error("truncated")]
    Truncated,
    #[error("a length beyond its enclosing structure")]
    Length,
}

impl DecodeError {
    /// The metric label of this error (bounded: one per variant).
    pub fn reason(self) -> &'static str {
        match self {
            Self::Version => "unsupported_version",
            Self::AddressType => "malformed",
            Self::Truncated => "truncated",
            Self::Length => "malformed",
        }
    }
}

/// A bounds-checked big-endian reader (XDR: every item a multiple of 4 bytes).
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.data.len() {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// An XDR variable-length opaque: its length, its bytes, then padding to a multiple of 4 (padding
    /// missing at the very end is tolerated).
    fn opaque(&mut self) -> Result<&'a [u8], DecodeError> {
        let length = usize::try_from(self.u32()?).map_err(|_| DecodeError::Length)?;
        let body = self.bytes(length).map_err(|_| DecodeError::Length)?;
        let padding = (4 - length % 4) % 4;
        self.data = self.data.get(padding..).unwrap_or_default();
        Ok(body)
    }
}

/// One sFlow v5 datagram, as far as the receiver needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram<'a> {
    /// The agent address: the node's address, as crosstrace configures OVS (`sFlow.agent`).
    pub agent: IpAddr,
    /// OVS numbers the bridges that export sFlow in one ovs-vswitchd 0, 1, ...
    pub sub_agent_id: u32,
    pub sequence: u32,
    /// Milliseconds since the agent started (sFlow carries no wall-clock time).
    pub uptime_ms: u32,
    pub flow_samples: Vec<FlowSample<'a>>,
    /// Samples of other kinds (counter samples, other enterprises), skipped.
    pub other_samples: u32,
}

/// A flow sample (format 1, compact, or 3, expanded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowSample<'a> {
    pub sequence: u32,
    /// 1 packet in `sampling_rate` was sampled.
    pub sampling_rate: u32,
    pub input: Port,
    pub output: Port,
    /// The `sampled_header` records (format 1); other records are skipped.
    pub headers: Vec<SampledHeader<'a>>,
}

/// An interface of a flow sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    /// An ifIndex; 0 when the agent does not know it (Open vSwitch reports 0 for ports without a kernel
    /// ifindex, such as dummy ports).
    Index(u32),
    /// Not known (0x3fffffff).
    Unknown,
    /// The packet was dropped, with this reason code (output only).
    Dropped(u32),
    /// Sent to several interfaces (output only); 0 = how many is not known.
    Multiple(u32),
}

impl Port {
    const UNKNOWN: u32 = 0x3fff_ffff;

    /// From the compact form: the format in the top 2 bits, the value in the other 30.
    fn compact(raw: u32) -> Self {
        Self::of(raw >> 30, raw & Self::UNKNOWN)
    }

    fn of(format: u32, value: u32) -> Self {
        match format {
            0 if value == Self::UNKNOWN => Self::Unknown,
            0 => Self::Index(value),
            1 => Self::Dropped(value),
            2 if value == Self::UNKNOWN => Self::Multiple(0),
            2 => Self::Multiple(value),
            _ => Self::Unknown,
        }
    }

    /// The ifIndex, when the sample names one known interface.
    pub fn index(self) -> Option<u32> {
        match self {
            Self::Index(i) if i != 0 => Some(i),
            _ => None,
        }
    }
}

/// A `sampled_header` flow record: the first bytes of the sampled packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampledHeader<'a> {
    /// What the header starts with (see [`HeaderProtocol`]).
    pub protocol: u32,
    /// The packet's length on the wire.
    pub frame_length: u32,
    /// Bytes removed from the end before sampling (e.g. the Ethernet FCS).
    pub stripped: u32,
    pub header: &'a [u8],
}

/// `header_protocol` values the receiver reads.
pub struct HeaderProtocol;

impl HeaderProtocol {
    pub const ETHERNET: u32 = 1;
    pub const IPV4: u32 = 11;
    pub const IPV6: u32 = 12;
}

const FLOW_SAMPLE: u32 = 1;
const FLOW_SAMPLE_EXPANDED: u32 = 3;
const SAMPLED_HEADER: u32 = 1;

/// Decodes one datagram. An error drops the whole datagram: a sample that overruns it says nothing
/// trustworthy about the rest.
pub fn decode(data: &[u8]) -> Result<Datagram<'_>, DecodeError> {
    let mut r = Reader::new(data);
    if r.u32()? != 5 {
        return Err(DecodeError::Version);
    }
    let agent = match r.u32()? {
        1 => {
            let b = r.bytes(4)?;
            IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
        }
        2 => {
            let b: [u8; 16] = r.bytes(16)?.try_into().map_err(|_| DecodeError::Truncated)?;
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return Err(DecodeError::AddressType),
    };
    let sub_agent_id = r.u32()?;
    let sequence = r.u32()?;
    let uptime_ms = r.u32()?;
    let count = r.u32()?;
    let mut datagram =
        Datagram { agent, sub_agent_id, sequence, uptime_ms, flow_samples: Vec::new(), other_samples: 0 };
    for _ in 0..count {
        // Each sample takes at least 8 bytes, so a count beyond the data ends here as truncated.
        let format = r.u32()?;
        let body = r.opaque()?;
        match (format >> 12, format & 0xfff) {
            (0, FLOW_SAMPLE) => datagram.flow_samples.push(flow_sample(body, false)?),
            (0, FLOW_SAMPLE_EXPANDED) => datagram.flow_samples.push(flow_sample(body, true)?),
            _ => datagram.other_samples += 1,
        }
    }
    Ok(datagram)
}

fn flow_sample(body: &[u8], expanded: bool) -> Result<FlowSample<'_>, DecodeError> {
    let mut r = Reader::new(body);
    let sequence = r.u32()?;
    r.u32()?; // source id (type and index; expanded: two words)
    if expanded {
        r.u32()?;
    }
    let sampling_rate = r.u32()?;
    r.u32()?; // sample pool
    r.u32()?; // drops
    let (input, output) = if expanded {
        let input = Port::of(r.u32()?, r.u32()?);
        (input, Port::of(r.u32()?, r.u32()?))
    } else {
        (Port::compact(r.u32()?), Port::compact(r.u32()?))
    };
    let count = r.u32()?;
    let mut headers = Vec::new();
    for _ in 0..count {
        let format = r.u32()?;
        let record = r.opaque()?;
        if format == SAMPLED_HEADER {
            headers.push(sampled_header(record)?);
        }
    }
    Ok(FlowSample { sequence, sampling_rate, input, output, headers })
}

fn sampled_header(record: &[u8]) -> Result<SampledHeader<'_>, DecodeError> {
    let mut r = Reader::new(record);
    let protocol = r.u32()?;
    let frame_length = r.u32()?;
    let stripped = r.u32()?;
    let header = r.opaque()?;
    Ok(SampledHeader { protocol, frame_length, stripped, header })
}

/// Builds datagrams for tests (and the receiver's own unit tests of what it emits).
#[cfg(test)]
pub(crate) mod build {
    use super::*;

    fn word(out: &mut Vec<u8>, v: u32) {
        out.extend_from_slice(&v.to_be_bytes());
    }

    fn opaque(out: &mut Vec<u8>, body: &[u8]) {
        word(out, u32::try_from(body.len()).unwrap());
        out.extend_from_slice(body);
        out.resize(out.len() + (4 - body.len() % 4) % 4, 0);
    }

    /// A `sampled_header` record of `header` (Ethernet).
    pub fn header_record(header: &[u8], frame_length: u32) -> Vec<u8> {
        let mut r = Vec::new();
        word(&mut r, SAMPLED_HEADER);
        let mut body = Vec::new();
        word(&mut body, HeaderProtocol::ETHERNET);
        word(&mut body, frame_length);
        word(&mut body, 4);
        opaque(&mut body, header);
        opaque(&mut r, &body);
        r
    }

    /// A flow sample holding `records`, compact or expanded.
    pub fn flow_sample(expanded: bool, rate: u32, input: u32, output: u32, records: &[Vec<u8>]) -> Vec<u8> {
        let mut s = Vec::new();
        word(&mut s, if expanded { FLOW_SAMPLE_EXPANDED } else { FLOW_SAMPLE });
        let mut body = Vec::new();
        word(&mut body, 7); // sequence
        word(&mut body, 0); // source id
        if expanded {
            word(&mut body, 3);
        }
        word(&mut body, rate);
        word(&mut body, 1000); // pool
        word(&mut body, 0); // drops
        if expanded {
            for v in [0, input, 0, output] {
                word(&mut body, v);
            }
        } else {
            word(&mut body, input);
            word(&mut body, output);
        }
        word(&mut body, u32::try_from(records.len()).unwrap());
        for r in records {
            body.extend_from_slice(r);
        }
        opaque(&mut s, &body);
        s
    }

    /// A datagram from IPv4 agent `agent` holding `samples`.
    pub fn datagram(agent: [u8; 4], samples: &[Vec<u8>]) -> Vec<u8> {
        let mut d = Vec::new();
        for v in [5, 1] {
            word(&mut d, v);
        }
        d.extend_from_slice(&agent);
        for v in [0, 42, 1234] {
            word(&mut d, v);
        }
        word(&mut d, u32::try_from(samples.len()).unwrap());
        for s in samples {
            d.extend_from_slice(s);
        }
        d
    }

    /// A counter sample (skipped by the decoder).
    pub fn counter_sample() -> Vec<u8> {
        let mut s = Vec::new();
        word(&mut s, 2);
        opaque(&mut s, &[0; 12]);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::build::{counter_sample, datagram, flow_sample, header_record};
    use super::*;

    fn sample_datagram(expanded: bool) -> Vec<u8> {
        let record = header_record(&[0xaa; 14], 60);
        datagram([127, 0, 1, 1], &[counter_sample(), flow_sample(expanded, 64, 65537, 65538, &[record])])
    }

    #[test]
    fn compact_and_expanded_flow_samples_decode_alike() {
        for expanded in [false, true] {
            let bytes = sample_datagram(expanded);
            let d = decode(&bytes).unwrap();
            assert_eq!(d.agent, IpAddr::V4(Ipv4Addr::new(127, 0, 1, 1)));
            assert_eq!((d.sequence, d.uptime_ms, d.other_samples), (42, 1234, 1));
            let [s] = &d.flow_samples[..] else { panic!("{d:?}") };
            assert_eq!((s.sampling_rate, s.input, s.output), (64, Port::Index(65537), Port::Index(65538)));
            let [h] = &s.headers[..] else { panic!("{s:?}") };
            assert_eq!((h.protocol, h.frame_length, h.stripped, h.header), (1, 60, 4, &[0xaa; 14][..]));
        }
    }

    #[test]
    fn compact_ports_carry_their_format() {
        assert_eq!(Port::compact(0x3fff_ffff), Port::Unknown);
        assert_eq!(Port::compact((1 << 30) | 3), Port::Dropped(3));
        assert_eq!(Port::compact((2 << 30) | 2), Port::Multiple(2));
        assert_eq!(Port::compact((2 << 30) | 0x3fff_ffff), Port::Multiple(0));
        assert_eq!(Port::compact(5).index(), Some(5));
        assert_eq!(Port::compact(0).index(), None, "0: not known");
    }

    #[test]
    fn every_truncation_is_an_error_never_a_panic() {
        for expanded in [false, true] {
            let bytes = sample_datagram(expanded);
            for end in 0..bytes.len() {
                // The last byte of padding of the last record may go; anything more is truncated.
                if let Ok(d) = decode(&bytes[..end]) {
                    assert!(end >= bytes.len() - 3, "decoded {end} of {} bytes: {d:?}", bytes.len());
                }
            }
        }
    }

    #[test]
    fn hostile_lengths_and_counts_are_errors() {
        let mut huge_count = datagram([10, 0, 0, 1], &[]);
        huge_count[24..28].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode(&huge_count), Err(DecodeError::Truncated));
        let mut long_sample = datagram([10, 0, 0, 1], &[counter_sample()]);
        long_sample[32..36].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode(&long_sample), Err(DecodeError::Length));
        let mut v4 = sample_datagram(false);
        v4[3] = 4;
        assert_eq!(decode(&v4), Err(DecodeError::Version));
        let mut address = sample_datagram(false);
        address[7] = 9;
        assert_eq!(decode(&address), Err(DecodeError::AddressType));
    }

    #[test]
    fn random_bytes_and_bit_flips_never_panic() {
        // A small xorshift generator: deterministic, no dependency.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let good = sample_datagram(true);
        for _ in 0..20_000 {
            let mut bytes = good.clone();
            for _ in 0..(next() % 4 + 1) {
                let at = usize::try_from(next() % bytes.len() as u64).unwrap();
                bytes[at] = next() as u8;
            }
            let end = usize::try_from(next() % (bytes.len() as u64 + 1)).unwrap();
            let _ = decode(&bytes[..end]);
            let noise: Vec<u8> = (0..(next() % 200)).map(|_| next() as u8).collect();
            let _ = decode(&noise);
        }
    }
}
