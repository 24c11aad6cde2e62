//! Firmware images shared by every node: the JetStream object store
//! `{cluster}_ota`, one object per artifact (named by its id), written by
//! the node the image was uploaded to. Other nodes copy an image into their
//! own data folder on first use and serve it from there (the caller checks
//! its SHA-256 against the artifact's before using it).

use crate::ClusterError;
use async_nats::jetstream::{self, object_store};
use tokio::io::AsyncWriteExt;

/// The bucket, opened (or created) on first use: most clusters never
/// upload an image.
pub(crate) struct Images {
    js: jetstream::Context,
    bucket: String,
    store: tokio::sync::OnceCell<object_store::ObjectStore>,
}

fn nats(what: &str, e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Nats(format!("{what}: {e}"))
}

impl Images {
    pub(crate) fn new(js: jetstream::Context, bucket: String) -> Images {
        Images {
            js,
            bucket,
            store: tokio::sync::OnceCell::new(),
        }
    }

    async fn store(&self) -> Result<&object_store::ObjectStore, ClusterError> {
        self.store
            .get_or_try_init(|| async {
                if let Ok(s) = self.js.get_object_store(&self.bucket).await {
                    return Ok(s);
                }
                // Nodes creating it at once create the same stream.
                match self
                    .js
                    .create_object_store(object_store::Config {
                        bucket: self.bucket.clone(),
                        description: Some("m2mhub: firmware images, name = artifact id".into()),
                        storage: jetstream::stream::StorageType::File,
                        ..Default::default()
                    })
                    .await
                {
                    Ok(s) => Ok(s),
                    Err(e) => self.js.get_object_store(&self.bucket).await.map_err(|_| {
                        ClusterError::Bucket {
                            bucket: self.bucket.clone(),
                            detail: e.to_string(),
                        }
                    }),
                }
            })
            .await
    }

    pub(crate) async fn put(&self, name: &str, path: &std::path::Path) -> Result<(), ClusterError> {
        let store = self.store().await?;
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| nats("cannot open the image", e))?;
        store
            .put(name, &mut file)
            .await
            .map_err(|e| nats("cannot store the image in JetStream", e))?;
        Ok(())
    }

    /// Copy an image into `dest` (created); `false` when there is none.
    pub(crate) async fn get(
        &self,
        name: &str,
        dest: &std::path::Path,
    ) -> Result<bool, ClusterError> {
        let store = self.store().await?;
        let mut object = match store.get(name).await {
            Ok(o) => o,
            Err(e) if e.kind() == object_store::GetErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(nats("cannot read the image from JetStream", e)),
        };
        let mut file = tokio::fs::File::create(dest)
            .await
            .map_err(|e| nats("cannot create the image's cache file", e))?;
        tokio::io::copy(&mut object, &mut file)
            .await
            .map_err(|e| nats("cannot copy the image from JetStream", e))?;
        file.flush()
            .await
            .map_err(|e| nats("cannot write the image's cache file", e))?;
        Ok(true)
    }

    pub(crate) async fn has(&self, name: &str) -> Result<bool, ClusterError> {
        let store = self.store().await?;
        match store.info(name).await {
            Ok(info) => Ok(!info.deleted),
            Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => Ok(false),
            Err(e) => Err(nats("cannot look the image up in JetStream", e)),
        }
    }

    pub(crate) async fn delete(&self, name: &str) -> Result<(), ClusterError> {
        let store = self.store().await?;
        match store.delete(name).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == object_store::DeleteErrorKind::NotFound => Ok(()),
            Err(e) => Err(nats("cannot delete the image from JetStream", e)),
        }
    }
}
