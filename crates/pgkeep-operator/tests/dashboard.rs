//! The Grafana dashboard in deploy/grafana shows only metrics that exist:
//! every `pgkeep_*` name it queries is written by the agent
//! (crates/pgkeep-agent/src/metrics.rs) or the operator
//! (crates/pgkeep-operator/src/context.rs).

#[test]
fn the_dashboard_queries_only_metrics_the_code_writes() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dashboard = std::fs::read_to_string(root.join("deploy/grafana/pgkeep-dashboard.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let sources = [
        std::fs::read_to_string(root.join("crates/pgkeep-agent/src/metrics.rs")).unwrap(),
        std::fs::read_to_string(root.join("crates/pgkeep-operator/src/context.rs")).unwrap(),
    ];
    let mut names = Vec::new();
    for panel in v["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("pgkeep_") {
                let name: String = rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                rest = &rest[i + name.len()..];
                names.push(name);
            }
        }
    }
    assert!(names.len() >= 10, "{names:?}");
    for name in names {
        assert!(sources.iter().any(|s| s.contains(&format!("\"{name}\""))), "the dashboard queries {name}, which no code writes");
    }
}
