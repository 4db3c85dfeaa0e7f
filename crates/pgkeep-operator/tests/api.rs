//! The operator against a real API server (scripts/kube-testenv): the CRDs
//! install with structural schemas, status subresources and printer
//! columns; the API server enforces what the schemas say (immutable Backup
//! spec, enums); every example in deploy/ applies with a server-side dry
//! run; and the operator binary, run outside the cluster with its
//! ServiceAccount's token (not admin), does its work with the RBAC of
//! deploy/operator and no more. The backup flows with PostgreSQL and the
//! agents are in crates/pgkeep/tests/kube.rs.

#[path = "../../pgkeep/tests/support/kube.rs"]
mod kube_env;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kube_env::{repo_root, ControlPlane};

#[test]
fn kube_crds_install_and_the_api_server_enforces_their_schemas() {
    let cp = ControlPlane::start();
    cp.install_operator_rbac_and_crds();
    for name in ["stanzas", "backups", "scheduledbackups"] {
        let crd: serde_json::Value =
            serde_json::from_str(&cp.kubectl(&["get", "crd", &format!("{name}.pgkeep.dev"), "-o", "json"])).unwrap();
        let v = &crd["spec"]["versions"][0];
        assert_eq!(v["name"], "v1alpha1");
        assert!(v["subresources"]["status"].is_object(), "{name}: no status subresource");
        assert!(v["additionalPrinterColumns"].as_array().is_some_and(|c| c.len() >= 3), "{name}: printer columns");
        let established =
            crd["status"]["conditions"].as_array().unwrap().iter().any(|c| c["type"] == "Established" && c["status"] == "True");
        let structural = crd["status"]["conditions"].as_array().unwrap().iter().any(|c| c["type"] == "NonStructuralSchema");
        assert!(established && !structural, "{name}: {}", crd["status"]);
    }
    cp.kubectl(&["create", "namespace", "db"]);
    let backup = "apiVersion: pgkeep.dev/v1alpha1\nkind: Backup\nmetadata: {name: b1, namespace: db}\nspec: {stanza: main, type: full}\n";
    cp.apply(backup);
    // The spec cannot change: the CEL rule of the CRD refuses it.
    let (ok, _, err) = cp.kubectl_as(&cp.kubeconfig, &["apply", "-f", "-"], Some(&backup.replace("type: full", "type: incr")));
    assert!(!ok && err.contains("a Backup's spec cannot change"), "{err}");
    // Enumerations and required fields.
    let bad = "apiVersion: pgkeep.dev/v1alpha1\nkind: Backup\nmetadata: {name: b2, namespace: db}\nspec: {stanza: main, type: weekly}\n";
    let (ok, _, err) = cp.kubectl_as(&cp.kubeconfig, &["apply", "-f", "-"], Some(bad));
    assert!(!ok && err.contains("spec.type") && err.contains("Unsupported value"), "{err}");
    let bad = "apiVersion: pgkeep.dev/v1alpha1\nkind: Stanza\nmetadata: {name: s, namespace: db}\nspec: {selector: {}, repositories: []}\n";
    let (ok, _, err) = cp.kubectl_as(&cp.kubeconfig, &["apply", "-f", "-"], Some(bad));
    assert!(!ok && err.contains("spec.repositories"), "{err}");
    let bad = "apiVersion: pgkeep.dev/v1alpha1\nkind: ScheduledBackup\nmetadata: {name: s, namespace: db}\nspec: {stanza: main, schedule: '* * * * *', backupOwnerReference: mine}\n";
    let (ok, _, err) = cp.kubectl_as(&cp.kubeconfig, &["apply", "-f", "-"], Some(bad));
    assert!(!ok && err.contains("backupOwnerReference"), "{err}");
    // Printer columns show.
    let table = cp.kubectl(&["-n", "db", "get", "backups"]);
    assert!(table.contains("STANZA") && table.contains("PHASE") && table.contains("b1"), "{table}");
}

#[test]
fn kube_every_manifest_in_deploy_applies_with_a_server_side_dry_run() {
    let cp = ControlPlane::start();
    let root = repo_root();
    // The namespaces first: a dry run creates nothing, and namespaced
    // objects of a namespace that does not exist yet are refused.
    cp.kubectl(&["apply", "-f", root.join("deploy/operator/namespace.yaml").to_str().unwrap()]);
    cp.kubectl(&["create", "namespace", "db"]);
    let out = cp.kubectl(&["apply", "--dry-run=server", "-k", root.join("deploy/operator").to_str().unwrap()]);
    assert!(out.contains("deployment.apps/pgkeep-operator created (server dry run)"), "{out}");
    // The examples need the CRDs installed.
    cp.kubectl(&["apply", "-k", root.join("deploy/crds").to_str().unwrap()]);
    cp.kubectl(&[
        "wait",
        "--for",
        "condition=Established",
        "--timeout=60s",
        "crd/stanzas.pgkeep.dev",
        "crd/backups.pgkeep.dev",
        "crd/scheduledbackups.pgkeep.dev",
    ]);
    let mut examples: Vec<_> = std::fs::read_dir(root.join("deploy/examples")).unwrap().map(|e| e.unwrap().path()).collect();
    examples.sort();
    assert!(examples.len() >= 5, "{examples:?}");
    for f in examples {
        let (ok, out, err) = cp.kubectl_as(&cp.kubeconfig, &["apply", "--dry-run=server", "-f", f.to_str().unwrap()], None);
        assert!(ok && !err.contains("Warning"), "{}: {err}{out}", f.display());
    }
}

struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn kube_the_operator_binary_works_with_its_service_account_and_no_more() {
    let cp = ControlPlane::start();
    cp.install_operator_rbac_and_crds();
    // Least privilege: what it must not do.
    let sa = "system:serviceaccount:pgkeep-system:pgkeep-operator";
    for (verb, what) in [
        ("delete", "pods"),
        ("create", "pods"),
        ("update", "pods"),
        ("delete", "secrets"),
        ("list", "secrets"),
        ("delete", "stanzas.pgkeep.dev"),
        ("create", "pods/exec"),
    ] {
        let (ok, out, _) = cp.kubectl_as(&cp.kubeconfig, &["auth", "can-i", verb, what, "--as", sa], None);
        assert!(!ok && out.trim() == "no", "the operator may {verb} {what}");
    }
    let kubeconfig = cp.kubeconfig_for("pgkeep-system", "pgkeep-operator");
    let log = tempfile::NamedTempFile::new().unwrap();
    let _op = Operator(
        Command::new(env!("CARGO_BIN_EXE_pgkeep-operator"))
            .env("KUBECONFIG", &kubeconfig)
            .args(["--metrics-listen", "127.0.0.1:0", "--pending-deadline", "3", "--poll", "1", "--stanza-refresh", "1"])
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap(),
    );
    cp.kubectl(&["create", "namespace", "db"]);
    cp.apply(
        "apiVersion: pgkeep.dev/v1alpha1\nkind: Stanza\nmetadata: {name: main, namespace: db}\n\
         spec: {selector: {matchLabels: {app: postgres}}, repositories: [{destinationPath: /backups}]}\n",
    );
    // It makes the agents' token Secret and the pods' config, owned by the
    // Stanza, and says in the status that no agent answers.
    let secret = cp.wait_for("db", "secret", "main-agent", Duration::from_secs(60), "made", |s| Some(s.clone()));
    assert_eq!(secret["metadata"]["ownerReferences"][0]["kind"], "Stanza");
    let cm = cp.wait_for("db", "configmap", "main-pgkeep", Duration::from_secs(60), "made", |s| Some(s.clone()));
    let toml = cm["data"]["pgkeep.toml"].as_str().unwrap();
    assert!(toml.contains("[stanza.\"main\"]") && toml.contains("location = \"/backups\""), "{toml}");
    let ready = cp.wait_for("db", "stanza", "main", Duration::from_secs(60), "not ready", |s| {
        s["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == "Ready" && c["status"] == "False").cloned()
    });
    assert!(ready["message"].as_str().unwrap().contains("no agent of the stanza answers"), "{ready}");
    // A Backup with no pod to run on waits, then fails past the pending
    // deadline, saying why; a Warning event says it too.
    cp.apply("apiVersion: pgkeep.dev/v1alpha1\nkind: Backup\nmetadata: {name: b1, namespace: db}\nspec: {stanza: main}\n");
    let error = cp.wait_for("db", "backup", "b1", Duration::from_secs(60), "failed", |b| {
        (b["status"]["phase"] == "failed").then(|| b["status"]["error"].as_str().unwrap().to_owned())
    });
    assert!(error.contains("no pod of the stanza has an agent that answers"), "{error}");
    assert!(cp.event_reasons("db", "b1").iter().any(|r| r == "Failed"), "{:?}", cp.event_reasons("db", "b1"));
    // A Backup of a Stanza that does not exist fails the same way.
    cp.apply("apiVersion: pgkeep.dev/v1alpha1\nkind: Backup\nmetadata: {name: b2, namespace: db}\nspec: {stanza: nope}\n");
    let error = cp.wait_for("db", "backup", "b2", Duration::from_secs(60), "failed", |b| {
        (b["status"]["phase"] == "failed").then(|| b["status"]["error"].as_str().unwrap().to_owned())
    });
    assert!(error.contains("Stanza nope does not exist in namespace db"), "{error}");
    // Deleting a failed Backup is not held up by the finalizer.
    cp.kubectl(&["-n", "db", "delete", "backup", "b1", "--timeout=30s"]);
    let log = std::fs::read_to_string(log.path()).unwrap();
    assert!(!log.contains("forbidden") && !log.contains("Forbidden"), "the operator hit RBAC: {log}");
}
