//! `stonelion demo`: the server on its embedded defaults, simulated field devices that
//! publish over their own MQTT connections, and a webhook receiver that prints what it
//! receives. One combustible gas detector climbs past level 1 and level 2 within a minute.

mod devices;
mod modbus;
mod receiver;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::clock::SystemClock;
use crate::config::{self, Overrides, builtin::builtin_profiles};
use crate::server::Server;

/// The demo's config; `WEBHOOK_URL` is replaced with the receiver's address.
pub const DEMO_CONFIG: &str = include_str!("demo.toml");

/// Secret that the demo's webhook signs with.
pub const DEMO_SECRET: &str = "demo-secret";

/// Runs the demo until SIGTERM or Ctrl-C.
pub async fn run(overrides: Overrides, webhook_listen: SocketAddr) -> anyhow::Result<()> {
    let api = Arc::new(std::sync::OnceLock::new());
    let (receiver_addr, receiver) =
        receiver::start(webhook_listen, DEMO_SECRET.as_bytes().to_vec(), api.clone())
            .await
            .with_context(|| {
                format!("cannot start the demo webhook receiver on {webhook_listen}")
            })?;
    let simulated_modbus = modbus::start(&builtin_profiles())
        .await
        .context("cannot start the demo's Modbus simulator")?;
    let text = DEMO_CONFIG
        .replace("WEBHOOK_URL", &format!("http://{receiver_addr}/stonelion"))
        .replace("MODBUS_ADDR", &simulated_modbus.addr.to_string());
    let mut config =
        config::parse(&text, builtin_profiles()).map_err(|problems| config::ConfigError {
            source_name: "demo config".to_owned(),
            problems,
        })?;
    overrides.apply(&mut config.server);
    // The receiver is bound already, so a server listener on its port would fail to bind.
    let listeners = crate::security::Listeners::of(&config, false);
    let mut named = listeners.named();
    named.insert(
        0,
        crate::security::NamedListener {
            name: "demo webhook receiver",
            addr: receiver_addr,
            setting: "--webhook-listen",
            key: "",
        },
    );
    if let Some(shared) = crate::security::shared_ports(&named, listeners.ipv6_only)
        .into_iter()
        .next()
    {
        return Err(shared.into());
    }
    let data_dir = config.server.data_dir.clone();
    let sites = config.sites.clone();

    let server = Server::start(config, Arc::new(SystemClock)).await?;
    let http = server.http_addr;
    let mqtt = server.mqtt_addr;
    let _ = api.set(http);
    println!("stonelion listening: http={http} mqtt={mqtt}");
    print_banner(
        http,
        mqtt,
        receiver_addr,
        simulated_modbus.addr,
        &data_dir,
        &sites,
    );

    let stop_devices = CancellationToken::new();
    let mut simulated = devices::spawn_all(mqtt, &stop_devices);
    simulated.push(simulated_modbus.spawn_updates(stop_devices.clone()));
    crate::cli::wait_for_signal().await;

    stop_devices.cancel();
    for task in simulated {
        let _ = task.await;
    }
    server.shutdown().await;
    receiver.abort();
    Ok(())
}

fn print_banner(
    http: SocketAddr,
    mqtt: SocketAddr,
    receiver: SocketAddr,
    modbus: SocketAddr,
    data_dir: &std::path::Path,
    sites: &[crate::config::Site],
) {
    let site_list: Vec<String> = sites
        .iter()
        .map(|s| format!("{} ({}, {})", s.id, s.name, s.kind.as_str()))
        .collect();
    println!(
        "\nStonelion demo\n\
         \n  sites:            {}\
         \n  MQTT broker:      {mqtt} (open, no credentials: demo only)\
         \n  HTTP API:         http://{http}/api/v1/devices (open, no API tokens: demo only)\
         \n  alarms:           http://{http}/api/v1/alarms\
         \n  gas series:       http://{http}/api/v1/devices/gas-a-01/series?metric=gas_lel&from=now-10m\
         \n  metrics:          http://{http}/metrics\
         \n  webhook receiver: http://{receiver}/stonelion (prints each delivery below)\
         \n  Modbus TCP:       {modbus} (simulated gateway: meter-a-02 unit 1, gasctl-b3-01 unit 2)\
         \n  data directory:   {}\
         \n\
         \n  gas-a-01 (MQTT) climbs past level 1 (25 %LEL) about 20 s from now and level 2 (50 %LEL) about 15 s later;\
         \n  gasctl-b3-01 (Modbus) climbs past level 1 about a minute from now.\
         \n  Raise another alarm yourself (Debian package mosquitto-clients):\
         \n    mosquitto_pub -h {} -p {} -q 1 -t telemetry/park-b3/smoke-b3-01 -m '{{\"values\": {{\"smoke\": true}}}}'\
         \n  Each raised alarm below comes with the command that acknowledges it. Close an alarm\
         \n  once it has cleared, with its id (ID) and a note:\
         \n    curl -X POST http://{http}/api/v1/alarms/ID/close -H 'content-type: application/json' -d '{{\"by\": \"duty officer\", \"note\": \"leak fixed\"}}'\
         \n\nPress Ctrl-C to stop.\n",
        site_list.join(", "),
        data_dir.display(),
        mqtt.ip(),
        mqtt.port(),
    );
}
