//! `pgkeep-operator`: runs the controllers against the cluster named by
//! the in-cluster service account, or by `KUBECONFIG` outside a cluster.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// The pgkeep Kubernetes operator.
#[derive(Debug, Parser)]
#[command(name = "pgkeep-operator", version, about)]
struct Args {
    /// Watch only this namespace (default: all).
    #[arg(long, env = "PGKEEP_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Serve /metrics and /healthz here.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_listen: SocketAddr,
    /// Seconds a running backup's agent may stay silent before the Backup
    /// fails.
    #[arg(long, default_value_t = 60)]
    agent_deadline: u64,
    /// Seconds a Backup may wait for its Stanza, a pod or a primary before
    /// it fails.
    #[arg(long, default_value_t = 300)]
    pending_deadline: u64,
    /// Seconds between two looks at a running backup.
    #[arg(long, default_value_t = 5)]
    poll: u64,
    /// Seconds between two refreshes of a Stanza's status.
    #[arg(long, default_value_t = 60)]
    stanza_refresh: u64,
    /// Serve the injection webhook (HTTPS) here, e.g. 0.0.0.0:8443.
    #[arg(long, requires_all = ["webhook_cert", "webhook_key"])]
    webhook_listen: Option<SocketAddr>,
    /// The webhook's certificate chain (PEM).
    #[arg(long)]
    webhook_cert: Option<std::path::PathBuf>,
    /// The webhook's private key (PEM).
    #[arg(long)]
    webhook_key: Option<std::path::PathBuf>,
    /// The image whose /usr/local/bin/pgkeep the webhook and the
    /// CloudNativePG plugin inject.
    #[arg(long, env = "PGKEEP_IMAGE", default_value = "ghcr.io/pgkeep/pgkeep:0.1.0")]
    image: String,
    /// Serve the CloudNativePG plugin pgkeep.dev (CNPG-I, gRPC with mutual
    /// TLS) here, e.g. 0.0.0.0:9090 (deploy/cnpg).
    #[arg(long, requires_all = ["cnpg_plugin_cert", "cnpg_plugin_key", "cnpg_plugin_client_ca"])]
    cnpg_plugin_listen: Option<SocketAddr>,
    /// The plugin's server certificate (PEM).
    #[arg(long)]
    cnpg_plugin_cert: Option<std::path::PathBuf>,
    /// The plugin's private key (PEM).
    #[arg(long)]
    cnpg_plugin_key: Option<std::path::PathBuf>,
    /// The certificate CloudNativePG's client certificate must chain to
    /// (PEM).
    #[arg(long)]
    cnpg_plugin_client_ca: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let text = e.to_string();
            eprintln!("pgkeep-operator: {}", text.lines().next().unwrap_or("invalid arguments").trim_start_matches("error: "));
            return ExitCode::from(1);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgkeep-operator: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let settings = pgkeep_operator::context::Settings {
        agent_deadline: Duration::from_secs(args.agent_deadline),
        pending_deadline: Duration::from_secs(args.pending_deadline),
        poll: Duration::from_secs(args.poll.max(1)),
        stanza_refresh: Duration::from_secs(args.stanza_refresh.max(1)),
    };
    pgkeep_operator::run::install_crypto_provider();
    let result = rt.block_on(async {
        let client = kube::Client::try_default().await.map_err(|e| {
            anyhow::anyhow!("cannot reach the Kubernetes API ({e}): run in a pod with a service account, or set KUBECONFIG")
        })?;
        let webhook = match (args.webhook_listen, args.webhook_cert, args.webhook_key) {
            (Some(listen), Some(cert), Some(key)) => {
                Some(pgkeep_operator::webhook::WebhookConfig { listen, cert, key, image: args.image.clone() })
            }
            _ => None,
        };
        if let (Some(listen), Some(cert), Some(key), Some(client_ca)) =
            (args.cnpg_plugin_listen, args.cnpg_plugin_cert, args.cnpg_plugin_key, args.cnpg_plugin_client_ca)
        {
            let cfg = pgkeep_operator::cnpg::CnpgPluginConfig { listen, cert, key, client_ca, image: args.image.clone() };
            let plugin = pgkeep_operator::cnpg::serve(client.clone(), cfg);
            tokio::spawn(async move {
                if let Err(e) = plugin.await {
                    eprintln!("pgkeep-operator: the CloudNativePG plugin on {listen} stopped: {e}");
                    std::process::exit(1);
                }
            });
        }
        pgkeep_operator::run::run(client, settings, args.namespace, Some(args.metrics_listen), webhook).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgkeep-operator: {e}");
            ExitCode::from(1)
        }
    }
}
