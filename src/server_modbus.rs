//! Polls the devices that have a `[devices.modbus]` section, and restarts polling when a
//! config reload or the device API changes them.

use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::SharedClock;
use crate::config::Config;
use crate::ingest::IngestHandle;
use crate::metrics::SharedRegistry;
use crate::modbus::{self, ModbusMetrics, PolledDevice};

/// The Modbus poller of a running server.
pub struct ModbusRunner {
    ingest: IngestHandle,
    metrics: ModbusMetrics,
    clock: SharedClock,
    /// The server's ingest shutdown; the poller stops with it.
    shutdown: CancellationToken,
    /// Stops the current poller only.
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
    /// The polled devices' settings and profiles, to tell whether a new config changes them.
    signature: String,
}

impl ModbusRunner {
    /// Starts polling the config's Modbus devices.
    pub fn start(
        config: &Config,
        ingest: IngestHandle,
        registry: &SharedRegistry,
        clock: SharedClock,
        shutdown: CancellationToken,
    ) -> ModbusRunner {
        let mut runner = ModbusRunner {
            ingest,
            metrics: registry.register(ModbusMetrics::new),
            clock,
            stop: shutdown.child_token(),
            shutdown,
            task: None,
            signature: String::new(),
        };
        runner.spawn(config);
        runner
    }

    fn spawn(&mut self, config: &Config) {
        self.signature = signature(config);
        let devices = polled_devices(config);
        if devices.is_empty() {
            return;
        }
        tracing::info!(devices = devices.len(), "polling Modbus devices");
        self.stop = self.shutdown.child_token();
        let poller = modbus::start_with_metrics(
            devices,
            self.ingest.clone(),
            self.metrics.clone(),
            self.stop.clone(),
            self.clock.clone(),
        );
        self.task = Some(poller.task);
    }

    /// Restarts polling when the Modbus devices or their profiles changed. Every device's
    /// polling restarts, because devices share bus and gateway connections.
    pub async fn update(&mut self, config: &Config) {
        if signature(config) == self.signature {
            return;
        }
        self.stop().await;
        self.spawn(config);
    }

    /// Stops polling and waits for the poll tasks to end.
    pub async fn stop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

fn polled_devices(config: &Config) -> Vec<PolledDevice> {
    config
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
        .collect()
}

fn signature(config: &Config) -> String {
    config
        .devices
        .iter()
        .filter(|device| device.modbus.is_some())
        .map(|device| {
            format!(
                "{:?}",
                (
                    &device.id,
                    &device.site,
                    &device.modbus,
                    config.profiles.get(&device.profile)
                )
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}
