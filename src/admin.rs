//! Admin limits: what whoever installs crosstrace allows TracingPolicy authors to ask for (sidecar and
//! ingress images, protected namespaces, flow collector networks, sampling and header bounds).
//!
//! The chart renders its `adminLimits` values into one ConfigMap, `crosstrace-admin-limits`, and into the
//! expressions of its ValidatingAdmissionPolicy `crosstrace-admin-limits` (not as ConfigMap parameters:
//! kube-apiserver can lose a ConfigMap param informer for good, kubernetes/kubernetes#130887). The API server
//! enforces them at admission; [`check`] enforces them again in the controller, for clusters without that
//! policy and for policies admitted before a limit was tightened. Both give the values the same meaning, so
//! that a policy refused by one is refused by the other: lists are comma-separated, an image entry is a repository (any
//! tag or digest) or `repository@sha256:<digest>` matched as written, and a flow target must be an IP
//! address inside one of the networks (a host name cannot be checked, so it is outside).
//!
//! Pure: no client. [`AdminLimits::from_dir`] reads the ConfigMap mounted as a volume (one file per key),
//! [`AdminLimits::from_data`] its `data` read through the API.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::api::TracingPolicySpec;
use crate::layers::workloads::PROTECTED_NAMESPACES;

/// Name of the chart's ConfigMap of admin limits (in the release namespace).
pub const CONFIG_MAP: &str = "crosstrace-admin-limits";

/// The ConfigMap's keys.
pub mod keys {
    pub const SIDECAR_IMAGES: &str = "sidecarImages";
    pub const INGRESS_IMAGES: &str = "ingressImages";
    pub const PROTECTED_NAMESPACES: &str = "protectedNamespaces";
    pub const COLLECTOR_NETWORKS: &str = "collectorNetworks";
    pub const MIN_SAMPLING: &str = "minSampling";
    pub const MAX_HEADER_BYTES: &str = "maxHeaderBytes";
    pub const ALL: [&str; 6] =
        [SIDECAR_IMAGES, INGRESS_IMAGES, PROTECTED_NAMESPACES, COLLECTOR_NETWORKS, MIN_SAMPLING, MAX_HEADER_BYTES];
}

/// The limits, as the chart's `adminLimits` values set them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminLimits {
    /// Repositories or `repository@sha256:<digest>` allowed for `spec.workloads.sidecar.image`.
    pub sidecar_images: Vec<String>,
    /// The same for `spec.ingress.image`.
    pub ingress_images: Vec<String>,
    /// Namespaces no layer touches, beyond kube-system, kube-public, kube-node-lease and the operator's
    /// own (which the layers never touch anyway; the chart lists them here too).
    pub protected_namespaces: Vec<String>,
    /// Networks sFlow/IPFIX targets must be IP addresses in.
    pub collector_networks: Vec<Network>,
    /// sFlow/IPFIX `sampling` must be at least this (at most 1 in N packets).
    pub min_sampling: u32,
    /// sFlow `header` must be at most this many bytes.
    pub max_header_bytes: u32,
}

impl Default for AdminLimits {
    /// The chart's defaults (helm/crosstrace/values.yaml `adminLimits`; a test keeps them equal).
    fn default() -> Self {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Self {
            sidecar_images: strings(&[
                "otel/opentelemetry-collector-k8s",
                "docker.io/otel/opentelemetry-collector-k8s",
                "ghcr.io/open-telemetry/opentelemetry-collector-releases/opentelemetry-collector-k8s",
            ]),
            ingress_images: strings(&[
                "registry.k8s.io/ingress-nginx/controller",
                "registry.k8s.io/ingress-nginx/controller-chroot",
            ]),
            protected_namespaces: Vec::new(),
            collector_networks: ["127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]
                .iter()
                .map(|n| n.parse().expect("a valid default network"))
                .collect(),
            min_sampling: crate::api::SAMPLING_FLOOR,
            max_header_bytes: 128,
        }
    }
}

/// Why the limits could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("admin limits: key {key} is missing")]
    Missing { key: &'static str },
    #[error("admin limits: {key}: {value:?} is not a non-negative integer")]
    Integer {
        key: &'static str,
        value: String,
        #[source]
        source: std::num::ParseIntError,
    },
    #[error("admin limits: {key}: {value:?} is not a network (CIDR, e.g. 10.0.0.0/8)")]
    Network { key: &'static str, value: String },
    #[error("admin limits: cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl AdminLimits {
    /// From the ConfigMap's `data`. Every key is required: limits that cannot be read are an error
    /// (the caller then applies nothing), never "no limits".
    pub fn from_data(data: &BTreeMap<String, String>) -> Result<Self, LoadError> {
        let get = |key: &'static str| data.get(key).map(String::as_str).ok_or(LoadError::Missing { key });
        let list = |key: &'static str| get(key).map(split_list);
        let integer = |key: &'static str| {
            let value = get(key)?.trim();
            value.parse::<u32>().map_err(|source| LoadError::Integer { key, value: value.into(), source })
        };
        let networks = list(keys::COLLECTOR_NETWORKS)?
            .into_iter()
            .map(|n| n.parse().map_err(|()| LoadError::Network { key: keys::COLLECTOR_NETWORKS, value: n }))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            sidecar_images: list(keys::SIDECAR_IMAGES)?,
            ingress_images: list(keys::INGRESS_IMAGES)?,
            protected_namespaces: list(keys::PROTECTED_NAMESPACES)?,
            collector_networks: networks,
            min_sampling: integer(keys::MIN_SAMPLING)?,
            max_header_bytes: integer(keys::MAX_HEADER_BYTES)?,
        })
    }

    /// From the ConfigMap mounted as a volume: one file per key in `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        let mut data = BTreeMap::new();
        for key in keys::ALL {
            let path = dir.join(key);
            match std::fs::read_to_string(&path) {
                Ok(value) => {
                    data.insert(key.to_string(), value);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(LoadError::Read { path, source }),
            }
        }
        Self::from_data(&data)
    }

    /// Whether no layer may touch `namespace` (the built-in protected namespaces included).
    pub fn is_protected(&self, namespace: &str) -> bool {
        PROTECTED_NAMESPACES.contains(&namespace) || self.protected_namespaces.iter().any(|p| p == namespace)
    }
}

/// Comma-separated, blanks around entries ignored, empty entries dropped.
fn split_list(value: &str) -> Vec<String> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
}

/// An IP network (CIDR).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Network {
    address: IpAddr,
    prefix: u8,
}

impl Network {
    /// Whether `ip` is inside (an IPv4 address is never inside an IPv6 network, nor the reverse).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.address, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_equal(u128::from(u32::from(net)) << 96, u128::from(u32::from(ip)) << 96, self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix_equal(u128::from(net), u128::from(ip), self.prefix),
            _ => false,
        }
    }
}

fn prefix_equal(a: u128, b: u128, prefix: u8) -> bool {
    let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(prefix)) };
    a & mask == b & mask
}

impl FromStr for Network {
    type Err = ();

    /// `address/prefix`, the prefix within the address family's width.
    fn from_str(s: &str) -> Result<Self, ()> {
        let (address, prefix) = s.trim().split_once('/').ok_or(())?;
        let address: IpAddr = address.parse().map_err(drop)?;
        let prefix: u8 = prefix.parse().map_err(drop)?;
        let width = if address.is_ipv4() { 32 } else { 128 };
        (prefix <= width).then_some(Self { address, prefix }).ok_or(())
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

/// The first thing in a policy beyond the admin limits: the field, its value and the limit.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("{field}: {image} is not from an allowed repository ({}; admin limit {limit})", allowed.join(","))]
    Image { field: &'static str, image: String, allowed: Vec<String>, limit: &'static str },
    #[error("{field}: {namespace} is protected (admin limit {})", keys::PROTECTED_NAMESPACES)]
    ProtectedNamespace { field: &'static str, namespace: String },
    #[error("{field}: {target} is not an IP address in an allowed collector network ({}; admin limit {})", networks.iter().map(ToString::to_string).collect::<Vec<_>>().join(","), keys::COLLECTOR_NETWORKS)]
    TargetOutside { field: &'static str, target: String, networks: Vec<Network> },
    #[error(
        "{field}: 1 in {sampling} samples more often than the lowest rate allowed, 1 in {min} (admin limit {})",
        keys::MIN_SAMPLING
    )]
    Sampling { field: &'static str, sampling: u32, min: u32 },
    #[error(
        "{field}: {header} bytes of each sampled packet is more than allowed, {max} (admin limit {})",
        keys::MAX_HEADER_BYTES
    )]
    Header { field: &'static str, header: u32, max: u32 },
}

impl Violation {
    /// The field of the policy's spec, e.g. `spec.workloads.sidecar.image`.
    pub fn field(&self) -> &'static str {
        match self {
            Self::Image { field, .. }
            | Self::ProtectedNamespace { field, .. }
            | Self::TargetOutside { field, .. }
            | Self::Sampling { field, .. }
            | Self::Header { field, .. } => field,
        }
    }
}

/// Checks a policy against the limits, in the order the admission policy does, and returns the first
/// violation. A workloads `namespaceSelector` is checked only where it names a protected namespace
/// outright (`kubernetes.io/metadata.name`); what it matches otherwise is the layer's business, which
/// skips namespaces for which [`AdminLimits::is_protected`] holds.
pub fn check(spec: &TracingPolicySpec, limits: &AdminLimits) -> Result<(), Violation> {
    if let Some(workloads) = &spec.workloads {
        check_image(
            "spec.workloads.sidecar.image",
            &workloads.sidecar.image,
            &limits.sidecar_images,
            keys::SIDECAR_IMAGES,
        )?;
    }
    if let Some(ingress) = &spec.ingress {
        check_image("spec.ingress.image", &ingress.image, &limits.ingress_images, keys::INGRESS_IMAGES)?;
        if !ingress.namespace.is_empty() && limits.is_protected(&ingress.namespace) {
            return Err(Violation::ProtectedNamespace {
                field: "spec.ingress.namespace",
                namespace: ingress.namespace.clone(),
            });
        }
    }
    if let Some(gateway) = &spec.gateway
        && !gateway.namespace.is_empty()
        && limits.is_protected(&gateway.namespace)
    {
        return Err(Violation::ProtectedNamespace {
            field: "spec.gateway.namespace",
            namespace: gateway.namespace.clone(),
        });
    }
    if let Some(workloads) = &spec.workloads
        && let Some(namespace) = named_namespaces(&workloads.namespace_selector).find(|n| limits.is_protected(n))
    {
        return Err(Violation::ProtectedNamespace {
            field: "spec.workloads.namespaceSelector",
            namespace: namespace.to_string(),
        });
    }
    let Some(network) = &spec.network else {
        return Ok(());
    };
    let sflow = network.sflow.as_ref().map(|s| (&s.targets, s.sampling));
    let ipfix = network.ipfix.as_ref().map(|i| (&i.targets, i.sampling));
    for (field, targets) in [("spec.network.sflow.targets", sflow), ("spec.network.ipfix.targets", ipfix)]
        .into_iter()
        .filter_map(|(field, exporter)| Some((field, exporter?.0)))
    {
        if let Some(target) = targets.iter().find(|t| !in_networks(t, &limits.collector_networks)) {
            return Err(Violation::TargetOutside {
                field,
                target: target.clone(),
                networks: limits.collector_networks.clone(),
            });
        }
    }
    for (field, sampling) in [("spec.network.sflow.sampling", sflow), ("spec.network.ipfix.sampling", ipfix)]
        .into_iter()
        .filter_map(|(field, exporter)| Some((field, exporter?.1)))
    {
        if sampling < limits.min_sampling {
            return Err(Violation::Sampling { field, sampling, min: limits.min_sampling });
        }
    }
    if let Some(sflow) = &network.sflow
        && sflow.header > limits.max_header_bytes
    {
        return Err(Violation::Header {
            field: "spec.network.sflow.header",
            header: sflow.header,
            max: limits.max_header_bytes,
        });
    }
    Ok(())
}

/// An empty image (the operator's default) is always allowed; otherwise an entry must equal the image's
/// repository, or its repository and digest (`repository@sha256:...`).
fn check_image(field: &'static str, image: &str, allowed: &[String], limit: &'static str) -> Result<(), Violation> {
    if image.is_empty() {
        return Ok(());
    }
    let (named, digest) = match image.split_once('@') {
        Some((named, digest)) => (named, Some(digest)),
        None => (image, None),
    };
    let repository = repository_of(named);
    let pinned = digest.map(|d| format!("{repository}@{d}"));
    if allowed.iter().any(|a| a == repository || Some(a) == pinned.as_ref()) {
        return Ok(());
    }
    Err(Violation::Image { field, image: image.to_string(), allowed: allowed.to_vec(), limit })
}

/// The repository of `name[:tag]`: a ':' after the last '/' starts the tag (one before it is a port).
fn repository_of(named: &str) -> &str {
    match (named.rfind(':'), named.rfind('/')) {
        (Some(colon), Some(slash)) if colon > slash => &named[..colon],
        (Some(colon), None) => &named[..colon],
        _ => named,
    }
}

/// Namespaces a selector names outright: `kubernetes.io/metadata.name` in matchLabels, or `In` values.
fn named_namespaces(
    selector: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
) -> impl Iterator<Item = &str> {
    const NAME_LABEL: &str = "kubernetes.io/metadata.name";
    let labelled = selector.match_labels.iter().flatten().filter(|(k, _)| *k == NAME_LABEL).map(|(_, v)| v.as_str());
    let listed = selector
        .match_expressions
        .iter()
        .flatten()
        .filter(|e| e.key == NAME_LABEL && e.operator == "In")
        .flat_map(|e| e.values.iter().flatten().map(String::as_str));
    labelled.chain(listed)
}

/// Whether a `host:port` target's host is an IP address inside one of the networks. A host name, an
/// IPv4-mapped IPv6 address or a zone is outside (the admission policy's CEL `isIP` refuses them too).
fn in_networks(target: &str, networks: &[Network]) -> bool {
    let (host, _port) = crate::layers::ingress::split_host_port(target);
    let Ok(ip) = host.parse::<IpAddr>() else {
        return false;
    };
    if matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some()) {
        return false;
    }
    networks.iter().any(|n| n.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{IngressSpec, IpfixSpec, NetworkSpec, SflowSpec, WorkloadsSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

    fn workloads(image: &str) -> TracingPolicySpec {
        let mut w = WorkloadsSpec::default();
        w.sidecar.image = image.into();
        TracingPolicySpec { workloads: Some(w), ..Default::default() }
    }

    fn ingress(namespace: &str, image: &str) -> TracingPolicySpec {
        let ingress = IngressSpec { namespace: namespace.into(), image: image.into(), ..Default::default() };
        TracingPolicySpec { ingress: Some(ingress), ..Default::default() }
    }

    fn sflow(targets: &[&str], sampling: u32, header: u32) -> SflowSpec {
        SflowSpec {
            targets: targets.iter().map(|t| t.to_string()).collect(),
            sampling,
            polling: 30,
            header,
            agent: String::new(),
        }
    }

    fn network(sflow: Option<SflowSpec>, ipfix: Option<IpfixSpec>) -> TracingPolicySpec {
        let network = NetworkSpec {
            node_selector: None,
            bridge: "br-int".into(),
            sflow,
            ipfix,
            conflict_policy: Default::default(),
            correlate: false,
        };
        TracingPolicySpec { network: Some(network), ..Default::default() }
    }

    fn ipfix(targets: &[&str], sampling: u32) -> IpfixSpec {
        IpfixSpec {
            targets: targets.iter().map(|t| t.to_string()).collect(),
            sampling,
            obs_domain_id: 1,
            cache_active_timeout: 60,
        }
    }

    fn field_of(spec: &TracingPolicySpec) -> Option<&'static str> {
        check(spec, &AdminLimits::default()).err().map(|v| v.field())
    }

    #[test]
    fn official_sidecar_images_with_any_tag_or_digest_and_the_default_are_allowed() {
        for image in [
            "",
            "otel/opentelemetry-collector-k8s:0.165.0",
            "otel/opentelemetry-collector-k8s",
            "docker.io/otel/opentelemetry-collector-k8s:0.165.0@sha256:0123",
            "ghcr.io/open-telemetry/opentelemetry-collector-releases/opentelemetry-collector-k8s:0.165.0",
        ] {
            assert_eq!(field_of(&workloads(image)), None, "{image}");
        }
    }

    #[test]
    fn other_sidecar_images_are_refused_naming_the_field_and_the_limit() {
        for image in [
            "evil.io/otel/opentelemetry-collector-k8s:1",
            "otel/opentelemetry-collector-k8s-evil:1",
            "otel/opentelemetry-collector-contrib:0.165.0",
            "x:broken",
        ] {
            let violation = check(&workloads(image), &AdminLimits::default()).unwrap_err();
            assert_eq!(violation.field(), "spec.workloads.sidecar.image", "{image}");
            let message = violation.to_string();
            assert!(message.starts_with(&format!("spec.workloads.sidecar.image: {image} is not")), "{message}");
            assert!(message.contains("admin limit sidecarImages"), "{message}");
        }
    }

    #[test]
    fn a_digest_entry_allows_exactly_that_digest() {
        let limits = AdminLimits { sidecar_images: vec!["reg:5000/otel/col@sha256:aa".into()], ..Default::default() };
        assert!(check(&workloads("reg:5000/otel/col@sha256:aa"), &limits).is_ok());
        assert!(check(&workloads("reg:5000/otel/col:1@sha256:aa"), &limits).is_ok(), "a tag besides the digest");
        assert!(check(&workloads("reg:5000/otel/col@sha256:bb"), &limits).is_err());
        assert!(check(&workloads("reg:5000/otel/col:1"), &limits).is_err(), "a tag alone is not the digest");
    }

    #[test]
    fn a_registry_port_is_not_a_tag() {
        assert_eq!(repository_of("reg:5000/otel/col"), "reg:5000/otel/col");
        assert_eq!(repository_of("reg:5000/otel/col:1"), "reg:5000/otel/col");
        assert_eq!(repository_of("col:1"), "col");
    }

    #[test]
    fn ingress_images_and_namespaces() {
        assert_eq!(field_of(&ingress("ingress-nginx", "registry.k8s.io/ingress-nginx/controller:v1.12.1")), None);
        assert_eq!(field_of(&ingress("", "registry.k8s.io/ingress-nginx/controller-chroot:v1.12.1")), None);
        assert_eq!(field_of(&ingress("ingress-nginx", "x:broken")), Some("spec.ingress.image"));
        assert_eq!(field_of(&ingress("kube-system", "")), Some("spec.ingress.namespace"));
        let gateway = |namespace: &str| TracingPolicySpec {
            gateway: Some(crate::api::GatewaySpec { namespace: namespace.into(), ..Default::default() }),
            ..Default::default()
        };
        assert_eq!(field_of(&gateway("kube-system")), Some("spec.gateway.namespace"));
        assert_eq!(field_of(&gateway("infra")), None);
        assert_eq!(field_of(&gateway("")), None);
        let limits = AdminLimits { protected_namespaces: vec!["vault".into()], ..Default::default() };
        let violation = check(&ingress("vault", ""), &limits).unwrap_err();
        assert_eq!(
            violation.to_string(),
            "spec.ingress.namespace: vault is protected (admin limit protectedNamespaces)"
        );
    }

    #[test]
    fn a_namespace_selector_naming_a_protected_namespace_is_refused() {
        let mut spec = workloads("");
        let selector = &mut spec.workloads.as_mut().unwrap().namespace_selector;
        *selector = LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "kubernetes.io/metadata.name".into(),
                operator: "In".into(),
                values: Some(vec!["shop".into(), "kube-public".into()]),
            }]),
            ..Default::default()
        };
        assert_eq!(field_of(&spec), Some("spec.workloads.namespaceSelector"));
        let selector = &mut spec.workloads.as_mut().unwrap().namespace_selector;
        *selector = LabelSelector {
            match_labels: Some(BTreeMap::from([("kubernetes.io/metadata.name".into(), "shop".into())])),
            ..Default::default()
        };
        assert_eq!(field_of(&spec), None);
    }

    #[test]
    fn flow_targets_must_be_addresses_in_the_networks() {
        let ok = network(Some(sflow(&["127.0.0.1:6343", "[fd00::1]:6343", "10.1.2.3:6343"], 64, 128)), None);
        assert_eq!(field_of(&ok), None);
        for target in ["8.8.8.8:6343", "collector.example:6343", "[2001:db8::1]:6343", "[::ffff:10.0.0.1]:6343"] {
            let spec = network(Some(sflow(&["127.0.0.1:6343", target], 64, 128)), None);
            let violation = check(&spec, &AdminLimits::default()).unwrap_err();
            assert_eq!(violation.field(), "spec.network.sflow.targets", "{target}");
            assert!(violation.to_string().starts_with(&format!("spec.network.sflow.targets: {target} is not")));
        }
        let spec = network(None, Some(ipfix(&["192.168.0.1:4739", "172.32.0.1:4739"], 64)));
        assert_eq!(field_of(&spec), Some("spec.network.ipfix.targets"), "172.32/16 is not RFC 1918");
        let anywhere = AdminLimits {
            collector_networks: vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()],
            ..Default::default()
        };
        assert!(check(&spec, &anywhere).is_ok());
    }

    #[test]
    fn sampling_and_header_bounds() {
        let limits = AdminLimits { min_sampling: 256, ..Default::default() };
        let dense = network(Some(sflow(&["127.0.0.1:6343"], 128, 128)), None);
        let violation = check(&dense, &limits).unwrap_err();
        assert_eq!(violation.field(), "spec.network.sflow.sampling");
        assert!(violation.to_string().contains("1 in 128"), "{violation}");
        let dense = network(None, Some(ipfix(&["127.0.0.1:4739"], 100)));
        assert_eq!(check(&dense, &limits).unwrap_err().field(), "spec.network.ipfix.sampling");
        assert!(check(&network(None, Some(ipfix(&["127.0.0.1:4739"], 256))), &limits).is_ok());
        let wide = network(Some(sflow(&["127.0.0.1:6343"], 400, 512)), None);
        assert_eq!(field_of(&wide), Some("spec.network.sflow.header"));
        assert_eq!(field_of(&network(Some(sflow(&["127.0.0.1:6343"], 400, 128)), None)), None);
    }

    #[test]
    fn networks_parse_and_contain() {
        let net: Network = "172.16.0.0/12".parse().unwrap();
        assert!(net.contains("172.31.255.255".parse().unwrap()));
        assert!(!net.contains("172.32.0.0".parse().unwrap()));
        assert!(!net.contains("::1".parse().unwrap()), "other family");
        let ula: Network = "fc00::/7".parse().unwrap();
        assert!(ula.contains("fdff::1".parse().unwrap()));
        assert!(!ula.contains("fe80::1".parse().unwrap()));
        for bad in ["10.0.0.0", "10.0.0.0/33", "::/129", "x/8", ""] {
            assert!(bad.parse::<Network>().is_err(), "{bad}");
        }
    }

    /// The chart's values.yaml, rendered the way its ConfigMap template does (comma-joined lists).
    fn chart_default_data() -> BTreeMap<String, String> {
        let values: serde_yaml::Value =
            serde_yaml::from_str(include_str!("../helm/crosstrace/values.yaml")).expect("values.yaml parses");
        let limits = &values["adminLimits"];
        let list = |key: &str| {
            let items = limits[key].as_sequence().unwrap_or_else(|| panic!("adminLimits.{key} is a list"));
            items.iter().map(|v| v.as_str().unwrap().to_string()).collect::<Vec<_>>().join(",")
        };
        BTreeMap::from([
            (keys::SIDECAR_IMAGES.into(), list(keys::SIDECAR_IMAGES)),
            (keys::INGRESS_IMAGES.into(), list(keys::INGRESS_IMAGES)),
            (keys::PROTECTED_NAMESPACES.into(), list(keys::PROTECTED_NAMESPACES)),
            (keys::COLLECTOR_NETWORKS.into(), list(keys::COLLECTOR_NETWORKS)),
            (keys::MIN_SAMPLING.into(), limits[keys::MIN_SAMPLING].as_u64().unwrap().to_string()),
            (keys::MAX_HEADER_BYTES.into(), limits[keys::MAX_HEADER_BYTES].as_u64().unwrap().to_string()),
        ])
    }

    #[test]
    fn the_default_is_the_charts_default() {
        assert_eq!(AdminLimits::from_data(&chart_default_data()).unwrap(), AdminLimits::default());
    }

    #[test]
    fn the_chart_template_writes_every_key() {
        let template = include_str!("../helm/crosstrace/templates/admin-limits.yaml");
        for key in keys::ALL {
            assert!(template.contains(&format!("  {key}: ")), "admin-limits.yaml does not write {key}");
        }
    }

    #[test]
    fn loading_refuses_what_it_cannot_read() {
        let mut data = chart_default_data();
        data.insert(keys::MIN_SAMPLING.into(), "-1".into());
        assert!(matches!(AdminLimits::from_data(&data), Err(LoadError::Integer { key: "minSampling", .. })));
        data = chart_default_data();
        data.insert(keys::COLLECTOR_NETWORKS.into(), "10.0.0.0/8, 999.0.0.0/8".into());
        let error = AdminLimits::from_data(&data).unwrap_err();
        assert!(matches!(&error, LoadError::Network { value, .. } if value == "999.0.0.0/8"), "{error}");
        data = chart_default_data();
        data.remove(keys::INGRESS_IMAGES);
        assert!(matches!(AdminLimits::from_data(&data), Err(LoadError::Missing { key: "ingressImages" })));
    }

    #[test]
    fn loads_from_a_mounted_config_map() {
        let dir = std::env::temp_dir().join(format!("crosstrace-admin-limits-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (key, value) in chart_default_data() {
            std::fs::write(dir.join(key), value).unwrap();
        }
        std::fs::write(dir.join(keys::PROTECTED_NAMESPACES), "kube-system, vault ,").unwrap();
        let limits = AdminLimits::from_dir(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(limits.protected_namespaces, ["kube-system", "vault"]);
        assert!(limits.is_protected("vault") && limits.is_protected("kube-node-lease") && !limits.is_protected("shop"));
    }

    #[test]
    fn the_controller_configmap_policy_lets_it_write_its_ledgers() {
        let template = include_str!("../helm/crosstrace/templates/controller-configmap-policy.yaml");
        for name in [crate::layers::ingress::LEDGER, crate::layers::gateway::LEDGER] {
            let ledger = format!("request.name == '{name}'");
            assert!(template.contains(&ledger), "controller-configmap-policy.yaml does not name the ledger ({ledger})");
        }
    }

    #[test]
    fn the_controller_configmap_policy_allows_exactly_the_keys_the_edge_layer_writes() {
        let template = include_str!("../helm/crosstrace/templates/controller-configmap-policy.yaml");
        let start = template.find("name: otelKeys").expect("the otelKeys variable");
        let list = &template[start..];
        let list = &list[list.find('[').unwrap() + 1..list.find(']').unwrap()];
        let in_policy: std::collections::BTreeSet<&str> =
            list.split(',').map(|k| k.trim().trim_matches('\'')).filter(|k| !k.is_empty()).collect();
        let written =
            crate::layers::ingress::otel_config(&Default::default(), &Default::default(), &IngressSpec::default());
        let written: std::collections::BTreeSet<&str> = written.keys().map(String::as_str).collect();
        assert_eq!(in_policy, written);
    }
}
