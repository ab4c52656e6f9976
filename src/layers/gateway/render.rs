//! What each provider's tracing looks like (pure): the sampling ratio in the provider's own terms,
//! and the objects and fields crosstrace writes.

use serde_json::{Value, json};

use super::GATEWAY_GROUP;
use crate::api::{GatewaySpec, SamplingSpec};

/// `numerator/denominator` of a decimal ratio string, exactly and in lowest terms: "0.25" → 1/4,
/// "0.333" → 333/1000, "1" → 1/1, "0" → 0/1. The API server has validated the form (at most 6 decimals).
pub fn fraction(ratio: &str) -> (u32, u32) {
    let (int, frac) = ratio.split_once('.').unwrap_or((ratio, ""));
    let denominator = 10u32.pow(u32::try_from(frac.len()).unwrap_or(0).min(6));
    let digits = format!("{}{}", if int.is_empty() { "0" } else { int }, &frac[..frac.len().min(6)]);
    let numerator: u32 = digits.parse().unwrap_or(0);
    let divisor = gcd(numerator, denominator).max(1);
    (numerator / divisor, denominator / divisor)
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The ratio as a percentage, exactly as a decimal ("0.333" → 33.3).
pub fn percent(ratio: &str) -> f64 {
    let (numerator, denominator) = fraction(ratio);
    f64::from(numerator) * 100.0 / f64::from(denominator)
}

/// The ratio as an integer percent (NGF), rounded half up, and whether that rounded it.
pub fn integer_percent(ratio: &str) -> (u32, bool) {
    let (numerator, denominator) = fraction(ratio);
    let hundredfold = u64::from(numerator) * 100;
    let rounded = (hundredfold + u64::from(denominator) / 2) / u64::from(denominator);
    (u32::try_from(rounded).unwrap_or(100), hundredfold % u64::from(denominator) != 0)
}

/// The collector endpoint as an Envoy Gateway backendRef when it is a Service's DNS name
/// (`<svc>.<ns>.svc[.cluster.local]:port`), else as host and port.
pub(super) fn envoy_collector(endpoint: &str) -> Value {
    let (host, port) = endpoint.rsplit_once(':').unwrap_or((endpoint, "4317"));
    let port: u16 = port.parse().unwrap_or(4317);
    let labels: Vec<&str> = host.split('.').collect();
    match labels[..] {
        [svc, ns, "svc"] | [svc, ns, "svc", "cluster", "local"] => {
            json!({"backendRefs": [{"name": svc, "namespace": ns, "port": port}]})
        }
        _ => json!({"host": host.trim_start_matches('[').trim_end_matches(']'), "port": port}),
    }
}

/// `EnvoyProxy.spec.telemetry.tracing` for a policy. Envoy samples with `samplingFraction` only "if no
/// prior sampling decision has been made": an incoming sampled parent is always followed, i.e. Envoy is
/// parent-based whatever `spec.sampling.parentBased` says (reported as a warning when it is false).
pub fn envoy_tracing(endpoint: &str, sampling: &SamplingSpec, gateway: &GatewaySpec) -> Value {
    let (numerator, denominator) = fraction(&sampling.ratio);
    let mut provider = json!({"type": "OpenTelemetry", "serviceName": gateway.service_name});
    if let (Some(p), Value::Object(collector)) = (provider.as_object_mut(), envoy_collector(endpoint)) {
        p.extend(collector);
    }
    json!({
        "provider": provider,
        "samplingFraction": {"numerator": numerator, "denominator": denominator},
    })
}

/// `NginxProxy.spec.telemetry` for a policy: the exporter endpoint and service name.
pub fn nginx_telemetry(endpoint: &str, gateway: &GatewaySpec) -> Value {
    json!({"exporter": {"endpoint": endpoint}, "serviceName": gateway.service_name})
}

/// The ObservabilityPolicy `spec.tracing`: NGF's ratio is an integer percent. A parent-based policy
/// propagates the incoming context (NGF continues the incoming trace, samples by the ratio).
pub fn nginx_tracing(sampling: &SamplingSpec) -> Value {
    let (ratio, _) = integer_percent(&sampling.ratio);
    let context = if sampling.parent_based { "propagate" } else { "inject" };
    json!({"strategy": "ratio", "ratio": ratio, "context": context})
}

/// The Istio `Telemetry` spec for one Gateway.
pub fn istio_telemetry(gateway: &str, provider: &str, sampling: &SamplingSpec) -> Value {
    json!({
        "targetRefs": [{"group": GATEWAY_GROUP, "kind": "Gateway", "name": gateway}],
        "tracing": [{"providers": [{"name": provider}], "randomSamplingPercentage": percent(&sampling.ratio)}],
    })
}

/// Name of an object crosstrace creates for `owner` (a Gateway or a route): `crosstrace-<owner>`, cut
/// with a hash when too long for a name.
pub fn owned_name(owner: &str) -> String {
    let name = format!("crosstrace-{owner}");
    if name.len() <= 253 {
        return name;
    }
    let hash = crate::layers::hash_of(&json!(owner));
    format!("{}-{hash}", &name[..253 - hash.len() - 1])
}
