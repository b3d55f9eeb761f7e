//! Traffic management and resilience, end to end: a real control plane, real proxies (real
//! processes where one must be killed) and test apps on loopback, policies applied through the
//! HTTP API. Randomness in the proxy is per-request draws; counts are checked against bounds
//! wide enough for that, failures against the limits.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{
    Answer, Client, apply, by_server, caller, config_of, control, counter, instance, load,
    metrics_of, proxy, wait_endpoints,
};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use trellis_core::ServiceName;
use trellis_proxy::app::Running;
use trellis_test_support::eventually;
use trellis_test_support::http_server::{self, Behavior};
use trellis_test_support::mesh::http_call;
use trellis_test_support::process::ProxyProcess;

fn proxy_bin() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_trellis")).with_file_name("trellis-proxy")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_under_load_costs_almost_nothing() {
    let (_running, cp) = control("resil-kill", |_| {}).await;
    let mut apps = Vec::new();
    let mut procs = Vec::new();
    for i in 0..3 {
        let app = http_server::spawn(&format!("backend-{i}")).await;
        let join = cp.join_args("backend").await;
        let mut args = vec!["--service", "backend", "--app"];
        let addr = app.addr.to_string();
        args.push(&addr);
        args.extend(join.iter().map(String::as_str));
        procs.push(ProxyProcess::spawn(&proxy_bin(), &args).await);
        apps.push(app);
    }
    let (client, up) = caller(&cp, "backend", &[]).await;
    wait_endpoints(&client, "backend", 3).await;

    let victim = procs.pop().unwrap();
    let load = tokio::spawn(load(up, "backend", 500, Duration::from_secs(4), 10));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    victim.signal("KILL");
    let killed = Instant::now();
    // Gone from rotation: ejected by outlier detection or removed by the control plane.
    let client_ref = &client;
    eventually(
        "the killed instance leaves rotation",
        Duration::from_secs(5),
        || async move {
            let c = config_of(client_ref).await;
            let eps = c["destinations"]["backend"]["endpoints"]
                .as_array()
                .unwrap()
                .clone();
            let healthy = eps.iter().filter(|e| e["state"] == "healthy").count();
            (healthy == 2).then_some(())
        },
    )
    .await;
    let out_of_rotation = killed.elapsed();
    let answers = load.await.unwrap();
    let failed = answers.iter().filter(|a| a.status != 200).count();
    let rate = failed as f64 / answers.len() as f64;
    eprintln!(
        "kill -9 under 500 rps: {} requests, {failed} failed ({:.3}%), out of rotation after {out_of_rotation:?}; {:?}",
        answers.len(),
        rate * 100.0,
        by_server(&answers)
    );
    assert!(answers.len() >= 1900, "load ran: {}", answers.len());
    assert!(rate <= 0.005, "client-visible failures {rate}");
    // How fast it left rotation is printed above and measured by `bench/resilience.sh`
    // ("victim out of rotation after"); the test only requires that it does (within 5 s).
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_hide_an_instance_that_fails_a_fifth_of_requests() {
    let (_running, cp) = control("resil-flaky", |_| {}).await;
    let flaky = Behavior {
        fail_every: 5,
        ..Behavior::default()
    };
    let (_a, _pa) = instance("backend", "flaky", flaky, &cp, &[]).await;
    let (_b, _pb) = instance("backend", "good-1", Behavior::default(), &cp, &[]).await;
    let (_c, _pc) = instance("backend", "good-2", Behavior::default(), &cp, &[]).await;
    apply(
        &cp,
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: backend-retry}\nspec:\n  parentRefs: [{name: backend}]\n  rules:\n    - retry: {codes: [503], attempts: 2, backoff: 5ms}\n",
    )
    .await;
    let (client, up) = caller(&cp, "backend", &[]).await;
    wait_endpoints(&client, "backend", 3).await;
    // Without the route, the failures would reach the app: wait until the retry is in force.
    eventually("route pushed", Duration::from_secs(10), || async {
        let c = config_of(&client).await;
        (!c["destinations"]["backend"]["routes"]["rules"][0]["retry"].is_null()).then_some(())
    })
    .await;
    let answers = load(up, "backend", 400, Duration::from_secs(3), 8).await;
    let failed = answers.iter().filter(|a| a.status != 200).count();
    let m = metrics_of(&client).await;
    let retried = counter(&m, "trellis_http_retries_total", &["result=\"retried\""]);
    eprintln!(
        "20% failing instance, retries on: {} requests, {failed} failed, {retried} retries; {:?}",
        answers.len(),
        by_server(&answers)
    );
    assert!(
        failed as f64 / answers.len() as f64 <= 0.01,
        "{failed} failed"
    );
    assert!(retried > 0.0, "retries happened and were counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_of_a_dead_service_stay_within_the_budget() {
    let (_running, cp) = control("resil-budget", |_| {}).await;
    let failing = Behavior::default();
    failing.failing.store(true, Ordering::SeqCst);
    let (app, _p) = instance("backend", "broken", failing, &cp, &[]).await;
    apply(
        &cp,
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: backend-retry}\nspec:\n  parentRefs: [{name: backend}]\n  rules:\n    - retry: {codes: [503], attempts: 3, backoff: 1ms}\n---\napiVersion: trellis.dev/v1alpha1\nkind: DestinationPolicy\nmetadata: {name: backend}\nspec:\n  targetRef: {name: backend}\n  retryBudget: {ratio: 0.2, minPerSecond: 1}\n",
    )
    .await;
    let (client, up) = caller(&cp, "backend", &[]).await;
    wait_endpoints(&client, "backend", 1).await;
    eventually(
        "route and policy pushed",
        Duration::from_secs(10),
        || async {
            let c = config_of(&client).await;
            let d = &c["destinations"]["backend"];
            (!d["routes"]["rules"][0]["retry"].is_null()
                && d["policy"]["retryBudget"]["minPerSecond"] == 1)
                .then_some(())
        },
    )
    .await;
    let before = app.requests();
    let mut c = Client::connect(up).await;
    let n = 300u64;
    let start = Instant::now();
    for _ in 0..n {
        assert_eq!(c.call("backend", "/", &[]).await.status, 503);
    }
    let elapsed = start.elapsed();
    let sent = app.requests() - before;
    let retries = sent - n;
    // Over the 10 s window: 20% of the requests plus 1/s × 10 s.
    let allowed = (0.2 * n as f64) as u64 + 10;
    let m = metrics_of(&client).await;
    let refused = counter(
        &m,
        "trellis_http_retries_total",
        &["result=\"budget-exhausted\""],
    );
    eprintln!(
        "100% failing: {n} requests in {elapsed:?} → {retries} retries (budget {allowed}, 3 attempts would be {}), {refused} refused by the budget",
        3 * n
    );
    assert!(retries <= allowed, "{retries} retries > budget {allowed}");
    assert!(retries >= allowed / 2, "the budget was used: {retries}");
    assert!(refused > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_zone_is_preferred_and_failed_over() {
    let (_running, cp) = control("resil-zone", |_| {}).await;
    let (a1, _p1) = instance("backend", "a-1", Behavior::default(), &cp, &["--zone", "a"]).await;
    let (a2, _p2) = instance("backend", "a-2", Behavior::default(), &cp, &["--zone", "a"]).await;
    let (_b, _p3) = instance("backend", "b-1", Behavior::default(), &cp, &["--zone", "b"]).await;
    apply(
        &cp,
        "apiVersion: trellis.dev/v1alpha1\nkind: DestinationPolicy\nmetadata: {name: backend}\nspec:\n  targetRef: {name: backend}\n  circuitBreaker: {consecutiveFailures: 2, baseEjectionTime: 30s, maxEjectedPercent: 100}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: backend-retry}\nspec:\n  parentRefs: [{name: backend}]\n  rules:\n    - retry: {codes: [503], attempts: 2}\n",
    )
    .await;
    let (client, up) = caller(&cp, "backend", &["--zone", "a"]).await;
    wait_endpoints(&client, "backend", 3).await;
    eventually("policy pushed", Duration::from_secs(10), || async {
        let c = config_of(&client).await;
        (c["destinations"]["backend"]["policy"]["outlier"]["maxEjectedPercent"] == 100)
            .then_some(())
    })
    .await;
    let mut c = Client::connect(up).await;
    let mut before = Vec::new();
    for _ in 0..300 {
        before.push(c.call("backend", "/", &[]).await);
    }
    let zone_a = before
        .iter()
        .filter(|a| a.served_by.starts_with("a-"))
        .count();
    assert_eq!(zone_a, 300, "all local: {:?}", by_server(&before));

    // Zone a's apps fail: outlier detection ejects them and traffic fails over to zone b.
    a1.failing_handle().store(true, Ordering::SeqCst);
    a2.failing_handle().store(true, Ordering::SeqCst);
    let mut after = Vec::new();
    for _ in 0..300 {
        after.push(c.call("backend", "/", &[]).await);
    }
    let last: Vec<&Answer> = after.iter().skip(100).collect();
    eprintln!(
        "zone failover: before {:?}, after {:?}",
        by_server(&before),
        by_server(&after)
    );
    assert!(last.iter().all(|a| a.status == 200 && a.served_by == "b-1"));
    let failed = after.iter().filter(|a| a.status != 200).count();
    assert!(failed <= 3, "retries cover the ejections: {failed} failed");
    let c = config_of(&client).await;
    let states: Vec<String> = c["destinations"]["backend"]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| format!("{}:{}", e["zone"], e["state"]))
        .collect();
    assert_eq!(
        states.iter().filter(|s| s.contains("ejected")).count(),
        2,
        "{states:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splits_headers_faults_limits_and_mirrors() {
    let (_running, cp) = control("resil-traffic", |_| {}).await;
    let (_v1, _p1) = instance("web-v1", "v1", Behavior::default(), &cp, &[]).await;
    let (_v2, _p2) = instance("web-v2", "v2", Behavior::default(), &cp, &[]).await;
    let slow_shadow = Behavior {
        delay: Duration::from_millis(500),
        ..Behavior::default()
    };
    let (shadow, _ps) = instance("shadow", "shadow", slow_shadow, &cp, &[]).await;
    apply(
        &cp,
        "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web}\nspec:\n  parentRefs: [{name: web}]\n  rules:\n    - name: canary\n      matches: [{headers: [{name: x-canary, value: \"yes\"}]}]\n      backendRefs: [{name: web-v2}]\n      filters:\n        - type: ResponseHeaderModifier\n          responseHeaderModifier: {set: [{name: x-route, value: canary}]}\n    - name: mirrored\n      matches: [{path: {type: PathPrefix, value: /mirror}}]\n      backendRefs: [{name: web-v1}]\n      timeouts: {request: 300ms}\n      filters:\n        - type: RequestMirror\n          requestMirror: {backendRef: {name: shadow}, percent: 100}\n    - backendRefs: [{name: web-v1, weight: 90}, {name: web-v2, weight: 10}]\n",
    )
    .await;
    let (client, up) = caller(&cp, "web", &[]).await;
    eventually("routes pushed", Duration::from_secs(10), || async {
        let c = config_of(&client).await;
        (c["destinations"]["web"]["routes"]["rules"]
            .as_array()
            .map(Vec::len)
            == Some(3))
        .then_some(())
    })
    .await;
    let mut c = Client::connect(up).await;
    // Wait for both backends to be discovered and serving.
    eventually("both versions serve", Duration::from_secs(10), || async {
        let mut c = Client::connect(up).await;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100 {
            seen.insert(c.call("web", "/", &[]).await.served_by);
        }
        (seen.contains("v1") && seen.contains("v2")).then_some(())
    })
    .await;

    // 90/10 over 5,000 requests.
    let mut v2 = 0;
    for _ in 0..5000 {
        let a = c.call("web", "/", &[]).await;
        assert_eq!(a.status, 200);
        v2 += usize::from(a.served_by == "v2");
    }
    let share = v2 as f64 / 5000.0;
    eprintln!("90/10 split: v2 got {share:.4}");
    assert!((0.07..=0.13).contains(&share), "v2 share {share}");

    // The canary header goes to v2, every time, with the response header filter applied.
    for _ in 0..200 {
        let a = c.call("web", "/", &[("x-canary", "yes")]).await;
        assert_eq!((a.status, a.served_by.as_str()), (200, "v2"));
    }

    // Mirror: the shadow (500 ms) gets copies; the primary (300 ms timeout) never waits.
    let shadow_before = shadow.requests();
    for _ in 0..20 {
        let a = c.call("web", "/mirror/x", &[]).await;
        assert_eq!((a.status, a.served_by.as_str()), (200, "v1"), "{a:?}");
    }
    eventually(
        "copies reach the shadow",
        Duration::from_secs(5),
        || async { (shadow.requests() - shadow_before >= 20).then_some(()) },
    )
    .await;

    // Fault injection: 50% aborts.
    apply(
        &cp,
        "apiVersion: trellis.dev/v1alpha1\nkind: FaultInjection\nmetadata: {name: web-chaos}\nspec:\n  targetRef: {name: web}\n  abort: {status: 503, percent: 50}\n",
    )
    .await;
    eventually("fault pushed", Duration::from_secs(10), || async {
        let c = config_of(&client).await;
        (!c["destinations"]["web"]["policy"]["fault"].is_null()).then_some(())
    })
    .await;
    let mut aborted = 0;
    for _ in 0..2000 {
        let a = c.call("web", "/", &[]).await;
        if a.status == 503 {
            assert_eq!(a.error, "fault-injected");
            aborted += 1;
        }
    }
    let share = aborted as f64 / 2000.0;
    eprintln!("50% abort: {share:.4} aborted");
    assert!((0.45..=0.55).contains(&share), "aborted {share}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_and_concurrency_limits_refuse_fast() {
    let (_running, cp) = control("resil-limits", |_| {}).await;
    let (_app, _p) = instance("backend", "backend", Behavior::default(), &cp, &[]).await;
    let slow = Behavior {
        delay: Duration::from_millis(400),
        ..Behavior::default()
    };
    let (_slow_app, _ps) = instance("slow", "slow", slow, &cp, &[]).await;
    apply(
        &cp,
        "apiVersion: trellis.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: backend-rps}\nspec:\n  targetRef: {name: backend}\n  requestsPerSecond: 100\n  burst: 100\n---\napiVersion: trellis.dev/v1alpha1\nkind: DestinationPolicy\nmetadata: {name: slow}\nspec:\n  targetRef: {name: slow}\n  limits: {maxConcurrentRequests: 2, maxPendingRequests: 0}\n",
    )
    .await;
    let client = proxy(
        "client",
        &cp,
        &[
            "--upstream",
            "backend=127.0.0.1:0",
            "--upstream",
            "slow=127.0.0.1:0",
        ],
    )
    .await;
    let backend = client.bound.upstreams[&ServiceName::new("backend").unwrap()];
    let slow_up = client.bound.upstreams[&ServiceName::new("slow").unwrap()];
    eventually("policies pushed", Duration::from_secs(10), || async {
        let c = config_of(&client).await;
        let limit = &c["destinations"]["slow"]["policy"]["limits"]["maxConcurrent"];
        let mut probe = Client::connect(backend).await;
        // The rate limit lives in the backend's proxy: seen once a burst gets refused.
        (limit == 2 && probe.call("backend", "/", &[]).await.status == 200).then_some(())
    })
    .await;

    // 100 req/s with a burst of 100: a 2 s flood of 400 req/s is mostly refused.
    let start = Instant::now();
    let answers = load(backend, "backend", 400, Duration::from_secs(2), 4).await;
    let elapsed = start.elapsed().as_secs_f64();
    let ok = answers.iter().filter(|a| a.status == 200).count();
    let limited: Vec<&Answer> = answers.iter().filter(|a| a.status == 429).collect();
    eprintln!(
        "rate limit 100/s: {} sent in {elapsed:.2}s, {ok} passed, {} refused",
        answers.len(),
        limited.len()
    );
    assert_eq!(ok + limited.len(), answers.len());
    assert!(ok as f64 <= 100.0 + 100.0 * (elapsed + 0.5), "{ok} passed");
    assert!(limited.len() >= 200, "the excess was refused");
    assert!(
        limited
            .iter()
            .all(|a| a.error == "rate-limited" && a.retry_after.is_some())
    );

    // Two slow requests fill the slots; the other eight fail at once instead of queueing.
    let mut tasks = Vec::new();
    for _ in 0..10 {
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(slow_up).await;
            c.call("slow", "/", &[]).await
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let served = results.iter().filter(|a| a.status == 200).count();
    let overloaded = results
        .iter()
        .filter(|a| a.status == 503 && a.error == "overloaded")
        .count();
    assert_eq!((served, overloaded), (2, 8), "{results:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_health_checks_take_an_instance_out_before_traffic_fails() {
    let (_running, cp) = control("resil-health", |_| {}).await;
    let (sick, _pa) = instance("backend", "sick", Behavior::default(), &cp, &[]).await;
    let (_well, _pb) = instance("backend", "well", Behavior::default(), &cp, &[]).await;
    apply(
        &cp,
        "apiVersion: trellis.dev/v1alpha1\nkind: DestinationPolicy\nmetadata: {name: backend}\nspec:\n  targetRef: {name: backend}\n  healthCheck: {path: /healthz, interval: 100ms, unhealthyThreshold: 2}\n",
    )
    .await;
    let (client, up) = caller(&cp, "backend", &[]).await;
    wait_endpoints(&client, "backend", 2).await;
    let states = |c: serde_json::Value| -> Vec<String> {
        c["destinations"]["backend"]["endpoints"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| e["state"].as_str().unwrap_or("").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    sick.failing_handle().store(true, Ordering::SeqCst);
    let client_ref = &client;
    eventually(
        "the failing instance is marked unhealthy",
        Duration::from_secs(10),
        || async move {
            let s = states(config_of(client_ref).await);
            (s.iter().filter(|s| *s == "unhealthy").count() == 1).then_some(())
        },
    )
    .await;
    // No request has to fail for the checks to act: every one goes to the healthy instance.
    let mut c = Client::connect(up).await;
    for _ in 0..100 {
        let a = c.call("backend", "/", &[]).await;
        assert_eq!((a.status, a.served_by.as_str()), (200, "well"));
    }
    sick.failing_handle().store(false, Ordering::SeqCst);
    eventually(
        "the instance is back after a passing check",
        Duration::from_secs(10),
        || async move {
            let s = states(config_of(client_ref).await);
            s.iter().all(|s| s == "healthy").then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_shows_what_the_callers_proxy_would_do() {
    let (_running, cp) = control("resil-explain", |_| {}).await;
    let (_v1, _p1) = instance("web-v1", "v1", Behavior::default(), &cp, &[]).await;
    let (_v2, _p2) = instance("web-v2", "v2", Behavior::default(), &cp, &[]).await;
    apply(
        &cp,
        "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web}\nspec:\n  parentRefs: [{name: web}]\n  rules:\n    - name: canary\n      matches: [{headers: [{name: x-canary, value: \"yes\"}]}]\n      backendRefs: [{name: web-v2}]\n      retry: {codes: [503], attempts: 2}\n      timeouts: {request: 2s}\n    - backendRefs: [{name: web-v1, weight: 90}, {name: web-v2, weight: 10}]\n---\napiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: no-client-on-v2}\nspec:\n  targetRef: {name: web-v2}\n  action: DENY\n  rules: [{from: [{services: [client]}]}]\n",
    )
    .await;
    let (_client, _up) = caller(&cp, "web", &[]).await;
    let explain = |q: &'static str| {
        let cp = cp.clone();
        async move {
            let (status, body) = http_call(cp.http, "GET", q, "", None).await;
            assert_eq!(status, 200, "{body}");
            serde_json::from_str::<serde_json::Value>(&body).unwrap()
        }
    };
    let v = eventually(
        "the caller's proxy answers",
        Duration::from_secs(10),
        || async {
            let v = explain("/api/v1/explain?src=client&dst=web&path=/x&header=x-canary:yes").await;
            let healthy = v["backends"][0]["endpoints"][0]["state"] == "healthy";
            (v["answeredBy"].as_str().unwrap_or("").starts_with("proxy") && healthy).then_some(v)
        },
    )
    .await;
    assert_eq!(v["route"]["name"], "web.canary", "{v}");
    assert_eq!(v["route"]["retry"]["attempts"], 2);
    assert_eq!(v["backends"].as_array().unwrap().len(), 1);
    assert_eq!(v["backends"][0]["service"], "web-v2");
    assert_eq!(v["authorization"][0]["allowed"], false);
    assert_eq!(v["authorization"][0]["reason"], "default/no-client-on-v2");

    let v = explain("/api/v1/explain?src=client&dst=web&path=/x").await;
    let shares: Vec<(String, f64)> = v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["service"].as_str().unwrap().to_owned(),
                b["sharePercent"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        shares,
        vec![("web-v1".into(), 90.0), ("web-v2".into(), 10.0)]
    );
    assert_eq!(v["authorization"][0]["allowed"], true);

    // The CLI prints the same decision.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["--control-http", &format!("http://{}", cp.http)])
        .args([
            "explain",
            "client",
            "web",
            "GET",
            "/x",
            "-H",
            "x-canary: yes",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("route: web.canary"), "{text}");
    assert!(text.contains("retry: codes [503], attempts 2"), "{text}");
    assert!(
        text.contains("authorization at web-v2: DENY (default/no-client-on-v2)"),
        "{text}"
    );
    eprintln!("{text}");
}

/// An HTTPS server on loopback with a certificate for `localhost` from a fresh CA; answers
/// `secure hello` with the Host it received. Returns its address and the CA's PEM.
async fn spawn_tls_server() -> (SocketAddr, String) {
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let ck = trellis_api::tls::certified_key(cert.pem().as_bytes(), key.serialize_pem().as_bytes())
        .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(trellis_api::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(trellis_api::tls::CertResolver::new(ck));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let host = req
                            .headers()
                            .get("host")
                            .map(|h| h.to_str().unwrap_or("").to_owned())
                            .unwrap_or_default();
                        let mut rsp = http::Response::new(Full::new(Bytes::from("secure hello")));
                        rsp.headers_mut()
                            .insert("x-served-by", "tls-server".parse().unwrap());
                        rsp.headers_mut()
                            .insert("x-seen-host", host.parse().unwrap());
                        Ok::<_, std::convert::Infallible>(rsp)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, ca.pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_services_follow_the_environment_and_originate_tls() {
    let (_running, cp) = control("resil-external", |_| {}).await;
    let dev = http_server::spawn("billing-dev").await;
    let prod = http_server::spawn("billing-prod").await;
    let (tls_addr, ca_pem) = spawn_tls_server().await;
    let ca_yaml: String = ca_pem.lines().map(|l| format!("      {l}\n")).collect();
    apply(
        &cp,
        &format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: ExternalService\nmetadata: {{name: billing}}\nspec:\n  endpoints:\n    dev: [\"{}\"]\n    prod: [\"{}\"]\n---\napiVersion: trellis.dev/v1alpha1\nkind: ExternalService\nmetadata: {{name: secure-api}}\nspec:\n  endpoints:\n    dev: [\"localhost:{}\"]\n  tls:\n    caBundle: |\n{ca_yaml}",
            dev.addr,
            prod.addr,
            tls_addr.port()
        ),
    )
    .await;
    let dev_client = proxy(
        "client",
        &cp,
        &[
            "--env",
            "dev",
            "--upstream",
            "billing=127.0.0.1:0",
            "--upstream",
            "secure-api=127.0.0.1:0",
            "--instance",
            "client-dev",
        ],
    )
    .await;
    let prod_client = proxy(
        "client",
        &cp,
        &[
            "--env",
            "prod",
            "--upstream",
            "billing=127.0.0.1:0",
            "--instance",
            "client-prod",
        ],
    )
    .await;
    let billing = |p: &Running| p.bound.upstreams[&ServiceName::new("billing").unwrap()];
    let answer = |addr: SocketAddr, host: &'static str| async move {
        eventually(
            "the external service answers",
            Duration::from_secs(10),
            || async {
                let a = Client::connect(addr).await.call(host, "/", &[]).await;
                (a.status == 200).then_some(a)
            },
        )
        .await
    };
    assert_eq!(
        answer(billing(&dev_client), "billing").await.served_by,
        "billing-dev"
    );
    assert_eq!(
        answer(billing(&prod_client), "billing").await.served_by,
        "billing-prod"
    );

    let secure = dev_client.bound.upstreams[&ServiceName::new("secure-api").unwrap()];
    let a = answer(secure, "secure-api").await;
    assert_eq!(a.served_by, "tls-server");
    // The external server saw its own name, not the mesh name the app used.
    let mut c = Client::connect(secure).await;
    c.sender.ready().await.unwrap();
    let rsp = c
        .sender
        .send_request(
            http::Request::get("/")
                .header("host", "secure-api")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        rsp.headers()["x-seen-host"],
        format!("localhost:{}", tls_addr.port()).as_str()
    );
    // Metrics name the mesh name, like any destination.
    let m = metrics_of(&dev_client).await;
    assert!(
        counter(
            &m,
            "trellis_http_requests_total",
            &["dst=\"secure-api\"", "code=\"200\""]
        ) >= 2.0,
        "{m}"
    );
}
