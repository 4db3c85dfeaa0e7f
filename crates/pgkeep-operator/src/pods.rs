//! A stanza's pods and their agents.

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use kube::core::Selector;
use kube::{Resource, ResourceExt};
use pgkeep_agent::client::AgentClient;

use crate::context::Context;
use crate::crd::Stanza;
use crate::error::{Error, Result};
use crate::target::Candidate;

/// The agent's port when the Stanza does not say.
pub const DEFAULT_AGENT_PORT: u16 = 8432;

/// The name of the Secret holding the agents' token.
pub fn token_secret_name(stanza: &Stanza) -> String {
    stanza.spec.agent.as_ref().and_then(|a| a.token_secret.clone()).unwrap_or_else(|| format!("{}-agent", stanza.name_any()))
}

/// The agents' port.
pub fn agent_port(stanza: &Stanza) -> u16 {
    stanza.spec.agent.as_ref().and_then(|a| a.port).unwrap_or(DEFAULT_AGENT_PORT)
}

/// PostgreSQL's port in the pods.
pub fn pg_port(stanza: &Stanza) -> u16 {
    stanza.spec.pg_port.unwrap_or(5432)
}

/// The agents' token: read from the Secret, which is created (with a
/// random token, owned by the Stanza) when missing.
pub async fn token(stanza: &Stanza, ctx: &Context) -> Result<String> {
    let ns = stanza.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let name = token_secret_name(stanza);
    if let Some(secret) = api.get_opt(&name).await? {
        return secret_token(&secret, &name);
    }
    let mut raw = [0u8; 24];
    getrandom::fill(&mut raw).map_err(|e| Error::Invalid(format!("no randomness for the agent token: {e}")))?;
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns),
            owner_references: stanza.controller_owner_ref(&()).map(|o| vec![o]),
            labels: Some([("app.kubernetes.io/managed-by".to_owned(), "pgkeep-operator".to_owned())].into()),
            ..Default::default()
        },
        string_data: Some([("token".to_owned(), token.clone())].into()),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(token),
        // Made meanwhile (another reconcile, or the user): use that one.
        Err(kube::Error::Api(s)) if s.code == 409 => secret_token(&api.get(&name).await?, &name),
        Err(e) => Err(e.into()),
    }
}

fn secret_token(secret: &Secret, name: &str) -> Result<String> {
    let bytes = secret.data.as_ref().and_then(|d| d.get("token")).map(|b| b.0.clone());
    let token = bytes.and_then(|b| String::from_utf8(b).ok()).map(|t| t.trim().to_owned()).unwrap_or_default();
    if token.is_empty() {
        return Err(Error::Invalid(format!(
            "Secret {name} has no key 'token': add one, or delete the Secret so that the operator makes it"
        )));
    }
    Ok(token)
}

/// The Stanza's running pods, by name: those its selector picks that are
/// running, not being deleted, and have an IP.
pub async fn running_pods(stanza: &Stanza, ctx: &Context) -> Result<Vec<Pod>> {
    let ns = stanza.namespace().unwrap_or_default();
    let selector = Selector::try_from(stanza.spec.selector.clone())
        .map_err(|e| Error::Invalid(format!("Stanza {}: spec.selector is not a valid label selector: {e}", stanza.name_any())))?;
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let mut pods: Vec<Pod> = api.list(&ListParams::default().labels_from(&selector)).await?.items;
    pods.retain(|p| p.metadata.deletion_timestamp.is_none() && pod_ip(p).is_some() && phase(p) == Some("Running"));
    pods.sort_by_key(|p| p.name_any());
    Ok(pods)
}

fn phase(p: &Pod) -> Option<&str> {
    p.status.as_ref()?.phase.as_deref()
}

/// A pod's IP.
pub fn pod_ip(p: &Pod) -> Option<String> {
    p.status.as_ref()?.pod_ip.clone().filter(|ip| !ip.is_empty())
}

/// The client of the agent in `pod`.
pub fn agent(stanza: &Stanza, ip: &str, token: &str) -> AgentClient {
    AgentClient::new(ip, agent_port(stanza), token)
}

/// Asks every running pod's agent; those that answer are the candidates.
/// Also returns, per pod that did not answer, why (for messages).
pub async fn candidates(stanza: &Stanza, ctx: &Context, token: &str) -> Result<(Vec<Candidate>, Vec<String>)> {
    let pods = running_pods(stanza, ctx).await?;
    let asks = pods.iter().map(|p| {
        let ip = pod_ip(p).unwrap_or_default();
        let client = agent(stanza, &ip, token);
        async move { (p.name_any(), ip, client.status().await) }
    });
    let mut found = Vec::new();
    let mut silent = Vec::new();
    for (pod, ip, answer) in futures::future::join_all(asks).await {
        match answer {
            Ok(status) if status.stanza == stanza.name_any() => found.push(Candidate { pod, ip, status }),
            Ok(status) => silent.push(format!("pod {pod}'s agent serves stanza '{}', not '{}'", status.stanza, stanza.name_any())),
            Err(e) => silent.push(format!("pod {pod}: {e}")),
        }
    }
    Ok((found, silent))
}
