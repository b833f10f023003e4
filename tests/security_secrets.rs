//! Secrets stay out of the output. The built binary runs at log level `trace` while
//! clients use right and wrong passwords and tokens, a webhook delivery fails and
//! InfluxDB rejects the InfluxDB 2 backend's token. No password, token, password hash or
//! webhook secret may appear in its stdout, its stderr, `/metrics` or an error response.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_stonelion");
const DEVICE_PASSWORD: &str = "device-password-7f3a";
const WRONG_PASSWORD: &str = "wrong-password-91c2";
const API_TOKEN: &str = "api-token-5d8e0b6c4a2f19e7d3b5a8c0e6f4d2b1";
const WRONG_TOKEN: &str = "wrong-token-c4e9";
const WEBHOOK_SECRET: &str = "webhook-secret-2b7d";
const INFLUXDB_TOKEN: &str = "influxdb-token-6a0e";

fn cheap_hash(password: &str) -> String {
    let params = Params::new(1024, 1, 1, None).unwrap();
    let salt = SaltString::encode_b64(b"sixteen byte salt").unwrap();
    let hasher = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
    hasher
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

/// Returns a loopback port that nothing listens on, so webhook deliveries to it fail.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts a loopback HTTP server that responds to every request with 401, like InfluxDB
/// given a wrong token, and returns its port.
fn unauthorized_influxdb() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            std::thread::spawn(move || answer_unauthorized(stream));
        }
    });
    port
}

/// Reads the requests of one connection (headers and `content-length` body) and responds
/// to each with 401.
fn answer_unauthorized(stream: std::net::TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let mut content_length = 0;
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(value) = lower.strip_prefix("content-length:") {
                content_length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; content_length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let answer = r#"{"code":"unauthorized","message":"unauthorized access"}"#;
        let response = format!(
            "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
            answer.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

fn config(password_hash: &str, influxdb_port: u16) -> String {
    format!(
        r#"
[server]
http_listen = "127.0.0.1:0"
mqtt_listen = "127.0.0.1:0"

[storage]
backend = "both"

[storage.influxdb2]
url = "http://127.0.0.1:{influxdb_port}"
org = "plant"
bucket = "stonelion"
token = "{INFLUXDB_TOKEN}"
flush_interval = "100ms"
retry_initial_backoff = "50ms"
retry_max_backoff = "100ms"

[[sites]]
id = "plant-a"
name = "Plant A"
kind = "enterprise"

[[devices]]
id = "gas-01"
site = "plant-a"
profile = "gas-detector"
mqtt_password_hash = "{password_hash}"

[[api_tokens]]
name = "operator"
role = "operator"
token_sha256 = "{token_digest}"

[[webhooks]]
name = "assistant"
url = "http://127.0.0.1:{port}/hook"
secret = "{WEBHOOK_SECRET}"
timeout = "1s"
initial_backoff = "50ms"
max_backoff = "100ms"
"#,
        token_digest = hex::encode(Sha256::digest(API_TOKEN.as_bytes())),
        port = closed_port(),
    )
}

fn mosquitto_pub(port: u16, password: &str, value: &str) -> std::process::Output {
    Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-i",
            "gas-01",
            "-u",
            "gas-01",
            "-P",
            password,
        ])
        .args(["-t", "telemetry/plant-a/gas-01/gas_lel", "-m", value])
        .output()
        .expect("mosquitto_pub must be installed (Debian package mosquitto-clients)")
}

#[test]
fn secrets_absent_from_output() {
    let dir = tempfile::tempdir().unwrap();
    let password_hash = cheap_hash(DEVICE_PASSWORD);
    let config_path = dir.path().join("stonelion.toml");
    std::fs::write(
        &config_path,
        config(&password_hash, unauthorized_influxdb()),
    )
    .unwrap();
    let stderr_path = dir.path().join("stderr.log");
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config_path)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("STONELION_LOG", "trace")
        .env_remove("STONELION_HTTP_LISTEN")
        .env_remove("STONELION_MQTT_LISTEN")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut listening = String::new();
    stdout.read_line(&mut listening).unwrap();
    let address = |key: &str| {
        listening
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap()
            .parse::<std::net::SocketAddr>()
            .unwrap()
    };
    let (http, mqtt) = (address("http="), address("mqtt="));

    assert!(
        !mosquitto_pub(mqtt.port(), WRONG_PASSWORD, "1")
            .status
            .success()
    );
    let published = mosquitto_pub(mqtt.port(), DEVICE_PASSWORD, "60");
    assert!(
        published.status.success(),
        "{}",
        String::from_utf8_lossy(&published.stderr)
    );

    let client = reqwest::blocking::Client::new();
    let mut bodies = Vec::new();
    let wrong = client
        .get(format!("http://{http}/api/v1/alarms"))
        .bearer_auth(WRONG_TOKEN)
        .send()
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    bodies.push(wrong.text().unwrap());
    let basic = client
        .get(format!("http://{http}/query?q=SHOW%20MEASUREMENTS"))
        .basic_auth("u", Some(WRONG_TOKEN))
        .send()
        .unwrap();
    assert_eq!(basic.status().as_u16(), 401);
    bodies.push(basic.text().unwrap());

    // The reading of 60 %LEL raises an alarm, whose webhook delivery fails and is retried,
    // and its write to InfluxDB is rejected with 401 and retried.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = client
            .get(format!("http://{http}/metrics"))
            .bearer_auth(API_TOKEN)
            .send()
            .unwrap()
            .text()
            .unwrap();
        let failed = |name: &str| {
            metrics
                .lines()
                .any(|l| l.starts_with(name) && !l.ends_with(" 0"))
        };
        if failed("stonelion_webhook_failed_attempts_total")
            && failed("stonelion_influxdb2_rejected_credentials_total")
        {
            bodies.push(metrics);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no failed webhook attempt or InfluxDB write within 20 s:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert!(child.wait().unwrap().success());
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(
        stderr.contains("MQTT client denied"),
        "the wrong password was not logged:\n{stderr}"
    );
    assert!(
        stderr.contains("webhook"),
        "the failed delivery was not logged:\n{stderr}"
    );
    assert!(
        stderr.contains("InfluxDB rejected the token, org or bucket"),
        "the rejected InfluxDB token was not logged:\n{stderr}"
    );

    let outputs = [
        ("stdout", format!("{listening}{rest}")),
        ("stderr", stderr),
        ("responses", bodies.join("\n")),
    ];
    let secrets = [
        DEVICE_PASSWORD,
        WRONG_PASSWORD,
        API_TOKEN,
        WRONG_TOKEN,
        WEBHOOK_SECRET,
        INFLUXDB_TOKEN,
        &password_hash,
    ];
    for (name, text) in &outputs {
        for secret in secrets {
            assert!(
                !text.contains(secret),
                "{name} contains the secret {secret:?}"
            );
        }
    }
}
