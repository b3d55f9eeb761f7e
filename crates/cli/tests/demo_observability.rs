//! The demo mesh seen from outside: the dashboard in a real headless Chromium, a real
//! Prometheus scraping the mesh through the control plane's service discovery and evaluating
//! the shipped recording rules, and `trellis stat` against the demo. `scripts/test.sh`
//! installs Chromium and Prometheus (Debian packages).

#![allow(clippy::unwrap_used)]

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn trellis() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_trellis"))
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

fn require(binary: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let p = Path::new(dir).join(binary);
        if p.exists() {
            return p;
        }
    }
    panic!("{binary} is not installed: scripts/test.sh installs it (apt-get install {binary})");
}

/// `trellis demo` in the background; stopped (SIGTERM) when dropped.
struct Demo {
    child: Child,
    /// `http://127.0.0.1:PORT` of the control plane (from the printed dashboard URL).
    base: String,
    dir: PathBuf,
}

impl Demo {
    fn start(name: &str) -> Demo {
        let dir = std::env::temp_dir().join(format!("trellis-{name}-{}", std::process::id()));
        let mut child = Command::new(trellis())
            .args(["demo", "--duration", "120s", "--rps", "40", "--dir"])
            .arg(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(stdout).lines();
        let mut base = None;
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(url) = line.strip_prefix("Dashboard: ") {
                base = Some(url.trim().trim_end_matches('/').to_owned());
                break;
            }
        }
        // Keep draining stdout so the demo never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Demo {
            child,
            base: base.expect("the demo prints the dashboard URL"),
            dir,
        }
    }

    /// `trellis stat -o json` against the demo.
    fn stat_json(&self) -> Value {
        let out = Command::new(trellis())
            .args(["--control-http", &self.base, "stat", "-o", "json"])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// Waits until the demo's traffic shows in the control plane's golden signals.
    fn wait_for_traffic(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let stat = self.stat_json();
            let busy = stat["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|i| i["requests"].as_u64().unwrap_or(0) > 0)
                .count();
            if busy >= 3 {
                return;
            }
            assert!(Instant::now() < deadline, "no traffic in the demo: {stat}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn dashboard_shows_the_demo_mesh_in_headless_chromium_and_stat_works() {
    let chromium = require("chromium");
    let demo = Demo::start("dash");
    demo.wait_for_traffic();

    // `trellis stat` against the demo: every demo service, with numbers.
    let table = Command::new(trellis())
        .args(["--control-http", &demo.base, "stat"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    for svc in ["frontend", "orders-v1", "inventory"] {
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("{svc} ")))
            .unwrap_or_else(|| panic!("no {svc} row:\n{table}"));
        assert!(row.contains('%') && row.contains("ms"), "{row}");
    }

    // The demo exports 10% of traces to the control plane's trace view: a whole request,
    // frontend → orders → inventory, is one trace of six spans in one tree.
    let curl_json = |url: String| -> Value {
        let out = Command::new("curl").args(["-fsS", &url]).output().unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let trace = loop {
        let list = curl_json(format!("{}/api/v1/traces?limit=200", demo.base));
        let whole =
            list["items"].as_array().into_iter().flatten().find(|t| {
                t["spans"] == 6 && t["services"].as_array().is_some_and(|s| s.len() == 3)
            });
        if let Some(t) = whole {
            break t.clone();
        }
        assert!(Instant::now() < deadline, "no complete trace: {list}");
        std::thread::sleep(Duration::from_millis(500));
    };
    let id = trace["trace_id"].as_str().unwrap();
    let spans = curl_json(format!("{}/api/v1/traces/{id}", demo.base))["spans"]
        .as_array()
        .cloned()
        .unwrap();
    let ids: Vec<&str> = spans
        .iter()
        .map(|s| s["span_id"].as_str().unwrap())
        .collect();
    let roots = spans
        .iter()
        .filter(|s| {
            s["parent_span_id"]
                .as_str()
                .is_none_or(|p| !ids.contains(&p))
        })
        .count();
    assert_eq!(roots, 1, "one tree: {spans:?}");
    assert_eq!(trace["services"][0], "frontend");
    assert_eq!(trace["services"][2], "inventory");

    // A real browser renders the page (its script fetches the API, draws the graph and the
    // tables) and hands back the resulting DOM.
    let profile = demo.dir.join("chromium-profile");
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--virtual-time-budget=15000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("{}/", demo.base))
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("data-loaded=\"true\""),
        "the page loaded its data: {}\n{dom}",
        String::from_utf8_lossy(&out.stderr)
    );
    for svc in ["frontend", "orders-v1", "orders-v2", "inventory"] {
        assert!(
            dom.contains(&format!("<tr data-service=\"{svc}\"")),
            "services table row for {svc}"
        );
        assert!(
            dom.contains(&format!("data-service=\"{svc}\" tabindex=\"0\">"))
                && dom.contains("<g class=\"node"),
            "topology node for {svc}"
        );
    }
    for edge in ["frontend-&gt;orders", "orders-v1-&gt;inventory"] {
        assert!(
            dom.contains(&format!("data-edge=\"{edge}\"")),
            "edge {edge}"
        );
    }
    assert!(dom.contains("data-trace=\""), "recent traces listed");
    // Numbers, not placeholders: a success percentage and an RPS figure in the table.
    let frontend_row = dom
        .split("<tr data-service=\"frontend\"")
        .nth(1)
        .and_then(|r| r.split("</tr>").next())
        .unwrap();
    assert!(frontend_row.contains('%'), "{frontend_row}");
    let rps: f64 = frontend_row
        .split("class=\"n rps\">")
        .nth(1)
        .and_then(|c| c.split('<').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("an RPS cell: {frontend_row}"));
    assert!(rps > 0.0, "{frontend_row}");
    // No asset from elsewhere: the page works offline.
    let html = Command::new("curl")
        .args(["-fsS", &format!("{}/", demo.base)])
        .output()
        .unwrap();
    let html = String::from_utf8_lossy(&html.stdout);
    assert!(html.len() < 100_000, "small page");
    for external in ["src=\"http", "href=\"http", "@import", "url(http"] {
        assert!(!html.contains(external), "external reference {external}");
    }
}

#[test]
fn prometheus_scrapes_the_demo_mesh_and_evaluates_the_golden_signal_rules() {
    let prometheus = require("prometheus");
    let demo = Demo::start("prom");
    demo.wait_for_traffic();

    // The shipped config and rules, with short intervals so the test does not wait minutes.
    let work = demo.dir.join("prometheus");
    std::fs::create_dir_all(&work).unwrap();
    let rules = std::fs::read_to_string(repo_file("deploy/prometheus/rules.yml"))
        .unwrap()
        .replace("interval: 15s", "interval: 1s");
    std::fs::write(work.join("rules.yml"), rules).unwrap();
    let config = std::fs::read_to_string(repo_file("deploy/prometheus/prometheus.yml"))
        .unwrap()
        .replace("http://127.0.0.1:7441", &demo.base)
        .replace("scrape_interval: 15s", "scrape_interval: 1s")
        .replace("evaluation_interval: 15s", "evaluation_interval: 1s")
        .replace("scrape_timeout: 10s", "scrape_timeout: 1s")
        .replace("refresh_interval: 30s", "refresh_interval: 1s");
    assert!(
        config.contains(&demo.base),
        "the config names the control plane"
    );
    std::fs::write(work.join("prometheus.yml"), config).unwrap();
    let listen = trellis_test_support::process::free_port();
    let mut server = Command::new(prometheus)
        .arg(format!(
            "--config.file={}",
            work.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            work.join("data").display()
        ))
        .arg(format!("--web.listen-address={listen}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _server = Kill(&mut server);

    let query = |q: &str| -> Value {
        let out = Command::new("curl")
            .args(["-fsS", "--get", "--data-urlencode"])
            .arg(format!("query={q}"))
            .arg(format!("http://{listen}/api/v1/query"))
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let result = loop {
        let r = query("trellis:service:requests:rate1m");
        let series = r["data"]["result"].as_array().cloned().unwrap_or_default();
        if series.iter().any(|s| s["metric"]["dst"] == "inventory") {
            break series;
        }
        assert!(Instant::now() < deadline, "no recorded golden signal: {r}");
        std::thread::sleep(Duration::from_millis(500));
    };
    let inventory = result
        .iter()
        .find(|s| s["metric"]["dst"] == "inventory")
        .unwrap();
    let rate: f64 = inventory["value"][1].as_str().unwrap().parse().unwrap();
    assert!(rate > 0.0, "inventory serves traffic: {inventory}");

    // Every demo proxy and the control plane were discovered and scraped.
    let up = query("up");
    let targets = up["data"]["result"].as_array().cloned().unwrap_or_default();
    let proxies = targets
        .iter()
        .filter(|t| t["metric"]["job"] == "trellis-proxy" && t["value"][1] == "1")
        .count();
    assert_eq!(proxies, 5, "{up}");
    assert!(
        targets
            .iter()
            .any(|t| t["metric"]["job"] == "trellis-control" && t["value"][1] == "1"),
        "{up}"
    );
    let success = query("trellis:service:success_rate:ratio1m");
    assert!(
        !success["data"]["result"].as_array().unwrap().is_empty(),
        "{success}"
    );
}
