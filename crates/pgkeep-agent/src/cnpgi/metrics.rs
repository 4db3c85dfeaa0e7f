//! `cnpgi.metrics.v1.Metrics`: the agent's metrics ([`crate::metrics`]),
//! which CloudNativePG's instance manager adds to its own `/metrics`: the
//! same names, help and values as the HTTP agent's, every series labelled
//! with the cluster's `stanza`.

use std::sync::Arc;

use pgkeep_cnpgi::cluster::Purpose;
use pgkeep_cnpgi::proto::metrics::metric_type;
use pgkeep_cnpgi::proto::metrics::metrics_capability::rpc::Type;
use pgkeep_cnpgi::proto::metrics::metrics_capability::{self, Rpc};
use pgkeep_cnpgi::proto::metrics::metrics_server::Metrics;
use pgkeep_cnpgi::proto::metrics::*;
use tonic::{Request, Response, Status};

use super::{cluster, Plugin};
use crate::metrics::{collect, Inputs, Kind, METRICS};

/// The Metrics service.
pub struct MetricsService(pub Arc<Plugin>);

#[tonic::async_trait]
impl Metrics for MetricsService {
    async fn get_capabilities(&self, _: Request<MetricsCapabilitiesRequest>) -> Result<Response<MetricsCapabilitiesResult>, Status> {
        Ok(Response::new(MetricsCapabilitiesResult {
            capabilities: vec![MetricsCapability { r#type: Some(metrics_capability::Type::Rpc(Rpc { r#type: Type::Metrics as i32 })) }],
        }))
    }

    async fn define(&self, _: Request<DefineMetricsRequest>) -> Result<Response<DefineMetricsResult>, Status> {
        let metrics = METRICS
            .iter()
            .map(|m| Metric {
                fq_name: m.name.into(),
                help: m.help.into(),
                variable_labels: std::iter::once("stanza").chain(m.labels.iter().copied()).map(str::to_owned).collect(),
                const_labels: Default::default(),
                value_type: Some(MetricType {
                    r#type: if m.kind == Kind::Counter { metric_type::Type::Counter } else { metric_type::Type::Gauge } as i32,
                }),
            })
            .collect();
        Ok(Response::new(DefineMetricsResult { metrics }))
    }

    async fn collect(&self, req: Request<CollectMetricsRequest>) -> Result<Response<CollectMetricsResult>, Status> {
        let cluster = cluster(&req.into_inner().cluster_definition)?;
        // An error here would fail the whole scrape of the instance,
        // every plugin's and PostgreSQL's own metrics with it: say it in
        // the log and report nothing instead.
        let stanza = match self.0.stanza(&cluster, Purpose::Own) {
            Ok((s, _)) => s,
            Err(e) => {
                eprintln!("pgkeep: no metrics: {}", e.message());
                return Ok(Response::new(CollectMetricsResult { metrics: Vec::new() }));
            }
        };
        let status = crate::server::local_status(&stanza.settings, self.0.jobs.running()).await.ok();
        let info = self.0.info.get(&stanza, true).await.ok();
        let finished = self.0.jobs.finished();
        let samples = collect(&Inputs { status: status.as_ref(), info: info.as_ref(), finished: &finished });
        let metrics = samples
            .into_iter()
            .map(|s| CollectMetric {
                value: s.value,
                fq_name: s.name.into(),
                variable_labels: std::iter::once(stanza.name().to_owned()).chain(s.labels).collect(),
            })
            .collect();
        Ok(Response::new(CollectMetricsResult { metrics }))
    }
}
