//! Side-by-side benchmark of Stonelion's write endpoint and engine against Debian's
//! `victoria-metrics`, both on loopback, fed the same line protocol by the same client.
//!
//! Run with `cargo bench --bench storage_vs_victoria_metrics` (see docs/benchmarks.md).
//! Each dataset gets a fresh VictoriaMetrics process and a fresh Stonelion server process
//! (this binary run as `serve DIR`), so peak RSS is measured per server. Stonelion's
//! server stores through an `IngestHandle` drained by one task into the engine, which is
//! what the pipeline does for points that match no known device.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use stonelion::ingest::line_protocol::router;
use stonelion::ingest::{IngestHandle, IngestMessage, WriteFailure};
use stonelion::metrics::SharedRegistry;
use stonelion::model::Timestamp;
use stonelion::storage::engine::{Engine, EngineOptions};
use stonelion::storage::{Aggregate, Query, Selector, TimeSeriesStore};

/// The server binary's allocator, so that the `serve` process allocates like `stonelion run`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const LINES_PER_REQUEST: usize = 5_000;
const CONCURRENCY: usize = 4;

struct Dataset {
    name: &'static str,
    bodies: Vec<String>,
    points: usize,
}

/// Small deterministic generator, so both servers get identical data on every run.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn base_seconds() -> i64 {
    // Recent timestamps, because VictoriaMetrics rejects samples outside its retention.
    chrono::Utc::now().timestamp() / 86_400 * 86_400 - 86_400
}

fn into_bodies(lines: &[String]) -> Vec<String> {
    lines
        .chunks(LINES_PER_REQUEST)
        .map(|chunk| chunk.concat())
        .collect()
}

/// Full-precision random walks: `series` series, `steps` points each, 1 s apart.
fn random_walk(name: &'static str, series: usize, steps: usize) -> Dataset {
    let base = base_seconds();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut values = vec![50.0f64; series];
    let mut lines = Vec::with_capacity(series * steps);
    for step in 0..steps {
        let ts = (base + i64::try_from(step).expect("small")) * 1_000_000_000;
        for (s, value) in values.iter_mut().enumerate() {
            *value += rng.next_f64() - 0.5;
            lines.push(format!(
                "sensor,site=s{},device=d{s},site_kind=plant v={value} {ts}\n",
                s % 50
            ));
        }
    }
    Dataset {
        name,
        points: lines.len(),
        bodies: into_bodies(&lines),
    }
}

/// Realistic sensors over 24 h at 1 s: temperature at 0.1 resolution that changes slowly,
/// a boolean alarm that rarely flips, and an increasing counter.
fn realistic(devices: usize) -> Dataset {
    let base = base_seconds();
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let mut temperature = vec![21.0f64; devices];
    let mut alarm = vec![false; devices];
    let mut counter = vec![0u64; devices];
    let mut lines = Vec::with_capacity(devices * 86_400);
    for second in 0..86_400i64 {
        let ts = (base + second) * 1_000_000_000;
        for d in 0..devices {
            if rng.next_f64() < 0.02 {
                temperature[d] += if rng.next_f64() < 0.5 { -0.1 } else { 0.1 };
            }
            if rng.next_f64() < 0.0005 {
                alarm[d] = !alarm[d];
            }
            counter[d] += u64::from(rng.next_f64() < 0.3);
            lines.push(format!(
                "sensor,site=s1,device=d{d},site_kind=plant temp={:.1},alarm={},pulses={}i {ts}\n",
                temperature[d], alarm[d], counter[d]
            ));
        }
    }
    let points = lines.len() * 3;
    Dataset {
        name: "realistic sensors, 24 h at 1 s",
        points,
        bodies: into_bodies(&lines),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn dir_bytes(path: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() {
            dir_bytes(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn wait_ready(client: &reqwest::Client, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if client
            .get(url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} did not become ready within 30 s");
}

struct IngestResult {
    points_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Posts every body with `CONCURRENCY` concurrent requests and times each request.
async fn ingest(client: &reqwest::Client, url: &str, dataset: &Dataset) -> IngestResult {
    let bodies: Arc<Vec<String>> = Arc::new(dataset.bodies.clone());
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (client, url, bodies, next) = (
            client.clone(),
            url.to_owned(),
            Arc::clone(&bodies),
            Arc::clone(&next),
        );
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(i) else { break };
                let sent = Instant::now();
                let response = client.post(&url).body(body.clone()).send().await.unwrap();
                let status = response.status();
                let text = response.text().await.unwrap();
                assert!(status.is_success(), "{url} returned {status}: {text}");
                latencies.push(sent.elapsed().as_secs_f64() * 1_000.0);
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    IngestResult {
        points_per_s: dataset.points as f64 / elapsed,
        p50_ms: at(0.5),
        p99_ms: at(0.99),
    }
}

struct VictoriaMetrics {
    child: Child,
    url: String,
    dir: PathBuf,
}

fn start_victoria_metrics(dir: &Path) -> VictoriaMetrics {
    let port = free_port();
    let child = Command::new("victoria-metrics")
        .arg(format!("-storageDataPath={}", dir.display()))
        .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
        .arg("-retentionPeriod=10y")
        .arg("-search.maxPointsPerTimeseries=100000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("victoria-metrics starts; install the Debian package victoria-metrics");
    VictoriaMetrics {
        child,
        url: format!("http://127.0.0.1:{port}"),
        dir: dir.to_owned(),
    }
}

struct StonelionServer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    url: String,
}

fn start_stonelion(dir: &Path) -> StonelionServer {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["serve", dir.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .expect("server prints its address")
        .to_owned();
    StonelionServer {
        child,
        stdin,
        stdout,
        url: format!("http://{addr}"),
    }
}

impl StonelionServer {
    /// Sends one command to the server process and returns its one-line reply.
    fn command(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_owned()
    }
}

/// Runs the server process: the write router on 127.0.0.1:0, storing into an engine.
fn serve(dir: &Path) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let engine = Arc::new(Engine::open(dir, EngineOptions::default()).unwrap());
    let store = Arc::clone(&engine);
    runtime.block_on(async move {
        let (ingest, mut rx) = IngestHandle::channel(64);
        tokio::spawn(async move {
            while let Some(message) = rx.recv().await {
                if let IngestMessage::Points { points, done } = message {
                    let result = tokio::task::block_in_place(|| store.write(points))
                        .map_err(|e| WriteFailure::Storage(e.to_string()));
                    if let Some(done) = done {
                        let _ = done.send(result);
                    }
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("listening {}", listener.local_addr().unwrap());
        let app = router(ingest, &SharedRegistry::new())
            .route("/health", axum::routing::get(|| async { "ok" }));
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let engine = Arc::clone(&engine);
        tokio::task::spawn_blocking(move || {
            for line in std::io::stdin().lock().lines().map_while(Result::ok) {
                match line.trim() {
                    "compact" => {
                        engine.compact_all().unwrap();
                        println!("compacted {}", engine.segment_bytes());
                    }
                    _ => {
                        engine.flush().unwrap();
                        println!("bye");
                        return;
                    }
                }
            }
        })
        .await
        .unwrap();
    });
}

async fn vm_compact(client: &reqwest::Client, vm: &VictoriaMetrics) -> u64 {
    client
        .get(format!("{}/internal/force_flush", vm.url))
        .send()
        .await
        .unwrap();
    client
        .get(format!("{}/internal/force_merge", vm.url))
        .send()
        .await
        .unwrap();
    // Merges finish in the background, so wait until the size is stable for 3 s.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = (dir_bytes(&vm.dir), Instant::now());
    while Instant::now() < deadline && last.1.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let size = dir_bytes(&vm.dir);
        if size != last.0 {
            last = (size, Instant::now());
        }
    }
    last.0
}

fn time_ms<T>(mut run: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::MAX;
    let mut out = run();
    for _ in 0..5 {
        let started = Instant::now();
        out = run();
        best = best.min(started.elapsed().as_secs_f64() * 1_000.0);
    }
    (best, out)
}

async fn time_http_ms(client: &reqwest::Client, url: &str) -> (f64, usize) {
    let mut best = f64::MAX;
    let mut bytes = 0;
    for _ in 0..6 {
        let started = Instant::now();
        let body = client.get(url).send().await.unwrap().bytes().await.unwrap();
        best = best.min(started.elapsed().as_secs_f64() * 1_000.0);
        bytes = body.len();
    }
    (best, bytes)
}

/// Query latency of the engine (in-process) and of VictoriaMetrics (over HTTP).
async fn queries(client: &reqwest::Client, vm: &VictoriaMetrics, dir: &Path) {
    let base_ms = base_seconds() * 1_000;
    let engine = Engine::open(dir, EngineOptions::default()).unwrap();
    let selector = Selector {
        measurement: Some("sensor".to_owned()),
        tags: vec![("device".to_owned(), "d0".to_owned())],
        field: Some("temp".to_owned()),
    };
    let mut query = Query {
        selector: selector.clone(),
        from: Timestamp(base_ms),
        to: Timestamp(base_ms + 86_400_000),
        aggregation: None,
        limit: None,
    };
    let (raw_ms, raw) = time_ms(|| engine.query(&query).unwrap());
    query.aggregation = Some((Duration::from_secs(60), Aggregate::Mean));
    let (agg_ms, agg) = time_ms(|| engine.query(&query).unwrap());
    let (latest_ms, latest) = time_ms(|| engine.latest(&Selector::default()).unwrap());
    println!(
        "  stonelion engine (in-process): raw 24 h {raw_ms:.2} ms ({} points), mean by 1 min {agg_ms:.2} ms ({} points), latest of {} series {latest_ms:.2} ms",
        raw[0].points.len(),
        agg[0].points.len(),
        latest.len()
    );

    let (start, end) = (base_ms / 1_000, base_ms / 1_000 + 86_399);
    let raw_url = format!(
        "{}/api/v1/export?match[]=sensor_temp{{device=\"d0\"}}&start={start}&end={end}",
        vm.url
    );
    let agg_url = format!(
        "{}/api/v1/query_range?query=avg_over_time(sensor_temp{{device=\"d0\"}}[1m])&start={start}&end={end}&step=60",
        vm.url
    );
    let latest_url = format!(
        "{}/api/v1/query?query={{__name__=~\"sensor_.*\"}}&time={end}",
        vm.url
    );
    let (vm_raw, raw_bytes) = time_http_ms(client, &raw_url).await;
    let (vm_agg, _) = time_http_ms(client, &agg_url).await;
    let (vm_latest, _) = time_http_ms(client, &latest_url).await;
    println!(
        "  victoria-metrics (HTTP): raw 24 h export {vm_raw:.2} ms ({raw_bytes} bytes), avg_over_time 1 min {vm_agg:.2} ms, latest of every series {vm_latest:.2} ms"
    );
}

async fn run_dataset(client: &reqwest::Client, dataset: &Dataset, with_queries: bool) {
    let root = tempfile::tempdir().unwrap();
    let (vm_dir, sl_dir) = (root.path().join("vm"), root.path().join("stonelion"));
    let mut vm = start_victoria_metrics(&vm_dir);
    let mut sl = start_stonelion(&sl_dir);
    wait_ready(client, &format!("{}/health", vm.url)).await;
    wait_ready(client, &format!("{}/health", sl.url)).await;

    let vm_result = ingest(
        client,
        &format!("{}/api/v2/write?org=o&bucket=b", vm.url),
        dataset,
    )
    .await;
    let sl_result = ingest(
        client,
        &format!("{}/api/v2/write?org=o&bucket=b", sl.url),
        dataset,
    )
    .await;
    let vm_bytes = vm_compact(client, &vm).await;
    let sl_reply = sl.command("compact");
    let sl_segments: u64 = sl_reply
        .strip_prefix("compacted ")
        .unwrap()
        .parse()
        .unwrap();
    let vm_rss = peak_rss_kib(vm.child.id());
    let sl_rss = peak_rss_kib(sl.child.id());
    sl.command("quit");
    sl.child.wait().unwrap();
    let sl_bytes = dir_bytes(&sl_dir);

    let points = dataset.points as f64;
    println!(
        "{} ({} points, {} requests of {LINES_PER_REQUEST} lines, {CONCURRENCY} concurrent):",
        dataset.name,
        dataset.points,
        dataset.bodies.len()
    );
    println!(
        "  ingest points/s: stonelion {:.0}, victoria-metrics {:.0}, ratio {:.2}",
        sl_result.points_per_s,
        vm_result.points_per_s,
        sl_result.points_per_s / vm_result.points_per_s
    );
    println!(
        "  request latency p50/p99 ms: stonelion {:.1}/{:.1}, victoria-metrics {:.1}/{:.1}",
        sl_result.p50_ms, sl_result.p99_ms, vm_result.p50_ms, vm_result.p99_ms
    );
    println!(
        "  disk B/point after compaction: stonelion {:.3} ({:.3} in segments), victoria-metrics {:.3}, ratio {:.2}",
        sl_bytes as f64 / points,
        sl_segments as f64 / points,
        vm_bytes as f64 / points,
        sl_bytes as f64 / vm_bytes as f64
    );
    println!(
        "  peak RSS MiB: stonelion {:.0}, victoria-metrics {:.0}, ratio {:.2}",
        sl_rss as f64 / 1024.0,
        vm_rss as f64 / 1024.0,
        sl_rss as f64 / vm_rss as f64
    );
    if with_queries {
        queries(client, &vm, &sl_dir).await;
    }
    vm.child.kill().unwrap();
    vm.child.wait().unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("serve") {
        serve(Path::new(&args[2]));
        return;
    }
    let only = args.iter().skip(1).find(|a| !a.starts_with('-')).cloned();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = reqwest::Client::new();
    runtime.block_on(async {
        let selected = |name: &str| only.as_deref().is_none_or(|o| name.contains(o));
        if selected("random") {
            run_dataset(
                &client,
                &random_walk("random walk, 20k series x 100 points", 20_000, 100),
                false,
            )
            .await;
        }
        if selected("realistic") {
            run_dataset(&client, &realistic(10), true).await;
        }
        if selected("100k") {
            run_dataset(
                &client,
                &random_walk("100k series x 10 points", 100_000, 10),
                false,
            )
            .await;
        }
    });
}
