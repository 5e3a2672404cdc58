//! `ambitctl config-dump`: a proxy's `/config_dump`, summarised for people.

use super::*;
/// A readable summary of a proxy's config dump; `-o json` gives the dump itself.
pub fn render_dump(c: &Component, dump: &Value, now: u64) -> String {
    let mut out = format!("{} {} ({})\n", c.kind.label(), c.name, c.endpoint);
    let field = |k: &str| match &dump[k] {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        v => Some(v.to_string()),
    };
    for k in [
        "version", "node", "gateway", "workload", "identity", "ready", "draining",
    ] {
        if let Some(v) = field(k) {
            out.push_str(&format!("  {k:<10} {v}\n"));
        }
    }
    let src = &dump["configSource"];
    if let Some(x) = src["xds"].as_str() {
        let st = &src["status"];
        out.push_str(&format!(
            "  config     xDS {x}: {}, {} responses, {} NACKs{}\n",
            if st["synced"] == true {
                "synced"
            } else {
                "NOT synced"
            },
            st["responses"],
            st["nacks"],
            st["lastError"]
                .as_str()
                .map(|e| format!(", last error: {e}"))
                .unwrap_or_default()
        ));
    } else if let Some(f) = src["file"].as_str() {
        out.push_str(&format!("  config     file {f}\n"));
    }
    let mut certs =
        crate::table::Table::new(&["IDENTITY", "NOT AFTER", "EXPIRES IN", "REFRESH AT"]);
    let mut cert_row = |identity: &str, v: &Value| {
        let na = v["notAfter"].as_u64().unwrap_or(0);
        let refresh = v["refreshAt"].as_u64().unwrap_or(0);
        certs.row([
            identity.to_string(),
            rfc3339(na),
            human_duration(na as i64 - now as i64),
            rfc3339(refresh),
        ]);
    };
    for v in dump["certificates"].as_array().into_iter().flatten() {
        cert_row(v["identity"].as_str().unwrap_or("?"), v);
    }
    if dump["certificate"].is_object() {
        cert_row(
            dump["identity"].as_str().unwrap_or("?"),
            &dump["certificate"],
        );
    }
    if !certs.is_empty() {
        out.push_str("\ncertificates:\n");
        out.push_str(&indent(&certs.render()));
    }
    if let Some(local) = dump["localWorkloads"].as_array() {
        let captures = dump["capture"]["workloads"].as_array();
        let mut t = crate::table::Table::new(&["WORKLOAD", "CAPTURE"]);
        for w in local.iter().filter_map(Value::as_str) {
            let cap = match (dump["capture"]["enabled"].as_bool(), captures) {
                (Some(false), _) => "off (no --capture)".to_string(),
                (Some(true), Some(list)) => match list.iter().find(|e| e["workload"] == w) {
                    Some(e) if e["attached"] == true => {
                        format!("attached on {}", e["interface"].as_str().unwrap_or("?"))
                    }
                    Some(e) => format!("NOT attached: {}", e["error"].as_str().unwrap_or("-")),
                    None => "- (speaks HBONE itself)".into(),
                },
                _ => "?".into(),
            };
            t.row([w.to_string(), cap]);
        }
        out.push_str(&format!("\nlocal workloads ({}):\n", local.len()));
        if !t.is_empty() {
            out.push_str(&indent(&t.render()));
        }
    }
    if let Some(pool) = dump["hbonePool"].as_array() {
        out.push_str(&format!("\nHBONE pool ({} destinations):\n", pool.len()));
        let mut t =
            crate::table::Table::new(&["SOURCE", "DESTINATION", "ADDRESS", "CONNS", "STREAMS"]);
        for p in pool {
            let s = |k: &str| match &p[k] {
                Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            t.row([
                s("source"),
                s("destination"),
                s("address"),
                s("connections"),
                s("streams"),
            ]);
        }
        if !t.is_empty() {
            out.push_str(&indent(&t.render()));
        }
    }
    let config = if dump["config"].is_object() {
        &dump["config"]
    } else {
        dump
    };
    let count = |k: &str| config[k].as_array().map(Vec::len);
    let counts: Vec<String> = [
        ("workloads", "workloads"),
        ("services", "services"),
        ("policies", "L4 policies"),
        ("peerAuthentications", "peer authentications"),
        ("httpRoutes", "HTTP routes"),
        ("httpPolicies", "L7 policies"),
        ("trafficPolicies", "traffic policies"),
    ]
    .iter()
    .filter_map(|(k, label)| count(k).map(|n| format!("{n} {label}")))
    .collect();
    if !counts.is_empty() {
        out.push_str(&format!("\nconfig: {}\n", counts.join(", ")));
    }
    out
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}
