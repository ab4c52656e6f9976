//! Plaintext HTTP/1.x requests at the start of a sampled TCP payload, and their W3C `traceparent`
//! (https://www.w3.org/TR/trace-context/#traceparent-header).
//!
//! A sampled header is cut at a fixed length, often in the middle of the headers: only complete lines
//! count (a `traceparent` line without its line end may be missing characters), the request line
//! included. Nothing else of the request is kept but the method, the path (never the query, which can
//! hold secrets) and the protocol version.

/// The beginning of an HTTP/1.x request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The path of the request target (origin or absolute form), without the query; `None` for the
    /// authority (`CONNECT`) and asterisk (`OPTIONS *`) forms.
    pub path: Option<&'a str>,
    /// `1.0` or `1.1`.
    pub version: &'a str,
    pub traceparent: Traceparent,
}

/// What the complete header lines say about the trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traceparent {
    /// No complete `traceparent` line.
    Absent,
    Valid(TraceContext),
    /// A `traceparent` that the specification says to ignore (also: more than one).
    Invalid,
}

/// A parsed, valid `traceparent`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The caller's span: the parent of the span the receiver emits.
    pub parent_id: [u8; 8],
    pub flags: u8,
}

impl TraceContext {
    /// The `sampled` flag: the caller records this trace.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

/// The longest method token read (the registered ones are at most 7 characters; extensions are rare).
const MAX_METHOD: usize = 32;

/// The request at the start of `payload`, when it is one: a complete request line `METHOD SP target SP
/// HTTP/1.x`, then as many complete header lines as were sampled.
pub fn parse(payload: &[u8]) -> Option<Request<'_>> {
    let mut lines = complete_lines(payload);
    let request_line = lines.next()?;
    let mut parts = request_line.split(' ');
    let (method, target, protocol) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || method.is_empty() || method.len() > MAX_METHOD || !method.bytes().all(is_tchar) {
        return None;
    }
    let version = protocol.strip_prefix("HTTP/").filter(|v| *v == "1.1" || *v == "1.0")?;
    if target.is_empty() || !target.bytes().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    let mut traceparent = Traceparent::Absent;
    let mut previous_was_traceparent = false;
    for line in lines {
        if line.is_empty() {
            break; // the end of the headers
        }
        if line.starts_with([' ', '\t']) {
            // An obsolete folded continuation: a traceparent continued on another line is not one.
            if previous_was_traceparent {
                traceparent = Traceparent::Invalid;
            }
            continue;
        }
        let Some((name, value)) = line.split_once(':') else { continue };
        previous_was_traceparent = name.eq_ignore_ascii_case("traceparent");
        if previous_was_traceparent {
            traceparent = match traceparent {
                Traceparent::Absent => {
                    parse_traceparent(value.trim_matches([' ', '\t'])).map_or(Traceparent::Invalid, Traceparent::Valid)
                }
                // Two traceparent headers: which one the server used is unknown.
                _ => Traceparent::Invalid,
            };
        }
    }
    Some(Request { method, path: path_of(target), version, traceparent })
}

/// The lines that end with a line feed (a carriage return before it dropped), as ASCII text; stops at
/// the first line that is not printable ASCII.
fn complete_lines(payload: &[u8]) -> impl Iterator<Item = &str> {
    let mut rest = payload;
    std::iter::from_fn(move || {
        let end = rest.iter().position(|b| *b == b'\n')?;
        let line = &rest[..end];
        rest = &rest[end + 1..];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if !line.iter().all(|b| b.is_ascii_graphic() || *b == b' ' || *b == b'\t') {
            rest = &[];
            return None;
        }
        std::str::from_utf8(line).ok()
    })
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn path_of(target: &str) -> Option<&str> {
    let path = if target.starts_with('/') {
        target
    } else {
        // Absolute form: scheme://authority/path
        let (_, after_scheme) = target.split_once("://")?;
        &after_scheme[after_scheme.find('/')?..]
    };
    let path = path.split(['?', '#']).next().unwrap_or_default();
    Some(path)
}

/// Parses a `traceparent` value by the W3C Trace Context rules: `version-traceid-parentid-flags` in
/// lowercase hex; version `ff` is invalid, version `00` is exactly 55 characters, a later version may
/// carry more after a `-`; an all-zero trace id or parent id is invalid.
pub fn parse_traceparent(value: &str) -> Option<TraceContext> {
    let b = value.as_bytes();
    if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let version = hex::<1>(&b[0..2])?[0];
    match version {
        0xff => return None,
        0 if b.len() != 55 => return None,
        _ if b.len() > 55 && b[55] != b'-' => return None,
        _ => {}
    }
    let trace_id = hex::<16>(&b[3..35])?;
    let parent_id = hex::<8>(&b[36..52])?;
    let flags = hex::<1>(&b[53..55])?[0];
    if trace_id == [0; 16] || parent_id == [0; 8] {
        return None;
    }
    Some(TraceContext { trace_id, parent_id, flags })
}

/// `2 * N` lowercase hex digits as `N` bytes.
fn hex<const N: usize>(digits: &[u8]) -> Option<[u8; N]> {
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    if digits.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    fn valid() -> String {
        format!("00-{TRACE}-{SPAN}-01")
    }

    #[test]
    fn a_request_with_a_traceparent() {
        let payload = format!("GET /shop/cart?token=secret HTTP/1.1\r\nHost: x\r\ntraceparent: {}\r\n\r\n", valid());
        let r = parse(payload.as_bytes()).unwrap();
        assert_eq!((r.method, r.path, r.version), ("GET", Some("/shop/cart"), "1.1"));
        let Traceparent::Valid(t) = r.traceparent else { panic!("{r:?}") };
        assert_eq!(t.trace_id[..4], [0x4b, 0xf9, 0x2f, 0x35]);
        assert_eq!(t.parent_id[7], 0xb7);
        assert!(t.sampled());
    }

    #[test]
    fn header_names_are_case_insensitive_and_values_trimmed() {
        let payload = format!("POST http://x.example/a/b HTTP/1.0\nTraceParent:\t {} \n", valid());
        let r = parse(payload.as_bytes()).unwrap();
        assert_eq!((r.method, r.path, r.version), ("POST", Some("/a/b"), "1.0"));
        assert!(matches!(r.traceparent, Traceparent::Valid(_)));
    }

    #[test]
    fn only_a_complete_traceparent_line_counts() {
        let full = format!("GET / HTTP/1.1\r\nHost: x\r\ntraceparent: {}\r\n\r\n", valid());
        let line_end = full.find("\r\n\r\n").unwrap();
        for cut in 0..full.len() {
            let r = parse(&full.as_bytes()[..cut]);
            let expected = if cut > line_end + 1 {
                Some(Traceparent::Valid(parse_traceparent(&valid()).unwrap()))
            } else if cut >= "GET / HTTP/1.1\r\n".len() {
                Some(Traceparent::Absent)
            } else {
                None
            };
            assert_eq!(r.map(|r| r.traceparent), expected, "cut at {cut}");
        }
    }

    #[test]
    fn headers_after_the_end_of_the_headers_are_body() {
        let payload = format!("GET / HTTP/1.1\r\n\r\ntraceparent: {}\r\n", valid());
        assert_eq!(parse(payload.as_bytes()).unwrap().traceparent, Traceparent::Absent);
    }

    #[test]
    fn not_requests() {
        for payload in [
            "HTTP/1.1 200 OK\r\ntraceparent: x\r\n",
            "GET / HTTP/2\r\n",
            "GET /  HTTP/1.1\r\n",
            "GET / HTTP/1.1 extra\r\n",
            "G(T / HTTP/1.1\r\n",
            "GET / HTTP/1.1",
            "\r\n",
            "",
        ] {
            assert_eq!(parse(payload.as_bytes()), None, "{payload:?}");
        }
        assert_eq!(parse(b"GET /\xff HTTP/1.1\r\n"), None);
    }

    #[test]
    fn two_traceparents_or_a_folded_one_are_invalid() {
        let two = format!("GET / HTTP/1.1\r\ntraceparent: {0}\r\ntraceparent: {0}\r\n", valid());
        assert_eq!(parse(two.as_bytes()).unwrap().traceparent, Traceparent::Invalid);
        let folded = format!("GET / HTTP/1.1\r\ntraceparent: {}\r\n  -01\r\n", valid());
        assert_eq!(parse(folded.as_bytes()).unwrap().traceparent, Traceparent::Invalid);
    }

    #[test]
    fn traceparent_rules_of_the_specification() {
        assert!(parse_traceparent(&valid()).is_some());
        assert!(!parse_traceparent(&format!("00-{TRACE}-{SPAN}-00")).unwrap().sampled());
        // A later version may carry more after a dash; version 00 may not.
        assert!(parse_traceparent(&format!("01-{TRACE}-{SPAN}-01-what-comes-next")).is_some());
        assert!(parse_traceparent(&format!("01-{TRACE}-{SPAN}-01")).is_some());
        for bad in [
            format!("00-{TRACE}-{SPAN}-01-extra"),
            format!("01-{TRACE}-{SPAN}-01extra"),
            format!("ff-{TRACE}-{SPAN}-01"),
            format!("00-{}-{SPAN}-01", "0".repeat(32)),
            format!("00-{TRACE}-{}-01", "0".repeat(16)),
            format!("00-{}-{SPAN}-01", TRACE.to_uppercase()),
            format!("00-{TRACE}-{SPAN}-0g"),
            format!("0-{TRACE}-{SPAN}-01"),
            format!("00-{TRACE}-{SPAN}01"),
            format!("00_{TRACE}-{SPAN}-01"),
            format!("00-{}-{SPAN}-01", &TRACE[1..]),
            format!("00-{TRACE}-{SPAN}-1"),
            String::new(),
        ] {
            assert_eq!(parse_traceparent(&bad), None, "{bad}");
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let base = format!("GET /a HTTP/1.1\r\ntraceparent: {}\r\n\r\n", valid()).into_bytes();
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let mut bytes = base.clone();
            let at = usize::try_from(state % bytes.len() as u64).unwrap();
            bytes[at] = (state >> 32) as u8;
            let end = usize::try_from((state >> 40) % (bytes.len() as u64 + 1)).unwrap();
            let _ = parse(&bytes[..end]);
        }
    }
}
