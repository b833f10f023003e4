//! Starts the Modbus poller for the devices that have a `[devices.modbus]` section.

use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::SharedClock;
use crate::config::Config;
use crate::ingest::IngestHandle;
use crate::metrics::SharedRegistry;
use crate::modbus::{self, PolledDevice};

/// Starts polling, returning the poller's task, or none when no device is polled.
pub fn start(
    config: &Config,
    ingest: IngestHandle,
    registry: &SharedRegistry,
    clock: SharedClock,
    shutdown: CancellationToken,
) -> Vec<JoinHandle<()>> {
    let devices: Vec<PolledDevice> = config
        .devices
        .iter()
        .filter_map(|device| {
            let modbus = device.modbus.clone()?;
            let profile = config.profiles.get(&device.profile)?;
            Some(PolledDevice {
                id: device.id.clone(),
                site: device.site.clone(),
                profile: Arc::new(profile.clone()),
                config: modbus,
            })
        })
        .collect();
    if devices.is_empty() {
        return Vec::new();
    }
    tracing::info!(devices = devices.len(), "polling Modbus devices");
    vec![modbus::start(devices, ingest, registry, shutdown, clock).task]
}
