use super::*;

const SPLIT: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata:
  name: payments
spec:
  ports:
    - port: 8080
      appProtocol: http
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: payments-split
  namespace: default
spec:
  parentRefs:
    - name: payments
  rules:
    - matches:
        - path: { type: PathPrefix, value: /api }
          method: GET
      backendRefs:
        - name: payments-v1
          weight: 80
        - name: payments-v2
          weight: 20
      timeouts:
        request: 2s
"#;

#[test]
fn parses_several_documents() {
    let rs = parse_documents(SPLIT).expect("valid");
    assert_eq!(rs.len(), 2);
    assert_eq!(rs[0].kind, Kind::Service);
    let Spec::HTTPRoute(route) = &rs[1].spec else {
        panic!("route")
    };
    assert_eq!(route.rules[0].backend_refs[1].weight, 20);
    assert_eq!(rs[1].key().to_string(), "HTTPRoute/default/payments-split");
}

#[test]
fn json_and_lists_are_accepted() {
    let json = r#"[{"apiVersion":"trellis.dev/v1alpha1","kind":"MeshConfig","metadata":{"name":"mesh"},"spec":{"mtls":"strict"}}]"#;
    assert_eq!(parse_documents(json).expect("json").len(), 1);
    let list = "kind: List\nitems:\n  - apiVersion: trellis.dev/v1alpha1\n    kind: Service\n    metadata: {name: a}\n";
    assert_eq!(parse_documents(list).expect("list").len(), 1);
}

fn one_error(text: &str) -> ResourceError {
    let errs = parse_documents(text).expect_err("should be rejected");
    errs.into_iter().next().expect("an error")
}

#[test]
fn errors_name_document_field_and_reason() {
    let bad_weight = SPLIT.replace("weight: 20", "weight: -5");
    let e = one_error(&bad_weight);
    assert_eq!(e.document, 1);
    assert_eq!(e.resource.as_deref(), Some("HTTPRoute/payments-split"));
    assert_eq!(e.path, "spec.rules[0].backendRefs[1].weight");
    assert!(e.reason.contains("negative"), "{e}");

    let zero = SPLIT
        .replace("weight: 80", "weight: 0")
        .replace("weight: 20", "weight: 0");
    assert!(one_error(&zero).reason.contains("all weights are zero"));

    let bad_type = SPLIT.replace("weight: 20", "weight: lots");
    let e = one_error(&bad_type);
    assert_eq!(e.path, "spec.rules[0].backendRefs[1].weight", "{e}");

    let bad_name = SPLIT.replace("name: payments-v2", "name: Payments_V2");
    let e = one_error(&bad_name);
    assert_eq!(e.path, "spec.rules[0].backendRefs[1].name");

    let bad_duration = SPLIT.replace("request: 2s", "request: soon");
    assert_eq!(
        one_error(&bad_duration).path,
        "spec.rules[0].timeouts.request"
    );

    let unknown_field = SPLIT.replace("timeouts:", "timeoutz:");
    let e = one_error(&unknown_field);
    assert!(e.path.starts_with("spec.rules[0]"), "{e}");
    assert!(e.reason.contains("timeoutz"), "{e}");
}

#[test]
fn unknown_kinds_versions_and_garbage_are_rejected() {
    let e = one_error("apiVersion: trellis.dev/v1alpha1\nkind: Gadget\nmetadata: {name: a}\n");
    assert_eq!(e.path, "kind");
    assert!(e.reason.contains("Gadget"));
    let e = one_error(
        "apiVersion: v1\nkind: HTTPRoute\nmetadata: {name: a}\nspec: {parentRefs: [{name: a}]}\n",
    );
    assert_eq!(e.path, "apiVersion");
    let e = one_error("key: [unclosed\n");
    assert_eq!(e.path, "<document>");
    let e = one_error(&"#".repeat(MAX_APPLY_BYTES + 1));
    assert!(e.reason.contains("larger than"));
}

#[test]
fn conflicting_routes_are_rejected() {
    let twice = format!(
        "{SPLIT}\n---\n{}",
        SPLIT
            .split("---")
            .nth(1)
            .expect("route")
            .replace("payments-split", "payments-other")
    );
    let e = one_error(&twice);
    assert!(
        e.reason
            .contains("conflicts with HTTPRoute/default/payments-split"),
        "{e}"
    );
}

#[test]
fn one_mesh_config_per_mesh() {
    let two = "apiVersion: trellis.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: a}\n---\napiVersion: trellis.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: b}\n";
    assert!(one_error(two).reason.contains("exactly one MeshConfig"));
}

#[test]
fn every_kind_has_a_valid_example() {
    let all = r#"
apiVersion: trellis.dev/v1alpha1
kind: DestinationPolicy
metadata: {name: payments}
spec:
  targetRef: {name: payments}
  loadBalancer: round-robin
  circuitBreaker: {consecutiveFailures: 5, baseEjectionTime: 30s}
  retryBudget: {ratio: 0.2, minPerSecond: 10}
---
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: payments-allow-web}
spec:
  targetRef: {name: payments}
  action: ALLOW
  rules:
    - from: [{services: [web]}]
      to: [{paths: ["/api/*"], methods: [GET]}]
---
apiVersion: trellis.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: payments}
spec: {targetRef: {name: payments}, requestsPerSecond: 100, burst: 20}
---
apiVersion: trellis.dev/v1alpha1
kind: FaultInjection
metadata: {name: payments-chaos}
spec:
  targetRef: {name: payments}
  delay: {duration: 100ms, percent: 10}
  abort: {status: 503, percent: 1}
---
apiVersion: trellis.dev/v1alpha1
kind: ExternalService
metadata: {name: stripe}
spec:
  endpoints:
    dev: ["127.0.0.1:9999"]
    prod: ["api.stripe.com:443"]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: echo}
spec:
  parentRefs: [{name: echo}]
  rules:
    - matches: [{method: {service: pkg.Echo, method: Unary}}]
      backendRefs: [{name: echo-v2}]
---
apiVersion: trellis.dev/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec: {mtls: permissive, defaultPolicy: allow-authenticated, tracing: {sampling: 0.1}}
"#;
    let rs = parse_documents(all).expect("valid");
    assert_eq!(rs.len(), 7);
    // Round trip: what we serialize parses back to the same resources.
    let json = serde_json::to_string(&rs).expect("serialize");
    assert_eq!(parse_documents(&json).expect("round trip"), rs);
}

#[test]
fn loose_kind_names() {
    assert_eq!(Kind::parse_loose("routes"), Some(Kind::HTTPRoute));
    assert_eq!(Kind::parse_loose("httproute"), Some(Kind::HTTPRoute));
    assert_eq!(Kind::parse_loose("services"), Some(Kind::Service));
    assert_eq!(Kind::parse_loose("meshconfig"), Some(Kind::MeshConfig));
    assert_eq!(Kind::parse_loose("grpcroutes"), Some(Kind::GRPCRoute));
    assert_eq!(Kind::parse_loose("nope"), None);
}

#[test]
fn referenced_services_name_their_fields() {
    let rs = parse_documents(SPLIT).expect("valid");
    let refs = referenced_services(&rs[1]);
    assert_eq!(
        refs,
        vec![
            (
                "spec.parentRefs[0].name".to_string(),
                "payments".to_string()
            ),
            (
                "spec.rules[0].backendRefs[0].name".to_string(),
                "payments-v1".to_string()
            ),
            (
                "spec.rules[0].backendRefs[1].name".to_string(),
                "payments-v2".to_string()
            ),
        ]
    );
    assert!(
        referenced_services(&rs[0]).is_empty(),
        "a Service refers to nothing"
    );
}

#[test]
fn mesh_config_observability_fields_are_checked() {
    let mesh = |spec: &str| {
        format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: mesh}}\nspec: {spec}\n"
        )
    };
    let ok = parse_documents(&mesh(
        "{tracing: {sampling: 0.01, otlpEndpoint: \"http://127.0.0.1:4318\", protocol: http/protobuf}, accessLogServices: [payments], metrics: {maxPaths: 50, maxRoutesPerService: 20}}",
    ))
    .expect("valid");
    let Spec::MeshConfig(m) = &ok[0].spec else {
        panic!("a MeshConfig")
    };
    assert!(m.access_log_for("payments") && !m.access_log_for("orders"));
    assert_eq!(m.signal_limits().max_paths, 50);
    assert_eq!(m.signal_limits().max_series, 20);
    for (spec, path) in [
        (
            "{tracing: {otlpEndpoint: \"https://collector:4317\"}}",
            "spec.tracing.otlpEndpoint",
        ),
        ("{tracing: {protocol: zipkin}}", "spec.tracing.protocol"),
        (
            "{accessLogServices: [Not_A_Name]}",
            "spec.accessLogServices[0]",
        ),
        ("{metrics: {maxPaths: 0}}", "spec.metrics.maxPaths"),
    ] {
        let e = one_error(&mesh(spec));
        assert_eq!(e.path, path, "{spec}: {e}");
    }
}
