//! `trellis apply`, `get`, `delete`: resources and registry views through the HTTP API.

use std::io::Read;
use std::process::ExitCode;

use http::Method;
use serde_json::Value;
use trellis_core::resources::Kind;

use crate::client::{ApiClient, ClientError};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Output {
    Table,
    Yaml,
    Json,
}

fn print_errors(v: &Value) {
    for e in v["errors"].as_array().into_iter().flatten() {
        let mut line = String::from("error: ");
        if let Some(d) = e["document"].as_u64() {
            line.push_str(&format!("document {d}"));
            if let Some(r) = e["resource"].as_str() {
                line.push_str(&format!(" ({r})"));
            }
            line.push_str(": ");
        }
        if let Some(p) = e["path"].as_str() {
            line.push_str(&format!("{p}: "));
        }
        line.push_str(e["reason"].as_str().unwrap_or("rejected"));
        eprintln!("{line}");
    }
}

pub(crate) async fn apply(
    api: &ApiClient,
    file: &str,
    dry_run: bool,
) -> Result<ExitCode, ClientError> {
    let text = if file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| ClientError::Other(format!("stdin: {e}")))?;
        s
    } else {
        std::fs::read_to_string(file).map_err(|e| ClientError::Other(format!("{file}: {e}")))?
    };
    let path = format!("/api/v1/apply?dryRun={dry_run}");
    let (status, body) = api.call(Method::POST, &path, Some(text)).await?;
    if status != 200 {
        print_errors(&body);
        eprintln!("nothing was applied");
        return Ok(ExitCode::from(64));
    }
    for w in body["warnings"].as_array().into_iter().flatten() {
        eprintln!(
            "warning: {}: {}: {}",
            w["resource"].as_str().unwrap_or(""),
            w["path"].as_str().unwrap_or(""),
            w["message"].as_str().unwrap_or("")
        );
    }
    let suffix = if dry_run { " (dry run)" } else { "" };
    for r in body["results"].as_array().into_iter().flatten() {
        println!(
            "{} {}{suffix}",
            r["resource"].as_str().unwrap_or("?"),
            r["action"].as_str().unwrap_or("?")
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn render(value: &Value, output: Output) -> String {
    match output {
        Output::Json => serde_json::to_string_pretty(value).unwrap_or_default(),
        _ => serde_saphyr::to_string(value).unwrap_or_default(),
    }
}

/// Column-aligned table.
pub(crate) fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("   ")
            .trim_end()
            .to_owned()
    };
    let mut out = vec![line(headers.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.into_iter().map(line));
    out.join("\n")
}

fn summary(kind: &str, spec: &Value) -> String {
    match kind {
        "HTTPRoute" | "GRPCRoute" => {
            let parents: Vec<&str> = spec["parentRefs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["name"].as_str())
                .collect();
            let backends: Vec<String> = spec["rules"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|r| r["backendRefs"].as_array().into_iter().flatten())
                .map(|b| {
                    format!(
                        "{}={}",
                        b["name"].as_str().unwrap_or("?"),
                        b["weight"].as_i64().unwrap_or(1)
                    )
                })
                .collect();
            format!(
                "parents={} backends={}",
                parents.join(","),
                backends.join(",")
            )
        }
        "Service" => {
            let ports: Vec<String> = spec["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    format!(
                        "{}/{}",
                        p["port"],
                        p["appProtocol"].as_str().unwrap_or("http")
                    )
                })
                .collect();
            format!("ports={}", ports.join(","))
        }
        _ => spec
            .get("targetRef")
            .and_then(|t| t["name"].as_str())
            .map(|t| format!("target={t}"))
            .unwrap_or_default(),
    }
}

pub(crate) async fn get(
    api: &ApiClient,
    what: &str,
    name: Option<&str>,
    namespace: &str,
    since: Option<&str>,
    output: Output,
) -> Result<ExitCode, ClientError> {
    match what.to_ascii_lowercase().as_str() {
        "services" | "service" | "svc" | "instances" | "instance" => {
            let (_, body) = api.call(Method::GET, "/api/v1/services", None).await?;
            if output != Output::Table {
                println!("{}", render(&body, output));
                return Ok(ExitCode::SUCCESS);
            }
            let items = body["items"].as_array().cloned().unwrap_or_default();
            if what.starts_with("inst") {
                let rows = items
                    .iter()
                    .flat_map(|s| {
                        let svc = s["name"].as_str().unwrap_or("").to_owned();
                        s["instances"]
                            .as_array()
                            .cloned()
                            .unwrap_or_default()
                            .into_iter()
                            .map(move |i| {
                                vec![
                                    svc.clone(),
                                    i["instance_id"].as_str().unwrap_or("").to_owned(),
                                    i["address"].as_str().unwrap_or("").to_owned(),
                                    i["zone"].as_str().unwrap_or("").to_owned(),
                                ]
                            })
                    })
                    .filter(|r| name.is_none_or(|n| r[0] == n))
                    .collect();
                println!(
                    "{}",
                    table(&["SERVICE", "INSTANCE", "ADDRESS", "ZONE"], rows)
                );
            } else {
                let rows = items
                    .iter()
                    .filter(|s| name.is_none_or(|n| s["name"].as_str() == Some(n)))
                    .map(|s| {
                        let instances = s["instances"].as_array().cloned().unwrap_or_default();
                        vec![
                            s["name"].as_str().unwrap_or("").to_owned(),
                            instances.len().to_string(),
                            instances
                                .iter()
                                .filter_map(|i| i["address"].as_str())
                                .collect::<Vec<_>>()
                                .join(","),
                        ]
                    })
                    .collect();
                println!("{}", table(&["SERVICE", "INSTANCES", "ADDRESSES"], rows));
            }
            Ok(ExitCode::SUCCESS)
        }
        "audit" => {
            let path = match since {
                Some(s) => format!("/api/v1/audit?limit=1000&since={s}"),
                None => "/api/v1/audit?limit=50".to_owned(),
            };
            let (status, body) = api.call(Method::GET, &path, None).await?;
            if status >= 300 {
                eprintln!("{}", render(&body, Output::Yaml));
                return Ok(ExitCode::from(1));
            }
            if output != Output::Table {
                println!("{}", render(&body, output));
                return Ok(ExitCode::SUCCESS);
            }
            let rows = body["items"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    vec![
                        r["version"].to_string(),
                        r["time"].as_str().unwrap_or("").to_owned(),
                        r["actor"].as_str().unwrap_or("").to_owned(),
                        r["action"].as_str().unwrap_or("").to_owned(),
                        r["resource"].as_str().unwrap_or("").to_owned(),
                    ]
                })
                .collect();
            println!(
                "{}",
                table(&["VERSION", "TIME", "ACTOR", "ACTION", "RESOURCE"], rows)
            );
            Ok(ExitCode::SUCCESS)
        }
        other => {
            let Some(kind) = Kind::parse_loose(other) else {
                eprintln!(
                    "error: unknown kind {other:?}; try services, instances, audit, or one of: {}",
                    Kind::ALL.map(|k| k.as_str()).join(", ")
                );
                return Ok(ExitCode::from(2));
            };
            let path = match name {
                Some(n) => format!("/api/v1/resources/{kind}/{namespace}/{n}"),
                None => format!("/api/v1/resources/{kind}"),
            };
            let (status, body) = api.call(Method::GET, &path, None).await?;
            if status != 200 {
                print_errors(&body);
                return Ok(ExitCode::from(1));
            }
            let items: Vec<Value> = match name {
                Some(_) => vec![body],
                None => body["items"].as_array().cloned().unwrap_or_default(),
            };
            match output {
                Output::Table => {
                    let rows = items
                        .iter()
                        .map(|i| {
                            let r = &i["resource"];
                            vec![
                                r["metadata"]["name"].as_str().unwrap_or("").to_owned(),
                                r["metadata"]["namespace"].as_str().unwrap_or("").to_owned(),
                                i["version"].to_string(),
                                i["updated"].as_str().unwrap_or("").to_owned(),
                                summary(kind.as_str(), &r["spec"]),
                            ]
                        })
                        .collect();
                    println!(
                        "{}",
                        table(
                            &["NAME", "NAMESPACE", "VERSION", "UPDATED", "SUMMARY"],
                            rows
                        )
                    );
                }
                _ => {
                    let resources: Vec<Value> =
                        items.iter().map(|i| i["resource"].clone()).collect();
                    let value = if name.is_some() {
                        resources.into_iter().next().unwrap_or_default()
                    } else {
                        Value::Array(resources)
                    };
                    println!("{}", render(&value, output));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub(crate) async fn delete(
    api: &ApiClient,
    what: &str,
    name: &str,
    namespace: &str,
) -> Result<ExitCode, ClientError> {
    let Some(kind) = Kind::parse_loose(what) else {
        eprintln!("error: unknown kind {what:?}");
        return Ok(ExitCode::from(2));
    };
    let (status, body) = api
        .call(
            Method::DELETE,
            &format!("/api/v1/resources/{kind}/{namespace}/{name}"),
            None,
        )
        .await?;
    if status != 200 {
        print_errors(&body);
        return Ok(ExitCode::from(1));
    }
    println!("{kind}/{namespace}/{name} deleted");
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn token(
    api: &ApiClient,
    cmd: &crate::TokenCommand,
) -> Result<ExitCode, ClientError> {
    let (status, body) = match cmd {
        crate::TokenCommand::Create {
            service,
            namespace,
            ttl,
            uses,
        } => {
            let req = serde_json::json!({
                "service": service, "namespace": namespace, "ttl": ttl, "maxUses": uses,
            });
            api.call(Method::POST, "/api/v1/tokens", Some(req.to_string()))
                .await?
        }
        crate::TokenCommand::List => api.call(Method::GET, "/api/v1/tokens", None).await?,
        crate::TokenCommand::Revoke { id } => {
            api.call(Method::DELETE, &format!("/api/v1/tokens/{id}"), None)
                .await?
        }
    };
    if status != 200 {
        print_errors(&body);
        return Ok(ExitCode::from(1));
    }
    match cmd {
        crate::TokenCommand::Create { .. } => {
            println!("{}", body["token"].as_str().unwrap_or_default());
        }
        crate::TokenCommand::List => {
            let mut rows = Vec::new();
            for t in body["tokens"].as_array().into_iter().flatten() {
                let expires = t["expires"].as_i64().unwrap_or(0).max(0) as u64;
                rows.push(vec![
                    t["id"].as_str().unwrap_or_default().to_owned(),
                    t["service"].as_str().unwrap_or_default().to_owned(),
                    t["namespace"].as_str().unwrap_or_default().to_owned(),
                    trellis_core::time::rfc3339(
                        std::time::UNIX_EPOCH + std::time::Duration::from_secs(expires),
                    ),
                    match t["maxUses"].as_u64() {
                        Some(max) => format!("{}/{max}", t["uses"]),
                        None => t["uses"].to_string(),
                    },
                    t["revoked"].to_string(),
                ]);
            }
            println!(
                "{}",
                table(
                    &["ID", "SERVICE", "NAMESPACE", "EXPIRES", "USES", "REVOKED"],
                    rows
                )
            );
        }
        crate::TokenCommand::Revoke { id } => println!("token {id} revoked"),
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn check(api: &ApiClient) -> Result<ExitCode, ClientError> {
    let (status, body) = api.call(Method::GET, "/api/v1/check", None).await?;
    if status != 200 {
        print_errors(&body);
        return Ok(ExitCode::from(1));
    }
    let mut all_ok = true;
    for c in body["checks"].as_array().into_iter().flatten() {
        let ok = c["ok"].as_bool().unwrap_or(false);
        all_ok &= ok;
        println!(
            "{} {:<20} {}",
            if ok { "ok  " } else { "FAIL" },
            c["name"].as_str().unwrap_or("?"),
            c["detail"].as_str().unwrap_or("")
        );
        if let Some(hint) = c["hint"].as_str() {
            println!("     hint: {hint}");
        }
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub(crate) async fn ca(api: &ApiClient, cmd: &crate::CaCommand) -> Result<ExitCode, ClientError> {
    let (status, body) = match cmd {
        crate::CaCommand::Rotate { finish, force } => {
            let req = serde_json::json!({ "finish": finish, "force": force }).to_string();
            api.call(Method::POST, "/api/v1/ca/rotation", Some(req))
                .await?
        }
        crate::CaCommand::Status => api.call(Method::GET, "/api/v1/ca/rotation", None).await?,
    };
    if status != 200 {
        print_errors(&body);
        return Ok(ExitCode::from(1));
    }
    let phase = body["phase"].as_str().unwrap_or("?");
    println!("phase: {phase}, trusted roots: {}", body["roots"]);
    if phase == "rotating" {
        println!(
            "proxies renew under the new root within seconds; then run `trellis ca rotate --finish`"
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) struct ExplainArgs<'a> {
    pub src: &'a str,
    pub dst: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a [String],
}

pub(crate) async fn explain(
    api: &ApiClient,
    args: &ExplainArgs<'_>,
    output: Output,
) -> Result<ExitCode, ClientError> {
    use trellis_core::explain::encode;
    let mut query = format!(
        "/api/v1/explain?src={}&dst={}&method={}&path={}",
        encode(args.src),
        encode(args.dst),
        encode(args.method),
        encode(args.path)
    );
    for h in args.headers {
        query.push_str(&format!("&header={}", encode(h)));
    }
    let (status, body) = api.call(Method::GET, &query, None).await?;
    if status != 200 {
        print_errors(&body);
        return Ok(ExitCode::from(1));
    }
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&body).unwrap_or_default()
        ),
        Output::Yaml => println!("{}", serde_saphyr::to_string(&body).unwrap_or_default()),
        Output::Table => print_explanation(&body),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_explanation(v: &Value) {
    let s = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    println!(
        "{} -> {}: {} {}",
        s(&v["source"]),
        s(&v["destination"]),
        s(&v["request"]["method"]),
        s(&v["request"]["path"])
    );
    println!("answered by: {}", s(&v["answeredBy"]));
    if let Some(e) = v["error"].as_str() {
        println!("error: {e}");
        return;
    }
    let route = &v["route"];
    if route.is_null() {
        println!(
            "route: none matches; calls go to {} itself",
            s(&v["destination"])
        );
    } else {
        println!("route: {}", s(&route["name"]));
        let ms = |x: &Value| {
            x.as_object().map(|d| {
                let secs = d.get("secs").and_then(Value::as_u64).unwrap_or(0);
                let nanos = d.get("nanos").and_then(Value::as_u64).unwrap_or(0);
                format!("{}ms", secs * 1000 + nanos / 1_000_000)
            })
        };
        println!(
            "  timeouts: request {}, per try {}",
            ms(&route["request_timeout"]).unwrap_or_else(|| "none".into()),
            ms(&route["backend_timeout"]).unwrap_or_else(|| "none".into())
        );
        match route["retry"].as_object() {
            Some(r) => println!(
                "  retry: codes {}, attempts {}, backoff {}{}",
                r.get("codes").map_or_else(String::new, |c| c.to_string()),
                r.get("attempts")
                    .map_or_else(String::new, |a| a.to_string()),
                r.get("backoff")
                    .map_or_else(|| "?".into(), |b| ms(b).unwrap_or_default()),
                if r.get("nonIdempotent").and_then(Value::as_bool) == Some(true) {
                    ", all methods"
                } else {
                    ", idempotent methods"
                }
            ),
            None => println!("  retry: connection failures only (once, any method)"),
        }
        if !route["mirror"].is_null() {
            println!(
                "  mirror: {} ({}%)",
                s(&route["mirror"]["service"]),
                route["mirror"]["percent"]
            );
        }
    }
    if !v["faults"].is_null() {
        println!("faults: {}", v["faults"]);
    }
    for b in v["backends"].as_array().into_iter().flatten() {
        println!(
            "backend {} weight {} ({:.1}%) lb {} ejection after {} failures",
            s(&b["service"]),
            b["weight"],
            b["sharePercent"].as_f64().unwrap_or(0.0),
            s(&b["policy"]["loadBalancer"]),
            b["policy"]["outlier"]["consecutiveFailures"]
        );
        for e in b["endpoints"].as_array().into_iter().flatten() {
            let reason = e["health"]["reason"]
                .as_str()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default();
            println!(
                "  {:<22} zone {:<8} {}{}",
                s(&e["address"]),
                e["zone"].as_str().filter(|z| !z.is_empty()).unwrap_or("-"),
                s(&e["state"]),
                reason
            );
        }
    }
    for d in v["authorization"].as_array().into_iter().flatten() {
        println!(
            "authorization at {}: {} ({}){}",
            s(&d["service"]),
            if d["allowed"].as_bool() == Some(true) {
                "ALLOW"
            } else {
                "DENY"
            },
            s(&d["reason"]),
            d["note"]
                .as_str()
                .map(|n| format!("; {n}"))
                .unwrap_or_default()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(&["A", "LONGER"], vec![vec!["xxxx".into(), "y".into()]]);
        assert_eq!(t, "A      LONGER\nxxxx   y");
    }

    #[test]
    fn route_summaries() {
        let spec = serde_json::json!({"parentRefs": [{"name": "web"}], "rules": [{"backendRefs": [{"name": "a", "weight": 80}, {"name": "b", "weight": 20}]}]});
        assert_eq!(
            summary("HTTPRoute", &spec),
            "parents=web backends=a=80,b=20"
        );
    }
}
