//! The built binary: `check-config`, `profiles check`, `run` with flag and environment
//! overrides, clean shutdown on SIGTERM, config reload on SIGHUP, and the demo raising its alarm.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_stonelion");

fn stonelion() -> Command {
    let mut command = Command::new(BIN);
    command
        .env_remove("STONELION_HTTP_LISTEN")
        .env_remove("STONELION_MQTT_LISTEN")
        .env_remove("STONELION_DATA_DIR");
    command
}

/// A child process whose stdout lines arrive on a channel.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn spawn(mut command: Command) -> Running {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a stdout line containing `needle` and returns it.
    fn wait_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line with {needle:?} within {timeout:?}; output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Sends SIGTERM and returns whether the process exited successfully.
    fn terminate(mut self) -> bool {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            assert!(
                Instant::now() < deadline,
                "the server did not stop within 20 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Returns the `http=` address from the listening line.
fn http_of(line: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("http="))
        .unwrap()
        .to_owned()
}

#[test]
fn check_config_accepts_example() {
    let output = stonelion()
        .args([
            "check-config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/stonelion.example.toml"),
        ])
        .env("STONELION_WEBHOOK_SECRET", "s3cret")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("valid (2 sites, 5 devices, 1 webhooks)"),
        "{stdout}"
    );
    assert!(!stdout.contains("s3cret"), "the secret is never printed");
}

#[test]
fn check_config_lists_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"[server]
colour = "red"

[[sites]]
id = "a"
name = "A"
kind = "factory"

[[sites]]
id = "b"
name = "B"
kind = "enterprise"

[[devices]]
id = "d1"
site = "zz"
profile = "gas-detector"

[[devices]]
id = "d2"
site = "b"
profile = "nope"

[[webhooks]]
name = "w"
url = "ftp://example.com"
secret = "x"
"#,
    )
    .unwrap();
    let output = stonelion()
        .args(["check-config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    let expected = [
        ("bad.toml:2: server.colour:", "unknown field `colour`"),
        ("bad.toml:7: sites[0].kind:", "factory"),
        ("bad.toml:16: devices[0].site:", "unknown site `zz`"),
        ("bad.toml:22: devices[1].profile:", "unknown profile `nope`"),
        ("bad.toml:26: webhooks[0].url:", "ftp"),
    ];
    for (place, text) in expected {
        assert!(
            stdout
                .lines()
                .any(|l| l.contains(place) && l.contains(text)),
            "missing {place} {text} in:\n{stdout}"
        );
    }
    assert!(stdout.contains("5 problem(s) found"), "{stdout}");
}

/// Returns the 1-based number of the only line of `text` that contains `needle`.
fn line_containing(text: &str, needle: &str) -> usize {
    let lines: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "{needle:?} must be on exactly one line of the test config"
    );
    lines[0]
}

#[test]
fn check_config_reports_problems_across_tables() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("many.toml");
    let text = r#"[server]
http_listen = "0.0.0.0:80x0"
data_dir = 5
colour = "red"

[ingest]
stale_after = "5 parsecs"

[storage]
memory_budget_bytes = 1024
max_series = 5000000000

[[sites]]
id = "plant-a"
name = "Plant A"
kind = "enterprise"

[[devices]]
id = "gas-01"
site = "plant-a"
profile = "gas-detector"

[[devices.rules]]
id = "lel-high"
metric = "gas_lel"
kind = "above"
level1 = 20

[[devices.rules]]
id = "lel-typo"
metric = "gas_lle"
kind = "above"
level1 = "high"

[[webhooks]]
name = "first"
url = "https://hooks.example/first"
secret = "s"

[[webhooks]]
name = "second"
url = "ftp://hooks.example/second"
secret = "s"
timeout = 5

[[webhooks]]
name = "third"
url = "gopher://hooks.example/third"
secret = "s"

[[api_tokens]]
name = "grafana"
role = "viewer"
token_sha256 = "not-a-digest"
"#;
    std::fs::write(&path, text).unwrap();
    let output = stonelion()
        .args(["check-config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    // (text on the line, key, part of the message)
    let expected = [
        (
            "0.0.0.0:80x0",
            "server.http_listen",
            "\"0.0.0.0:80x0\" is not a socket address; write HOST:PORT",
        ),
        (
            "data_dir = 5",
            "server.data_dir",
            "invalid type: integer `5`",
        ),
        ("colour", "server.colour", "unknown field `colour`"),
        ("5 parsecs", "ingest.stale_after", "expected a duration"),
        (
            "memory_budget_bytes",
            "storage.memory_budget_bytes",
            "write at least 16777216",
        ),
        (
            "max_series",
            "storage.max_series",
            "5000000000 is above the engine's maximum of 4294967294 series; write a smaller number, or 0 for no limit",
        ),
        (
            "gas_lle",
            "devices[0].rules[1].metric",
            "has no metric `gas_lle`",
        ),
        (
            "level1 = \"high\"",
            "devices[0].rules[1].level1",
            "invalid type: string \"high\"",
        ),
        (
            "ftp://",
            "webhooks[1].url",
            "unsupported URL scheme \"ftp\"",
        ),
        ("timeout = 5", "webhooks[1].timeout", "expected a duration"),
        (
            "gopher://",
            "webhooks[2].url",
            "unsupported URL scheme \"gopher\"",
        ),
        (
            "not-a-digest",
            "api_tokens[0].token_sha256",
            "must be 64 hex digits",
        ),
    ];
    for (needle, key, message) in expected {
        let place = format!("many.toml:{}: {key}: ", line_containing(text, needle));
        assert!(
            stdout
                .lines()
                .any(|l| l.contains(&place) && l.contains(message)),
            "missing {place}{message} in:\n{stdout}"
        );
    }
    assert!(
        stdout.contains(&format!("{} problem(s) found", expected.len())),
        "{stdout}"
    );
}

#[test]
fn check_config_rejects_open_listener() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("open.toml");
    let data = dir.path().join("data");
    std::fs::write(
        &path,
        format!(
            "[server]\ndata_dir = {:?}\nhttp_listen = \"0.0.0.0:8080\"\n",
            data.display().to_string()
        ),
    )
    .unwrap();
    let output = stonelion()
        .args(["check-config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(
            "open.toml:3: server.http_listen: the HTTP API would accept anyone on 0.0.0.0:8080"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("1 problem(s) found"), "{stdout}");

    // `run` rejects the same file before it opens anything.
    let run = stonelion()
        .args(["run", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        !run.status.success(),
        "run accepted an open API beyond loopback"
    );
    assert!(String::from_utf8_lossy(&run.stderr).contains("no [[api_tokens]] is configured"));

    // The open-listener check also runs next to other problems.
    std::fs::write(
        &path,
        "[server]\nhttp_listen = \"0.0.0.0:8080\"\ncolour = \"red\"\n",
    )
    .unwrap();
    let output = stonelion()
        .args(["check-config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("open.toml:2: server.http_listen: the HTTP API would accept anyone"),
        "{stdout}"
    );
    assert!(stdout.contains("open.toml:3: server.colour:"), "{stdout}");
    assert!(stdout.contains("2 problem(s) found"), "{stdout}");
}

#[test]
fn check_config_rejects_listeners_on_one_port() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ports.toml");
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(
        &path,
        format!(
            "[server]\nmqtt_listen = \"127.0.0.1:1883\"\n\n[mqtt]\ntls_listen = \
             \"127.0.0.1:1883\"\ntls_cert = {:?}\ntls_key = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
    )
    .unwrap();
    let output = stonelion()
        .args(["check-config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(
            "ports.toml:5: mqtt.tls_listen: the MQTT listener on 127.0.0.1:1883 ([server] \
             mqtt_listen, --mqtt-listen or STONELION_MQTT_LISTEN) and the MQTT over TLS \
             listener on 127.0.0.1:1883 ([mqtt] tls_listen) cannot share port 1883; give each \
             listener its own port"
        ),
        "{stdout}"
    );

    // A listener that keeps its default is not written, so the other one's line is named.
    std::fs::write(
        &path,
        "# ports\n[server]\nhttp_listen = \"127.0.0.1:1883\"\n",
    )
    .unwrap();
    let output = stonelion()
        .args(["check-config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("ports.toml:3: server.http_listen: the HTTP listener on 127.0.0.1:1883"),
        "{stdout}"
    );
}

#[test]
fn check_config_warns_of_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tls.toml");
    let cert = dir.path().join("missing-cert.pem");
    let key = dir.path().join("missing-key.pem");
    std::fs::write(
        &path,
        format!(
            "[api]\ntls_cert = {:?}\ntls_key = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
    )
    .unwrap();
    let output = stonelion()
        .args(["check-config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "a missing file is a warning only:\n{stdout}"
    );
    assert!(
        stdout.contains("tls.toml:2: api.tls_cert: warning: cannot open"),
        "{stdout}"
    );
    assert!(
        stdout.contains("tls.toml:3: api.tls_key: warning: cannot open"),
        "{stdout}"
    );
    assert!(stdout.contains("tls.toml: valid"), "{stdout}");
}

#[test]
fn check_config_reports_syntax_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    std::fs::write(
        &path,
        "[server]\nhttp_listen = \"127.0.0.1:8080\"\n[[sites]\n",
    )
    .unwrap();
    let output = stonelion()
        .args(["check-config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1));
    assert!(stdout.contains("broken.toml:3:"), "{stdout}");
    assert!(stdout.contains("invalid TOML"), "{stdout}");
}

#[test]
fn profiles_check_accepts_shipped_profiles() {
    let output = stonelion()
        .args([
            "profiles",
            "check",
            concat!(env!("CARGO_MANIFEST_DIR"), "/device-profiles"),
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
}

#[test]
fn flag_beats_env_beats_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let data = dir.path().join("data");
    std::fs::write(
        &config,
        format!(
            "[server]\nhttp_listen = \"127.0.0.3:0\"\nmqtt_listen = \"127.0.0.3:0\"\ndata_dir = {:?}\n",
            data.display().to_string()
        ),
    )
    .unwrap();

    // The environment variable beats the file.
    let mut command = stonelion();
    command
        .args(["run", "--config", config.to_str().unwrap()])
        .env("STONELION_HTTP_LISTEN", "127.0.0.2:0");
    let mut run = Running::spawn(command);
    let line = run.wait_line("stonelion listening", Duration::from_secs(30));
    assert!(http_of(&line).starts_with("127.0.0.2:"), "{line}");
    assert!(
        line.contains("mqtt=127.0.0.3:"),
        "the file's MQTT address applies: {line}"
    );
    assert!(run.terminate(), "exit status after SIGTERM");

    // The flag beats the environment variable.
    let mut command = stonelion();
    command
        .args([
            "run",
            "--config",
            config.to_str().unwrap(),
            "--http-listen",
            "127.0.0.1:0",
        ])
        .env("STONELION_HTTP_LISTEN", "127.0.0.2:0");
    let mut run = Running::spawn(command);
    let line = run.wait_line("stonelion listening", Duration::from_secs(30));
    assert!(http_of(&line).starts_with("127.0.0.1:"), "{line}");
    let health = reqwest::blocking::get(format!("http://{}/healthz", http_of(&line))).unwrap();
    assert_eq!(health.status(), 200);
    assert!(run.terminate());
    assert!(
        data.join("state.sqlite").exists(),
        "the data directory from the file was used"
    );
}

#[test]
fn demo_raises_its_alarm() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = stonelion();
    command.args([
        "demo",
        "--http-listen",
        "127.0.0.1:0",
        "--mqtt-listen",
        "127.0.0.1:0",
        "--data-dir",
        dir.path().join("data").to_str().unwrap(),
    ]);
    let mut demo = Running::spawn(command);
    let listening = demo.wait_line("stonelion listening", Duration::from_secs(30));
    let http = http_of(&listening);
    demo.wait_line("mosquitto_pub", Duration::from_secs(5));
    let raised = demo.wait_line("webhook received: alarm.raised", Duration::from_secs(60));
    assert!(
        raised.contains("device gas-a-01") && raised.contains("signature valid"),
        "{raised}"
    );
    let ack = demo.wait_line("acknowledge it: curl", Duration::from_secs(5));
    assert!(
        ack.contains(&format!("http://{http}/api/v1/alarms/1/ack")),
        "the printed command names the raised alarm: {ack}"
    );
    let escalated = demo.wait_line("webhook received: alarm.escalated", Duration::from_secs(60));
    assert!(escalated.contains("level 2"), "{escalated}");

    let alarms: serde_json::Value =
        reqwest::blocking::get(format!("http://{http}/api/v1/alarms?device=gas-a-01"))
            .unwrap()
            .json()
            .unwrap();
    assert_eq!(alarms["alarms"][0]["level"], 2, "{alarms}");
    assert_eq!(alarms["alarms"][0]["state"], "active");

    // The Modbus devices are polled into the same pipeline and raise alarms too.
    let modbus = demo.wait_line(
        "webhook received: alarm.raised alarm 2",
        Duration::from_secs(60),
    );
    assert!(modbus.contains("device gasctl-b3-01"), "{modbus}");
    let meter: serde_json::Value =
        reqwest::blocking::get(format!("http://{http}/api/v1/devices/meter-a-02"))
            .unwrap()
            .json()
            .unwrap();
    let energy = meter["latest"]["energy_import_kwh"]["value"].as_f64();
    assert!(energy.is_some_and(|kwh| kwh > 52_000.0), "{meter}");
    assert_eq!(meter["online"], true);

    // The simulated devices disconnect cleanly at shutdown, so the broker publishes none
    // of their last wills and no device goes offline.
    let mqtt = listening
        .split_whitespace()
        .find_map(|w| w.strip_prefix("mqtt="))
        .unwrap()
        .to_owned();
    let (host, port) = mqtt.rsplit_once(':').unwrap();
    // stdbuf makes mosquitto_sub write each line as it prints it.
    let mut command = Command::new("stdbuf");
    command.args(["-oL", "mosquitto_sub", "-d", "-v", "-h", host, "-p", port]);
    command.args(["-t", "status/#"]);
    let mut status = Running::spawn(command);
    status.wait_line("received SUBACK", Duration::from_secs(10));
    assert!(demo.terminate(), "the demo exits cleanly on SIGTERM");
    status.child.kill().unwrap();
    status.child.wait().unwrap();
    let published: Vec<String> = status
        .seen
        .into_iter()
        .chain(status.lines.iter())
        .filter(|line| line.starts_with("status/"))
        .collect();
    assert!(
        published.is_empty(),
        "status messages at shutdown: {published:?}"
    );
}

#[test]
fn check_config_rejects_invalid_rollups() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rollups.toml");
    std::fs::write(
        &path,
        r#"[storage]
retention = "30d"

[[storage.rollups]]
resolution = "1h"
retention = "365d"

[[storage.rollups]]
resolution = "1m"
retention = "365d"

[[storage.rollups]]
resolution = "2h"
retention = "7d"

[[storage.rollups]]
resolution = "7h"
retention = "400d"

[[storage.rollups]]
resolution = "8h"
retention = "400d"
"#,
    )
    .unwrap();
    let output = stonelion()
        .args(["check-config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    for needle in [
        "storage.rollups[1].resolution",
        "not coarser than the tier before it",
        "storage.rollups[2].retention",
        "shorter than storage.retention",
        "write at least \"30d\"",
        "storage.rollups[3].resolution",
        "divide 1d",
        "storage.rollups[4].resolution",
        "resolution 8h is not a multiple of the tier before it (7h)",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
    assert!(
        !stdout.contains("storage.rollups[0]"),
        "the first tier is valid:\n{stdout}"
    );
    assert!(
        !stdout.contains("storage.rollups[2].resolution"),
        "2h is a multiple of 1m:\n{stdout}"
    );
}

#[test]
fn check_config_accepts_rollups() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rollups.toml");
    std::fs::write(
        &path,
        r#"[storage]
retention = "30d"

[[storage.rollups]]
resolution = "1m"
retention = "365d"

[[storage.rollups]]
resolution = "1h"
retention = "1825d"
"#,
    )
    .unwrap();
    let output = stonelion()
        .args(["check-config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
}

#[test]
fn check_config_rejects_zero_query_limits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("limits.toml");
    std::fs::write(
        &path,
        r#"[api]
query_max_series = 0
query_max_points = 0
query_max_buckets = 5000
"#,
    )
    .unwrap();
    let output = stonelion()
        .args(["check-config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("api.query_max_series"), "{stdout}");
    assert!(stdout.contains("api.query_max_points"), "{stdout}");
    assert!(stdout.contains("must be at least 1"), "{stdout}");
    assert!(
        !stdout.contains("api.query_max_buckets"),
        "5000 buckets is valid:\n{stdout}"
    );
}

#[test]
fn check_config_rejects_unworkable_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("unworkable.toml");
    std::fs::write(
        &path,
        r#"[ingest]
max_payload_bytes = 0
stale_after = "0s"

[storage]
retention = "0s"
summary_interval = "0s"

[[sites]]
id = "a"
name = "A"
kind = "enterprise"

[[devices]]
id = "g"
site = "a"
profile = "gas-detector"
stale_after = "0s"

[[devices.rules]]
id = "x"
metric = "gas_lel"
kind = "equals"
equals = true

[[devices.rules]]
id = "x"
metric = "gas_lel"
kind = "above"
level1 = 10
"#,
    )
    .unwrap();
    let output = stonelion()
        .args(["check-config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    for needle in [
        "ingest.max_payload_bytes",
        "ingest.stale_after",
        "devices[0].stale_after",
        "storage.retention",
        "storage.summary_interval",
        "an equals rule cannot watch `gas_lel`",
        "rule id `x` is used twice",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
}

#[test]
fn sighup_reloads_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let base = format!(
        "[server]\nhttp_listen = \"127.0.0.1:0\"\nmqtt_listen = \"127.0.0.1:0\"\ndata_dir = {:?}\n\n\
         [[sites]]\nid = \"plant-a\"\nname = \"Plant A\"\nkind = \"enterprise\"\n",
        dir.path().join("data").display().to_string()
    );
    std::fs::write(&config, &base).unwrap();
    let mut run = Running::spawn({
        let mut command = stonelion();
        command.args(["run", "--config", config.to_str().unwrap()]);
        command
    });
    let line = run.wait_line("stonelion listening", Duration::from_secs(30));
    let devices_url = format!("http://{}/api/v1/devices", http_of(&line));
    let devices = || -> serde_json::Value {
        reqwest::blocking::get(&devices_url)
            .unwrap()
            .json()
            .unwrap()
    };
    assert_eq!(devices()["devices"], serde_json::json!([]));

    std::fs::write(
        &config,
        format!(
            "{base}\n[[devices]]\nid = \"gas-01\"\nsite = \"plant-a\"\nprofile = \"gas-detector\"\n"
        ),
    )
    .unwrap();
    let status = Command::new("kill")
        .args(["-HUP", &run.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if devices()["devices"][0]["id"] == "gas-01" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not add gas-01 within 20 s: {}",
            devices()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        run.terminate(),
        "the server keeps running after SIGHUP and stops on SIGTERM"
    );
}
