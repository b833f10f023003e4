//! Starts the Modbus poller for the devices that have a `[devices.modbus]` section.

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::SharedClock;
use crate::config::Config;
use crate::ingest::IngestHandle;
use crate::metrics::SharedRegistry;

/// Starts polling, returning the poller's tasks.
pub fn start(
    _config: &Config,
    _ingest: IngestHandle,
    _registry: &SharedRegistry,
    _clock: SharedClock,
    _shutdown: CancellationToken,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    Ok(Vec::new())
}
