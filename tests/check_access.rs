//! `crosstrace check` asks, verb by verb, whether the controller's ServiceAccount may do what the
//! controller does ([`crosstrace::check::CONTROLLER_ACCESS`]). That list and the chart's RBAC must say the
//! same: a verb the chart grants but the check does not know would go unchecked, one the check asks but the
//! chart does not grant fails every `helm test`. Read from the template's text (its rules hold no template
//! expressions but the Lease's name).

use std::collections::BTreeSet;
use std::path::Path;

use crosstrace::check::{CONTROLLER_ACCESS, Scope};

#[derive(serde::Deserialize)]
struct Rule {
    #[serde(rename = "apiGroups")]
    api_groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
    #[serde(rename = "resourceNames", default)]
    resource_names: Vec<String>,
}

#[derive(serde::Deserialize)]
struct Object {
    kind: String,
    #[serde(default)]
    rules: Vec<Rule>,
}

/// (group, resource, verb, scope) of every rule of the chart's controller ClusterRole and leader Role.
fn granted() -> BTreeSet<(String, String, String, &'static str)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("helm/crosstrace/templates/controller-rbac.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let mut granted = BTreeSet::new();
    for doc in text.split("\n---\n") {
        // Template lines (labels, names) do not matter here; the Lease's name is the only expression in a rule.
        let plain: String = doc
            .lines()
            .filter(|l| !l.trim_start().starts_with("{{"))
            .map(|l| l.replace("[{{ include \"crosstrace.controllerName\" . }}]", "[LEASE]"))
            .map(|l| if l.contains("{{") { String::new() } else { l + "\n" })
            .collect();
        let object: Object = serde_yaml::from_str(&plain).unwrap_or_else(|e| panic!("{e}: {plain}"));
        for rule in object.rules {
            let scope = match (object.kind.as_str(), rule.resource_names.as_slice()) {
                ("ClusterRole", []) => "cluster",
                ("Role", []) => "own namespace",
                ("Role", [name]) if name == "LEASE" => "own lease",
                (kind, names) => panic!("a {kind} rule on {names:?}: teach this test and crosstrace check"),
            };
            for group in &rule.api_groups {
                for resource in &rule.resources {
                    for verb in &rule.verbs {
                        granted.insert((group.clone(), resource.clone(), verb.clone(), scope));
                    }
                }
            }
        }
    }
    granted
}

#[test]
fn the_check_asks_exactly_what_the_chart_grants_the_controller() {
    let checked: BTreeSet<_> = CONTROLLER_ACCESS
        .iter()
        .flat_map(|(group, resource, verbs, scope)| {
            let scope = match scope {
                Scope::Cluster => "cluster",
                Scope::OwnNamespace => "own namespace",
                Scope::OwnLease => "own lease",
            };
            verbs.iter().map(move |verb| (group.to_string(), resource.to_string(), verb.to_string(), scope))
        })
        .collect();
    let granted = granted();
    let unchecked: Vec<_> = granted.difference(&checked).collect();
    let ungranted: Vec<_> = checked.difference(&granted).collect();
    assert!(unchecked.is_empty(), "granted by the chart, not checked by crosstrace check: {unchecked:?}");
    assert!(ungranted.is_empty(), "checked by crosstrace check, not granted by the chart: {ungranted:?}");
}
