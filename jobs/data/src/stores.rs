//! Object stores for DataFusion and Ballista: the registry every SQL session, the cluster's
//! scheduler and its executors use, so a table at `s3://…` (or `gs://`, `az://`, `https://`) is
//! read straight from the store by whichever process runs the scan — no shared volume. The
//! stores are cnclip's own ([`cnclip_operators::storage::remote`]: the same configuration,
//! retries and counters as every other job), built on first use from the environment of the
//! process that reads, so each executor needs the store's credentials in its environment.

use std::sync::Arc;

use datafusion::execution::object_store::{DefaultObjectStoreRegistry, ObjectStoreRegistry};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use object_store::ObjectStore;
use url::Url;

/// DataFusion's registry (local files, stores registered by hand), which finds a remote URL's
/// store through cnclip's storage seam when none is registered for it.
#[derive(Debug, Default)]
pub struct Stores {
    registered: DefaultObjectStoreRegistry,
}

impl ObjectStoreRegistry for Stores {
    fn register_store(&self, url: &Url, store: Arc<dyn ObjectStore>) -> Option<Arc<dyn ObjectStore>> {
        self.registered.register_store(url, store)
    }

    fn deregister_store(&self, url: &Url) -> datafusion::common::Result<Arc<dyn ObjectStore>> {
        self.registered.deregister_store(url)
    }

    fn get_store(&self, url: &Url) -> datafusion::common::Result<Arc<dyn ObjectStore>> {
        if let Ok(store) = self.registered.get_store(url) {
            return Ok(store);
        }
        if !cnclip_operators::storage::remote::is_remote_scheme(url.scheme()) {
            return self.registered.get_store(url);
        }
        let remote = cnclip_operators::storage::remote::parse(url.as_str())
            .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
        self.registered.register_store(url, remote.store.clone());
        Ok(remote.store)
    }
}

/// A runtime whose object stores are [`Stores`].
///
/// # Errors
/// DataFusion's, building the runtime.
pub fn runtime() -> datafusion::common::Result<Arc<RuntimeEnv>> {
    RuntimeEnvBuilder::new().with_object_store_registry(Arc::new(Stores::default())).build_arc()
}
