//! The controller's own check of the values that reach another program as text (ingress-nginx's TOML,
//! OVSDB, Pod templates). The API server refuses them on create and update (`rules.rs`), but a policy
//! stored while the CRD was looser keeps its old values: CRD validation ratcheting lets unchanged
//! fields stay. So the controller checks them again before it writes anything, with the same
//! patterns, and reports the field instead of rendering it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::LazyLock;

use regex::Regex;

use super::TracingPolicySpec;
use super::rules::{IMAGE_REFERENCE, OVS_NAME, SERVICE_NAME};

/// A field whose value must not reach another program, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct UnsafeValue {
    /// The field's path, e.g. `spec.ingress.serviceName`.
    pub field: String,
    pub reason: &'static str,
}

static SERVICE_NAME_RE: LazyLock<Regex> = LazyLock::new(|| Regex::new(SERVICE_NAME).expect("a valid pattern"));
static OVS_NAME_RE: LazyLock<Regex> = LazyLock::new(|| Regex::new(OVS_NAME).expect("a valid pattern"));
static IMAGE_RE: LazyLock<Regex> = LazyLock::new(|| Regex::new(IMAGE_REFERENCE).expect("a valid pattern"));
static DNS_SUBDOMAIN_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new("^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$").expect("a valid pattern")
});
static DNS_LABEL_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new("^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$").expect("a valid pattern"));

/// Every value of `spec` that the API server would refuse today among those rendered into another
/// program's input; empty when the policy is safe to act on.
pub fn unsafe_values(spec: &TracingPolicySpec) -> Vec<UnsafeValue> {
    let mut found = Vec::new();
    let mut check = |ok: bool, field: String, reason: &'static str| {
        if !ok {
            found.push(UnsafeValue { field, reason });
        }
    };
    if let Some(collector) = &spec.collector {
        let endpoint = &collector.endpoint;
        check(endpoint.is_empty() || is_host_port(endpoint, true), "spec.collector.endpoint".into(), ENDPOINT);
    }
    if let Some(ingress) = &spec.ingress {
        check(SERVICE_NAME_RE.is_match(&ingress.service_name), "spec.ingress.serviceName".into(), SERVICE);
        check(
            ingress.namespace.is_empty() || DNS_LABEL_RE.is_match(&ingress.namespace),
            "spec.ingress.namespace".into(),
            NAMESPACE,
        );
        check(ingress.image.is_empty() || IMAGE_RE.is_match(&ingress.image), "spec.ingress.image".into(), IMAGE);
    }
    if let Some(gateway) = &spec.gateway {
        check(SERVICE_NAME_RE.is_match(&gateway.service_name), "spec.gateway.serviceName".into(), SERVICE);
        check(
            gateway.namespace.is_empty() || DNS_LABEL_RE.is_match(&gateway.namespace),
            "spec.gateway.namespace".into(),
            NAMESPACE,
        );
    }
    if let Some(workloads) = &spec.workloads {
        let image = &workloads.sidecar.image;
        check(image.is_empty() || IMAGE_RE.is_match(image), "spec.workloads.sidecar.image".into(), IMAGE);
    }
    if let Some(network) = &spec.network {
        check(is_ovs_name(&network.bridge), "spec.network.bridge".into(), BRIDGE);
        if let Some(sflow) = &network.sflow {
            let agent = &sflow.agent;
            let agent_ok = agent.is_empty()
                || agent.parse::<IpAddr>().is_ok()
                || (!agent.chars().all(|c| c.is_ascii_digit() || c == '.') && is_ovs_name(agent));
            check(agent_ok, "spec.network.sflow.agent".into(), AGENT);
            for (i, target) in sflow.targets.iter().enumerate() {
                check(is_host_port(target, false), format!("spec.network.sflow.targets[{i}]"), TARGET);
            }
        }
        if let Some(ipfix) = &network.ipfix {
            for (i, target) in ipfix.targets.iter().enumerate() {
                check(is_host_port(target, false), format!("spec.network.ipfix.targets[{i}]"), TARGET);
            }
        }
    }
    found
}

const ENDPOINT: &str = "not host:port with a DNS name, IPv4 or bracketed IPv6 address and a port in 1-65535";
const TARGET: &str = "not IPv4:port or [IPv6]:port with a port in 1-65535";
const SERVICE: &str = "not a service name of letters, digits, '.', '_' and '-'";
const NAMESPACE: &str = "not a namespace name";
const IMAGE: &str = "not an image reference";
const BRIDGE: &str = "not an OVS bridge name";
const AGENT: &str = "neither an interface name nor an IP address";

fn is_ovs_name(name: &str) -> bool {
    OVS_NAME_RE.is_match(name) && name != "." && name != ".."
}

/// `host:port` as `rules::host_port` checks it: a bracketed IPv6 address, an IPv4 address or (when
/// `dns`) a lowercase DNS name of at most 253 characters; a dotted string of digits must be IPv4.
fn is_host_port(value: &str, dns: bool) -> bool {
    let Some((host, port)) = value.rsplit_once(':') else { return false };
    let port_ok = !port.starts_with('0') && port.len() <= 5 && port.parse::<u16>().is_ok_and(|p| p > 0);
    let host_ok = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        inner.parse::<Ipv6Addr>().is_ok_and(|ip| ip.to_ipv4_mapped().is_none()) && !inner.contains('%')
    } else if host.chars().all(|c| c.is_ascii_digit() || c == '.') {
        host.parse::<Ipv4Addr>().is_ok()
    } else {
        dns && host.len() <= 253 && DNS_SUBDOMAIN_RE.is_match(host) && host.split('.').all(|label| label.len() <= 63)
    };
    port_ok && host_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CollectorSpec, IngressSpec, IpfixSpec, NetworkSpec, SflowSpec};

    fn fields(spec: &TracingPolicySpec) -> Vec<String> {
        unsafe_values(spec).into_iter().map(|u| u.field).collect()
    }

    #[test]
    fn addresses_are_real_ipv4_or_ipv6_or_dns_names() {
        for good in ["otel:4317", "otel-gateway.observability.svc:4317", "10.0.0.5:1", "[fd00::5]:65535"] {
            assert!(is_host_port(good, true), "{good}");
        }
        for bad in [
            "999.1.1.1:4317",
            "[zz::1]:4317",
            "otel..svc:4317",
            "OTEL:4317",
            "otel:0",
            "otel:65536",
            "otel:04317",
            "otel",
            "[1.2.3.4]:80",
            "[::ffff:1.2.3.4]:80",
            "[fe80::1%eth0]:80",
            "1.2.3:80",
            "x\"\n:80",
        ] {
            assert!(!is_host_port(bad, true), "{bad:?}");
        }
        assert!(is_host_port("10.0.0.5:6343", false));
        assert!(is_host_port("[2001:db8::1]:6343", false));
        assert!(!is_host_port("collector:6343", false), "flow targets are addresses, never names");
    }

    #[test]
    fn a_policy_stored_under_a_looser_schema_is_reported_field_by_field() {
        let spec = TracingPolicySpec {
            collector: Some(CollectorSpec { endpoint: "999.1.1.1:4317".into(), ..Default::default() }),
            ingress: Some(IngressSpec {
                service_name: "x\"\n[exporters.otlp]\nhost = \"evil\"\n#".into(),
                namespace: "Ingress_NGINX".into(),
                image: "evil image".into(),
                ..Default::default()
            }),
            gateway: Some(crate::api::GatewaySpec {
                namespace: "Infra".into(),
                service_name: "edge\"; otel_exporter {".into(),
                selector: None,
            }),
            network: Some(NetworkSpec {
                node_selector: None,
                bridge: "br/int".into(),
                sflow: Some(SflowSpec {
                    targets: vec!["10.0.0.5:6343".into(), "[zz::1]:6343".into()],
                    sampling: 400,
                    polling: 30,
                    header: 128,
                    agent: "1.2.3.999".into(),
                }),
                ipfix: Some(IpfixSpec {
                    targets: vec!["host:4739".into()],
                    sampling: 400,
                    obs_domain_id: 1,
                    cache_active_timeout: 60,
                }),
                conflict_policy: Default::default(),
                correlate: false,
            }),
            ..Default::default()
        };
        assert_eq!(
            fields(&spec),
            [
                "spec.collector.endpoint",
                "spec.ingress.serviceName",
                "spec.ingress.namespace",
                "spec.ingress.image",
                "spec.gateway.serviceName",
                "spec.gateway.namespace",
                "spec.network.bridge",
                "spec.network.sflow.agent",
                "spec.network.sflow.targets[1]",
                "spec.network.ipfix.targets[0]",
            ]
        );
    }

    #[test]
    fn the_samples_policies_are_safe() {
        for sample in ["edge.yaml", "workloads.yaml", "network.yaml", "storefront.yaml", "migration.yaml"] {
            let path = format!("{}/config/samples/{sample}", env!("CARGO_MANIFEST_DIR"));
            let policy: crate::api::TracingPolicy =
                serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            assert_eq!(unsafe_values(&policy.spec), [], "{sample}");
        }
    }
}
