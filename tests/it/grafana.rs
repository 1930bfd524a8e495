//! `deploy/grafana/lockstep.json`: every query of the dashboard names a metric the node
//! exports (the names declared in `hub/src/metrics.rs` and `api/src/metrics.rs`, the only
//! places metric names are written), histograms only through their `_bucket` series, and the
//! dashboard covers the figures operators ask for first.

use serde_json::Value;
use std::collections::BTreeSet;
use tests::workspace;

/// Every `"lockstep_…"` string literal of the two metrics modules.
fn exported() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for file in ["hub/src/metrics.rs", "api/src/metrics.rs"] {
        let text = std::fs::read_to_string(workspace().join(file)).unwrap();
        for part in text.split('"').skip(1).step_by(2) {
            if part.starts_with("lockstep_")
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                names.insert(part.to_owned());
            }
        }
    }
    names
}

/// Every `expr` in the dashboard, however deeply nested.
fn exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// The metric names a query uses that the node does not export (histograms are exported as
/// `_bucket`, `_sum` and `_count` series; a bare histogram name is not a series).
fn unknown(expr: &str, exported: &BTreeSet<String>) -> Vec<String> {
    let mut bad = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("lockstep_") {
        let token: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[at + token.len()..];
        let histogram = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| token.strip_suffix(s))
            .filter(|base| base.ends_with("_seconds") && exported.contains(*base));
        let known =
            histogram.is_some() || (exported.contains(&token) && !token.ends_with("_seconds"));
        if !known {
            bad.push(token);
        }
    }
    bad
}

#[test]
fn every_dashboard_query_names_an_exported_metric() {
    let exported = exported();
    assert!(exported.len() > 40, "found only {exported:?}");
    let text = std::fs::read_to_string(workspace().join("deploy/grafana/lockstep.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut all = Vec::new();
    exprs(&dashboard, &mut all);
    assert!(all.len() > 30, "{} queries", all.len());
    let bad: Vec<(String, Vec<String>)> = all
        .iter()
        .map(|e| (e.clone(), unknown(e, &exported)))
        .filter(|(_, bad)| !bad.is_empty())
        .collect();
    assert!(
        bad.is_empty(),
        "queries naming metrics the node does not export: {bad:#?}"
    );
    // The checker can fail: a typo, a bare histogram and a counter's made-up bucket.
    assert_eq!(
        unknown(
            "rate(lockstep_deliveries_totl[1m]) + lockstep_broker_publish_seconds + lockstep_deliveries_total_bucket",
            &exported
        ),
        [
            "lockstep_deliveries_totl",
            "lockstep_broker_publish_seconds",
            "lockstep_deliveries_total_bucket"
        ]
    );
    // What operators look at first is there.
    let used: BTreeSet<&str> = all.iter().map(String::as_str).collect();
    for needle in [
        "lockstep_ws_connections",
        "rate(lockstep_deliveries_total",
        "code=\"4008\"",
        "lockstep_broker_publish_seconds_bucket",
        "lockstep_redis_reconnects_total",
        "lockstep_lock_grants_total",
        "lockstep_lock_conflicts_total",
        "lockstep_lock_expiries_total",
        "lockstep_http_request_duration_seconds_bucket",
        "lockstep_resumes_total",
        "lockstep_presence_changes_total",
        "lockstep_webhook_deliveries_total",
    ] {
        assert!(
            used.iter().any(|e| e.contains(needle)),
            "no panel uses {needle}"
        );
    }
    // Titles are unique, so a panel can be named in a runbook.
    let mut titles = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap();
        assert!(titles.insert(title), "two panels titled {title}");
    }
}
