//! The mutating admission webhook that injects pgkeep into PostgreSQL
//! pods ([`crate::inject`]): HTTPS (the API server calls webhooks only
//! over TLS), `POST /mutate` with an `admission.k8s.io/v1`
//! AdmissionReview of a Pod, answered with a JSON Patch.
//!
//! The MutatingWebhookConfiguration (deploy/webhook/) selects pods with
//! the label `pgkeep.dev/stanza` only, on CREATE, with `failurePolicy:
//! Fail`: a labelled pod is never created without its archiving (a pod
//! that silently misses WAL archiving is a hole in every backup after
//! it); the price is that such pods wait while the operator is down.
//! A pod whose Stanza does not exist, whose labels the Stanza's selector
//! does not pick (the operator would never find it), or that cannot be
//! injected (no PostgreSQL container, no volume at PGDATA), is refused
//! with the reason.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::Client;
use serde_json::{json, Value};

use crate::crd::Stanza;

/// How the webhook serves.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// PEM certificate chain.
    pub cert: std::path::PathBuf,
    /// PEM private key.
    pub key: std::path::PathBuf,
    /// The image with the pgkeep binary, for the init container and the
    /// agent.
    pub image: String,
}

fn tls_config(cert: &Path, key: &Path) -> anyhow::Result<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| anyhow::anyhow!("cannot read the webhook certificate {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("the webhook certificate {} is not PEM: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| anyhow::anyhow!("cannot read the webhook key {}: {e}", key.display()))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| anyhow::anyhow!("the webhook certificate and key do not match: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The modification times of the certificate and key files.
fn stamps(cfg: &WebhookConfig) -> Option<(std::time::SystemTime, std::time::SystemTime)> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((m(&cfg.cert)?, m(&cfg.key)?))
}

/// Serves the webhook until the task is dropped. A certificate renewed on
/// disk (cert-manager rewrites the mounted Secret; `make-cert` replaces
/// it) is read again at the next connection after it changed: no restart.
pub async fn serve(client: Client, cfg: WebhookConfig) -> anyhow::Result<()> {
    let mut acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls_config(&cfg.cert, &cfg.key)?));
    let mut loaded = stamps(&cfg);
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    let state = Arc::new((client, cfg.image.clone()));
    let app = axum::Router::new()
        .route("/mutate", axum::routing::post(mutate))
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .with_state(state);
    loop {
        let (tcp, _) = listener.accept().await?;
        let now = stamps(&cfg);
        if now != loaded {
            match tls_config(&cfg.cert, &cfg.key) {
                Ok(config) => {
                    acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
                    loaded = now;
                }
                // Half-written (the key before the certificate): the old
                // pair serves until both are readable and match.
                Err(e) => eprintln!("pgkeep-operator: keeping the webhook's previous certificate: {e}"),
            }
        }
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else { return };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(tls), service).await;
        });
    }
}

async fn mutate(axum::extract::State(state): axum::extract::State<Arc<(Client, String)>>, body: axum::body::Bytes) -> axum::Json<Value> {
    let (client, image) = &*state;
    let review: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let uid = review["request"]["uid"].clone();
    let answer = match review_pod(client, image, &review).await {
        Ok(ops) if ops.is_empty() => json!({"uid": uid, "allowed": true}),
        Ok(ops) => {
            let patch = base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&ops).expect("a patch encodes"));
            json!({"uid": uid, "allowed": true, "patchType": "JSONPatch", "patch": patch})
        }
        Err(why) => json!({"uid": uid, "allowed": false, "status": {"code": 403, "message": format!("pgkeep: {why}")}}),
    };
    axum::Json(json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": answer}))
}

/// The patch for the Pod under review, or why it is refused.
async fn review_pod(client: &Client, image: &str, review: &Value) -> Result<Vec<Value>, String> {
    let req = &review["request"];
    if req["kind"]["kind"] != "Pod" {
        return Ok(Vec::new());
    }
    let pod: Pod = serde_json::from_value(req["object"].clone()).map_err(|e| format!("cannot read the pod: {e}"))?;
    let Some(name) = pod.metadata.labels.as_ref().and_then(|l| l.get(crate::inject::LABEL)).cloned() else {
        return Ok(Vec::new());
    };
    let ns = req["namespace"].as_str().unwrap_or("default");
    let stanza = Api::<Stanza>::namespaced(client.clone(), ns)
        .get_opt(&name)
        .await
        .map_err(|e| format!("cannot read Stanza {name}: {e}"))?
        .ok_or_else(|| {
            format!("the pod's label {}={name} names no Stanza in namespace {ns}: create the Stanza first", crate::inject::LABEL)
        })?;
    // A labelled pod the Stanza's selector does not pick would be injected
    // but never found by the operator: refuse it, saying so.
    let selector = kube::core::Selector::try_from(stanza.spec.selector.clone())
        .map_err(|e| format!("Stanza {name}: spec.selector is not a valid label selector: {e}"))?;
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    if !kube::core::SelectorExt::matches(&selector, &labels) {
        return Err(format!("the pod's labels do not match Stanza {name}'s spec.selector ({selector}): the operator would never find it"));
    }
    crate::inject::patch(&pod, &stanza, image).map_err(|e| format!("cannot add pgkeep to the pod for Stanza {name}: {e}"))
}
