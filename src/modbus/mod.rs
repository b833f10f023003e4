//! The Modbus poller: reads field devices over Modbus TCP, RTU on a serial port, or RTU
//! framing over TCP, decodes their registers by device profile and feeds good readings to
//! the pipeline.
//!
//! [`decode`], [`plan`] and [`transport`] hold no server state, so an edge binary can reuse
//! them; [`simulator`] serves registers for the demo and tests.

pub mod config;
pub mod decode;
pub mod metrics;
pub mod plan;
mod poller;
pub mod simulator;
pub mod transport;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::error;

pub use config::{ModbusDeviceConfig, Parity, Transport};
pub use metrics::ModbusMetrics;
pub use simulator::{
    Behaviour, RegisterBank, SimulatorHandle, spawn_rtu_over_tcp_simulator, spawn_simulator,
};

use crate::clock::{SharedClock, SystemClock};
use crate::ingest::IngestHandle;
use crate::metrics::SharedRegistry;
use crate::model::{DeviceId, MetricName, SiteId};
use crate::profile::Profile;
use poller::{DeviceState, Shared};
use transport::Link;

/// A device the poller reads: who it is, its type and how to reach it.
#[derive(Clone, Debug)]
pub struct PolledDevice {
    pub id: DeviceId,
    pub site: SiteId,
    pub profile: Arc<Profile>,
    pub config: ModbusDeviceConfig,
}

/// The latest text values (serial numbers, firmware versions) per device. Text is not a
/// time-series value, so it is kept here instead of being sent as readings.
pub type TextValues = Arc<Mutex<HashMap<DeviceId, BTreeMap<MetricName, String>>>>;

/// A running poller.
pub struct Poller {
    /// Finishes once every poll task has stopped after shutdown.
    pub task: JoinHandle<()>,
    pub texts: TextValues,
    pub metrics: ModbusMetrics,
}

/// Starts polling `devices` until `shutdown` is cancelled, with the system clock.
///
/// A device whose config or profile does not fit (see [`ModbusDeviceConfig::validate`]) is
/// logged at ERROR and skipped; the others still run.
pub fn spawn_poller(
    devices: Vec<PolledDevice>,
    ingest: IngestHandle,
    registry: &SharedRegistry,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    start(devices, ingest, registry, shutdown, Arc::new(SystemClock)).task
}

/// Like [`spawn_poller`], with an injected clock for reading timestamps, returning the
/// text values and metrics too.
pub fn start(
    devices: Vec<PolledDevice>,
    ingest: IngestHandle,
    registry: &SharedRegistry,
    shutdown: CancellationToken,
    clock: SharedClock,
) -> Poller {
    let metrics = registry.register(ModbusMetrics::new);
    start_with_metrics(devices, ingest, metrics, shutdown, clock)
}

/// Like [`start`], with metrics that are already registered, so that a config reload can
/// restart polling without registering its metrics twice.
pub fn start_with_metrics(
    devices: Vec<PolledDevice>,
    ingest: IngestHandle,
    metrics: ModbusMetrics,
    shutdown: CancellationToken,
    clock: SharedClock,
) -> Poller {
    let texts = TextValues::default();
    let shared = Shared {
        ingest,
        metrics: metrics.clone(),
        clock,
        texts: Arc::clone(&texts),
        shutdown,
    };
    let groups = group_devices(devices);
    let task = tokio::spawn(run_groups(groups, shared));
    Poller {
        task,
        texts,
        metrics,
    }
}

/// Devices grouped by how they are polled.
#[derive(Default)]
struct Groups {
    /// Serial ports and RTU-over-TCP gateways: one connection, one request at a time.
    buses: BTreeMap<String, (Link, Vec<DeviceState>)>,
    /// Modbus TCP devices with the concurrency limit of their `host:port`.
    tcp: Vec<(DeviceState, String)>,
    gateway_limits: HashMap<String, usize>,
}

fn group_devices(devices: Vec<PolledDevice>) -> Groups {
    let mut groups = Groups::default();
    for device in devices {
        let problems = device.config.validate();
        if !problems.is_empty() {
            for (key, message) in problems {
                error!(device = %device.id, key, %message, "invalid modbus config; device not polled");
            }
            continue;
        }
        let link = Link::of(&device.config);
        let limit = device.config.max_concurrent_requests;
        let id = device.id.clone();
        let state = match DeviceState::new(device) {
            Ok(state) => state,
            Err(message) => {
                error!(device = %id, %message, "modbus device not polled");
                continue;
            }
        };
        match &link {
            Link::Tcp(address) => {
                let entry = groups
                    .gateway_limits
                    .entry(address.clone())
                    .or_insert(limit);
                *entry = (*entry).min(limit);
                groups.tcp.push((state, address.clone()));
            }
            Link::RtuOverTcp(_) | Link::Serial(_) => add_to_bus(&mut groups, &link, state),
        }
    }
    groups
}

fn add_to_bus(groups: &mut Groups, link: &Link, state: DeviceState) {
    let key = match &link {
        Link::Serial(serial) => serial.path.clone(),
        other => other.to_string(),
    };
    let (bus_link, states) = groups
        .buses
        .entry(key)
        .or_insert_with(|| (link.clone(), Vec::new()));
    if bus_link != link {
        error!(link = %link, "devices on one serial port have different line settings; using the first device's");
    }
    states.push(state);
}

async fn run_groups(groups: Groups, shared: Shared) {
    let mut tasks = tokio::task::JoinSet::new();
    let semaphores: HashMap<String, Arc<Semaphore>> = groups
        .gateway_limits
        .iter()
        .map(|(address, limit)| (address.clone(), Arc::new(Semaphore::new(*limit))))
        .collect();
    for (state, address) in groups.tcp {
        let gateway = Arc::clone(&semaphores[&address]);
        tasks.spawn(poller::run_tcp_device(state, gateway, shared.clone()));
    }
    for (_, (link, states)) in groups.buses {
        tasks.spawn(poller::run_bus(link, states, shared.clone()));
    }
    while let Some(result) = tasks.join_next().await {
        if let Err(error) = result {
            error!(%error, "modbus poll task failed");
        }
    }
}
