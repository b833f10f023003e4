//! A client that no one here wrote: Debian's `mosquitto_pub` publishes to the embedded
//! broker and raises an alarm.

mod support;

use std::process::Command;
use std::time::Duration;

use support::{CONFIG, Receiver, alarms_of, start_server, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_pub_raises_alarm() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = start_server(CONFIG, &receiver.url(), data.path()).await;
    let port = server.mqtt_addr.port().to_string();

    let publish = |topic: &str, message: &str| {
        let output = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port, "-q", "1", "-i", "mosquitto-test", "-t", topic, "-m", message])
            .output()
            .expect("mosquitto_pub must be installed (Debian package mosquitto-clients; .ci/install-deps installs it)");
        assert!(
            output.status.success(),
            "mosquitto_pub failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    publish(
        "telemetry/plant-a/gas-01",
        r#"{"values": {"gas_lel": 31.5}}"#,
    );
    publish("telemetry/park-b3/smoke-01/smoke", "true");

    let raised = wait_for("two raised deliveries", Duration::from_secs(15), || async {
        let r = receiver.events("alarm.raised");
        (r.len() == 2).then_some(r)
    })
    .await;
    let devices: Vec<&str> = raised
        .iter()
        .map(|d| d.body["alarm"]["device"].as_str().unwrap())
        .collect();
    assert!(
        devices.contains(&"gas-01") && devices.contains(&"smoke-01"),
        "{devices:?}"
    );
    let gas = &alarms_of(server.http_addr, "gas-01").await[0];
    assert_eq!(gas["value"], 31.5);
    assert_eq!(gas["level"], 1);
    server.shutdown().await;
}
