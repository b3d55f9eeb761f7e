//! `trellis stat`, `edges`, `top` and `tap`: golden signals and live traffic from the control
//! plane, which merges what the proxies keep (no Prometheus needed).

use std::process::ExitCode;
use std::time::Duration;

use http::Method;
use serde_json::Value;

use crate::client::{ApiClient, ClientError};
use crate::resources::{Output, render, table};

fn pct(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| "-".into(), |r| format!("{:.2}%", r * 100.0))
}

fn ms(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| "-".into(), |m| format!("{m:.2}ms"))
}

fn rps(v: &Value) -> String {
    format!("{:.1}", v.as_f64().unwrap_or(0.0))
}

/// The signal columns every view shares.
fn signal_cells(item: &Value) -> Vec<String> {
    vec![
        rps(&item["rps"]),
        pct(&item["success_rate"]),
        ms(&item["latency_ms"]["p50"]),
        ms(&item["latency_ms"]["p95"]),
        ms(&item["latency_ms"]["p99"]),
        pct(&item["tls_share"]),
    ]
}

const SIGNAL_HEADERS: [&str; 6] = ["RPS", "SUCCESS", "P50", "P95", "P99", "TLS"];

fn items(body: &Value) -> Vec<Value> {
    body["items"].as_array().cloned().unwrap_or_default()
}

async fn fetch(api: &ApiClient, path: &str) -> Result<Value, ClientError> {
    let (status, body) = api.call(Method::GET, path, None).await?;
    if status >= 300 {
        let reason = body["errors"][0]["reason"]
            .as_str()
            .or(body["error"].as_str())
            .unwrap_or("request failed")
            .to_owned();
        return Err(ClientError::Other(format!("{path}: {status} {reason}")));
    }
    Ok(body)
}

fn footer(body: &Value) -> String {
    format!(
        "(last {}s; {} of {} proxies answered)",
        body["window_secs"], body["proxies_answered"], body["proxies_asked"]
    )
}

pub(crate) async fn stat(
    api: &ApiClient,
    service: Option<&str>,
    window: u32,
    output: Output,
) -> Result<ExitCode, ClientError> {
    let mut path = format!("/api/v1/stats/services?window={window}");
    if let Some(s) = service {
        path.push_str(&format!("&service={s}"));
    }
    let body = fetch(api, &path).await?;
    if output != Output::Table {
        println!("{}", render(&body, output));
        return Ok(ExitCode::SUCCESS);
    }
    let rows = items(&body)
        .iter()
        .map(|i| {
            let mut row = vec![
                i["service"].as_str().unwrap_or("").to_owned(),
                i["instances"].to_string(),
            ];
            row.extend(signal_cells(i));
            row
        })
        .collect();
    let mut headers = vec!["SERVICE", "INSTANCES"];
    headers.extend(SIGNAL_HEADERS);
    println!("{}", table(&headers, rows));
    if let Some(s) = service {
        let routes = fetch(
            api,
            &format!("/api/v1/stats/routes?service={s}&window={window}"),
        )
        .await?;
        let rows = items(&routes)
            .iter()
            .map(|i| {
                let mut row = vec![i["route"].as_str().unwrap_or("").to_owned()];
                row.extend(signal_cells(i));
                row
            })
            .collect();
        let mut headers = vec!["ROUTE"];
        headers.extend(SIGNAL_HEADERS);
        println!("\n{}", table(&headers, rows));
    }
    println!("{}", footer(&body));
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn edges(
    api: &ApiClient,
    window: u32,
    output: Output,
) -> Result<ExitCode, ClientError> {
    let body = fetch(api, &format!("/api/v1/stats/edges?window={window}")).await?;
    if output != Output::Table {
        println!("{}", render(&body, output));
        return Ok(ExitCode::SUCCESS);
    }
    let rows = items(&body)
        .iter()
        .map(|i| {
            let mut row = vec![
                i["src"].as_str().unwrap_or("").to_owned(),
                i["dst"].as_str().unwrap_or("").to_owned(),
            ];
            row.extend(signal_cells(i));
            row.push(i["dst_identity"].as_str().unwrap_or("-").to_owned());
            row
        })
        .collect();
    let mut headers = vec!["SRC", "DST"];
    headers.extend(SIGNAL_HEADERS);
    headers.push("DST IDENTITY");
    println!("{}\n{}", table(&headers, rows), footer(&body));
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn top(
    api: &ApiClient,
    service: &str,
    window: u32,
    once: bool,
    output: Output,
) -> Result<ExitCode, ClientError> {
    loop {
        let body = fetch(
            api,
            &format!("/api/v1/stats/paths?service={service}&window={window}&limit=20"),
        )
        .await?;
        if output != Output::Table {
            println!("{}", render(&body, output));
        } else {
            let rows = items(&body)
                .iter()
                .map(|i| {
                    let mut row = vec![
                        i["method"].as_str().unwrap_or("").to_owned(),
                        i["path"].as_str().unwrap_or("").to_owned(),
                        i["requests"].to_string(),
                    ];
                    row.extend(signal_cells(i));
                    row
                })
                .collect();
            let mut headers = vec!["METHOD", "PATH", "REQUESTS"];
            headers.extend(SIGNAL_HEADERS);
            if !once {
                // Clear the terminal and redraw, like top(1).
                print!("\x1b[2J\x1b[H");
                println!("trellis top {service} (every 2s, Ctrl-C to quit)\n");
            }
            println!("{}\n{}", table(&headers, rows), footer(&body));
        }
        if once {
            return Ok(ExitCode::SUCCESS);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
        }
    }
}

pub(crate) struct TapArgs<'a> {
    pub service: &'a str,
    pub path: Option<&'a str>,
    pub method: Option<&'a str>,
    pub rate: u32,
    /// Stop after this many requests.
    pub max: Option<u64>,
}

pub(crate) async fn tap(
    api: &ApiClient,
    args: &TapArgs<'_>,
    output: Output,
) -> Result<ExitCode, ClientError> {
    let mut path = format!("/api/v1/tap?service={}&rate={}", args.service, args.rate);
    if let Some(p) = args.path {
        path.push_str(&format!("&path={p}"));
    }
    if let Some(m) = args.method {
        path.push_str(&format!("&method={m}"));
    }
    let mut seen = 0u64;
    let mut header_printed = false;
    api.stream_lines(&path, |line| {
        let Ok(event) = serde_json::from_str::<Value>(line) else {
            return true;
        };
        if output == Output::Table {
            if !header_printed {
                println!(
                    "{:<24} {:<8} {:<12} {:<12} {:<6} {:<30} {:>6} {:>10}  TRACE",
                    "TIME", "DIR", "SRC", "DST", "METHOD", "PATH", "STATUS", "LATENCY"
                );
                header_printed = true;
            }
            println!(
                "{:<24} {:<8} {:<12} {:<12} {:<6} {:<30} {:>6} {:>10}  {}",
                event["time"].as_str().unwrap_or(""),
                event["direction"].as_str().unwrap_or(""),
                event["src"].as_str().unwrap_or(""),
                event["dst"].as_str().unwrap_or(""),
                event["method"].as_str().unwrap_or(""),
                event["path"].as_str().unwrap_or(""),
                event["status"],
                ms(&event["latency_ms"]),
                event["trace_id"].as_str().unwrap_or("-"),
            );
        } else {
            println!("{line}");
        }
        seen += 1;
        args.max.is_none_or(|max| seen < max)
    })
    .await?;
    Ok(ExitCode::SUCCESS)
}
