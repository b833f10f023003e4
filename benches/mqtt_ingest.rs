//! MQTT ingest throughput on loopback: Stonelion (embedded broker, storage and rules)
//! against Debian's `mosquitto` routing the same messages to one subscriber.
//!
//! `BENCH_CONNECTIONS` rumqttc connections, one device each, publish `BENCH_MESSAGES`
//! QoS 1 JSON messages each to `telemetry/{site}/{device}` with at most `BENCH_INFLIGHT`
//! unacknowledged publishes per connection. Devices cycle through the built-in profiles
//! `gas-detector`, `temperature-sensor` and `energy-meter`. The energy meters get two
//! device rules, because their profile has none. Values stay below every threshold, so
//! rules run on every message but raise no alarm.
//!
//! Each run starts a fresh server process. Stonelion is the built binary run with
//! `run --config FILE`; its run ends when `stonelion_points_stored_total` on `/metrics`
//! reaches the number of points sent. mosquitto gets a config with a free loopback port;
//! its run ends when every PUBACK has arrived and the subscriber has received every message.
//! The runs alternate between the two servers `BENCH_RUNS` times, and the table shows
//! medians. Server CPU is user + system time from `/proc/PID/stat` over the run.
//!
//! Run with `cargo bench --bench mqtt_ingest` (see docs/benchmarks.md).

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::task::JoinSet;

const SITE: &str = "bench-site";
const PROFILES: [&str; 3] = ["gas-detector", "temperature-sensor", "energy-meter"];

/// Load and run counts, read from `BENCH_*` environment variables.
#[derive(Clone, Copy, Debug)]
struct Settings {
    connections: usize,
    messages: usize,
    inflight: u16,
    runs: usize,
    timeout: Duration,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text} is not a valid number")),
        Err(_) => default,
    }
}

impl Settings {
    fn from_env() -> Settings {
        let settings = Settings {
            connections: env_or("BENCH_CONNECTIONS", 8),
            messages: env_or("BENCH_MESSAGES", 5_000),
            inflight: env_or("BENCH_INFLIGHT", 100),
            runs: env_or("BENCH_RUNS", 3),
            timeout: Duration::from_secs(env_or("BENCH_TIMEOUT_SECS", 120)),
        };
        assert!(
            settings.connections > 0,
            "BENCH_CONNECTIONS must be at least 1"
        );
        assert!(settings.messages > 0, "BENCH_MESSAGES must be at least 1");
        assert!(settings.inflight > 0, "BENCH_INFLIGHT must be at least 1");
        assert!(settings.runs > 0, "BENCH_RUNS must be at least 1");
        settings
    }
}

/// Small deterministic generator, so every run sends the same values.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One connection's device and its payloads, built before the clock starts.
struct Stream {
    client_id: String,
    topic: String,
    payloads: Vec<Vec<u8>>,
    points: usize,
}

/// Builds the payloads of connection `index`: one JSON message per millisecond, ending a
/// minute before now, so every timestamp of a device is unique and none is in the future.
fn stream(index: usize, messages: usize) -> Stream {
    let profile = PROFILES[index % PROFILES.len()];
    let device = format!("dev-{index:03}");
    let count = i64::try_from(messages).expect("BENCH_MESSAGES fits in i64");
    let first_ts = chrono::Utc::now().timestamp_millis() - 60_000 - count;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (index as u64 + 1));
    let mut energy_kwh = 1_000.0;
    let mut payloads = Vec::with_capacity(messages);
    for ts in first_ts..first_ts + count {
        let values = match profile {
            "gas-detector" => {
                serde_json::json!({ "gas_lel": (rng.next_f64() * 10.0 * 10.0).round() / 10.0 })
            }
            "temperature-sensor" => {
                serde_json::json!({ "temperature_c": 20.0 + (rng.next_f64() * 100.0).round() / 10.0 })
            }
            _ => {
                energy_kwh += rng.next_f64() * 0.01;
                serde_json::json!({
                    "energy_kwh": energy_kwh,
                    "power_kw": 5.0 + rng.next_f64() * 20.0,
                    "voltage_v": 225.0 + rng.next_f64() * 10.0,
                })
            }
        };
        payloads.push(
            serde_json::json!({ "ts": ts, "values": values })
                .to_string()
                .into_bytes(),
        );
    }
    let points_per_message = if profile == "energy-meter" { 3 } else { 1 };
    Stream {
        client_id: format!("bench-{device}"),
        topic: format!("telemetry/{SITE}/{device}"),
        payloads,
        points: points_per_message * messages,
    }
}

/// Builds the Stonelion config: one site and one device per connection.
fn stonelion_config(connections: usize) -> String {
    let mut text = format!(
        "[ingest]\nstale_after = \"1h\"\n\n[[sites]]\nid = \"{SITE}\"\nname = \"Bench site\"\nkind = \"enterprise\"\n"
    );
    for index in 0..connections {
        let profile = PROFILES[index % PROFILES.len()];
        text.push_str(&format!(
            "\n[[devices]]\nid = \"dev-{index:03}\"\nsite = \"{SITE}\"\nprofile = \"{profile}\"\n"
        ));
        // The energy-meter profile has no rules of its own.
        if profile == "energy-meter" {
            text.push_str(
                "\n[[devices.rules]]\nid = \"power-high\"\nmetric = \"power_kw\"\nkind = \"above\"\n\
                 level1 = 80.0\nlevel2 = 100.0\ndeadband = 1.0\n\
                 \n[[devices.rules]]\nid = \"voltage-low\"\nmetric = \"voltage_v\"\nkind = \"below\"\n\
                 level1 = 200.0\nlevel2 = 190.0\ndeadband = 2.0\n",
            );
        }
    }
    text
}

/// Returns the user + system CPU time of a process, in seconds.
fn cpu_seconds(pid: u32, ticks_per_second: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name in field 2 may contain spaces, so fields are counted after its ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the file, and `fields` starts at field 3.
    (ticks(11) + ticks(12)) as f64 / ticks_per_second
}

fn clock_ticks_per_second() -> f64 {
    let output = Command::new("getconf").arg("CLK_TCK").output();
    output
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// A server process under test, stopped with SIGTERM when dropped.
struct ServerProcess {
    child: Child,
    mqtt: SocketAddr,
    /// Stonelion's HTTP API, or `None` for mosquitto.
    http: Option<SocketAddr>,
}

impl ServerProcess {
    fn start_stonelion(dir: &Path, connections: usize) -> ServerProcess {
        let config = dir.join("stonelion.toml");
        std::fs::write(&config, stonelion_config(connections)).unwrap();
        let log = std::fs::File::create(dir.join("stonelion.log")).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_stonelion"))
            .arg("run")
            .arg("--config")
            .arg(&config)
            .args([
                "--http-listen",
                "127.0.0.1:0",
                "--mqtt-listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(dir.join("data"))
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("the stonelion binary starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let Some(addresses) = line.trim().strip_prefix("stonelion listening: ") else {
            let log = std::fs::read_to_string(dir.join("stonelion.log")).unwrap_or_default();
            panic!("stonelion did not report its addresses (stdout `{line}`); its log:\n{log}");
        };
        let address = |key: &str| {
            let value = addresses
                .split(' ')
                .find_map(|part| part.strip_prefix(key))
                .unwrap();
            value.parse::<SocketAddr>().unwrap()
        };
        ServerProcess {
            mqtt: address("mqtt="),
            http: Some(address("http=")),
            child,
        }
    }

    fn start_mosquitto(dir: &Path) -> ServerProcess {
        // The port is free when probed. Another process taking it before mosquitto binds
        // makes the connection wait below fail.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.join("mosquitto.conf");
        // `max_queued_messages 0` lifts the 1,000-message queue limit per client, so a
        // subscriber that falls behind during the burst loses nothing.
        let text =
            format!("listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n");
        std::fs::write(&config, text).unwrap();
        let log = std::fs::File::create(dir.join("mosquitto.log")).unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mosquitto must be installed (Debian package mosquitto)");
        ServerProcess {
            child,
            mqtt: SocketAddr::from(([127, 0, 0, 1], port)),
            http: None,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the server accepts TCP connections on `addr`.
async fn wait_until_accepting(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no server accepts connections on {addr} after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connects one MQTT client and polls its event loop until CONNACK.
async fn connect(addr: SocketAddr, client_id: &str, inflight: u16) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(60));
    options.set_inflight(inflight);
    let (client, mut events) = AsyncClient::new(options, usize::from(inflight) * 2);
    let connected = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return,
                Ok(_) => {}
                Err(e) => panic!("MQTT client {client_id} failed to connect to {addr}: {e}"),
            }
        }
    });
    connected
        .await
        .unwrap_or_else(|_| panic!("no CONNACK from {addr} for {client_id} within 10 s"));
    (client, events)
}

/// Publishes every payload of a stream with QoS 1 and returns the time of the last
/// PUBACK, measured from `start`.
async fn publish_stream(
    client: AsyncClient,
    mut events: EventLoop,
    stream: Stream,
    start: Instant,
) -> Duration {
    let Stream {
        client_id,
        topic,
        payloads,
        ..
    } = stream;
    let expected = payloads.len();
    let sender = tokio::spawn(async move {
        for payload in payloads {
            client
                .publish(topic.as_str(), QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
        }
        client
    });
    let mut acked = 0;
    while acked < expected {
        match events.poll().await {
            Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
            Ok(_) => {}
            Err(e) => panic!("MQTT connection {client_id} failed after {acked} PUBACKs: {e}"),
        }
    }
    let elapsed = start.elapsed();
    let client = sender.await.unwrap();
    let _ = client.disconnect().await;
    elapsed
}

/// Counts the messages a subscriber receives and returns the time of the `expected`-th.
///
/// The client is kept until then, because its event loop stops once every client handle
/// is dropped.
async fn count_deliveries(
    client: AsyncClient,
    mut events: EventLoop,
    expected: usize,
    start: Instant,
) -> Duration {
    let mut received = 0;
    while received < expected {
        match events.poll().await {
            Ok(Event::Incoming(Packet::Publish(_))) => received += 1,
            Ok(_) => {}
            Err(e) => panic!("the subscriber failed after {received} of {expected} messages: {e}"),
        }
    }
    let elapsed = start.elapsed();
    drop(client);
    elapsed
}

/// Returns the value of an unlabelled sample in Prometheus text, or the sum over its labels.
fn metric_value(text: &str, name: &str) -> f64 {
    let samples = text.lines().filter(|line| !line.starts_with('#'));
    let matching =
        samples.filter(|line| line.starts_with(name) && line[name.len()..].starts_with([' ', '{']));
    matching
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn fetch_metrics(http: SocketAddr) -> String {
    reqwest::get(format!("http://{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Polls `/metrics` every 20 ms until `expected` points are stored and returns that time.
async fn wait_for_points(http: SocketAddr, expected: usize, start: Instant) -> Duration {
    loop {
        let stored = metric_value(&fetch_metrics(http).await, "stonelion_points_stored_total");
        if stored >= expected as f64 {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Figures of one run.
#[derive(Clone, Debug)]
struct Outcome {
    broker: &'static str,
    messages: usize,
    points: usize,
    /// Time until every connection had all its PUBACKs.
    acked: Duration,
    /// Time until every point was stored (Stonelion) or delivered to the subscriber
    /// (mosquitto).
    done: Duration,
    server_cpu: f64,
    client_cpu: f64,
    /// End of the CPU sample window: the later of `acked` and `done`.
    window: Duration,
}

impl Outcome {
    /// Messages per second: by stored points for Stonelion and by PUBACKs for mosquitto.
    fn messages_per_second(&self) -> f64 {
        let basis = if self.broker == "stonelion" {
            self.done
        } else {
            self.acked
        };
        self.messages as f64 / basis.as_secs_f64()
    }

    fn points_per_second(&self) -> f64 {
        let basis = if self.broker == "stonelion" {
            self.done
        } else {
            self.acked
        };
        self.points as f64 / basis.as_secs_f64()
    }

    fn server_cores(&self) -> f64 {
        self.server_cpu / self.window.as_secs_f64()
    }

    fn client_cores(&self) -> f64 {
        self.client_cpu / self.window.as_secs_f64()
    }
}

/// Runs one load against a started server.
async fn run_load(
    server: &ServerProcess,
    broker: &'static str,
    settings: Settings,
    ticks: f64,
) -> Outcome {
    wait_until_accepting(server.mqtt).await;
    let streams: Vec<Stream> = (0..settings.connections)
        .map(|i| stream(i, settings.messages))
        .collect();
    let messages = settings.connections * settings.messages;
    let points = streams.iter().map(|s| s.points).sum();
    let mut clients = Vec::new();
    for stream in streams {
        let (client, events) = connect(server.mqtt, &stream.client_id, settings.inflight).await;
        clients.push((client, events, stream));
    }
    let subscriber = match server.http {
        Some(_) => None,
        None => Some(subscribe(server.mqtt).await),
    };

    let (server_cpu_start, client_cpu_start) = (
        cpu_seconds(server.pid(), ticks),
        cpu_seconds(std::process::id(), ticks),
    );
    let start = Instant::now();
    let mut publishers = JoinSet::new();
    for (client, events, stream) in clients {
        publishers.spawn(publish_stream(client, events, stream, start));
    }
    let completion = match (server.http, subscriber) {
        (Some(http), _) => tokio::spawn(wait_for_points(http, points, start)),
        (None, Some((client, events))) => {
            tokio::spawn(count_deliveries(client, events, messages, start))
        }
        (None, None) => unreachable!("mosquitto runs always have a subscriber"),
    };
    let finished = tokio::time::timeout(settings.timeout, async {
        let mut acked = Duration::ZERO;
        while let Some(elapsed) = publishers.join_next().await {
            acked = acked.max(elapsed.unwrap());
        }
        (acked, completion.await.unwrap())
    });
    let Ok((acked, done)) = finished.await else {
        panic!(
            "{broker}: the run did not finish within {:?}; raise BENCH_TIMEOUT_SECS or lower the load",
            settings.timeout
        );
    };
    let window = start.elapsed();
    let server_cpu = cpu_seconds(server.pid(), ticks) - server_cpu_start;
    let client_cpu = cpu_seconds(std::process::id(), ticks) - client_cpu_start;
    Outcome {
        broker,
        messages,
        points,
        acked,
        done,
        server_cpu,
        client_cpu,
        window,
    }
}

/// Connects the mosquitto subscriber to `telemetry/#` with QoS 0, as Stonelion's own
/// ingest link subscribes, and waits for SUBACK.
async fn subscribe(addr: SocketAddr) -> (AsyncClient, EventLoop) {
    let (client, mut events) = connect(addr, "bench-subscriber", 100).await;
    client
        .subscribe("telemetry/#", QoS::AtMostOnce)
        .await
        .unwrap();
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::SubAck(_))) => return (client, events),
            Ok(_) => {}
            Err(e) => panic!("the subscriber failed before SUBACK: {e}"),
        }
    }
}

/// Checks that Stonelion rejected nothing, because a rejected message stores no points.
async fn check_no_rejections(http: SocketAddr) {
    let text = fetch_metrics(http).await;
    let rejected = metric_value(&text, "stonelion_ingest_rejected_total");
    assert!(
        rejected == 0.0,
        "stonelion rejected {rejected} messages; see its /metrics and log"
    );
}

fn run_once(
    runtime: &tokio::runtime::Runtime,
    broker: &'static str,
    settings: Settings,
    ticks: f64,
) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let server = match broker {
        "stonelion" => ServerProcess::start_stonelion(dir.path(), settings.connections),
        _ => ServerProcess::start_mosquitto(dir.path()),
    };
    let outcome = runtime.block_on(async {
        let outcome = run_load(&server, broker, settings, ticks).await;
        if let Some(http) = server.http {
            check_no_rejections(http).await;
        }
        outcome
    });
    drop(server);
    outcome
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

fn print_run(outcome: &Outcome) {
    println!(
        "{:<9} PUBACKs {:>6.3} s, {} {:>6.3} s, {:>7.0} msg/s, {:>7.0} points/s, server {:.2} cores, load generator {:.2} cores",
        outcome.broker,
        outcome.acked.as_secs_f64(),
        if outcome.broker == "stonelion" {
            "stored"
        } else {
            "delivered"
        },
        outcome.done.as_secs_f64(),
        outcome.messages_per_second(),
        outcome.points_per_second(),
        outcome.server_cores(),
        outcome.client_cores(),
    );
}

/// Prints the table of medians and returns the median messages/s.
fn print_medians(broker: &str, outcomes: &[Outcome]) -> f64 {
    let column = |f: &dyn Fn(&Outcome) -> f64| median(outcomes.iter().map(f).collect());
    let rate = column(&|o| o.messages_per_second());
    println!(
        "| {broker} | {:.3} | {:.3} | {rate:.0} | {:.0} | {:.2} | {:.2} |",
        column(&|o| o.acked.as_secs_f64()),
        column(&|o| o.done.as_secs_f64()),
        column(&|o| o.points_per_second()),
        column(&|o| o.server_cores()),
        column(&|o| o.client_cores()),
    );
    rate
}

fn main() {
    let settings = Settings::from_env();
    let ticks = clock_ticks_per_second();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    println!(
        "{} connections x {} QoS 1 messages, in-flight window {}, {} runs per broker, {cores} cores",
        settings.connections, settings.messages, settings.inflight, settings.runs
    );
    let mut stonelion = Vec::new();
    let mut mosquitto = Vec::new();
    for _ in 0..settings.runs {
        let outcome = run_once(&runtime, "stonelion", settings, ticks);
        print_run(&outcome);
        stonelion.push(outcome);
        let outcome = run_once(&runtime, "mosquitto", settings, ticks);
        print_run(&outcome);
        mosquitto.push(outcome);
    }
    println!();
    println!(
        "| broker | all PUBACKs (s) | all stored / delivered (s) | messages/s | points/s | server cores | load generator cores |"
    );
    println!("|---|---|---|---|---|---|---|");
    let stonelion_rate = print_medians("stonelion", &stonelion);
    let mosquitto_rate = print_medians("mosquitto", &mosquitto);
    println!();
    println!(
        "Stonelion (stored) / mosquitto (acknowledged), median messages/s: {:.2}",
        stonelion_rate / mosquitto_rate
    );
}
