//! The operator side of the CloudNativePG plugin against a real API server
//! (scripts/kube-testenv): served over TCP with mutual TLS, certificates
//! made the way deploy/cnpg makes them (self-signed leaves, each trusted
//! as itself, as cert-manager's selfSigned issuer and CloudNativePG do);
//! the lifecycle patch applied to Pod and Job specs shaped like
//! CloudNativePG 1.27-1.30's gives objects the API server accepts
//! (`create --dry-run=server`); Cluster validation names each mistake's
//! field; the plugin status comes from the Stanza. The plugin runs as
//! the operator's ServiceAccount, with deploy/operator's RBAC, not as admin.

#[path = "../../pgkeep/tests/support/kube.rs"]
mod kube_env;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kube_env::ControlPlane;
use pgkeep_cnpgi::proto::identity::identity_client::IdentityClient;
use pgkeep_cnpgi::proto::identity::GetPluginCapabilitiesRequest;
use pgkeep_cnpgi::proto::lifecycle::operator_lifecycle_client::OperatorLifecycleClient;
use pgkeep_cnpgi::proto::lifecycle::operator_operation_type::Type as Operation;
use pgkeep_cnpgi::proto::lifecycle::{OperatorLifecycleCapabilitiesRequest, OperatorLifecycleRequest, OperatorOperationType};
use pgkeep_cnpgi::proto::operator::operator_client::OperatorClient;
use pgkeep_cnpgi::proto::operator::{
    OperatorCapabilitiesRequest, OperatorValidateClusterChangeRequest, OperatorValidateClusterCreateRequest, SetStatusInClusterRequest,
};
use serde::Deserialize;
use serde_json::{json, Value};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A self-signed certificate for `cn` with `usage` (serverAuth or
/// clientAuth), as `name.crt` / `name.key` in `dir`.
fn self_signed(dir: &Path, name: &str, cn: &str, usage: &str) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj"])
        .arg(format!("/CN={cn}"))
        .args(["-addext", &format!("subjectAltName=DNS:{cn}"), "-addext", "basicConstraints=critical,CA:FALSE"])
        .args(["-addext", "keyUsage=critical,digitalSignature", "-addext", &format!("extendedKeyUsage={usage}")])
        .args(["-keyout", &format!("{name}.key"), "-out", &format!("{name}.crt")])
        .output()
        .unwrap();
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A CNPG Cluster using pgkeep, as CloudNativePG sends it.
fn cluster(params: Value) -> Value {
    json!({"apiVersion": "postgresql.cnpg.io/v1", "kind": "Cluster",
        "metadata": {"name": "pg", "namespace": "db", "uid": "7d0c3f2a-0000-4000-8000-00000000000a"},
        "spec": {"instances": 2, "imageName": "ghcr.io/cloudnative-pg/postgresql:17.5",
            "plugins": [{"name": "pgkeep.dev", "isWALArchiver": true, "parameters": params}]},
        "status": {"currentPrimary": "pg-1"}})
}

/// An instance Pod as CloudNativePG 1.27-1.30 creates it (trimmed to
/// what matters: the containers, the volumes, the security context).
fn instance_pod() -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "pg-1", "namespace": "db",
            "labels": {"cnpg.io/cluster": "pg", "cnpg.io/instanceName": "pg-1", "cnpg.io/podRole": "instance"}},
        "spec": {
            "initContainers": [{"name": "bootstrap-controller", "image": "ghcr.io/cloudnative-pg/cloudnative-pg:1.27.0",
                "command": ["/manager", "bootstrap", "/controller/manager"],
                "volumeMounts": [{"name": "scratch-data", "mountPath": "/controller"}]}],
            "containers": [{"name": "postgres", "image": "ghcr.io/cloudnative-pg/postgresql:17.5",
                "command": ["/controller/manager", "instance", "run"],
                "env": [{"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"},
                        {"name": "POD_NAME", "value": "pg-1"}, {"name": "NAMESPACE", "value": "db"},
                        {"name": "CLUSTER_NAME", "value": "pg"}, {"name": "PGHOST", "value": "/controller/run"}],
                "ports": [{"name": "postgresql", "containerPort": 5432}, {"name": "metrics", "containerPort": 9187}],
                "volumeMounts": [{"name": "pgdata", "mountPath": "/var/lib/postgresql/data"},
                                 {"name": "scratch-data", "mountPath": "/controller"},
                                 {"name": "shm", "mountPath": "/dev/shm"}],
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]},
                    "readOnlyRootFilesystem": true, "runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}}}],
            "securityContext": {"runAsUser": 26, "runAsGroup": 26, "fsGroup": 26, "runAsNonRoot": true},
            "volumes": [{"name": "pgdata", "persistentVolumeClaim": {"claimName": "pg-1"}},
                        {"name": "scratch-data", "emptyDir": {}}, {"name": "shm", "emptyDir": {"medium": "Memory"}}]}})
}

/// A recovery Job as CloudNativePG creates it.
fn recovery_job() -> Value {
    json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "pg-1-full-recovery", "namespace": "db",
            "labels": {"cnpg.io/cluster": "pg", "cnpg.io/jobRole": "full-recovery"}},
        "spec": {"template": {"metadata": {"labels": {"cnpg.io/cluster": "pg", "cnpg.io/jobRole": "full-recovery"}},
            "spec": {"restartPolicy": "Never",
                "containers": [{"name": "full-recovery", "image": "ghcr.io/cloudnative-pg/postgresql:17.5",
                    "command": ["/controller/manager", "instance", "restore"],
                    "env": [{"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"}],
                    "volumeMounts": [{"name": "pgdata", "mountPath": "/var/lib/postgresql/data"},
                                     {"name": "scratch-data", "mountPath": "/controller"}]}],
                "securityContext": {"runAsUser": 26, "runAsGroup": 26, "fsGroup": 26},
                "volumes": [{"name": "pgdata", "persistentVolumeClaim": {"claimName": "pg-1"}},
                            {"name": "scratch-data", "emptyDir": {}}]}}}})
}

/// Applies the "add" operations the plugin writes (RFC 6902).
fn apply(doc: &Value, patch: &[u8]) -> Value {
    let ops: Vec<Value> = serde_json::from_slice(patch).unwrap();
    let mut doc = doc.clone();
    for op in ops {
        assert_eq!(op["op"], "add", "{op}");
        let path = op["path"].as_str().unwrap();
        let (parent, last) = path.rsplit_once('/').unwrap();
        match (doc.pointer_mut(parent).unwrap_or_else(|| panic!("{path}: no parent")), last) {
            (Value::Array(a), "-") => a.push(op["value"].clone()),
            (Value::Object(o), key) => {
                o.insert(key.to_owned(), op["value"].clone());
            }
            (other, _) => panic!("{path}: cannot add into {other}"),
        }
    }
    doc
}

#[test]
fn kube_cnpg_plugin_over_mutual_tls_patches_pods_and_jobs_the_api_server_accepts() {
    let cp = ControlPlane::start();
    // The operator's own RBAC: the plugin runs as its ServiceAccount.
    cp.install_operator_rbac_and_crds();
    cp.kubectl(&["create", "namespace", "db"]);
    for name in ["main", "old"] {
        cp.apply(&format!(
            "apiVersion: pgkeep.dev/v1alpha1\nkind: Stanza\nmetadata: {{name: {name}, namespace: db}}\nspec:\n  selector: {{matchLabels: {{cnpg.io/cluster: pg}}}}\n  repositories:\n  - destinationPath: s3://backups/{name}\n    s3Credentials:\n      accessKeyId: {{name: s3-{name}, key: ACCESS_KEY_ID}}\n      secretAccessKey: {{name: s3-{name}, key: ACCESS_SECRET_KEY}}\n"
        ));
    }
    // What the Stanza controller and the user make, which the sidecar
    // mounts (the controller does not run here). main's S3 Secret is
    // created below, after the refusal it is missing for.
    for name in ["main", "old"] {
        cp.kubectl(&["-n", "db", "create", "configmap", &format!("{name}-pgkeep"), "--from-literal=pgkeep.toml=# rendered"]);
    }
    cp.kubectl(&["-n", "db", "create", "secret", "generic", "main-agent", "--from-literal=token=0123456789abcdef0123"]);
    let certs = tempfile::tempdir().unwrap();
    self_signed(certs.path(), "server", "pgkeep-cnpg", "serverAuth");
    self_signed(certs.path(), "client", "pgkeep-cnpg-client", "clientAuth");
    self_signed(certs.path(), "stranger", "someone-else", "clientAuth");
    let port = free_port();
    let kubeconfig = cp.kubeconfig_for("pgkeep-system", "pgkeep-operator");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    pgkeep_operator::run::install_crypto_provider();
    let dir = certs.path().to_owned();
    rt.spawn(async move {
        let kc = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap();
        let client = kube::Client::try_from(config).unwrap();
        let cfg = pgkeep_operator::cnpg::CnpgPluginConfig {
            listen: ([127, 0, 0, 1], port).into(),
            cert: dir.join("server.crt"),
            key: dir.join("server.key"),
            client_ca: dir.join("client.crt"),
            image: "ghcr.io/pgkeep/pgkeep:0.1.0".into(),
        };
        pgkeep_operator::cnpg::serve(client, cfg).await.unwrap();
    });
    let read = |f: &str| std::fs::read(certs.path().join(f)).unwrap();
    // CloudNativePG's client: the server's own certificate as the root, the
    // Service's name as the server name, its client certificate.
    let connect = |client: &str, attempts: usize| {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("server.crt")))
            .domain_name("pgkeep-cnpg")
            .identity(Identity::from_pem(read(&format!("{client}.crt")), read(&format!("{client}.key"))));
        async move {
            let endpoint = Endpoint::from_shared(format!("https://127.0.0.1:{port}")).unwrap().tls_config(tls).unwrap();
            for _ in 0..attempts {
                if let Ok(ch) = endpoint.connect().await {
                    return Ok::<Channel, ()>(ch);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(())
        }
    };

    rt.block_on(async {
        let ch = connect("client", 100).await.expect("CloudNativePG's client connects");
        // A client certificate the plugin does not trust gets nowhere.
        if let Ok(ch) = connect("stranger", 1).await {
            let r = IdentityClient::new(ch).get_plugin_capabilities(GetPluginCapabilitiesRequest {}).await;
            assert!(r.is_err(), "a stranger's certificate was accepted: {r:?}");
        }
        let caps = IdentityClient::new(ch.clone()).get_plugin_capabilities(GetPluginCapabilitiesRequest {}).await.unwrap().into_inner();
        assert_eq!(caps.capabilities.len(), 4, "{caps:?}");

        let mut life = OperatorLifecycleClient::new(ch.clone());
        let kinds: Vec<String> = life
            .get_capabilities(OperatorLifecycleCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner()
            .lifecycle_capabilities
            .iter()
            .map(|c| format!("{}/{}", c.group, c.kind))
            .collect();
        assert_eq!(kinds, ["/Pod", "batch/Job"]);
        let hook = |object: &Value, cluster: &Value, op: Operation| OperatorLifecycleRequest {
            operation_type: Some(OperatorOperationType { r#type: op as i32 }),
            cluster_definition: serde_json::to_vec(cluster).unwrap(),
            object_definition: serde_json::to_vec(object).unwrap(),
        };
        let c = cluster(json!({"stanza": "main"}));
        // The S3 Secret the Stanza names is missing: refused, not a Pod
        // stuck in CreateContainerConfigError.
        let e = life.lifecycle_hook(hook(&instance_pod(), &c, Operation::Create)).await.unwrap_err();
        assert!(e.message().contains("Secret 's3-main' of Stanza 'main' does not exist"), "{e:?}");
        cp.kubectl(&["-n", "db", "create", "secret", "generic", "s3-main", "--from-literal=ACCESS_KEY_ID=a"]);
        let e = life.lifecycle_hook(hook(&instance_pod(), &c, Operation::Create)).await.unwrap_err();
        assert!(e.message().contains("key 'ACCESS_SECRET_KEY' of Secret 's3-main'"), "{e:?}");
        cp.kubectl(&["-n", "db", "delete", "secret", "s3-main"]);
        cp.kubectl(&[
            "-n",
            "db",
            "create",
            "secret",
            "generic",
            "s3-main",
            "--from-literal=ACCESS_KEY_ID=a",
            "--from-literal=ACCESS_SECRET_KEY=b",
        ]);
        cp.kubectl(&[
            "-n",
            "db",
            "create",
            "secret",
            "generic",
            "s3-old",
            "--from-literal=ACCESS_KEY_ID=a",
            "--from-literal=ACCESS_SECRET_KEY=b",
        ]);
        let patch = life.lifecycle_hook(hook(&instance_pod(), &c, Operation::Create)).await.unwrap().into_inner().json_patch;
        let pod = apply(&instance_pod(), &patch);
        let (ok, out, err) =
            cp.kubectl_as(&cp.kubeconfig, &["create", "--dry-run=server", "-o", "json", "-f", "-"], Some(&pod.to_string()));
        assert!(ok && !err.contains("Warning"), "the API server refused the patched Pod: {err}\n{pod:#}");
        let created: Value = serde_json::from_str(&out).unwrap();
        let sidecar = created["spec"]["initContainers"].as_array().unwrap().iter().find(|c| c["name"] == "plugin-pgkeep").unwrap();
        assert_eq!(sidecar["restartPolicy"], "Always");
        // EVALUATE (of the Pod CloudNativePG would make now): the same
        // patch, so no rollout while nothing changed.
        let evaluated = life.lifecycle_hook(hook(&instance_pod(), &c, Operation::Evaluate)).await.unwrap().into_inner().json_patch;
        assert_eq!(evaluated, patch);
        // A spec that has the sidecar already is left as it is.
        let again = life.lifecycle_hook(hook(&pod, &c, Operation::Create)).await.unwrap().into_inner().json_patch;
        assert!(again.is_empty(), "{}", String::from_utf8_lossy(&again));

        // The recovery Job of a Cluster bootstrapping from stanza old.
        let mut rc = cluster(json!({"stanza": "main"}));
        rc["spec"]["bootstrap"] = json!({"recovery": {"source": "origin", "recoveryTarget": {"targetTime": "2026-11-30 10:00:00+00"}}});
        rc["spec"]["externalClusters"] = json!([{"name": "origin", "plugin": {"name": "pgkeep.dev", "parameters": {"stanza": "old"}}}]);
        rc["status"] = json!({});
        let patch = life.lifecycle_hook(hook(&recovery_job(), &rc, Operation::Create)).await.unwrap().into_inner().json_patch;
        let job = apply(&recovery_job(), &patch);
        let (ok, _, err) = cp.kubectl_as(&cp.kubeconfig, &["create", "--dry-run=server", "-f", "-"], Some(&job.to_string()));
        assert!(ok && !err.contains("Warning"), "the API server refused the patched Job: {err}\n{job:#}");
        assert!(job.to_string().contains("old.toml") && job.to_string().contains("main.toml"), "{job:#}");
        // A snapshot recovery replays WAL in its Job too: it gets the sidecar.
        let mut snap = recovery_job();
        snap["spec"]["template"]["metadata"]["labels"]["cnpg.io/jobRole"] = json!("snapshot-recovery");
        snap["spec"]["template"]["spec"]["containers"][0]["name"] = json!("snapshot-recovery");
        let patch = life.lifecycle_hook(hook(&snap, &rc, Operation::Create)).await.unwrap().into_inner().json_patch;
        assert!(String::from_utf8_lossy(&patch).contains("plugin-pgkeep"), "{}", String::from_utf8_lossy(&patch));
        // A Job of another role (initdb, join) is not ours.
        let mut other = recovery_job();
        other["spec"]["template"]["metadata"]["labels"]["cnpg.io/jobRole"] = json!("initdb");
        assert!(life.lifecycle_hook(hook(&other, &rc, Operation::Create)).await.unwrap().into_inner().json_patch.is_empty());
        // A Stanza that does not exist: the Pod is refused with the way out.
        let e = life.lifecycle_hook(hook(&instance_pod(), &cluster(json!({"stanza": "nope"})), Operation::Create)).await.unwrap_err();
        assert!(e.message().contains("Stanza 'nope' does not exist in namespace 'db'"), "{e:?}");

        // Validation: every mistake with its field.
        let mut op = OperatorClient::new(ch);
        let rpcs = op.get_capabilities(OperatorCapabilitiesRequest {}).await.unwrap().into_inner().capabilities;
        assert_eq!(rpcs.len(), 3, "validate create and change, status: {rpcs:?}");
        let v = |c: Value| OperatorValidateClusterCreateRequest { definition: serde_json::to_vec(&c).unwrap() };
        assert!(op.validate_cluster_create(v(c.clone())).await.unwrap().into_inner().validation_errors.is_empty());
        let errors =
            op.validate_cluster_create(v(cluster(json!({"stanza": "nope", "bucket": "x"})))).await.unwrap().into_inner().validation_errors;
        let paths: Vec<String> = errors.iter().map(|e| e.path_components.join(".")).collect();
        assert_eq!(paths, ["spec.plugins[0].parameters.bucket"], "{errors:?}");
        let errors = op.validate_cluster_create(v(cluster(json!({"stanza": "nope"})))).await.unwrap().into_inner().validation_errors;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!((errors[0].path_components.join("."), errors[0].value.as_str()), ("spec.plugins[0].parameters.stanza".into(), "nope"));

        // A change is checked like a creation (the new definition).
        let change = OperatorValidateClusterChangeRequest {
            old_cluster: serde_json::to_vec(&c).unwrap(),
            new_cluster: serde_json::to_vec(&cluster(json!({"stanza": "-x"}))).unwrap(),
        };
        let errors = op.validate_cluster_change(change).await.unwrap().into_inner().validation_errors;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].path_components.join("."), "spec.plugins[0].parameters.stanza");
        // The plugin's status in the Cluster, from the Stanza's.
        let status =
            op.set_status_in_cluster(SetStatusInClusterRequest { cluster: serde_json::to_vec(&c).unwrap() }).await.unwrap().into_inner();
        let status: Value = serde_json::from_slice(&status.json_status).unwrap();
        assert_eq!((status["stanza"].as_str(), status["backups"].as_u64()), (Some("main"), Some(0)), "{status}");
        // The same status again: nothing (CloudNativePG would patch the
        // Cluster and reconcile it again in 5 s).
        let mut with = c.clone();
        with["status"]["pluginStatus"] = json!([{"name": "pgkeep.dev", "version": "0.1.0", "status": status.to_string()}]);
        let again =
            op.set_status_in_cluster(SetStatusInClusterRequest { cluster: serde_json::to_vec(&with).unwrap() }).await.unwrap().into_inner();
        assert!(again.json_status.is_empty(), "{}", String::from_utf8_lossy(&again.json_status));
    });
}

/// deploy/cnpg installs into CloudNativePG's namespace (where it looks for
/// plugins) and applies with a server-side dry run; its examples hold
/// parameters the plugin accepts.
#[test]
fn kube_deploy_cnpg_applies_in_cloudnativepgs_namespace_and_its_examples_are_valid() {
    let cp = ControlPlane::start();
    let root = kube_env::repo_root();
    cp.kubectl(&["create", "namespace", "cnpg-system"]);
    let rendered = cp.kubectl(&["kustomize", root.join("deploy/cnpg").to_str().unwrap()]);
    assert!(!rendered.contains("pgkeep-system"), "everything goes to cnpg-system:\n{rendered}");
    assert!(rendered.contains("--cnpg-plugin-listen=0.0.0.0:9090") && rendered.contains("cnpg.io/pluginName: pgkeep.dev"), "{rendered}");
    let out = cp.kubectl(&["apply", "--dry-run=server", "-k", root.join("deploy/cnpg").to_str().unwrap()]);
    for what in [
        "service/pgkeep-cnpg created",
        "deployment.apps/pgkeep-operator created",
        "clusterrolebinding.rbac.authorization.k8s.io/pgkeep-operator created",
    ] {
        assert!(out.contains(what), "{what} missing:\n{out}");
    }
    // cert-manager's kinds are not installed here: the documents parse and
    // name the Secrets the Service's annotations name.
    let certs = std::fs::read_to_string(root.join("deploy/cnpg/cert-manager.yaml")).unwrap();
    let secrets: Vec<String> = serde_yaml::Deserializer::from_str(&certs)
        .filter_map(|d| serde_yaml::Value::deserialize(d).ok())
        .filter_map(|d| d.get("spec").and_then(|s| s.get("secretName")).and_then(|s| s.as_str()).map(str::to_owned))
        .collect();
    assert_eq!(secrets, ["pgkeep-cnpg-server-tls", "pgkeep-cnpg-client-tls"]);
    let service = std::fs::read_to_string(root.join("deploy/cnpg/service.yaml")).unwrap();
    assert!(secrets.iter().all(|s| service.contains(s.as_str())));
    // The examples: the Stanza against the real CRD, CloudNativePG's kinds
    // through the plugin's own checks.
    cp.install_crds();
    cp.kubectl(&["create", "namespace", "db"]);
    let (ok, _, err) = cp.kubectl_as(
        &cp.kubeconfig,
        &["apply", "--dry-run=server", "-f", root.join("deploy/cnpg/examples/stanza.yaml").to_str().unwrap()],
        None,
    );
    assert!(ok && !err.contains("Warning"), "{err}");
    let mut clusters = 0;
    for f in ["cluster.yaml", "recovery.yaml", "backup.yaml", "scheduledbackup.yaml"] {
        let text = std::fs::read_to_string(root.join("deploy/cnpg/examples").join(f)).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = serde_json::to_value(serde_yaml::Value::deserialize(doc).unwrap()).unwrap();
            match v["kind"].as_str().unwrap() {
                "Cluster" => {
                    let c = pgkeep_cnpgi::cluster::Cluster::from_json(v.to_string().as_bytes()).unwrap();
                    assert!(pgkeep_cnpgi::cluster::validate(&c).is_empty(), "{f}: {:?}", pgkeep_cnpgi::cluster::validate(&c));
                    assert!(c.archives_wal(), "{f}");
                    clusters += 1;
                }
                "Backup" | "ScheduledBackup" => {
                    let b: pgkeep_cnpgi::cluster::Backup = serde_json::from_value(v.clone()).unwrap();
                    assert_eq!(b.spec.method, "plugin", "{f}");
                    pgkeep_cnpgi::cluster::backup_type(&b).unwrap_or_else(|e| panic!("{f}: {e}"));
                }
                other => panic!("{f}: unexpected kind {other}"),
            }
        }
    }
    assert_eq!(clusters, 2);
}
