//! What a `TracingPolicy` value must look like before it may reach another program: ingress-nginx's
//! TOML template, Open vSwitch, the OpenTelemetry Collector, a Pod template. Each rule is CEL that the
//! API server runs (Kubernetes 1.31+ libraries: `isIP`/`ip`, `isQuantity`/`quantity`, `format.*`), so
//! a hostile or malformed policy is refused at admission with a message the API server prefixes with
//! the field's path. The schemas for Kubernetes' own `LabelSelector` and `ResourceRequirements` are
//! written here because the upstream ones bound nothing and check neither operators nor quantities.

use kube::core::{Message, Rule};
use schemars::{Schema, SchemaGenerator, json_schema};
use serde_json::{Value, json};

/// A port, 1..=65535, as a regular expression.
const PORT: &str = "([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])";

/// Longest `host:port` accepted: a 253-character DNS name, `:` and five digits.
pub const MAX_ENDPOINT: u32 = 260;
/// Longest flow target: a bracketed 45-character IPv6 address, `:` and five digits.
pub const MAX_FLOW_TARGET: u32 = 54;
/// Longest sFlow agent: an IPv6 address written with an embedded IPv4 address.
pub const MAX_AGENT: u32 = 45;
/// Longest OVS bridge or interface name (Linux's IFNAMSIZ less the terminating NUL).
pub const MAX_OVS_NAME: u32 = 15;
/// Longest image reference: a 255-character name, a 128-character tag and a sha256 digest.
pub const MAX_IMAGE: u32 = 512;

/// CEL that is true when `subject` (a CEL expression of a string) is `host:port` with a port in
/// 1..=65535 and host a bracketed IPv6 address, an IPv4 address or, when `dns` is set, a lowercase DNS
/// name (RFC 1123 subdomain). A dotted string of digits is held to be an IPv4 address, so `999.1.1.1`
/// is refused, not looked up.
fn host_port(subject: &str, dns: bool) -> String {
    // The shape leaves one ':' outside brackets, so the host is everything before the first ':' or
    // inside the brackets.
    let unbracketed = if dns { "[a-z0-9.-]+" } else { "[0-9.]+" };
    let shape = format!(r"^(\\[[0-9a-fA-F:.]+\\]|{unbracketed}):{PORT}$");
    let ipv6 = format!("{subject}.substring(1, {subject}.indexOf(']'))");
    let host = format!("{subject}.substring(0, {subject}.indexOf(':'))");
    let unbracketed_is_address = if dns {
        format!("{host}.matches('^[0-9.]+$') ? isIP({host}) : !format.dns1123Subdomain().validate({host}).hasValue()")
    } else {
        format!("isIP({host})")
    };
    format!(
        "{subject}.matches('{shape}') && ({subject}.startsWith('[') ? isIP({ipv6}) && ip({ipv6}).family() == 6 : {unbracketed_is_address})"
    )
}

/// The collector endpoint: `host:port`, host a DNS name, an IPv4 or a bracketed IPv6 address. Empty is
/// left to the spec-level rule that requires an endpoint when a layer needs one.
pub fn collector_endpoint() -> Rule {
    Rule::new(format!("self == '' || ({})", host_port("self", true))).message(
        "must be host:port, host a lowercase DNS name, an IPv4 address or a bracketed IPv6 address, port in \
         1-65535, e.g. otel-gateway.observability.svc:4317 or [fd00::5]:4317",
    )
}

/// A sampling ratio: a decimal string in [0, 1] with at most 6 decimals (Kubernetes APIs avoid floats).
pub fn ratio() -> Rule {
    Rule::new("self.matches('^(0(\\\\.[0-9]{1,6})?|1(\\\\.0{1,6})?|\\\\.[0-9]{1,6})$')")
        .message("must be a decimal string between 0 and 1 with at most 6 decimals, e.g. \"0.25\"")
}

/// Flow collectors: Open vSwitch sends sFlow and IPFIX to addresses, never to names.
pub fn flow_targets(example: &str) -> Rule {
    Rule::new(format!("self.all(t, {})", host_port("t", false))).message(Message::Message(format!(
        "every target must be IPv4:port or [IPv6]:port with a port in 1-65535, e.g. {example}"
    )))
}

/// An OTel service name, conservatively: letters, digits, '.', '_', '-', starting alphanumeric.
pub const SERVICE_NAME: &str = "^[A-Za-z0-9][A-Za-z0-9._-]*$";

/// The OTel service name: ingress-nginx renders it unescaped into a TOML string, so nothing that could
/// close the string or start a line (quotes, backslashes, control characters) gets through.
pub fn service_name() -> Rule {
    Rule::new(format!("self.matches('{SERVICE_NAME}')"))
        .message("must be a service name of letters, digits, '.', '_' and '-', starting with a letter or digit")
}

/// A Linux network device name as Open vSwitch takes it, kept to a conservative charset.
pub const OVS_NAME: &str = "^[A-Za-z0-9_.-]{1,15}$";

/// An Open vSwitch bridge: a Linux network device name (1-15 characters, no '/', whitespace or control
/// characters, not `.` or `..`).
pub fn ovs_bridge() -> Rule {
    Rule::new(format!("self.matches('{OVS_NAME}') && self != '.' && self != '..'"))
        .message("must be an OVS bridge name: 1-15 letters, digits, '_', '.' or '-', not '.' or '..'")
}

/// The sFlow agent: an interface name (as a bridge name) or an IPv4/IPv6 address; empty = OVS's choice.
/// A dotted string of digits must be an IPv4 address (`1.2.3.999` is refused, not taken for a name).
pub fn sflow_agent() -> Rule {
    Rule::new(format!("self == '' || isIP(self) || (!self.matches('^[0-9.]+$') && self.matches('{OVS_NAME}'))"))
        .message("must be an interface name (1-15 letters, digits, '_', '.' or '-') or an IPv4/IPv6 address")
}

/// A namespace name (RFC 1123 label); empty when the field means "every namespace".
pub fn namespace_or_empty() -> Rule {
    Rule::new("self == '' || !format.dns1123Label().validate(self).hasValue()").message(
        "must be a namespace name: at most 63 lowercase letters, digits and '-', starting and ending alphanumeric",
    )
}

/// An image reference, `[registry[:port]/]repository[:tag][@sha256:digest]`, after the distribution
/// reference grammar: a registry is `localhost`, a dotted host or a host with a port (else the first
/// component is part of the repository), then lowercase path components joined by `.`, `_`, `__` or
/// dashes, a tag of at most 128 characters, a sha256 digest.
pub const IMAGE_REFERENCE: &str = concat!(
    "^(((localhost|[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?([.][A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)+)(:[0-9]{1,5})?",
    "|[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?:[0-9]{1,5})/)?",
    "[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*(/[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*)*",
    "(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?$",
);

/// An image reference (see [`IMAGE_REFERENCE`]); empty = the default.
pub fn image_reference_or_empty() -> Rule {
    Rule::new(format!("self == '' || self.matches('{IMAGE_REFERENCE}')")).message(
        "must be an image reference, registry/repository[:tag][@sha256:digest], e.g. \
         otel/opentelemetry-collector-contrib:0.120.0",
    )
}

/// Bounds of a label selector: at most this many expressions, values per expression and labels.
const MAX_SELECTOR_EXPRESSIONS: u32 = 16;
const MAX_SELECTOR_VALUES: u32 = 64;
const MAX_MATCH_LABELS: u32 = 32;
/// Longest label key: a 253-character DNS prefix, '/', a 63-character name.
const MAX_LABEL_KEY: u32 = 317;
const MAX_LABEL_VALUE: u32 = 63;

const LABEL_KEY_IS_VALID: &str = "!format.qualifiedName().validate(self).hasValue()";
const LABEL_KEY_MESSAGE: &str = "must be a label key: an optional DNS subdomain prefix and '/', then at most 63 letters, digits, '-', '_' or '.', starting and ending alphanumeric";
const LABEL_VALUE_IS_VALID: &str = "!format.labelValue().validate(self).hasValue()";
const LABEL_VALUE_MESSAGE: &str =
    "must be a label value: at most 63 letters, digits, '-', '_' or '.', starting and ending alphanumeric";

fn rule(rule: &str, message: &str) -> Value {
    json!({"rule": rule, "message": message})
}

fn label_selector(nullable: bool) -> Schema {
    let label_value = json!({
        "type": "string",
        "maxLength": MAX_LABEL_VALUE,
        "x-kubernetes-validations": [rule(LABEL_VALUE_IS_VALID, LABEL_VALUE_MESSAGE)],
    });
    let mut schema = json_schema!({
        "type": "object",
        "description": "A label selector, checked as the API server checks LabelSelectors.",
        "properties": {
            "matchExpressions": {
                "type": "array",
                "maxItems": MAX_SELECTOR_EXPRESSIONS,
                "description": "Requirements, ANDed.",
                "items": {
                    "type": "object",
                    "required": ["key", "operator"],
                    "properties": {
                        "key": {
                            "type": "string",
                            "maxLength": MAX_LABEL_KEY,
                            "x-kubernetes-validations": [rule(LABEL_KEY_IS_VALID, LABEL_KEY_MESSAGE)],
                        },
                        "operator": {"type": "string", "enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                        "values": {"type": "array", "maxItems": MAX_SELECTOR_VALUES, "items": label_value},
                    },
                    "x-kubernetes-validations": [rule(
                        "self.operator in ['In', 'NotIn'] ? (has(self.values) && size(self.values) > 0) : (!has(self.values) || size(self.values) == 0)",
                        "values must be non-empty when operator is In or NotIn, and empty when it is Exists or DoesNotExist",
                    )],
                },
            },
            "matchLabels": {
                "type": "object",
                "maxProperties": MAX_MATCH_LABELS,
                "description": "Labels that must all match.",
                "additionalProperties": label_value,
                "x-kubernetes-validations": [rule(
                    &format!("self.all(k, size(k) <= {MAX_LABEL_KEY} && !format.qualifiedName().validate(k).hasValue())"),
                    &format!("every key {LABEL_KEY_MESSAGE}"),
                )],
            },
        },
    });
    if nullable {
        schema.insert("nullable".into(), true.into());
    }
    schema
}

/// Schema of a required `LabelSelector` field.
pub fn required_label_selector(_: &mut SchemaGenerator) -> Schema {
    label_selector(false)
}

/// Schema of an optional `LabelSelector` field.
pub fn optional_label_selector(_: &mut SchemaGenerator) -> Schema {
    label_selector(true)
}

/// The resources a collector sidecar may ask for. Three also keeps the quantity rules within the API
/// server's CEL cost budget (a quantity may be written as a number, so its length is unknown to it).
const SIDECAR_RESOURCES: [&str; 3] = ["cpu", "memory", "ephemeral-storage"];
/// Longest quantity written as a string (`9223372036854775807` has 19 digits; room for a suffix).
const MAX_QUANTITY: u32 = 32;

/// Schema of an optional `ResourceRequirements`: limits and requests are maps of resource name to a
/// non-negative quantity, every request at most its limit, and no resource claims (a sidecar injected
/// into someone else's Pod must not claim devices).
pub fn optional_resource_requirements(_: &mut SchemaGenerator) -> Schema {
    let quantities = |description: &str| {
        json!({
            "type": "object",
            "description": description,
            "maxProperties": SIDECAR_RESOURCES.len(),
            "additionalProperties": {
                "x-kubernetes-int-or-string": true,
                "maxLength": MAX_QUANTITY,
                "x-kubernetes-validations": [rule(
                    "isQuantity(string(self)) && quantity(string(self)).compareTo(quantity('0')) >= 0",
                    "must be a non-negative quantity, e.g. 100m or 64Mi",
                )],
            },
            "x-kubernetes-validations": [rule(
                &format!("self.all(k, k in {SIDECAR_RESOURCES:?})"),
                "every key must be cpu, memory or ephemeral-storage",
            )],
        })
    };
    let requests_within_limits = Rule::new(
        "!has(self.requests) || !has(self.limits) || self.requests.all(r, !(r in self.limits) || \
         !isQuantity(string(self.requests[r])) || !isQuantity(string(self.limits[r])) || \
         quantity(string(self.requests[r])).compareTo(quantity(string(self.limits[r]))) <= 0)",
    )
    .message("every request must be at most the limit of the same resource")
    .field_path(".requests");
    json_schema!({
        "type": "object",
        "nullable": true,
        "description": "Resources of the sidecar; absent = the operator's default.",
        "properties": {
            "limits": quantities("The most of each resource the sidecar may use."),
            "requests": quantities("What the sidecar is scheduled with; each at most its limit."),
            "claims": {
                "type": "array",
                "maxItems": 1,
                "description": "Must be empty: the sidecar claims no dynamic resources.",
                "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                "x-kubernetes-validations": [rule(
                    "size(self) == 0",
                    "must be empty: a sidecar injected into other teams' Pods claims no dynamic resources",
                )],
            },
        },
        "x-kubernetes-validations": [serde_json::to_value(requests_within_limits).expect("a rule serializes")],
    })
}

#[cfg(test)]
mod tests {
    //! The regular expressions, run here with the `regex` crate (RE2 syntax, as the API server's CEL
    //! `matches`); the whole rules, with `isIP`, `quantity` and `format`, run against the real API
    //! server in the e2e test of `config/samples/bad/`.

    use super::*;
    use regex::Regex;

    fn matches(pattern: &str, value: &str) -> bool {
        Regex::new(pattern).unwrap().is_match(value)
    }

    #[test]
    fn service_names_that_could_break_out_of_a_toml_string_are_refused() {
        for good in ["ingress-nginx", "edge", "Edge_gateway.eu-1", "0"] {
            assert!(matches(SERVICE_NAME, good), "{good}");
        }
        for bad in ["x\"\n[exporters.otlp]\nhost = \"evil\"\n#", "a\\b", "a b", "-edge", ".edge", "", "é", "a\tb"] {
            assert!(!matches(SERVICE_NAME, bad), "{bad:?}");
        }
    }

    #[test]
    fn ovs_names_are_short_device_names() {
        for good in ["br-int", "br-ex.100", "eth0", "a", "abcdefghijklmno"] {
            assert!(matches(OVS_NAME, good), "{good}");
        }
        for bad in ["br/int", "br int", "abcdefghijklmnop", "", "br\nint", "br:0"] {
            assert!(!matches(OVS_NAME, bad), "{bad:?}");
        }
    }

    #[test]
    fn image_references_follow_the_distribution_grammar() {
        let digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        for good in [
            "nginx".to_string(),
            "otel/opentelemetry-collector-contrib:0.120.0".into(),
            "registry.k8s.io/ingress-nginx/controller:v1.12.1".into(),
            "localhost:5000/collector".into(),
            format!("registry.example.com:5000/team/collector:v1@{digest}"),
            format!("ghcr.io/a/b@{digest}"),
            "a__b/c---d:TAG_1.x".into(),
            "Registry.Example.com/team/app".into(),
            "myhost:5000/app:1".into(),
        ] {
            assert!(matches(IMAGE_REFERENCE, &good), "{good}");
        }
        for bad in [
            "",
            "nginx:",
            "UPPER/case",
            "Team/app",
            "a//b",
            "../x",
            "x y",
            "ghcr.io/a/b@sha256:abc",
            "registry.k8s.io/ingress-nginx/controller:v1.12.1 --privileged",
            "a:b:c",
            "-a/b",
        ] {
            assert!(!matches(IMAGE_REFERENCE, bad), "{bad:?}");
        }
        let long_tag = format!("nginx:{}", "t".repeat(129));
        assert!(!matches(IMAGE_REFERENCE, &long_tag));
    }

    #[test]
    fn ports_are_one_to_65535() {
        let port = format!("^{PORT}$");
        for good in ["1", "80", "4317", "9999", "10000", "59999", "64999", "65499", "65529", "65535"] {
            assert!(matches(&port, good), "{good}");
        }
        for bad in ["0", "00", "080", "65536", "65540", "66000", "99999", "100000", ""] {
            assert!(!matches(&port, bad), "{bad:?}");
        }
    }

    #[test]
    fn selector_schemas_bound_and_check_every_part() {
        let schema = serde_json::to_value(optional_label_selector(&mut SchemaGenerator::default())).unwrap();
        assert_eq!(schema["nullable"], true);
        let expression = &schema["properties"]["matchExpressions"];
        assert_eq!(expression["maxItems"], MAX_SELECTOR_EXPRESSIONS);
        let operators = &expression["items"]["properties"]["operator"]["enum"];
        assert_eq!(operators, &serde_json::json!(["In", "NotIn", "Exists", "DoesNotExist"]));
        assert_eq!(expression["items"]["properties"]["values"]["maxItems"], MAX_SELECTOR_VALUES);
        assert_eq!(schema["properties"]["matchLabels"]["maxProperties"], MAX_MATCH_LABELS);
        let required = serde_json::to_value(required_label_selector(&mut SchemaGenerator::default())).unwrap();
        assert!(required.get("nullable").is_none());
    }
}
