//! The controllers together, and the operator's metrics endpoint.

use std::net::SocketAddr;
use std::sync::Arc;

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher::Config as WatcherConfig;
use kube::runtime::Controller;
use kube::{Client, ResourceExt};

use crate::context::{Context, Settings};
use crate::crd::{Backup, ScheduledBackup, Stanza};

/// Chooses rustls's crypto provider for the process (the dependency tree
/// enables two, so rustls cannot choose alone). Call before the first TLS
/// connection: before making the kube client.
pub fn install_crypto_provider() {
    // Already installed (a second call, or an embedding program's choice).
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Runs the three controllers (all namespaces, or `namespace`) and, when
/// given, the metrics endpoint and the injection webhook, until SIGTERM or
/// Ctrl-C.
pub async fn run(
    client: Client,
    settings: Settings,
    namespace: Option<String>,
    metrics: Option<SocketAddr>,
    webhook: Option<crate::webhook::WebhookConfig>,
) -> anyhow::Result<()> {
    let ctx = Arc::new(Context::new(client.clone(), settings));
    fn api<K>(client: &Client, ns: &Option<String>) -> Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
        K::DynamicType: Default,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    if let Some(addr) = metrics {
        let ctx = ctx.clone();
        let app = axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok\n" })).route(
            "/metrics",
            axum::routing::get(move || {
                let ctx = ctx.clone();
                async move { ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], ctx.metrics.render()) }
            }),
        );
        let listener = tokio::net::TcpListener::bind(addr).await?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
    }
    if let Some(cfg) = webhook {
        let client = client.clone();
        let listen = cfg.listen;
        // A webhook that cannot serve (no certificate) is an error at start,
        // not later.
        let server = crate::webhook::serve(client, cfg);
        tokio::spawn(async move {
            if let Err(e) = server.await {
                eprintln!("pgkeep-operator: the webhook on {listen} stopped: {e}");
                std::process::exit(1);
            }
        });
    }
    let wc = WatcherConfig::default().any_semantic();
    // A Backup that changes wakes its Stanza (status: backups, last failure).
    let stanzas = Controller::new(api::<Stanza>(&client, &namespace), wc.clone())
        .watches(api::<Backup>(&client, &namespace), wc.clone(), |b: Backup| {
            Some(ObjectRef::new(&b.spec.stanza).within(&b.namespace().unwrap_or_default()))
        })
        .shutdown_on_signal()
        .run(crate::stanza::reconcile, crate::stanza::error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    let backups = Controller::new(api::<Backup>(&client, &namespace), wc.clone())
        .shutdown_on_signal()
        .run(crate::backup::reconcile, crate::backup::error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    // A Backup that finishes wakes its ScheduledBackup's next decision.
    let scheduled = Controller::new(api::<ScheduledBackup>(&client, &namespace), wc.clone())
        .owns(api::<Backup>(&client, &namespace), wc)
        .shutdown_on_signal()
        .run(crate::scheduled::reconcile, crate::scheduled::error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    tokio::join!(stanzas, backups, scheduled);
    Ok(())
}
