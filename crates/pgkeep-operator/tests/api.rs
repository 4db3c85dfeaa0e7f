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
    let out = cp.kubectl(&["apply", "--dry-run=server", "-k", root.join("deploy/webhook").to_str().unwrap()]);
    assert!(out.contains("mutatingwebhookconfiguration.admissionregistration.k8s.io/pgkeep-inject created (server dry run)"), "{out}");
    // The webhook's patch lands where the Deployment has its container.
    let rendered = cp.kubectl(&["kustomize", root.join("deploy/webhook").to_str().unwrap()]);
    assert!(
        rendered.contains("--webhook-cert=/etc/pgkeep-webhook/tls.crt") && rendered.contains("secretName: pgkeep-webhook-tls"),
        "{rendered}"
    );
    // The examples need the CRDs installed.
    cp.install_crds();
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
    assert!(error.contains("Stanza main is not ready: no agent of the stanza answers"), "{error}");
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

/// A CA and a certificate for 127.0.0.1 signed by it: (CA PEM, cert
/// file, key file).
fn webhook_cert(dir: &std::path::Path) -> (String, std::path::PathBuf, std::path::PathBuf) {
    let sh = |args: &str| {
        let out = Command::new("sh").arg("-c").arg(args).current_dir(dir).output().unwrap();
        assert!(out.status.success(), "{args}: {}", String::from_utf8_lossy(&out.stderr));
    };
    sh("openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=test-ca -keyout ca.key -out ca.crt");
    sh("openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout tls.key -out tls.csr");
    sh("printf 'subjectAltName=IP:127.0.0.1\\n' > ext && openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile ext -out tls.crt");
    (std::fs::read_to_string(dir.join("ca.crt")).unwrap(), dir.join("tls.crt"), dir.join("tls.key"))
}

#[test]
fn kube_the_webhook_adds_pgkeep_to_labelled_pods_and_refuses_those_of_no_stanza() {
    let cp = ControlPlane::start();
    cp.install_operator_rbac_and_crds();
    cp.kubectl(&["create", "namespace", "db"]);
    let tmp = tempfile::tempdir().unwrap();
    let (ca, cert, key) = webhook_cert(tmp.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let kubeconfig = cp.kubeconfig_for("pgkeep-system", "pgkeep-operator");
    let log = tempfile::NamedTempFile::new().unwrap();
    let _op = Operator(
        Command::new(env!("CARGO_BIN_EXE_pgkeep-operator"))
            .env("KUBECONFIG", &kubeconfig)
            .args(["--metrics-listen", "127.0.0.1:0", "--image", "registry.example/pgkeep:test"])
            .arg(format!("--webhook-listen=127.0.0.1:{port}"))
            .arg(format!("--webhook-cert={}", cert.display()))
            .arg(format!("--webhook-key={}", key.display()))
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "the webhook does not listen: {}", std::fs::read_to_string(log.path()).unwrap());
        std::thread::sleep(Duration::from_millis(100));
    }
    // deploy/webhook's configuration, pointed at this process by URL (the
    // API server reaches it on loopback) instead of the in-cluster Service.
    let text = std::fs::read_to_string(repo_root().join("deploy/webhook/mutatingwebhook.yaml")).unwrap();
    let mut config: serde_json::Value = serde_yaml::from_str(&text).unwrap();
    config["webhooks"][0]["clientConfig"] = serde_json::json!({
        "url": format!("https://127.0.0.1:{port}/mutate"),
        "caBundle": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &ca),
    });
    cp.apply(&config.to_string());
    cp.apply(
        "apiVersion: pgkeep.dev/v1alpha1\nkind: Stanza\nmetadata: {name: main, namespace: db}\n\
         spec: {selector: {matchLabels: {app: postgres}}, repositories: [{destinationPath: 's3://b/main', \
         s3Credentials: {accessKeyId: {name: s3, key: id}, secretAccessKey: {name: s3, key: secret}}}]}\n",
    );
    // The example: the official image with one label, made by a StatefulSet.
    cp.kubectl(&["apply", "-f", repo_root().join("deploy/examples/postgres-injected.yaml").to_str().unwrap()]);
    let pod = cp.wait_for("db", "pod", "postgres-injected-0", Duration::from_secs(60), "created", |p| Some(p.clone()));
    let spec = &pod["spec"];
    let names: Vec<&str> = spec["containers"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["postgres", "pgkeep-agent"], "{spec}");
    assert_eq!(spec["initContainers"][0]["image"], "registry.example/pgkeep:test");
    let args = spec["containers"][0]["args"].to_string();
    assert!(args.contains("archive_command=/pgkeep/bin/pgkeep --config /etc/pgkeep/pgkeep.toml --stanza main archive-push %p"), "{args}");
    let env = spec["containers"][1]["env"].to_string();
    assert!(env.contains("AWS_SECRET_ACCESS_KEY") && env.contains("PGKEEP_AGENT_TOKEN_FILE"), "{env}");
    let volumes = spec["volumes"].to_string();
    assert!(volumes.contains("main-pgkeep") && volumes.contains("main-agent"), "{volumes}");
    // A pod whose label names no Stanza is refused, saying why.
    let bad = "apiVersion: v1\nkind: Pod\nmetadata: {name: stray, namespace: db, labels: {pgkeep.dev/stanza: nope}}\n\
               spec: {containers: [{name: postgres, image: postgres:17}]}\n";
    let (ok, _, err) = cp.kubectl_as(&cp.kubeconfig, &["apply", "-f", "-"], Some(bad));
    assert!(!ok && err.contains("names no Stanza in namespace db"), "{err}");
    // One the Stanza's selector would not pick is refused too.
    let unseen = "apiVersion: v1\nkind: Pod\nmetadata: {name: unseen, namespace: db, labels: {pgkeep.dev/stanza: main}}\n\
               spec: {containers: [{name: postgres, image: postgres:17}]}\n";
    let (ok, _, err) = cp.kubectl_as(&cp.kubeconfig, &["apply", "-f", "-"], Some(unseen));
    assert!(!ok && err.contains("do not match Stanza main's spec.selector"), "{err}");
    // Pods without the label are not the webhook's business.
    cp.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: other, namespace: db}\nspec: {containers: [{name: app, image: busybox}]}\n");
    assert_eq!(cp.get("db", "pod", "other").unwrap()["spec"]["containers"].as_array().unwrap().len(), 1);
}
