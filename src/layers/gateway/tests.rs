//! The gateway layer's plans, table by table: pure, no client.

use super::*;
use crate::api::{CollectorSpec, RolloutSpec, SamplingSpec, TracingPolicySpec};

const NOW: i64 = 1_000_000;

fn spec(ratio: &str) -> TracingPolicySpec {
    TracingPolicySpec {
        collector: Some(CollectorSpec { endpoint: "otel.observability.svc:4317".into(), ..Default::default() }),
        sampling: SamplingSpec { ratio: ratio.into(), parent_based: true },
        gateway: Some(GatewaySpec { service_name: "edge".into(), ..Default::default() }),
        rollout: RolloutSpec { progress_deadline_seconds: 60, ..Default::default() },
        ..Default::default()
    }
}

fn view(spec: &TracingPolicySpec) -> PolicyView<'_> {
    PolicyView { generation: 2, ..PolicyView::new("edge", spec) }
}

fn object(kind: Kind, namespace: &str, name: &str, rest: Value) -> DynamicObject {
    let mut value = json!({
        "apiVersion": kind.api_version(),
        "kind": format!("{kind:?}"),
        "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"), "generation": 1, "resourceVersion": "1"},
    });
    value.as_object_mut().unwrap().extend(rest.as_object().cloned().unwrap_or_default());
    serde_json::from_value(value).unwrap()
}

fn gateway(name: &str, infrastructure: Option<Value>) -> DynamicObject {
    let mut spec =
        json!({"gatewayClassName": "class", "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]});
    if let Some(i) = infrastructure {
        spec["infrastructure"] = i;
    }
    object(Kind::Gateway, "infra", name, json!({"spec": spec}))
}

/// Sets what the provider's controller reports on a Gateway, for its current generation.
fn report(g: &mut DynamicObject, accepted: &str, programmed: &str) {
    let generation = g.metadata.generation.unwrap();
    let condition = |type_: &str, status: &str| json!({"type": type_, "status": status, "reason": if status == "True" { type_ } else { "Invalid" }, "message": "", "observedGeneration": generation});
    g.data["status"] = json!({"conditions": [condition("Accepted", accepted), condition("Programmed", programmed)]});
}

fn target(provider: &str, g: DynamicObject) -> Observed {
    Observed {
        key: ObjectKey::of(&g.metadata),
        uid: g.metadata.uid.clone().unwrap(),
        gateway: Some(g),
        class: Some(Class { controller_name: provider.into(), parameters_ref: None }),
        selected: true,
        installed: [Kind::EnvoyProxy, Kind::NginxProxy, Kind::ObservabilityPolicy, Kind::Telemetry].into(),
        ..Default::default()
    }
}

fn with_object(mut t: Observed, o: DynamicObject) -> Observed {
    let kind = match o.types.as_ref().map(|t| t.kind.as_str()) {
        Some("EnvoyProxy") => Kind::EnvoyProxy,
        Some("NginxProxy") => Kind::NginxProxy,
        Some("ObservabilityPolicy") => Kind::ObservabilityPolicy,
        _ => Kind::Telemetry,
    };
    let r = Ref::new(kind, o.metadata.namespace.as_deref().unwrap(), &o.name_any());
    t.objects.insert(r, o);
    t
}

/// RFC 7386, as the API server applies a merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// What the API server holds after the actions (a spec change bumps a generation).
fn applied(mut t: Observed, actions: &[Action]) -> Observed {
    for action in actions {
        match action {
            Action::Record { record, .. } => t.record = Ok(record.clone()),
            Action::Apply { target, body } => {
                let mut o: DynamicObject = serde_json::from_value(body.clone()).unwrap();
                o.metadata.generation = Some(1);
                t.objects.insert(target.clone(), o);
            }
            Action::Patch { target, patch, .. } if target.kind == Kind::Gateway => {
                let g = t.gateway.as_mut().unwrap();
                merge(&mut g.data, patch);
                g.metadata.generation = Some(g.metadata.generation.unwrap() + 1);
            }
            Action::Patch { target, patch, .. } => {
                let o = t.objects.get_mut(target).unwrap();
                let mut data = o.data.clone();
                merge(&mut data, patch);
                o.data = data;
            }
            Action::Delete { target } => {
                t.objects.remove(target);
            }
        }
    }
    t
}

fn healthy(mut t: Observed) -> Observed {
    report(t.gateway.as_mut().unwrap(), "True", "True");
    t
}

fn run(s: &TracingPolicySpec, t: &Observed, now: i64) -> Plan {
    plan(view(s), &Config { istio_provider: Some("otel".into()) }, std::slice::from_ref(t), now)
}

#[test]
fn ratios_map_exactly_where_the_provider_can() {
    let rows = [
        ("0.25", (1, 4), 25.0, (25, false)),
        ("0.333", (333, 1000), 33.3, (33, true)),
        ("1", (1, 1), 100.0, (100, false)),
        ("1.0", (1, 1), 100.0, (100, false)),
        ("0", (0, 1), 0.0, (0, false)),
        (".5", (1, 2), 50.0, (50, false)),
        ("0.000001", (1, 1_000_000), 0.0001, (0, true)),
        ("0.125", (1, 8), 12.5, (13, true)),
    ];
    for (ratio, fraction_, percent_, integer) in rows {
        assert_eq!(fraction(ratio), fraction_, "{ratio}");
        assert!((percent(ratio) - percent_).abs() < 1e-9, "{ratio}: {}", percent(ratio));
        assert_eq!(integer_percent(ratio), integer, "{ratio}");
    }
}

#[test]
fn the_collector_is_a_backend_ref_when_it_is_a_service_name() {
    let rows = [
        (
            "otel.observability.svc:4317",
            json!({"backendRefs": [{"name": "otel", "namespace": "observability", "port": 4317}]}),
        ),
        (
            "otel.observability.svc.cluster.local:4317",
            json!({"backendRefs": [{"name": "otel", "namespace": "observability", "port": 4317}]}),
        ),
        ("collector.example.com:4317", json!({"host": "collector.example.com", "port": 4317})),
        ("10.0.0.5:4317", json!({"host": "10.0.0.5", "port": 4317})),
        ("[fd00::5]:4317", json!({"host": "fd00::5", "port": 4317})),
    ];
    for (endpoint, want) in rows {
        assert_eq!(envoy_collector(endpoint), want, "{endpoint}");
    }
}

#[test]
fn merge_patches_turn_one_value_into_exactly_the_other() {
    let rows = [
        (
            Some(json!({"a": 1, "b": {"c": 2, "d": 3}})),
            Some(json!({"a": 1, "b": {"c": 4}})),
            json!({"b": {"c": 4, "d": null}}),
        ),
        (None, Some(json!({"x": 1})), json!({"x": 1})),
        (Some(json!({"x": 1})), None, Value::Null),
        (Some(json!(3)), Some(json!({"y": 2})), json!({"y": 2})),
    ];
    for (from, to, want) in rows {
        let patch = merge_patch(from.as_ref(), to.as_ref());
        assert_eq!(patch, want);
        let mut doc = json!({"v": from});
        merge(&mut doc, &json!({"v": patch}));
        assert_eq!(doc.get("v").filter(|v| !v.is_null()), to.as_ref());
    }
}

#[test]
fn an_envoy_gateway_gets_its_own_envoy_proxy_then_converges_with_no_write() {
    let s = spec("0.25");
    let t = target(ENVOY_GATEWAY, gateway("public", None));
    let first = run(&s, &t, NOW);
    let [
        Action::Record { record: Some(record), .. },
        Action::Apply { target: own, body },
        Action::Patch { target: gw, patch, .. },
    ] = &first.actions[..]
    else {
        panic!("{:#?}", first.actions)
    };
    assert_eq!(record.infrastructure, Some(OriginalInfrastructure { existed: false, parameters_ref: None }));
    assert_eq!(record.created, vec![own.clone()]);
    assert_eq!((own.kind, own.name.as_str()), (Kind::EnvoyProxy, "crosstrace-public"));
    let tracing = &body["spec"]["telemetry"]["tracing"];
    assert_eq!(tracing["samplingFraction"], json!({"numerator": 1, "denominator": 4}));
    assert_eq!(tracing["provider"]["type"], "OpenTelemetry");
    assert_eq!(tracing["provider"]["serviceName"], "edge");
    assert!(body["spec"].get("mergeType").is_none(), "no class-level EnvoyProxy to keep");
    assert_eq!(gw.kind, Kind::Gateway);
    assert_eq!(
        patch["spec"]["infrastructure"]["parametersRef"],
        json!({"group": "gateway.envoyproxy.io", "kind": "EnvoyProxy", "name": "crosstrace-public"})
    );
    assert_eq!(first.report.in_flight, 1);

    // Written; the Gateway is not programmed yet for its new generation.
    let written = applied(t, &first.actions);
    let waiting = run(&s, &written, NOW + 10);
    assert!(waiting.actions.is_empty(), "{:?}", waiting.actions);
    assert_eq!(waiting.report.in_flight, 1);

    let ready = healthy(written);
    let mark = run(&s, &ready, NOW + 11);
    assert!(matches!(&mark.actions[..], [Action::Record { record: Some(r), .. }] if r.converged));
    let converged = applied(ready, &mark.actions);
    let idle = run(&s, &converged, NOW + 12);
    assert!(idle.actions.is_empty(), "{:?}", idle.actions);
    assert_eq!((idle.report.selected, idle.report.ready), (1, 1));

    // Delete: the Gateway first, then crosstrace's EnvoyProxy, then the ledger entry.
    let deleting = PolicyView { deleting: true, ..view(&s) };
    let revert = plan(deleting, &Config::default(), std::slice::from_ref(&converged), NOW + 13);
    match &revert.actions[..] {
        [Action::Patch { target: g, patch, .. }, Action::Delete { target: d }, Action::Record { record: None, .. }] => {
            assert_eq!(g.kind, Kind::Gateway);
            assert_eq!(patch, &json!({"spec": {"infrastructure": null}}));
            assert_eq!(d.name, "crosstrace-public");
        }
        other => panic!("{other:#?}"),
    }
    let reverted = applied(converged, &revert.actions);
    assert_eq!(reverted.gateway.unwrap().data["spec"], gateway("public", None).data["spec"]);
}

#[test]
fn an_envoy_proxy_the_gateway_already_uses_is_merged_and_restored_exactly() {
    let s = spec("0.25");
    let reference =
        json!({"parametersRef": {"group": "gateway.envoyproxy.io", "kind": "EnvoyProxy", "name": "custom"}});
    let owners = object(
        Kind::EnvoyProxy,
        "infra",
        "custom",
        json!({"spec": {"logging": {"level": {"default": "warn"}}, "telemetry": {"metrics": {"prometheus": {"disable": true}}}}}),
    );
    let before = owners.data.clone();
    let t = with_object(target(ENVOY_GATEWAY, gateway("public", Some(reference.clone()))), owners);
    let first = run(&s, &t, NOW);
    let [Action::Record { record: Some(record), .. }, Action::Patch { target, patch, resource_version }] =
        &first.actions[..]
    else {
        panic!("{:#?}", first.actions)
    };
    assert_eq!(target.name, "custom");
    assert_eq!(resource_version.as_deref(), Some("1"), "written only over what was observed");
    assert_eq!(record.merged[0].original, None);
    assert_eq!(record.merged[0].absent_parents, 0, "spec.telemetry existed");
    assert!(record.created.is_empty() && record.infrastructure.is_none());
    assert_eq!(patch["spec"]["telemetry"]["tracing"]["samplingFraction"]["denominator"], 4);

    // The owner changes their own fields meanwhile: not crosstrace's business, no write.
    let mut written = healthy(applied(t, &first.actions));
    let owners = written.objects.values_mut().next().unwrap();
    owners.data["spec"]["logging"]["level"]["default"] = json!("debug");
    let converged = applied(written.clone(), &run(&s, &written, NOW + 1).actions);
    assert!(run(&s, &converged, NOW + 2).actions.is_empty());

    let deleting = PolicyView { deleting: true, ..view(&s) };
    let revert = plan(deleting, &Config::default(), std::slice::from_ref(&converged), NOW + 3);
    let reverted = applied(converged, &revert.actions);
    let mut expected = before;
    expected["spec"]["logging"]["level"]["default"] = json!("debug");
    assert_eq!(reverted.objects.values().next().unwrap().data, expected, "only crosstrace's field went back");
    assert_eq!(reverted.gateway.unwrap().data["spec"]["infrastructure"], reference);
    assert!(reverted.record.unwrap().is_none());
}

#[test]
fn a_telemetry_section_crosstrace_added_goes_again_on_revert() {
    let s = spec("0.5");
    let reference =
        json!({"parametersRef": {"group": "gateway.envoyproxy.io", "kind": "EnvoyProxy", "name": "custom"}});
    let owners = object(Kind::EnvoyProxy, "infra", "custom", json!({"spec": {"logging": {}}}));
    let before = owners.data.clone();
    let t = with_object(target(ENVOY_GATEWAY, gateway("public", Some(reference))), owners);
    let written = applied(t.clone(), &run(&s, &t, NOW).actions);
    let Ok(Some(record)) = &written.record else { panic!() };
    assert_eq!(record.merged[0].absent_parents, 1);
    let revert =
        plan(PolicyView { deleting: true, ..view(&s) }, &Config::default(), std::slice::from_ref(&written), NOW);
    let reverted = applied(written, &revert.actions);
    assert_eq!(reverted.objects.values().next().unwrap().data, before);
}

#[test]
fn a_gateway_class_envoy_proxy_is_kept_by_a_strategic_merge() {
    let s = spec("0.25");
    let mut t = target(ENVOY_GATEWAY, gateway("public", None));
    t.class.as_mut().unwrap().parameters_ref = Some(
        json!({"group": "gateway.envoyproxy.io", "kind": "EnvoyProxy", "name": "class-wide", "namespace": "envoy-gateway-system"}),
    );
    let first = run(&s, &t, NOW);
    let Some(Action::Apply { body, .. }) = first.actions.get(1) else { panic!("{:#?}", first.actions) };
    assert_eq!(body["spec"]["mergeType"], "StrategicMerge");
}

#[test]
fn an_nginx_gateway_fabric_gateway_gets_an_nginx_proxy_and_a_policy_per_route() {
    let s = spec("0.333");
    let mut t = target(NGINX_GATEWAY_FABRIC, gateway("public", None));
    t.routes = vec![
        Route { kind: Kind::HTTPRoute, key: ObjectKey::new("shop", "web") },
        Route { kind: Kind::GRPCRoute, key: ObjectKey::new("shop", "api") },
    ];
    let first = run(&s, &t, NOW);
    let applies: Vec<(&Ref, &Value)> = first
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Apply { target, body } => Some((target, body)),
            _ => None,
        })
        .collect();
    assert_eq!(applies.len(), 3, "{:#?}", first.actions);
    assert_eq!(applies[0].0.kind, Kind::NginxProxy);
    assert_eq!(
        applies[0].1["spec"]["telemetry"],
        json!({"exporter": {"endpoint": "otel.observability.svc:4317"}, "serviceName": "edge"})
    );
    let route_policy = applies[1].1;
    assert_eq!(route_policy["metadata"]["namespace"], "shop");
    assert_eq!(
        route_policy["spec"]["targetRefs"][0],
        json!({"group": GATEWAY_GROUP, "kind": "HTTPRoute", "name": "web"})
    );
    assert_eq!(route_policy["spec"]["tracing"], json!({"strategy": "ratio", "ratio": 33, "context": "propagate"}));
    assert_eq!(applies[2].1["spec"]["targetRefs"][0]["kind"], "GRPCRoute");
    assert!(first.report.warnings[0].contains("rounded to 33%"), "{:?}", first.report.warnings);

    // Ready only once NGF accepted every route's policy for the generation crosstrace wrote.
    let mut written = healthy(applied(t, &first.actions));
    assert!(run(&s, &written, NOW + 1).actions.is_empty());
    for (r, o) in written.objects.iter_mut().filter(|(r, _)| r.kind == Kind::ObservabilityPolicy) {
        o.data["status"] = json!({"ancestors": [{"ancestorRef": {"name": "public", "namespace": "infra"}, "controllerName": NGINX_GATEWAY_FABRIC,
            "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "", "observedGeneration": 1, "lastTransitionTime": "2026-01-01T00:00:00Z"}]}]});
        assert_eq!(r.namespace, "shop");
    }
    let mark = run(&s, &written, NOW + 2);
    assert!(
        matches!(&mark.actions[..], [Action::Record { record: Some(r), .. }] if r.converged),
        "{:#?}",
        mark.actions
    );
    let converged = applied(written, &mark.actions);

    // A route added later gets its policy.
    let mut more = converged.clone();
    more.routes.push(Route { kind: Kind::HTTPRoute, key: ObjectKey::new("shop", "new") });
    let added = run(&s, &more, NOW + 3);
    assert!(added.actions.iter().any(|a| matches!(a, Action::Apply { target, .. } if target.name == "crosstrace-new")));

    // Delete removes every object crosstrace created.
    let grown = applied(more, &added.actions);
    let revert =
        plan(PolicyView { deleting: true, ..view(&s) }, &Config::default(), std::slice::from_ref(&grown), NOW + 4);
    let reverted = applied(grown, &revert.actions);
    assert!(reverted.objects.is_empty(), "{:?}", reverted.objects.keys());
}

#[test]
fn a_conflicted_observability_policy_is_reported_not_fought() {
    let s = spec("0.25");
    let mut t = target(NGINX_GATEWAY_FABRIC, gateway("public", None));
    t.routes = vec![Route { kind: Kind::HTTPRoute, key: ObjectKey::new("shop", "web") }];
    let mut written = healthy(applied(t.clone(), &run(&s, &t, NOW).actions));
    for (_, o) in written.objects.iter_mut().filter(|(r, _)| r.kind == Kind::ObservabilityPolicy) {
        o.data["status"] = json!({"ancestors": [{"ancestorRef": {"name": "public"}, "conditions": [{"type": "Accepted", "status": "False", "reason": "Conflicted", "message": "another policy", "observedGeneration": 1}]}]});
    }
    let p = run(&s, &written, NOW + 3600);
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    assert_eq!((p.report.waiting, p.report.rolled_back), (1, 0));
    assert_eq!(p.report.problems[0].reason, reasons::POLICY_CONFLICT);
}

#[test]
fn an_istio_gateway_gets_a_telemetry_with_the_configured_provider() {
    let s = spec("0.25");
    let t = target(ISTIO, gateway("public", None));
    let first = run(&s, &t, NOW);
    let Some(Action::Apply { target, body }) = first.actions.get(1) else { panic!("{:#?}", first.actions) };
    assert_eq!((target.kind, target.namespace.as_str()), (Kind::Telemetry, "infra"));
    assert_eq!(body["spec"]["targetRefs"], json!([{"group": GATEWAY_GROUP, "kind": "Gateway", "name": "public"}]));
    assert_eq!(body["spec"]["tracing"][0]["providers"], json!([{"name": "otel"}]));
    assert_eq!(body["spec"]["tracing"][0]["randomSamplingPercentage"], 25.0);
    assert_eq!(first.actions.len(), 2, "the Gateway itself is not changed: {:#?}", first.actions);

    let unconfigured = plan(view(&s), &Config::default(), std::slice::from_ref(&t), NOW);
    assert!(unconfigured.actions.is_empty());
    assert_eq!(unconfigured.report.problems[0].reason, reasons::ISTIO_PROVIDER_MISSING);
}

#[test]
fn what_crosstrace_cannot_trace_is_reported_and_nothing_is_written() {
    let s = spec("0.25");
    let rows: Vec<(&str, Observed, &str)> = vec![
        (
            "other controller",
            target("example.com/gateway-controller", gateway("g", None)),
            reasons::UNSUPPORTED_PROVIDER,
        ),
        (
            "no class",
            Observed { class: None, ..target(ENVOY_GATEWAY, gateway("g", None)) },
            reasons::TARGET_NOT_AVAILABLE,
        ),
        (
            "provider CRDs missing",
            Observed { installed: BTreeSet::new(), ..target(ENVOY_GATEWAY, gateway("g", None)) },
            reasons::PROVIDER_NOT_INSTALLED,
        ),
        (
            "parametersRef to a ConfigMap",
            target(
                ENVOY_GATEWAY,
                gateway("g", Some(json!({"parametersRef": {"group": "", "kind": "ConfigMap", "name": "x"}}))),
            ),
            reasons::PARAMETERS_UNSUPPORTED,
        ),
        (
            "parametersRef to a missing EnvoyProxy",
            target(
                ENVOY_GATEWAY,
                gateway(
                    "g",
                    Some(
                        json!({"parametersRef": {"group": "gateway.envoyproxy.io", "kind": "EnvoyProxy", "name": "x"}}),
                    ),
                ),
            ),
            reasons::PARAMETERS_MISSING,
        ),
        (
            "a name crosstrace would use is someone else's",
            with_object(
                target(ENVOY_GATEWAY, gateway("g", None)),
                object(Kind::EnvoyProxy, "infra", "crosstrace-g", json!({"spec": {}})),
            ),
            reasons::NAME_TAKEN,
        ),
        (
            "an older policy holds it",
            Observed { claimed_by: Some("older".into()), ..target(ENVOY_GATEWAY, gateway("g", None)) },
            reasons::CONFLICT,
        ),
    ];
    for (what, t, reason) in rows {
        let p = run(&s, &t, NOW);
        assert!(p.actions.is_empty(), "{what}: {:?}", p.actions);
        assert_eq!(p.report.problems[0].reason, reason, "{what}: {:?}", p.report.problems);
        assert_eq!(p.report.selected, 1, "{what}");
    }
    let s = spec("0.25");
    let t = target("example.com/gateway-controller", gateway("g", None));
    assert!(run(&s, &t, NOW).report.problems[0].message.contains("example.com/gateway-controller"));
}

#[test]
fn a_gateway_not_programmed_by_the_deadline_is_rolled_back_and_not_retried() {
    let s = spec("0.25");
    let t = target(ENVOY_GATEWAY, gateway("public", None));
    let written = applied(t.clone(), &run(&s, &t, NOW).actions);
    let failed = run(&s, &written, NOW + 60);
    assert_eq!(failed.report.rolled_back, 1);
    assert!(failed.report.stopped);
    let [Action::Patch { .. }, Action::Delete { .. }, Action::Record { record: Some(marker), .. }] =
        &failed.actions[..]
    else {
        panic!("{:#?}", failed.actions)
    };
    assert_eq!((marker.rolled_back, marker.revision.as_ref()), (Some(2), None));
    let rolled_back = applied(written, &failed.actions);
    assert_eq!(rolled_back.gateway.as_ref().unwrap().data["spec"], gateway("public", None).data["spec"]);
    let held = run(&s, &rolled_back, NOW + 61);
    assert!(held.actions.is_empty());
    assert_eq!(held.report.problems[0].reason, reasons::ROLLED_BACK);
    let message = &held.report.problems[0].message;
    assert!(message.contains("did not become healthy within 60s") && message.contains("retry"), "{message}");
    // A new generation retries.
    let retry = plan(PolicyView { generation: 3, ..view(&s) }, &Config::default(), &[rolled_back], NOW + 62);
    assert!(!retry.actions.is_empty());
}

#[test]
fn a_gateway_its_controller_refuses_fails_before_the_deadline() {
    let s = spec("0.25");
    let t = target(ENVOY_GATEWAY, gateway("public", None));
    let mut written = applied(t.clone(), &run(&s, &t, NOW).actions);
    report(written.gateway.as_mut().unwrap(), "False", "False");
    let failed = run(&s, &written, NOW + 1);
    assert_eq!(failed.report.problems[0].reason, reasons::ROLLED_BACK);
    assert!(failed.report.problems[0].message.contains("not Accepted"), "{:?}", failed.report.problems);
}

#[test]
fn tracing_changed_by_someone_else_is_drift_and_written_again() {
    let s = spec("0.25");
    let t = target(ENVOY_GATEWAY, gateway("public", None));
    let written = healthy(applied(t.clone(), &run(&s, &t, NOW).actions));
    let mut converged = applied(written.clone(), &run(&s, &written, NOW + 1).actions);
    assert!(run(&s, &converged, NOW + 2).drifted.is_empty());
    let own = converged.objects.values_mut().next().unwrap();
    own.data["spec"]["telemetry"]["tracing"]["samplingFraction"] = json!({"numerator": 1, "denominator": 1});
    let fix = run(&s, &converged, NOW + 3);
    assert_eq!(fix.drifted, vec![converged.key.clone()]);
    assert!(fix.actions.iter().any(|a| matches!(a, Action::Apply { .. })), "{:?}", fix.actions);

    // The owner editing the Gateway's listeners is no drift and no failure: no write at all.
    let mut edited = converged.clone();
    let own = edited.objects.values_mut().next().unwrap();
    own.data["spec"]["telemetry"]["tracing"]["samplingFraction"] = json!({"numerator": 1, "denominator": 4});
    let g = edited.gateway.as_mut().unwrap();
    g.data["spec"]["listeners"] = json!([{"name": "https", "port": 443, "protocol": "HTTPS"}]);
    g.metadata.generation = Some(g.metadata.generation.unwrap() + 1);
    let p = run(&s, &edited, NOW + 4);
    assert!(p.actions.is_empty() && p.drifted.is_empty(), "{:?}", p.actions);
    assert_eq!(p.report.rolled_back, 0);
}

#[test]
fn parameters_the_owner_names_after_crosstrace_pointed_the_gateway_are_theirs() {
    let s = spec("0.25");
    let t = target(ENVOY_GATEWAY, gateway("public", None));
    let written = healthy(applied(t.clone(), &run(&s, &t, NOW).actions));
    let converged = applied(written.clone(), &run(&s, &written, NOW + 1).actions);
    // The owner points the Gateway at an EnvoyProxy of their own.
    let mut repointed = with_object(converged, object(Kind::EnvoyProxy, "infra", "mine", json!({"spec": {}})));
    let g = repointed.gateway.as_mut().unwrap();
    g.data["spec"]["infrastructure"] =
        json!({"parametersRef": {"group": "gateway.envoyproxy.io", "kind": "EnvoyProxy", "name": "mine"}});
    g.metadata.generation = Some(g.metadata.generation.unwrap() + 1);
    let repointed = healthy(repointed);
    let p = run(&s, &repointed, NOW + 2);
    let gateway_patches =
        p.actions.iter().filter(|a| matches!(a, Action::Patch { target, .. } if target.kind == Kind::Gateway));
    assert_eq!(gateway_patches.count(), 0, "the owner's parametersRef stays: {:#?}", p.actions);
    assert!(
        p.actions.iter().any(|a| matches!(a, Action::Patch { target, .. } if target.name == "mine")),
        "merged into theirs"
    );
    assert!(p.actions.iter().any(|a| matches!(a, Action::Delete { target } if target.name == "crosstrace-public")));
    let moved = applied(repointed, &p.actions);
    let Ok(Some(record)) = &moved.record else { panic!() };
    assert!(record.infrastructure.is_none() && record.created.is_empty(), "{record:?}");
    let revert =
        plan(PolicyView { deleting: true, ..view(&s) }, &Config::default(), std::slice::from_ref(&moved), NOW + 3);
    let reverted = applied(moved, &revert.actions);
    assert_eq!(reverted.gateway.unwrap().data["spec"]["infrastructure"]["parametersRef"]["name"], "mine");
    assert!(reverted.objects[&Ref::new(Kind::EnvoyProxy, "infra", "mine")].data["spec"].get("telemetry").is_none());
}

#[test]
fn a_gateway_that_left_the_selection_is_reverted() {
    let s = spec("0.25");
    let t = target(ISTIO, gateway("public", None));
    let written = applied(t.clone(), &run(&s, &t, NOW).actions);
    let gone = Observed { selected: false, ..written };
    let p = run(&s, &gone, NOW);
    assert_eq!(p.report.selected, 0);
    assert!(matches!(&p.actions[..], [Action::Delete { .. }, Action::Record { record: None, .. }]), "{:#?}", p.actions);
}

#[test]
fn routes_attach_by_parent_refs() {
    let gw = ObjectKey::new("infra", "public");
    let route = |parents: Value| object(Kind::HTTPRoute, "shop", "r", json!({"spec": {"parentRefs": parents}}));
    assert!(attached(&route(json!([{"name": "public", "namespace": "infra"}])), &gw));
    assert!(!attached(&route(json!([{"name": "public"}])), &gw), "a parentRef without namespace is the route's");
    assert!(!attached(&route(json!([{"name": "public", "namespace": "infra", "kind": "Service", "group": ""}])), &gw));
}

#[test]
fn gateways_change_in_batches_of_max_concurrent_and_pause_holds_them() {
    let mut s = spec("0.25");
    s.rollout.max_concurrent = 2;
    let targets: Vec<Observed> = (0..3)
        .map(|i| target(ENVOY_GATEWAY, gateway(&format!("g{i}"), None)))
        .map(|mut t| {
            t.uid = format!("uid-{}", t.key.name);
            t
        })
        .collect();
    let first = plan(view(&s), &Config::default(), &targets, NOW);
    assert_eq!((first.report.in_flight, first.report.pending), (2, 1));
    let records = first.actions.iter().filter(|a| matches!(a, Action::Record { .. })).count();
    assert_eq!(records, 2, "only the batch is written: {:#?}", first.actions);

    s.rollout.paused = true;
    let paused = plan(view(&s), &Config::default(), &targets, NOW);
    assert!(paused.actions.is_empty());
    assert_eq!(paused.report.pending, 3);
}

#[test]
fn another_tracing_policy_on_the_same_gateway_is_reported_not_fought() {
    let s = spec("0.25");
    let mut t = target(ISTIO, gateway("public", None));
    t.others = vec![Ref::new(Kind::Telemetry, "infra", "mesh-team")];
    let p = run(&s, &t, NOW);
    assert!(p.actions.iter().all(|a| !matches!(a, Action::Delete { .. } | Action::Patch { .. })), "{:?}", p.actions);
    assert!(p.report.warnings[0].contains("Telemetry infra/mesh-team") && p.report.warnings[0].contains("not fought"));
}
