//! `crds/` and the chart's `crds/` are generated from the Rust types (`just crds`); this fails when
//! the committed files are stale, so the API server never gets a schema the code does not match.

use std::path::Path;

#[test]
fn committed_crds_match_the_types() {
    let files = crosstrace::api::crd_files().expect("CRDs serialize");
    for dir in ["crds", "helm/crosstrace/crds"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        for (name, generated) in &files {
            let committed =
                std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{}/{name}: {e}", dir.display()));
            assert!(
                committed == *generated,
                "{}/{name} is stale: run `just crds` and commit the result",
                dir.display()
            );
        }
        let on_disk = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(on_disk, files.len(), "{} holds files no type generates", dir.display());
    }
}

#[test]
fn every_string_and_list_in_the_schemas_is_bounded() {
    fn walk(path: &str, schema: &serde_json::Value, unbounded: &mut Vec<String>) {
        // LabelSelector and ResourceRequirements are Kubernetes' own types, bounded by the API server.
        if path.ends_with("Selector")
            || path.ends_with("selector")
            || path.ends_with(".resources")
            || path.contains(".conditions[]")
        {
            return;
        }
        match schema.get("type").and_then(|t| t.as_str()) {
            Some("string")
                if schema.get("maxLength").is_none()
                    && schema.get("enum").is_none()
                    && schema.get("format").is_none() =>
            {
                unbounded.push(path.to_string())
            }
            Some("array") if schema.get("maxItems").is_none() => unbounded.push(path.to_string()),
            _ => {}
        }
        if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
            for (k, v) in props {
                walk(&format!("{path}.{k}"), v, unbounded);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(&format!("{path}[]"), items, unbounded);
        }
    }
    let mut unbounded = Vec::new();
    for (name, yaml) in crosstrace::api::crd_files().unwrap() {
        let crd: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        walk(&name, schema, &mut unbounded);
    }
    assert!(unbounded.is_empty(), "unbounded strings or lists: {unbounded:#?}");
}
