//! The OTA service's view of the cluster (`m2mhub_ingest::ota_topics::
//! OtaCluster`): a lease per unfinished campaign (`{cluster}_leases`, keys
//! `ota.{campaign}`, placed by rendezvous hashing as rules are), so
//! campaigns spread over the nodes and a killed node's campaigns move to a
//! survivor within seconds; presence on other nodes; images in the
//! cluster's object store.

use m2mhub_cluster::leases::Leases;
use m2mhub_cluster::Cluster;
use m2mhub_ingest::ota_topics::{BoxFuture, OtaCluster};
use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

pub struct ClusterOta {
    cluster: Arc<Cluster>,
    leases: Leases,
}

impl ClusterOta {
    /// `None` before the cluster's runtime is up (see `Cluster::leases`).
    pub fn new(cluster: Arc<Cluster>) -> Option<ClusterOta> {
        let leases = cluster.leases("ota")?;
        Some(ClusterOta { cluster, leases })
    }
}

impl OtaCluster for ClusterOta {
    fn drives(&self, campaign_id: &str) -> bool {
        self.leases.owned().borrow().contains(campaign_id)
    }

    fn want(&self, campaigns: BTreeSet<String>) {
        self.leases.want(campaigns);
    }

    fn online_elsewhere(&self, ids: Vec<String>) -> BoxFuture<HashSet<String>> {
        let c = self.cluster.clone();
        Box::pin(async move {
            c.online_elsewhere(&ids).await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot ask the other nodes which devices they hold");
                HashSet::new()
            })
        })
    }

    fn put_image(&self, artifact_id: String, path: PathBuf) -> BoxFuture<Result<(), String>> {
        let c = self.cluster.clone();
        Box::pin(async move {
            c.put_image(&artifact_id, &path)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn fetch_image(&self, artifact_id: String, dest: PathBuf) -> BoxFuture<Result<bool, String>> {
        let c = self.cluster.clone();
        Box::pin(async move {
            c.fetch_image(&artifact_id, &dest)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn delete_image(&self, artifact_id: String) -> BoxFuture<Result<(), String>> {
        let c = self.cluster.clone();
        Box::pin(async move {
            c.delete_image(&artifact_id)
                .await
                .map_err(|e| e.to_string())
        })
    }
}
