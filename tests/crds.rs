//! `crds/` (plain manifests for `kubectl apply`) and the chart's CRD templates
//! (`helm/crosstrace/templates/crds/`, the same documents behind the chart's guard) are generated from
//! the Rust types (`just crds`); this fails when the committed files are stale, so the API server never
//! gets a schema the code does not match.

use std::path::Path;

/// Every file of `dir` equals what the types generate, and nothing else is there.
fn assert_committed(dir: &str, files: &[(String, String)]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    for (name, generated) in files {
        let committed =
            std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{}/{name}: {e}", dir.display()));
        assert!(committed == *generated, "{}/{name} is stale: run `just crds` and commit the result", dir.display());
    }
    let on_disk = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(on_disk, files.len(), "{} holds files no type generates", dir.display());
}

#[test]
fn committed_crds_match_the_types() {
    assert_committed("crds", &crosstrace::api::crd_files().expect("CRDs serialize"));
}

#[test]
fn the_charts_crd_templates_match_the_types() {
    assert_committed(crosstrace::api::CHART_CRD_DIR, &crosstrace::api::crd_chart_templates().expect("CRDs serialize"));
}

/// Helm installs a chart's `crds/` once and never upgrades it: the chart must not have one.
#[test]
fn the_chart_has_no_crds_directory() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("helm/crosstrace/crds");
    assert!(!dir.exists(), "{} exists: Helm would never upgrade what is in it", dir.display());
}

/// The `openAPIV3Schema` of every CRD, by file name.
fn schemas() -> Vec<(String, serde_json::Value)> {
    crosstrace::api::crd_files()
        .unwrap()
        .into_iter()
        .map(|(name, yaml)| {
            let crd: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
            (name, crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone())
        })
        .collect()
}

/// Calls `visit` on every node of a schema with its path (`.a.b[]` for items, `.a{}` for map values).
fn walk(path: &str, schema: &serde_json::Value, visit: &mut dyn FnMut(&str, &serde_json::Value)) {
    visit(path, schema);
    if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
        for (k, v) in props {
            walk(&format!("{path}.{k}"), v, visit);
        }
    }
    if let Some(items) = schema.get("items") {
        walk(&format!("{path}[]"), items, visit);
    }
    if let Some(values) = schema.get("additionalProperties").filter(|v| v.is_object()) {
        walk(&format!("{path}{{}}"), values, visit);
    }
}

#[test]
fn every_string_list_and_map_in_the_schemas_is_bounded() {
    let mut unbounded = Vec::new();
    for (name, schema) in schemas() {
        walk(&name, &schema, &mut |path, schema| {
            // Conditions are Kubernetes' own type, bounded by the API server.
            if path.contains(".conditions[]") {
                return;
            }
            let has = |key: &str| schema.get(key).is_some();
            let string_like = schema.get("type").and_then(|t| t.as_str()) == Some("string")
                || schema.get("x-kubernetes-int-or-string") == Some(&true.into());
            let bounded = match schema.get("type").and_then(|t| t.as_str()) {
                _ if string_like => has("maxLength") || has("enum") || has("format"),
                Some("array") => has("maxItems"),
                Some("object") if has("additionalProperties") => has("maxProperties"),
                _ => true,
            };
            if !bounded {
                unbounded.push(path.to_string());
            }
        });
    }
    assert!(unbounded.is_empty(), "unbounded strings, lists or maps: {unbounded:#?}");
}

/// Every label selector in the API is checked as the API server checks a LabelSelector: a new
/// selector field declared with the upstream schema (which checks nothing) fails here.
#[test]
fn every_label_selector_is_checked_like_the_api_servers() {
    let mut selectors = Vec::new();
    let mut unchecked = Vec::new();
    for (name, schema) in schemas() {
        walk(&name, &schema, &mut |path, schema| {
            let Some(expressions) = schema.pointer("/properties/matchExpressions") else { return };
            selectors.push(path.to_string());
            let requirement = &expressions["items"];
            let checked = requirement.pointer("/properties/operator/enum")
                == Some(&serde_json::json!(["In", "NotIn", "Exists", "DoesNotExist"]))
                && requirement.get("x-kubernetes-validations").is_some()
                && requirement.pointer("/properties/key/x-kubernetes-validations").is_some()
                && requirement.pointer("/properties/values/items/x-kubernetes-validations").is_some()
                && schema.pointer("/properties/matchLabels/x-kubernetes-validations").is_some()
                && schema.pointer("/properties/matchLabels/additionalProperties/x-kubernetes-validations").is_some();
            if !checked {
                unchecked.push(path.to_string());
            }
        });
    }
    let spec = "tracingpolicies.crosstrace.dev.yaml.spec";
    for field in [
        ".ingress.selector",
        ".gateway.selector",
        ".workloads.namespaceSelector",
        ".workloads.selector",
        ".network.nodeSelector",
    ] {
        assert!(selectors.contains(&format!("{spec}{field}")), "{field} is a selector: {selectors:?}");
    }
    assert!(unchecked.is_empty(), "selectors without the API server's checks: {unchecked:#?}");
}

/// Every bad sample says which field its refusal must name, and that field is in the schema (the
/// e2e test applies each one to the real API server and checks the message names the field).
#[test]
fn every_bad_sample_names_a_field_of_the_schema() {
    let (_, schema) = schemas().into_iter().find(|(name, _)| name.starts_with("tracingpolicies")).unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/samples/bad");
    let mut samples = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let doc: serde_json::Value = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(doc["kind"], "TracingPolicy", "{}", path.display());
        let expected = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect-error: "))
            .unwrap_or_else(|| panic!("{} says no `# expect-error: <field>`", path.display()));
        // The first field named, without list indexes or map keys: `spec.a.b[0].c` -> spec, a, b, c.
        let field = expected.split(',').next().unwrap().trim();
        let mut node = &schema;
        for part in field.split('.') {
            let name = part.split('[').next().unwrap();
            node = node
                .pointer(&format!("/properties/{name}"))
                .or_else(|| node.pointer(&format!("/items/properties/{name}")))
                .unwrap_or_else(|| panic!("{}: {field} is not a field of the schema", path.display()));
        }
        samples += 1;
    }
    assert!(samples >= 30, "one bad sample per class, found {samples}");
}

/// The range an integer of this OpenAPI format can hold on the wire; `None` for a format this test
/// does not know (it then fails, so a new format is looked at rather than let through).
fn wire_range(format: Option<&str>) -> Option<(f64, f64)> {
    match format {
        Some("int32") => Some((i32::MIN.into(), i32::MAX.into())),
        Some("uint32") => Some((0.0, u32::MAX.into())),
        // The API server holds bounds as float64 and converts them back to int64, so the bound must be a
        // float64 below 2^63 (i64::MAX rounds up to 2^63 and overflows): at most 2^63 - 1024.
        Some("int64") => Some((i64::MIN as f64, 2f64.powi(63) - 1024.0)),
        _ => None,
    }
}

#[test]
fn every_integer_in_the_schemas_is_bounded_to_its_wire_width() {
    let mut unbounded = Vec::new();
    let mut integers = 0;
    for (name, schema) in schemas() {
        walk(&name, &schema, &mut |path, schema| {
            // Conditions are Kubernetes' own type, bounded by the API server.
            if path.contains(".conditions[]") || schema.get("type").and_then(|t| t.as_str()) != Some("integer") {
                return;
            }
            integers += 1;
            let bound = |key: &str| schema.get(key).and_then(serde_json::Value::as_f64);
            let format = schema.get("format").and_then(|f| f.as_str());
            match (wire_range(format), bound("minimum"), bound("maximum")) {
                (Some((low, high)), Some(min), Some(max)) if low <= min && min <= max && max <= high => {}
                (range, min, max) => unbounded
                    .push(format!("{path}: format {format:?} (range {range:?}), minimum {min:?}, maximum {max:?}")),
            }
        });
    }
    assert!(integers > 10, "the schemas have integers to check, found {integers}");
    assert!(unbounded.is_empty(), "integers not bounded within their wire width: {unbounded:#?}");
}
