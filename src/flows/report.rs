//! What `crosstrace flows` tells the operator, and what the operator makes of it: the `TracesFlowing`
//! condition.
//!
//! Each receiver replica keeps, for the last [`WINDOW`], per node: the flow samples it decoded, the
//! trace-linked spans it made of them and how many of those its collector accepted; and when an export
//! last succeeded and last failed (with the error). It publishes that as a [`Report`] in the annotation
//! [`REPORT_ANNOTATION`] of a `coordination.k8s.io` Lease named after its pod, renewed every few seconds,
//! so that the operator needs no network path to the receiver and a replica that stops is seen stop
//! (its Lease is not renewed). The chart's admission policy lets a receiver write only the Lease of its
//! own pod.
//!
//! [`traces_flowing`] is pure: the fresh reports in, the condition out. Its message names nodes, never
//! counts, so that a steady flow does not rewrite the policy's status (the counts are the receiver's
//! metrics).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::api::conditions::Status;

/// How far back a report looks.
pub const WINDOW: Duration = Duration::from_secs(300);
/// The width of one bucket of the window.
const BUCKET: Duration = Duration::from_secs(60);
/// The annotation of the receiver's Lease that holds its [`Report`] (JSON).
pub const REPORT_ANNOTATION: &str = "crosstrace.dev/flows-report";
/// The label every receiver's Lease carries (the operator lists by it).
pub const REPORT_LABEL: &str = "crosstrace.dev/flows-report";

/// One node's counts in the window.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeCounts {
    /// Flow samples decoded.
    pub samples: u64,
    /// Trace-linked spans made of them.
    pub spans: u64,
    /// Of those, accepted by the collector.
    pub exported: u64,
    /// The policies whose sFlow export on this node names the receiver (from the `NodeTracing`).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub policies: BTreeSet<String>,
}

/// An export that failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportError {
    pub at: String,
    pub message: String,
}

/// One receiver's report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// Where the receiver exports its spans (`--collector`).
    pub collector: String,
    pub window_seconds: u64,
    pub nodes: BTreeMap<String, NodeCounts>,
    /// When an export last succeeded (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_export_ok: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_export_error: Option<ExportError>,
}

impl Report {
    /// Whether the last export failed (a failure newer than the last success).
    pub fn failing(&self) -> Option<&ExportError> {
        let error = self.last_export_error.as_ref()?;
        let at = |s: &str| s.parse::<Timestamp>().ok();
        match self.last_export_ok.as_deref().and_then(at) {
            Some(ok) if at(&error.at).is_none_or(|failed| ok >= failed) => None,
            _ => Some(error),
        }
    }
}

#[derive(Default)]
struct Bucket {
    start: i64,
    nodes: BTreeMap<String, NodeCounts>,
}

/// The receiver's running counts: a window of minute buckets and the last export outcomes. Not
/// thread-safe on its own: the receiver keeps it behind a mutex (the exporter runs on the SDK's thread).
#[derive(Default)]
pub struct Tally {
    buckets: VecDeque<Bucket>,
    last_ok: Option<Timestamp>,
    last_error: Option<(Timestamp, String)>,
}

impl Tally {
    fn bucket(&mut self, now: Timestamp) -> &mut BTreeMap<String, NodeCounts> {
        let width = BUCKET.as_secs() as i64;
        let start = now.as_second().div_euclid(width) * width;
        let oldest = start - WINDOW.as_secs() as i64 + width;
        while self.buckets.front().is_some_and(|b| b.start < oldest) {
            self.buckets.pop_front();
        }
        if self.buckets.back().is_none_or(|b| b.start < start) {
            self.buckets.push_back(Bucket { start, nodes: BTreeMap::new() });
        }
        &mut self.buckets.back_mut().expect("a bucket was just pushed").nodes
    }

    /// A datagram's samples and the spans made of them, on `node`.
    pub fn sampled(&mut self, node: &str, samples: u64, spans: u64, now: Timestamp) {
        let counts = self.bucket(now).entry(node.to_string()).or_default();
        counts.samples += samples;
        counts.spans += spans;
    }

    /// An export of spans from these nodes (how many each) succeeded or failed.
    pub fn exported(&mut self, nodes: &BTreeMap<String, u64>, outcome: Result<(), String>, now: Timestamp) {
        match outcome {
            Ok(()) => {
                self.last_ok = Some(now);
                let bucket = self.bucket(now);
                for (node, n) in nodes {
                    bucket.entry(node.clone()).or_default().exported += n;
                }
            }
            Err(message) => self.last_error = Some((now, message)),
        }
    }

    /// The report as of `now`; `policies` names, per node, the policies exporting there.
    pub fn report(&mut self, collector: &str, policies: &BTreeMap<String, BTreeSet<String>>, now: Timestamp) -> Report {
        self.bucket(now);
        let mut nodes: BTreeMap<String, NodeCounts> = BTreeMap::new();
        for bucket in &self.buckets {
            for (node, c) in &bucket.nodes {
                let total = nodes.entry(node.clone()).or_default();
                total.samples += c.samples;
                total.spans += c.spans;
                total.exported += c.exported;
            }
        }
        for (node, total) in &mut nodes {
            total.policies = policies.get(node).cloned().unwrap_or_default();
        }
        Report {
            collector: collector.to_string(),
            window_seconds: WINDOW.as_secs(),
            nodes,
            last_export_ok: self.last_ok.map(|t| t.to_string()),
            last_export_error: self
                .last_error
                .as_ref()
                .map(|(at, message)| ExportError { at: at.to_string(), message: message.clone() }),
        }
    }
}

/// The reasons of `TracesFlowing`.
pub mod reasons {
    /// Trace-linked spans of the policy's nodes reached the collector in the window.
    pub const SPANS_EXPORTED: &str = "TraceLinkedSpansExported";
    /// Spans were made in the window, and none is known accepted or refused yet.
    pub const SPANS_PENDING: &str = "SpansPending";
    /// The receiver's collector refused its last export, or was not there.
    pub const EXPORT_FAILING: &str = "SpanExportFailing";
    /// No sampled packet of the policy's nodes carried a traceparent in the window.
    pub const NO_TRACE_LINKED_SAMPLES: &str = "NoTraceLinkedSamples";
    /// No receiver reported recently.
    pub const RECEIVER_SILENT: &str = "FlowsReceiverSilent";
}

/// `TracesFlowing` for `policy` from the fresh reports of every receiver replica.
pub fn traces_flowing(policy: &str, reports: &[Report]) -> (Status, &'static str, String) {
    let minutes = WINDOW.as_secs() / 60;
    if reports.is_empty() {
        return (
            Status::False,
            reasons::RECEIVER_SILENT,
            "no crosstrace flows receiver has reported lately: is the chart's flows.enabled on, and its pod \
             running?"
                .into(),
        );
    }
    if let Some((report, error)) = reports.iter().find_map(|r| r.failing().map(|e| (r, e))) {
        return (
            Status::False,
            reasons::EXPORT_FAILING,
            format!("crosstrace flows cannot export spans to {}: {}", report.collector, error.message),
        );
    }
    let mine = |c: &&NodeCounts| c.policies.contains(policy);
    let mut exported = BTreeSet::new();
    let mut made = BTreeSet::new();
    let mut sampled = BTreeSet::new();
    for report in reports {
        for (node, c) in report.nodes.iter().filter(|(_, c)| mine(c)) {
            if c.exported > 0 {
                exported.insert(node.as_str());
            }
            if c.spans > 0 {
                made.insert(node.as_str());
            }
            if c.samples > 0 {
                sampled.insert(node.as_str());
            }
        }
    }
    let collectors: BTreeSet<&str> = reports.iter().map(|r| r.collector.as_str()).collect();
    let collectors = collectors.into_iter().collect::<Vec<_>>().join(", ");
    let list = |nodes: &BTreeSet<&str>| nodes.iter().copied().collect::<Vec<_>>().join(", ");
    if !exported.is_empty() {
        return (
            Status::True,
            reasons::SPANS_EXPORTED,
            format!(
                "spans of the network hop joined their traces and reached {collectors} in the last {minutes} min, \
                 from node(s) {}",
                list(&exported)
            ),
        );
    }
    if !made.is_empty() {
        return (
            Status::Unknown,
            reasons::SPANS_PENDING,
            format!("spans of the network hop from node(s) {} are on their way to {collectors}", list(&made)),
        );
    }
    let seen = if sampled.is_empty() {
        "no flow sample of its nodes arrived".to_string()
    } else {
        format!("flow samples arrived from node(s) {}", list(&sampled))
    };
    (
        Status::False,
        reasons::NO_TRACE_LINKED_SAMPLES,
        format!(
            "in the last {minutes} min {seen}, but none held a plaintext HTTP/1.x request with a sampled W3C \
             traceparent"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    fn policies(node: &str, policy: &str) -> BTreeMap<String, BTreeSet<String>> {
        BTreeMap::from([(node.to_string(), BTreeSet::from([policy.to_string()]))])
    }

    #[test]
    fn the_window_keeps_five_minutes_and_forgets_the_rest() {
        let mut tally = Tally::default();
        tally.sampled("n0", 10, 2, at(0));
        tally.exported(&BTreeMap::from([("n0".to_string(), 2)]), Ok(()), at(1));
        tally.sampled("n0", 5, 0, at(200));
        let report = tally.report("c:4317", &policies("n0", "p"), at(250));
        let n0 = &report.nodes["n0"];
        assert_eq!((n0.samples, n0.spans, n0.exported), (15, 2, 2));
        assert_eq!(n0.policies, BTreeSet::from(["p".to_string()]));
        let later = tally.report("c:4317", &policies("n0", "p"), at(330));
        assert_eq!(later.nodes["n0"].spans, 0, "the first minute has left the window: {later:?}");
        assert_eq!(later.nodes["n0"].samples, 5);
        let much_later = tally.report("c:4317", &BTreeMap::new(), at(3600));
        assert!(much_later.nodes.is_empty());
        assert_eq!(much_later.last_export_ok.as_deref(), Some(at(1).to_string().as_str()));
    }

    #[test]
    fn a_failure_counts_until_an_export_succeeds_again() {
        let mut tally = Tally::default();
        let one = BTreeMap::from([("n0".to_string(), 1)]);
        tally.exported(&one, Ok(()), at(0));
        tally.exported(&one, Err("connection refused".into()), at(5));
        assert_eq!(tally.report("c", &BTreeMap::new(), at(6)).failing().unwrap().message, "connection refused");
        tally.exported(&one, Ok(()), at(9));
        assert_eq!(tally.report("c", &BTreeMap::new(), at(10)).failing(), None);
    }

    #[test]
    fn the_condition_says_what_the_reports_show() {
        let report = |spans, exported, policy: &str| Report {
            collector: "otel:4317".into(),
            window_seconds: 300,
            nodes: BTreeMap::from([(
                "n0".to_string(),
                NodeCounts { samples: 64, spans, exported, policies: BTreeSet::from([policy.to_string()]) },
            )]),
            ..Default::default()
        };
        let (status, reason, message) = traces_flowing("p", &[report(9, 9, "p")]);
        assert_eq!((status, reason), (Status::True, reasons::SPANS_EXPORTED));
        assert!(message.contains("otel:4317") && message.contains("n0") && !message.contains('9'), "{message}");
        assert_eq!(traces_flowing("p", &[report(3, 0, "p")]).1, reasons::SPANS_PENDING);
        let (status, reason, message) = traces_flowing("p", &[report(0, 0, "p")]);
        assert_eq!((status, reason), (Status::False, reasons::NO_TRACE_LINKED_SAMPLES));
        assert!(message.contains("arrived from node(s) n0"), "{message}");
        let (_, reason, message) = traces_flowing("p", &[report(3, 3, "other")]);
        assert_eq!(reason, reasons::NO_TRACE_LINKED_SAMPLES, "another policy's nodes do not count");
        assert!(message.contains("no flow sample of its nodes"), "{message}");
        assert_eq!(traces_flowing("p", &[]).1, reasons::RECEIVER_SILENT);
        let mut failing = report(3, 3, "p");
        failing.last_export_ok = Some(at(0).to_string());
        failing.last_export_error = Some(ExportError { at: at(5).to_string(), message: "Unavailable".into() });
        let (status, reason, message) = traces_flowing("p", &[report(3, 3, "p"), failing]);
        assert_eq!((status, reason), (Status::False, reasons::EXPORT_FAILING));
        assert!(message.ends_with("otel:4317: Unavailable"), "{message}");
    }

    #[test]
    fn a_report_reads_back_as_written() {
        let mut tally = Tally::default();
        tally.sampled("n0", 1, 1, at(0));
        let report = tally.report("c", &policies("n0", "p"), at(1));
        let json = serde_json::to_string(&report).unwrap();
        assert!(json.contains("\"windowSeconds\":300"), "{json}");
        assert_eq!(serde_json::from_str::<Report>(&json).unwrap(), report);
    }
}
