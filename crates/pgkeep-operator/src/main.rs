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
        pgkeep_operator::run::run(client, settings, args.namespace, Some(args.metrics_listen)).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgkeep-operator: {e}");
            ExitCode::from(1)
        }
    }
}
