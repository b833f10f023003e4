//! Simulated field devices: each publishes telemetry over its own MQTT connection, with a
//! last will on its status topic, as a real device would.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Outgoing, QoS};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Interval between two publishes of one device.
const PUBLISH_INTERVAL: Duration = Duration::from_secs(2);
/// Length of the climbing gas detector's cycle.
const GAS_CYCLE_SECS: f64 = 150.0;

#[derive(Clone, Copy)]
enum Behaviour {
    /// Combustible gas that climbs past both levels, holds, and falls back, every cycle.
    ClimbingGas,
    /// Combustible gas at a low background level.
    BackgroundGas(f64),
    Smoke,
    EnergyMeter,
    Temperature,
}

struct Simulated {
    site: &'static str,
    device: &'static str,
    behaviour: Behaviour,
}

const DEVICES: &[Simulated] = &[
    Simulated {
        site: "plant-a",
        device: "gas-a-01",
        behaviour: Behaviour::ClimbingGas,
    },
    Simulated {
        site: "plant-a",
        device: "gas-a-02",
        behaviour: Behaviour::BackgroundGas(3.0),
    },
    Simulated {
        site: "plant-a",
        device: "meter-a-01",
        behaviour: Behaviour::EnergyMeter,
    },
    Simulated {
        site: "park-b3",
        device: "gas-b3-01",
        behaviour: Behaviour::BackgroundGas(1.5),
    },
    Simulated {
        site: "park-b3",
        device: "smoke-b3-01",
        behaviour: Behaviour::Smoke,
    },
    Simulated {
        site: "park-b3",
        device: "temp-b3-01",
        behaviour: Behaviour::Temperature,
    },
];

/// Starts every simulated device against the broker at `mqtt`.
pub fn spawn_all(mqtt: SocketAddr, stop: &CancellationToken) -> Vec<JoinHandle<()>> {
    let started = Instant::now();
    DEVICES
        .iter()
        .map(|d| tokio::spawn(run_device(d, mqtt, started, stop.clone())))
        .collect()
}

/// Percent LEL of the climbing detector `t` seconds into its cycle: background for 10 s,
/// +2 %LEL/s to 64, a hold, then a fall back to background.
pub fn climbing_gas(t: f64) -> f64 {
    let t = t % GAS_CYCLE_SECS;
    let background = 4.0;
    let value = if t < 10.0 {
        background
    } else if t < 40.0 {
        background + (t - 10.0) * 2.0
    } else if t < 70.0 {
        64.0 - (t - 40.0) * 0.2
    } else if t < 90.0 {
        58.0 - (t - 70.0) * 2.7
    } else {
        background
    };
    (value * 10.0).round() / 10.0
}

async fn run_device(
    device: &'static Simulated,
    mqtt: SocketAddr,
    started: Instant,
    stop: CancellationToken,
) {
    let status_topic = format!("status/{}/{}", device.site, device.device);
    let mut options = MqttOptions::new(device.device, mqtt.ip().to_string(), mqtt.port());
    options.set_keep_alive(Duration::from_secs(10));
    options.set_last_will(LastWill::new(
        &status_topic,
        "offline",
        QoS::AtLeastOnce,
        false,
    ));
    let (client, mut events) = AsyncClient::new(options, 16);

    // The event loop runs until it has sent the DISCONNECT queued at stop, so the broker
    // does not publish the last will and the device does not look offline.
    let event_stop = stop.clone();
    let mut event_loop = tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                Ok(_) => {}
                Err(_) if event_stop.is_cancelled() => break,
                Err(e) => {
                    tracing::debug!(error = %e, "simulated device lost its MQTT connection; reconnecting");
                    tokio::select! {
                        () = event_stop.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    });

    let _ = client
        .publish(&status_topic, QoS::AtLeastOnce, false, "online")
        .await;
    let topic = format!("telemetry/{}/{}", device.site, device.device);
    let mut ticker = tokio::time::interval(PUBLISH_INTERVAL);
    let mut energy_kwh = 18_250.0;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let t = started.elapsed().as_secs_f64();
        let jitter = (t * 7.3).sin();
        let values = match device.behaviour {
            Behaviour::ClimbingGas => json!({ "gas_lel": climbing_gas(t) }),
            Behaviour::BackgroundGas(level) => {
                json!({ "gas_lel": ((level + jitter * 0.4) * 10.0).round() / 10.0 })
            }
            Behaviour::Smoke => json!({ "smoke": false }),
            Behaviour::EnergyMeter => {
                let power_kw = 42.0 + jitter * 3.0;
                energy_kwh += power_kw * PUBLISH_INTERVAL.as_secs_f64() / 3600.0;
                json!({
                    "energy_kwh": (energy_kwh * 100.0_f64).round() / 100.0,
                    "power_kw": (power_kw * 10.0_f64).round() / 10.0,
                    "voltage_v": ((230.0 + jitter) * 10.0_f64).round() / 10.0,
                })
            }
            Behaviour::Temperature => {
                json!({ "temperature_c": ((24.0 + jitter * 0.8) * 10.0_f64).round() / 10.0 })
            }
        };
        let payload = json!({ "ts": chrono::Utc::now().timestamp_millis(), "values": values });
        let _ = client
            .publish(&topic, QoS::AtLeastOnce, false, payload.to_string())
            .await;
    }
    // A device still connecting when the demo stops (the server started moments before)
    // gets a few seconds to connect and disconnect cleanly.
    let _ = client.disconnect().await;
    if tokio::time::timeout(Duration::from_secs(5), &mut event_loop)
        .await
        .is_err()
    {
        event_loop.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::climbing_gas;

    #[test]
    fn climbing_gas_crosses_both_levels_within_a_minute() {
        let first_level1 = (0..600)
            .map(|i| f64::from(i) / 10.0)
            .find(|t| climbing_gas(*t) >= 25.0);
        let first_level2 = (0..600)
            .map(|i| f64::from(i) / 10.0)
            .find(|t| climbing_gas(*t) >= 50.0);
        assert!(first_level1.is_some_and(|t| t < 30.0), "{first_level1:?}");
        assert!(first_level2.is_some_and(|t| t < 60.0), "{first_level2:?}");
        assert!(
            climbing_gas(100.0) < 23.0,
            "the gas falls back below level 1 minus the deadband"
        );
    }
}
