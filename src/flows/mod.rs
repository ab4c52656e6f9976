//! `crosstrace flows`: the cross-layer join. A UDP receiver for the sFlow v5 datagrams the network
//! layer exports; a sampled packet that holds a plaintext HTTP/1.x request with a W3C `traceparent`
//! becomes a span of that trace, parented to the caller's span, "sampled on node N, bridge B". Every
//! other sample only feeds the metrics.
//!
//! - [`sflow`]: the datagrams, [`packet`]: Ethernet / IP / TCP, [`request`]: HTTP and `traceparent`
//!   (all pure, bounds-checked, fuzzed by their tests).
//! - [`origins`]: which node and bridge a datagram comes from, by its sFlow agent address: with
//!   `spec.network.correlate` the controller sets each node's own address as the sFlow agent of its
//!   export, and `NodeTracing` objects say which node has which agent address on which bridges.
//! - [`receiver`]: the IO: the UDP socket, the `NodeTracing` watch, the OTLP export, the metrics.
//! - [`report`]: what the receiver tells the operator (pure), and the `TracesFlowing` condition made of it;
//!   [`reporter`]: its IO (a Lease per receiver pod).

pub mod origins;
pub mod packet;
pub mod receiver;
pub mod report;
pub mod reporter;
pub mod request;
pub mod sflow;

use std::time::SystemTime;

use opentelemetry::KeyValue;

use origins::Origin;
use request::{TraceContext, Traceparent};
use sflow::{Datagram, Port};

pub use receiver::{FlowsArgs, run};

/// A span to emit for one sample.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleSpan {
    pub trace: TraceContext,
    pub name: String,
    pub attributes: Vec<KeyValue>,
    /// When the datagram arrived (sFlow carries only the agent's uptime; OVS sends a datagram at the
    /// latest a second after the sample).
    pub time: SystemTime,
}

/// What one datagram gave, for the metrics and the exporter.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    /// Flow samples and their packets' frame bytes (as on the wire, not scaled by the sampling rate).
    pub samples: u64,
    pub bytes: u64,
    /// Samples with a `traceparent` the W3C rules refuse (or two of them).
    pub invalid_traceparents: u64,
    /// Samples with a valid `traceparent` whose caller does not record the trace (flag sampled = 0):
    /// no span, as a parent-based sampler decides.
    pub unsampled: u64,
    pub spans: Vec<SampleSpan>,
}

/// Longest `url.path` attribute kept (a sampled header holds at most 512 bytes anyway).
const MAX_PATH: usize = 256;

/// Joins one datagram's samples to their traces. Pure.
pub fn correlate(datagram: &Datagram<'_>, origin: &Origin, received: SystemTime) -> Outcome {
    let mut outcome = Outcome::default();
    for sample in &datagram.flow_samples {
        outcome.samples += 1;
        for header in &sample.headers {
            outcome.bytes += u64::from(header.frame_length);
            let Some(packet) = packet::parse(header.protocol, header.header) else { continue };
            let Some(transport) = &packet.transport else { continue };
            let Some(request) = request::parse(transport.payload) else { continue };
            let trace = match request.traceparent {
                Traceparent::Absent => continue,
                Traceparent::Invalid => {
                    outcome.invalid_traceparents += 1;
                    continue;
                }
                Traceparent::Valid(t) if !t.sampled() => {
                    outcome.unsampled += 1;
                    continue;
                }
                Traceparent::Valid(t) => t,
            };
            let network_type = if packet.source.is_ipv4() { "ipv4" } else { "ipv6" };
            let mut attributes = vec![
                KeyValue::new("network.transport", transport.protocol.name()),
                KeyValue::new("network.type", network_type),
                KeyValue::new("source.address", packet.source.to_string()),
                KeyValue::new("source.port", i64::from(transport.source_port)),
                KeyValue::new("destination.address", packet.destination.to_string()),
                KeyValue::new("destination.port", i64::from(transport.destination_port)),
                KeyValue::new("network.protocol.name", "http"),
                KeyValue::new("network.protocol.version", request.version.to_string()),
            ];
            attributes.extend(method_attributes(request.method));
            if let Some(path) = request.path {
                attributes.push(KeyValue::new("url.path", truncate(path, MAX_PATH).to_string()));
            }
            attributes.push(KeyValue::new("crosstrace.node", origin.node.clone()));
            if let Some(bridge) = &origin.bridge {
                attributes.push(KeyValue::new("crosstrace.bridge", bridge.clone()));
            }
            attributes.extend(port_attribute("crosstrace.sflow.input_port", sample.input));
            attributes.extend(port_attribute("crosstrace.sflow.output_port", sample.output));
            attributes.extend([
                KeyValue::new("crosstrace.sflow.sampling_rate", i64::from(sample.sampling_rate)),
                KeyValue::new("crosstrace.sflow.frame_length", i64::from(header.frame_length)),
                KeyValue::new("crosstrace.sflow.agent", datagram.agent.to_string()),
                KeyValue::new("crosstrace.sflow.sub_agent_id", i64::from(datagram.sub_agent_id)),
                KeyValue::new("crosstrace.sflow.sequence", i64::from(sample.sequence)),
            ]);
            outcome.spans.push(SampleSpan { trace, name: origin.span_name(), attributes, time: received });
        }
    }
    outcome
}

/// `http.request.method` as the semantic conventions want it: a known method as is, any other as
/// `_OTHER` with the original beside it.
fn method_attributes(method: &str) -> Vec<KeyValue> {
    const KNOWN: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];
    if KNOWN.contains(&method) {
        vec![KeyValue::new("http.request.method", method.to_string())]
    } else {
        vec![
            KeyValue::new("http.request.method", "_OTHER"),
            KeyValue::new("http.request.method_original", method.to_string()),
        ]
    }
}

fn port_attribute(key: &'static str, port: Port) -> Option<KeyValue> {
    port.index().map(|i| KeyValue::new(key, i64::from(i)))
}

fn truncate(s: &str, max: usize) -> &str {
    // ASCII only (the request parser checked), so any byte index is a character boundary.
    &s[..s.len().min(max)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::Value;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    fn datagram_of(payloads: &[&[u8]]) -> Vec<u8> {
        let samples: Vec<Vec<u8>> = payloads
            .iter()
            .map(|p| {
                let frame = packet::build::tcp4(p);
                let record = sflow::build::header_record(&frame, 1500);
                sflow::build::flow_sample(false, 64, 65537, 65538, &[record])
            })
            .collect();
        sflow::build::datagram([127, 0, 1, 1], &samples)
    }

    fn origin() -> Origin {
        Origin { node: "kwok-node-0".into(), bridge: Some("br-int".into()) }
    }

    fn attribute<'a>(span: &'a SampleSpan, key: &str) -> Option<&'a Value> {
        span.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| &kv.value)
    }

    #[test]
    fn a_request_with_a_traceparent_becomes_a_span_of_its_trace() {
        let request =
            format!("GET /cart?session=s3cret HTTP/1.1\r\nHost: x\r\ntraceparent: 00-{TRACE}-{SPAN}-01\r\n\r\n");
        let bytes = datagram_of(&[request.as_bytes(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01 tls"]);
        let d = sflow::decode(&bytes).unwrap();
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let outcome = correlate(&d, &origin(), now);
        assert_eq!((outcome.samples, outcome.bytes, outcome.spans.len()), (3, 4500, 1));
        let span = &outcome.spans[0];
        assert_eq!(span.name, "sampled on node kwok-node-0, bridge br-int");
        assert_eq!(span.time, now);
        assert_eq!(span.trace.trace_id[..2], [0x4b, 0xf9]);
        assert_eq!(span.trace.parent_id[..2], [0x00, 0xf0]);
        let expect = [
            ("network.transport", Value::from("tcp")),
            ("network.type", Value::from("ipv4")),
            ("source.address", Value::from("10.0.0.1")),
            ("source.port", Value::from(40000_i64)),
            ("destination.address", Value::from("10.0.0.2")),
            ("destination.port", Value::from(80_i64)),
            ("http.request.method", Value::from("GET")),
            ("url.path", Value::from("/cart")),
            ("crosstrace.node", Value::from("kwok-node-0")),
            ("crosstrace.bridge", Value::from("br-int")),
            ("crosstrace.sflow.input_port", Value::from(65537_i64)),
            ("crosstrace.sflow.output_port", Value::from(65538_i64)),
            ("crosstrace.sflow.sampling_rate", Value::from(64_i64)),
            ("crosstrace.sflow.frame_length", Value::from(1500_i64)),
        ];
        for (key, value) in expect {
            assert_eq!(attribute(span, key), Some(&value), "{key}");
        }
        let all = format!("{:?}", span.attributes);
        assert!(!all.contains("s3cret"), "the query is never kept: {all}");
    }

    #[test]
    fn unsampled_and_invalid_traceparents_make_no_span() {
        let unsampled = format!("GET / HTTP/1.1\r\ntraceparent: 00-{TRACE}-{SPAN}-00\r\n");
        let invalid = format!("GET / HTTP/1.1\r\ntraceparent: 00-{}-{SPAN}-01\r\n", "0".repeat(32));
        let bytes = datagram_of(&[unsampled.as_bytes(), invalid.as_bytes()]);
        let outcome = correlate(&sflow::decode(&bytes).unwrap(), &origin(), SystemTime::now());
        assert_eq!((outcome.samples, outcome.unsampled, outcome.invalid_traceparents), (2, 1, 1));
        assert!(outcome.spans.is_empty());
    }

    #[test]
    fn an_unknown_bridge_is_left_out_and_other_methods_are_other() {
        let request = format!("BREW /pot HTTP/1.1\r\ntraceparent: 00-{TRACE}-{SPAN}-01\r\n");
        let bytes = datagram_of(&[request.as_bytes()]);
        let origin = Origin { node: "n1".into(), bridge: None };
        let outcome = correlate(&sflow::decode(&bytes).unwrap(), &origin, SystemTime::now());
        let span = &outcome.spans[0];
        assert_eq!(span.name, "sampled on node n1");
        assert_eq!(attribute(span, "crosstrace.bridge"), None);
        assert_eq!(attribute(span, "http.request.method"), Some(&Value::from("_OTHER")));
        assert_eq!(attribute(span, "http.request.method_original"), Some(&Value::from("BREW")));
    }
}
