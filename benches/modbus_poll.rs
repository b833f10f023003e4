//! Polling capacity against simulated Modbus TCP devices on loopback.
//!
//! Runs simulated devices with u16 metrics at a 1 s interval for a fixed time, once with
//! coalescing and once with one read per metric. It prints requests/s, readings/s and the
//! process CPU time, which includes the simulators because they share the process.
//!
//! Run with `cargo bench --bench modbus_poll`; `BENCH_DEVICES`, `BENCH_REGISTERS` and
//! `BENCH_SECONDS` override the defaults.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stonelion::clock::SystemClock;
use stonelion::ingest::{IngestHandle, IngestMessage};
use stonelion::metrics::SharedRegistry;
use stonelion::modbus::{self, ModbusDeviceConfig, PolledDevice, RegisterBank};
use stonelion::model::{DeviceId, SiteId};
use stonelion::profile::{self, Function};
use tokio_util::sync::CancellationToken;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU time of this process (user + system), from /proc/self/stat in clock ticks of 10 ms.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
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
    // Fields 14 and 15 of the file are utime and stime; `rest` starts at field 3.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

fn profile_text(registers: usize) -> String {
    let mut text = String::from("name = \"bench\"\n");
    for i in 0..registers {
        let _ = write!(
            text,
            "[[metrics]]\nname = \"m{i}\"\nmodbus = {{ function = \"input_register\", address = {i} }}\n"
        );
    }
    text
}

struct Outcome {
    requests: usize,
    readings: usize,
    elapsed: Duration,
    cpu: Duration,
}

async fn run(devices: usize, registers: usize, seconds: u64, coalesce: bool) -> Outcome {
    let profile =
        Arc::new(profile::parse(&profile_text(registers), None).expect("bench profile parses"));
    let mut bank = RegisterBank::default();
    let count = u16::try_from(registers).expect("at most 65535 registers");
    bank.set_words(Function::InputRegister, 0, &vec![7; usize::from(count)]);
    let mut sims = Vec::new();
    let mut polled = Vec::new();
    for i in 0..devices {
        let units = BTreeMap::from([(1, bank.clone())]);
        let (address, sim) = modbus::spawn_simulator("127.0.0.1:0".parse().expect("valid"), units)
            .await
            .expect("binds");
        let mut config = ModbusDeviceConfig::tcp(address.to_string(), 1);
        config.poll_interval = Some(Duration::from_secs(1));
        config.coalesce = coalesce;
        polled.push(PolledDevice {
            id: DeviceId::new(format!("d{i}")),
            site: SiteId::new("s"),
            profile: Arc::clone(&profile),
            config,
        });
        sims.push(sim);
    }
    let (ingest, mut rx) = IngestHandle::channel(65_536);
    let counter = tokio::spawn(async move {
        let mut readings = 0;
        while let Some(message) = rx.recv().await {
            if let IngestMessage::Readings(batch) = message {
                readings += batch.len();
            }
        }
        readings
    });

    let shutdown = CancellationToken::new();
    let (cpu_start, start) = (cpu_time(), Instant::now());
    let poller = modbus::start(
        polled,
        ingest,
        &SharedRegistry::new(),
        shutdown.clone(),
        Arc::new(SystemClock),
    );
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    shutdown.cancel();
    poller.task.await.expect("poller stops");
    let (elapsed, cpu) = (start.elapsed(), cpu_time().saturating_sub(cpu_start));
    let requests = sims
        .iter()
        .map(modbus::SimulatorHandle::request_count)
        .sum();
    for sim in &sims {
        sim.shutdown();
    }
    let readings = counter.await.expect("counter task");
    Outcome {
        requests,
        readings,
        elapsed,
        cpu,
    }
}

fn main() {
    let devices = env_or("BENCH_DEVICES", 200);
    let registers = env_or("BENCH_REGISTERS", 50);
    let seconds = u64::try_from(env_or("BENCH_SECONDS", 10)).expect("small");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!("{devices} devices x {registers} u16 registers, 1 s interval, {seconds} s per run");
    let mut results = Vec::new();
    for coalesce in [true, false] {
        let outcome = runtime.block_on(run(devices, registers, seconds, coalesce));
        let secs = outcome.elapsed.as_secs_f64();
        println!(
            "coalesce={coalesce}: {:.0} requests/s, {:.0} readings/s, CPU {:.2} s in {secs:.1} s ({:.0} % of one core)",
            outcome.requests as f64 / secs,
            outcome.readings as f64 / secs,
            outcome.cpu.as_secs_f64(),
            100.0 * outcome.cpu.as_secs_f64() / secs,
        );
        results.push(outcome);
    }
    let per_reading = |o: &Outcome| o.cpu.as_secs_f64() / o.readings.max(1) as f64;
    println!(
        "CPU per reading, one read per metric vs coalesced: {:.1}x",
        per_reading(&results[1]) / per_reading(&results[0])
    );
}
