//! A real Kubernetes control plane for tests (etcd, kube-apiserver with
//! RBAC and admission, kube-controller-manager), built from Kubernetes' Go
//! modules by `scripts/kube-testenv build` (tools/kube-testenv), and the
//! kubelet the tests play: no kubelet runs, so a test starts the real
//! processes of a Pod itself (PostgreSQL, the agent) and then marks the Pod
//! running with a `podIP` on 127.0.0.0/8 ([`ControlPlane::mark_running`]).
//!
//! Self-contained (std and serde_json only): the operator crate's tests
//! include it too.
//!
//! - `PGKEEP_KUBE_TESTENV`: the kube-testenv binary (default
//!   `/opt/pgkeep-test/kube-testenv/kube-testenv`).

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The repository's root (for `deploy/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn testenv_bin() -> PathBuf {
    std::env::var_os("PGKEEP_KUBE_TESTENV").map(PathBuf::from).unwrap_or_else(|| "/opt/pgkeep-test/kube-testenv/kube-testenv".into())
}

/// A running control plane, stopped on drop.
pub struct ControlPlane {
    dir: PathBuf,
    _tmp: tempfile::TempDir,
    pub kubeconfig: PathBuf,
}

impl ControlPlane {
    /// Starts one in a new directory; panics (with the way out) when the
    /// binary is missing or it does not come up.
    pub fn start() -> ControlPlane {
        let bin = testenv_bin();
        assert!(bin.exists(), "{} is missing: run `scripts/kube-testenv build` (scripts/test-setup does)", bin.display());
        let tmp = tempfile::Builder::new().prefix("pgkeep-kube-").tempdir_in("/tmp").unwrap();
        let dir = tmp.path().to_owned();
        let out = Command::new(&bin).arg("start").arg(&dir).output().unwrap();
        assert!(
            out.status.success(),
            "kube-testenv start failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("control plane: {}", String::from_utf8_lossy(&out.stdout).trim());
        ControlPlane { kubeconfig: dir.join("kubeconfig"), dir, _tmp: tmp }
    }

    /// Runs kubectl (as admin unless `kubeconfig` says otherwise):
    /// (success, stdout, stderr).
    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
        let mut cmd = Command::new(testenv_bin());
        cmd.arg("kubectl").arg("--kubeconfig").arg(kubeconfig).args(args);
        cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() }).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if let Some(input) = stdin {
            child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// kubectl as admin; panics on failure.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.kubectl_as(&self.kubeconfig, args, None);
        assert!(ok, "kubectl {args:?} failed: {err}");
        out
    }

    /// `kubectl apply -f -` of `yaml` as admin; panics on failure.
    pub fn apply(&self, yaml: &str) -> String {
        let (ok, out, err) = self.kubectl_as(&self.kubeconfig, &["apply", "-f", "-"], Some(yaml));
        assert!(ok, "kubectl apply failed: {err}\n{yaml}");
        out
    }

    /// An object as JSON, or `None` when it does not exist.
    pub fn get(&self, ns: &str, kind: &str, name: &str) -> Option<serde_json::Value> {
        let (ok, out, err) = self.kubectl_as(&self.kubeconfig, &["-n", ns, "get", kind, name, "-o", "json"], None);
        if !ok {
            assert!(err.contains("NotFound"), "kubectl get {kind} {name} failed: {err}");
            return None;
        }
        Some(serde_json::from_str(&out).unwrap())
    }

    /// Every object of `kind` in `ns`.
    pub fn list(&self, ns: &str, kind: &str) -> Vec<serde_json::Value> {
        let out = self.kubectl(&["-n", ns, "get", kind, "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["items"].as_array().cloned().unwrap_or_default()
    }

    /// Waits until `check` returns something for object `kind/name`.
    pub fn wait_for<T>(
        &self,
        ns: &str,
        kind: &str,
        name: &str,
        timeout: Duration,
        what: &str,
        check: impl Fn(&serde_json::Value) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            if let Some(obj) = self.get(ns, kind, name) {
                if let Some(t) = check(&obj) {
                    return t;
                }
                last = Some(obj);
            }
            assert!(
                Instant::now() < deadline,
                "{kind} {ns}/{name}: not {what} after {timeout:?}; last seen: {}",
                serde_json::to_string_pretty(&last).unwrap()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Installs the CRDs (`deploy/crds`) and waits until they are served.
    pub fn install_crds(&self) {
        self.kubectl(&["apply", "-k", repo_root().join("deploy/crds").to_str().unwrap()]);
        self.kubectl(&[
            "wait",
            "--for",
            "condition=Established",
            "--timeout=60s",
            "crd/stanzas.pgkeep.dev",
            "crd/backups.pgkeep.dev",
            "crd/scheduledbackups.pgkeep.dev",
        ]);
    }

    /// Installs the CRDs and the operator's namespace and RBAC
    /// (`deploy/operator`).
    pub fn install_operator_rbac_and_crds(&self) {
        self.install_crds();
        for f in ["namespace.yaml", "rbac.yaml"] {
            self.kubectl(&["apply", "-f", repo_root().join("deploy/operator").join(f).to_str().unwrap()]);
        }
    }

    /// A kubeconfig that authenticates as ServiceAccount `ns/sa` with a
    /// token minted now (TokenRequest, one hour).
    pub fn kubeconfig_for(&self, ns: &str, sa: &str) -> PathBuf {
        let token = self.kubectl(&["-n", ns, "create", "token", sa, "--duration=1h"]).trim().to_owned();
        let admin = std::fs::read_to_string(&self.kubeconfig).unwrap();
        let mut out = String::new();
        let mut in_user = false;
        for line in admin.lines() {
            // Replace the admin's token and name (the file is ours: one user).
            if line.trim_start().starts_with("token:") && in_user {
                out.push_str(&format!("    token: {token}\n"));
                continue;
            }
            if line.starts_with("users:") {
                in_user = true;
            }
            out.push_str(line);
            out.push('\n');
        }
        let path = self.dir.join(format!("{ns}-{sa}.kubeconfig"));
        std::fs::write(&path, out).unwrap();
        path
    }

    /// Plays the kubelet for pod `ns/name`: marks it Running and Ready,
    /// with `ip` as its podIP and one ready container per container of its
    /// spec. The processes it stands for must already run.
    pub fn mark_running(&self, ns: &str, name: &str, ip: &str) {
        let pod = self.wait_for(ns, "pod", name, Duration::from_secs(60), "created", |p| Some(p.clone()));
        let now = "2026-01-01T00:00:00Z";
        let containers: Vec<serde_json::Value> = pod["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                serde_json::json!({"name": c["name"], "image": c["image"], "imageID": "", "ready": true, "started": true,
                    "restartCount": 0, "state": {"running": {"startedAt": now}}})
            })
            .collect();
        let status = serde_json::json!({"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "127.0.0.1", "startTime": now,
            "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"},
                           {"type": "Initialized", "status": "True"}, {"type": "PodScheduled", "status": "True"}],
            "containerStatuses": containers}});
        self.kubectl(&["-n", ns, "patch", "pod", name, "--subresource=status", "--type=merge", "-p", &status.to_string()]);
    }

    /// The reasons of the Events about object `name` in `ns`.
    pub fn event_reasons(&self, ns: &str, name: &str) -> Vec<String> {
        let out = self.kubectl(&["-n", ns, "get", "events.events.k8s.io", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["regarding"]["name"] == name)
            .map(|e| e["reason"].as_str().unwrap_or("").to_owned())
            .collect()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = Command::new(testenv_bin()).arg("stop").arg(&self.dir).output();
    }
}
