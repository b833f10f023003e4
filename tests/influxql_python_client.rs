//! Runs the Python `influxdb` client (an InfluxDB 1.x client from PyPI) against a real
//! Stonelion server on the embedded engine, with an API token that the client sends as its
//! password: writes go through `/write` and the pipeline, queries through `/query`. The
//! pytest file is `tests/python/test_influxdb_client.py`.

mod support;

use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};
use support::{Receiver, start_server, wait_for};

const TOKEN: &str = "python-client-token-0123456789abcdef0123456789ab";

/// Sites and devices of the data the Python tests query.
const DEVICES: [(&str, &str, &str); 6] = [
    ("plant-a", "gas-01", "gas-detector"),
    ("plant-a", "gas-02", "gas-detector"),
    ("plant-a", "meter-01", "energy-meter"),
    ("park-b", "smoke-01", "smoke-detector"),
    ("park-b", "temp-01", "temperature-sensor"),
    ("park-b", "gas-03", "gas-detector"),
];

fn config() -> String {
    let mut text = String::from(
        r#"
[[sites]]
id = "plant-a"
name = "Plant A"
kind = "enterprise"

[[sites]]
id = "park-b"
name = "Park Building B"
kind = "park_building"
"#,
    );
    for (site, device, profile) in DEVICES {
        text.push_str(&format!(
            "\n[[devices]]\nid = \"{device}\"\nsite = \"{site}\"\nprofile = \"{profile}\"\n"
        ));
    }
    text.push_str(&format!(
        "\n[[api_tokens]]\nname = \"python-client\"\nrole = \"admin\"\ntoken_sha256 = \"{}\"\n",
        hex::encode(Sha256::digest(TOKEN.as_bytes()))
    ));
    text.push_str(
        "\n[[webhooks]]\nname = \"assistant\"\nurl = \"WEBHOOK_URL\"\nsecret = \"test-secret\"\n",
    );
    text
}

/// Two hours of one-minute readings ending at the last full minute, as line protocol.
/// gas-01 peaks at 40 %LEL, so it raises a level 1 alarm and `alarm_events` exists.
fn history() -> String {
    let now = chrono::Utc::now().timestamp_millis();
    let end = now - now % 60_000;
    let mut body = String::new();
    for (index, (site, device, profile)) in DEVICES.iter().enumerate() {
        for minute in 0..120_i64 {
            let ts = end - (119 - minute) * 60_000;
            let phase = minute as f64 + index as f64 * 7.0;
            let fields = match *profile {
                "gas-detector" => format!("gas_lel={}", 10.0 + 30.0 * (phase / 20.0).sin().abs()),
                "smoke-detector" => format!("smoke={}", minute % 50 == 0),
                "energy-meter" => {
                    format!(
                        "energy_kwh={},power_kw={}",
                        1000.0 + minute as f64 * 0.8,
                        48.0 + (phase / 9.0).cos() * 4.0
                    )
                }
                _ => format!("temperature_c={}", 21.5 + (phase / 30.0).sin()),
            };
            body.push_str(&format!(
                "{profile},site={site},device={device} {fields} {ts}\n"
            ));
        }
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_influxdb_client_reads_and_writes() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = start_server(&config(), &receiver.url(), data.path()).await;
    let http = server.http_addr;

    let response = reqwest::Client::new()
        .post(format!("http://{http}/write?db=stonelion&precision=ms"))
        .bearer_auth(TOKEN)
        .body(history())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204, "{}", response.text().await.unwrap());
    wait_for(
        "an alarm from the written history",
        Duration::from_secs(15),
        || async { receiver.events("alarm.raised").pop() },
    )
    .await;

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Debian's interpreter is the one `.ci/install-deps` installs `influxdb` and pytest for.
    let python =
        std::env::var("STONELION_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".to_owned());
    let mut command = tokio::process::Command::new(&python);
    command
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/python/test_influxdb_client.py",
        ])
        .current_dir(root)
        .env("STONELION_HOST", http.ip().to_string())
        .env("STONELION_PORT", http.port().to_string())
        .env("STONELION_TOKEN", TOKEN)
        .kill_on_drop(true);
    let run = tokio::time::timeout(Duration::from_secs(120), command.output());
    let output = run
        .await
        .expect("pytest finished within 120 s")
        .expect("python3 starts: run .ci/install-deps, or set STONELION_PYTHON to a Python with influxdb and pytest");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "pytest failed ({})\n{stdout}\n{stderr}",
        output.status
    );
    assert!(stdout.contains("passed"), "pytest ran no test:\n{stdout}");
    server.shutdown().await;
}
