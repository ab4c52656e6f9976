//! The sidecar's collector configuration, checked by the collector it is written for: every variant
//! `collector_config` can produce goes through `otelcol-k8s validate` of the release the default
//! sidecar image runs (built by `e2e/build.sh`, pinned in `e2e/versions.env`). A component renamed or
//! retired upstream, a setting moved, a value the API admits that the collector refuses: each fails
//! here, not in a user's pod.
//!
//! The binary comes from `CROSSTRACE_OTELCOL`, which `just unit` (and so `just test` and CI) sets. A
//! plain `cargo test` without it skips these checks and says so on the terminal.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crosstrace::api::validate::unsafe_values;
use crosstrace::api::{CollectorSpec, OtlpProtocol, TracingPolicySpec};
use crosstrace::controller::DEFAULT_SIDECAR_IMAGE;
use crosstrace::layers::workloads::collector_config;

const OTELCOL_ENV: &str = "CROSSTRACE_OTELCOL";

/// Endpoints the API admits, from the everyday ones to the extremes: the shortest and longest DNS
/// names (253 characters, 63-character labels), IPv4, IPv6 (compressed and the longest spelling), the
/// lowest and highest ports.
fn endpoints() -> Vec<String> {
    let label = "a".repeat(63);
    let longest_name = format!("{label}.{label}.{label}.{}", "b".repeat(61));
    assert_eq!(longest_name.len(), 253);
    vec![
        "otel-gateway.observability.svc:4317".into(),
        "otel:1".into(),
        format!("{longest_name}:65535"),
        "10.0.0.5:4317".into(),
        "255.255.255.255:65535".into(),
        "[fd00::5]:4317".into(),
        "[::1]:1".into(),
        "[fd00:ffff:ffff:ffff:ffff:ffff:255.255.255.255]:65535".into(),
    ]
}

fn spec(endpoint: &str, protocol: OtlpProtocol) -> TracingPolicySpec {
    let mut spec: TracingPolicySpec = serde_json::from_value(serde_json::json!({
        "workloads": {
            "namespaceSelector": {"matchLabels": {"tracing": "enabled"}},
            "kinds": ["Deployment", "StatefulSet", "DaemonSet"],
        },
    }))
    .expect("a valid spec");
    spec.collector = Some(CollectorSpec { endpoint: endpoint.into(), protocol });
    spec
}

/// The pinned release, `OTELCOL_VERSION` of `e2e/versions.env` without its `v`.
fn pinned_release() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/versions.env");
    let versions = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let version = versions.lines().find_map(|line| line.strip_prefix("OTELCOL_VERSION="));
    version.and_then(|v| v.strip_prefix('v')).expect("OTELCOL_VERSION=v<release> in e2e/versions.env").to_string()
}

/// The collector to check with, or `None` (announced on the terminal, past the test harness's output
/// capture) when `CROSSTRACE_OTELCOL` is unset.
fn otelcol(test: &str) -> Option<PathBuf> {
    let Some(path) = std::env::var_os(OTELCOL_ENV) else {
        let _ = writeln!(
            std::io::stderr(),
            "\nSKIPPED {test}: {OTELCOL_ENV} is not set, so no real collector checks the sidecar configuration. \
             `just unit` builds one (e2e/build.sh) and sets it.\n"
        );
        return None;
    };
    let path = PathBuf::from(path);
    assert!(path.is_file(), "{OTELCOL_ENV}={} is not a file", path.display());
    let version = Command::new(&path).arg("--version").output().expect("otelcol-k8s --version runs");
    let version = String::from_utf8_lossy(&version.stdout);
    let release = pinned_release();
    assert!(
        version.split_whitespace().any(|word| word.trim_start_matches('v') == release),
        "{} reports {version:?}, not the pinned release {release}",
        path.display()
    );
    Some(path)
}

/// The env the sidecar container has in its pod (downward API and the workload's name), which the
/// configuration's `${env:...}` references read.
const POD_ENV: [(&str, &str); 4] = [
    ("K8S_POD_NAME", "cart-7d9f8-x2x4q"),
    ("K8S_NAMESPACE_NAME", "shop"),
    ("K8S_NODE_NAME", "node-1"),
    ("K8S_WORKLOAD_NAME", "cart"),
];

/// Runs `otelcol validate` on `config` with the env the sidecar has in its pod; the collector's
/// verdict and what it said.
fn validate(otelcol: &Path, name: &str, config: &str) -> (bool, String) {
    validate_with_env(otelcol, name, config, &POD_ENV)
}

fn validate_with_env(otelcol: &Path, name: &str, config: &str, env: &[(&str, &str)]) -> (bool, String) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("collector_config");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(name);
    std::fs::write(&file, config).unwrap();
    let output = Command::new(otelcol)
        .arg("validate")
        .arg(format!("--config={}", file.display()))
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("otelcol-k8s validate runs");
    let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), said)
}

/// The component types the collector lists under their current names (`otelcol components`), by
/// section: `validate` also accepts deprecated aliases (`otlp` for `otlp_grpc`) without a word.
fn current_types(otelcol: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let output = Command::new(otelcol).arg("components").output().expect("otelcol-k8s components runs");
    assert!(output.status.success(), "otelcol-k8s components: {}", String::from_utf8_lossy(&output.stderr));
    let listed: serde_yaml::Value = serde_yaml::from_slice(&output.stdout).expect("components lists YAML");
    SECTIONS
        .iter()
        .map(|section| {
            let names = listed[*section].as_sequence().map(Vec::as_slice).unwrap_or_default();
            let names = names.iter().filter_map(|c| c["name"].as_str().map(String::from)).collect();
            (section.to_string(), names)
        })
        .collect()
}

const SECTIONS: [&str; 4] = ["receivers", "processors", "exporters", "extensions"];

/// Component ids of `config` whose type is not one of `current`: unknown, or a deprecated alias.
fn outdated_components(config: &str, current: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let config: serde_yaml::Value = serde_yaml::from_str(config).expect("the configuration is YAML");
    let mut outdated = Vec::new();
    for section in SECTIONS {
        for id in config[section].as_mapping().into_iter().flat_map(|m| m.keys()).filter_map(|k| k.as_str()) {
            let component_type = id.split_once('/').map_or(id, |(t, _)| t);
            if !current[section].contains(component_type) {
                outdated.push(format!("{section}::{id}"));
            }
        }
    }
    outdated
}

#[test]
fn the_default_sidecar_image_is_the_release_the_configuration_is_checked_with() {
    let release = pinned_release();
    assert_eq!(
        DEFAULT_SIDECAR_IMAGE.rsplit_once(':').map(|(_, tag)| tag),
        Some(release.as_str()),
        "DEFAULT_SIDECAR_IMAGE and OTELCOL_VERSION in e2e/versions.env name different releases"
    );
}

#[test]
fn every_sidecar_configuration_passes_the_collectors_validate() {
    let Some(otelcol) = otelcol("every_sidecar_configuration_passes_the_collectors_validate") else { return };
    let current = current_types(&otelcol);
    let mut checked = 0;
    for protocol in [OtlpProtocol::Grpc, OtlpProtocol::Http] {
        for endpoint in endpoints() {
            let spec = spec(&endpoint, protocol);
            assert!(unsafe_values(&spec).is_empty(), "the API refuses {endpoint}: {:?}", unsafe_values(&spec));
            let files = collector_config(&spec);
            assert_eq!(files.len(), 3, "one configuration per workload kind");
            for (file, config) in files {
                let (valid, said) = validate(&otelcol, &format!("{protocol:?}-{checked}-{file}"), &config);
                assert!(
                    valid,
                    "otelcol-k8s refuses {file} for {protocol:?} {endpoint}:\n{said}\n--- config ---\n{config}"
                );
                let outdated = outdated_components(&config, &current);
                assert!(outdated.is_empty(), "{file}: not under a current name: {outdated:?}\n{config}");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 2 * endpoints().len() * 3);
}

/// The check bites: what the collector does not know, or knows to be wrong, is refused.
#[test]
fn the_collectors_validate_refuses_unknown_components_and_bad_settings() {
    let Some(otelcol) = otelcol("the_collectors_validate_refuses_unknown_components_and_bad_settings") else { return };
    let good = collector_config(&spec("otel-gateway.observability.svc:4317", OtlpProtocol::Grpc))
        .remove("deployment.yaml")
        .unwrap();
    let (valid, said) = validate(&otelcol, "good.yaml", &good);
    assert!(valid, "the unchanged configuration must pass:\n{said}");

    for (name, config, complaint) in [
        ("misspelled-exporter.yaml", good.replace("otlp_grpc", "otlp_grcp"), "otlp_grcp"),
        ("unconfigured-batch-processor.yaml", good.replace("- resource", "- resource\n      - batch"), "batch"),
        ("batch-max-below-min.yaml", good.replace("max_size: 2048", "max_size: 256"), "max_size"),
    ] {
        assert_ne!(config, good, "{name}: the edit must change the configuration");
        let (valid, said) = validate(&otelcol, name, &config);
        assert!(!valid, "otelcol-k8s accepts {name}:\n{config}");
        assert!(said.contains(complaint), "{name}: the collector's complaint does not name {complaint:?}:\n{said}");
    }

    // `validate` takes a deprecated alias without a word (the collector logs it only when it runs); the
    // check by current names catches it.
    let alias = good.replace("otlp_grpc", "otlp");
    assert_eq!(outdated_components(&alias, &current_types(&otelcol)), ["exporters::otlp"]);

    // Outside a pod the `${env:...}` references are empty, and the resource processor refuses empty
    // values: the sidecar's env is part of its configuration.
    let (valid, said) = validate_with_env(&otelcol, "without-pod-env.yaml", &good, &[]);
    assert!(!valid, "otelcol-k8s accepts the configuration without the pod's env");
    assert!(said.contains("k8s.namespace.name"), "the complaint does not name the empty attribute:\n{said}");
}
