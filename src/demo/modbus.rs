//! The demo's Modbus TCP devices: a Chint DTSU666 energy meter (unit 1) and an IGD
//! TOC-635 gas alarm controller (unit 2) on one simulated gateway, whose registers change
//! while the server polls them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::modbus::decode::Decoded;
use crate::modbus::{RegisterBank, SimulatorHandle, spawn_simulator};
use crate::model::{MetricName, ProfileName};
use crate::profile::{Profile, ProfileSet};

pub const METER_UNIT: u8 = 1;
pub const CONTROLLER_UNIT: u8 = 2;
pub const METER_PROFILE: &str = "chint-dtsu666";
pub const CONTROLLER_PROFILE: &str = "igd-toc-635";

/// Seconds into the demo at which the controller's gas starts to climb, after the MQTT
/// detector's alarm, so the two alarms are easy to tell apart.
const CONTROLLER_CLIMB_START_SECS: f64 = 40.0;

/// The running simulator and the profiles whose registers it serves.
pub struct DemoModbus {
    pub addr: SocketAddr,
    handle: SimulatorHandle,
    meter: Profile,
    controller: Profile,
}

/// Starts the simulated gateway on a free loopback port.
pub async fn start(profiles: &ProfileSet) -> anyhow::Result<DemoModbus> {
    let profile = |name: &str| {
        profiles
            .get(&ProfileName::from(name))
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("built-in profile `{name}` is missing"))
    };
    let meter = profile(METER_PROFILE)?;
    let controller = profile(CONTROLLER_PROFILE)?;
    let units = BTreeMap::from([
        (METER_UNIT, zeroed_bank(&meter)),
        (CONTROLLER_UNIT, zeroed_bank(&controller)),
    ]);
    let (addr, handle) = spawn_simulator(SocketAddr::from(([127, 0, 0, 1], 0)), units).await?;
    let demo = DemoModbus {
        addr,
        handle,
        meter,
        controller,
    };
    demo.update(0.0);
    Ok(demo)
}

impl DemoModbus {
    /// Changes the registers every second until `stop`.
    pub fn spawn_updates(self, stop: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(async move {
            let started = Instant::now();
            let mut ticker = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = ticker.tick() => self.update(started.elapsed().as_secs_f64()),
                }
            }
            self.handle.shutdown();
        })
    }

    fn update(&self, t: f64) {
        let wave = (t * 0.7).sin();
        let meter = [
            ("voltage_a_v", 229.8 + wave),
            ("voltage_b_v", 230.4 - wave),
            ("voltage_c_v", 230.1),
            ("current_a_a", 12.3 + wave),
            ("current_b_a", 11.8),
            ("current_c_a", 12.1 - wave),
            ("power_kw", 8.3 + wave * 0.5),
            ("power_factor", 0.95),
            ("frequency_hz", 50.0),
            ("energy_import_kwh", 52_310.0 + t * 8.3 / 3600.0),
            ("energy_export_kwh", 0.0),
        ];
        for (metric, value) in meter {
            self.set(METER_UNIT, &self.meter, metric, &Decoded::Number(value));
        }

        let gas = controller_gas(t);
        self.set(
            CONTROLLER_UNIT,
            &self.controller,
            "gas_lel",
            &Decoded::Number(gas),
        );
        self.set(
            CONTROLLER_UNIT,
            &self.controller,
            "sensor_volts",
            &Decoded::Number(1.2 + gas / 100.0),
        );
        for metric in self
            .controller
            .metrics
            .iter()
            .filter(|m| m.kind == crate::model::ValueKind::Bool)
        {
            let on = match metric.name.as_str() {
                "alarm1" => gas >= 25.0,
                "alarm2" => gas >= 50.0,
                _ => false,
            };
            self.set(
                CONTROLLER_UNIT,
                &self.controller,
                metric.name.as_str(),
                &Decoded::Bool(on),
            );
        }
    }

    fn set(&self, unit: u8, profile: &Profile, metric: &str, value: &Decoded) {
        let Some(register) = profile.register(&MetricName::from(metric)) else {
            return;
        };
        if let Err(e) = self.handle.set_value(unit, register, value) {
            tracing::warn!(profile = %profile.name, metric, error = %e, "demo cannot set a simulated register");
        }
    }
}

/// A bank with every register from the profile's lowest to its highest address set to 0,
/// as a real device answers for the reserved registers between its values. The poller
/// reads across such gaps to save requests.
fn zeroed_bank(profile: &Profile) -> RegisterBank {
    let mut bank = RegisterBank::default();
    let mut spans: BTreeMap<crate::profile::Function, (u16, u16)> = BTreeMap::new();
    for register in profile.registers.iter().map(|r| &r.register) {
        let end = register.address.saturating_add(register.span.max(1));
        let span = spans
            .entry(register.function)
            .or_insert((register.address, end));
        *span = (span.0.min(register.address), span.1.max(end));
    }
    for (function, (start, end)) in spans {
        let zeros = vec![0u16; usize::from(end - start)];
        bank.set_words(function, start, &zeros);
    }
    bank
}

/// %LEL at the gas alarm controller: background, then a climb past level 1 to 32 %LEL
/// that falls back after half a minute, every three minutes.
pub fn controller_gas(t: f64) -> f64 {
    let t = (t - CONTROLLER_CLIMB_START_SECS).rem_euclid(180.0);
    let value = if t < 15.0 {
        2.0 + t * 2.0
    } else if t < 45.0 {
        32.0
    } else if t < 60.0 {
        32.0 - (t - 45.0) * 2.0
    } else {
        2.0
    };
    (value * 10.0).round() / 10.0
}
