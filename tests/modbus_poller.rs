//! The Modbus poller against in-process simulators on loopback: exact decoding of every
//! shipped profile and every data type, request coalescing, offline detection, exceptions
//! and late replies.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use stonelion::clock::SystemClock;
use stonelion::ingest::{IngestHandle, IngestMessage, LivenessCause};
use stonelion::metrics::SharedRegistry;
use stonelion::modbus::decode::Decoded;
use stonelion::modbus::plan::ReadBlock;
use stonelion::modbus::transport::{Connection, Link, ReadError, Reply};
use stonelion::modbus::{
    self, Behaviour, ModbusDeviceConfig, PolledDevice, Poller, RegisterBank, SimulatorHandle,
};
use stonelion::model::{DeviceId, Reading, SiteId, Value};
use stonelion::profile::{self, DataType, Function, Profile, ProfileSet};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(10);
const UNIT: u8 = 1;

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().expect("valid address")
}

async fn simulator() -> (SocketAddr, SimulatorHandle) {
    let units = BTreeMap::from([(UNIT, RegisterBank::default())]);
    modbus::spawn_simulator(loopback(), units)
        .await
        .expect("simulator binds")
}

fn device(id: &str, profile: &Arc<Profile>, config: ModbusDeviceConfig) -> PolledDevice {
    PolledDevice {
        id: DeviceId::new(id),
        site: SiteId::new("site-1"),
        profile: Arc::clone(profile),
        config,
    }
}

fn fast_config(address: SocketAddr) -> ModbusDeviceConfig {
    let mut config = ModbusDeviceConfig::tcp(address.to_string(), UNIT);
    config.poll_interval = Some(Duration::from_millis(100));
    config.timeout = Duration::from_millis(200);
    config
}

struct Harness {
    rx: mpsc::Receiver<IngestMessage>,
    poller: Poller,
    shutdown: CancellationToken,
    /// Readings sent to be evaluated but not stored, in arrival order.
    unstored: Vec<Reading>,
    /// Bad readings reported, as (device, metric, reason).
    bad: Vec<(String, String, String)>,
}

impl Harness {
    fn start(devices: Vec<PolledDevice>) -> Harness {
        let (ingest, rx) = IngestHandle::channel(4096);
        let shutdown = CancellationToken::new();
        let poller = modbus::start(
            devices,
            ingest,
            &SharedRegistry::new(),
            shutdown.clone(),
            Arc::new(SystemClock),
        );
        Harness {
            rx,
            poller,
            shutdown,
            unstored: Vec::new(),
            bad: Vec::new(),
        }
    }

    /// Receives messages until `done` returns true for the collected readings to store and
    /// liveness changes, or fails the test at the deadline. Unstored readings go to
    /// `self.unstored`.
    async fn collect_until(
        &mut self,
        mut done: impl FnMut(&[Reading], &[(DeviceId, bool, LivenessCause)]) -> bool,
    ) -> (Vec<Reading>, Vec<(DeviceId, bool, LivenessCause)>) {
        let deadline = Instant::now() + DEADLINE;
        let (mut readings, mut liveness) = (Vec::new(), Vec::new());
        while !done(&readings, &liveness) {
            let message = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "condition not met in time; readings: {readings:?}, liveness: {liveness:?}"
                    )
                })
                .expect("pipeline channel open");
            match message {
                IngestMessage::Readings(batch) => readings.extend(batch),
                IngestMessage::UnstoredReadings(batch) => self.unstored.extend(batch),
                IngestMessage::BadReadings { device, bad } => {
                    self.bad.extend(
                        bad.into_iter().map(|(metric, reason)| {
                            (device.to_string(), metric.to_string(), reason)
                        }),
                    );
                }
                IngestMessage::Liveness {
                    device,
                    online,
                    cause,
                } => liveness.push((device, online, cause)),
                IngestMessage::Points { .. } => panic!("the poller sends no points"),
            }
        }
        (readings, liveness)
    }

    /// Receives messages until `done` returns true for the unstored readings, and returns
    /// the readings to store that came meanwhile.
    async fn collect_unstored_until(
        &mut self,
        mut done: impl FnMut(&[Reading]) -> bool,
    ) -> Vec<Reading> {
        let deadline = Instant::now() + DEADLINE;
        let mut stored = Vec::new();
        while !done(&self.unstored) {
            let message = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!("condition not met in time; unstored: {:?}", self.unstored)
                })
                .expect("pipeline channel open");
            match message {
                IngestMessage::Readings(batch) => stored.extend(batch),
                IngestMessage::UnstoredReadings(batch) => self.unstored.extend(batch),
                IngestMessage::BadReadings { device, bad } => {
                    self.bad.extend(
                        bad.into_iter().map(|(metric, reason)| {
                            (device.to_string(), metric.to_string(), reason)
                        }),
                    );
                }
                IngestMessage::Liveness { .. } => {}
                IngestMessage::Points { .. } => panic!("the poller sends no points"),
            }
        }
        stored
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(DEADLINE, self.poller.task)
            .await
            .expect("poller stops")
            .expect("poller task ok");
    }
}

fn value_of(readings: &[Reading], metric: &str) -> Option<Value> {
    readings
        .iter()
        .rev()
        .find(|r| r.metric.as_str() == metric)
        .map(|r| r.value)
}

fn assert_close(metric: &str, got: Option<Value>, expected: f64) {
    let Some(Value::Number(got)) = got else {
        panic!("{metric}: expected a number, got {got:?}")
    };
    let tolerance = expected.abs().max(1.0) * 1e-9;
    assert!(
        (got - expected).abs() <= tolerance,
        "{metric}: got {got}, expected {expected}"
    );
}

/// Big-endian registers of a raw value, written out by hand rather than by the crate's
/// encoder, so decoding is checked against an independent encoding.
fn abcd_words(data_type: DataType, raw: i64) -> Vec<u16> {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let bytes: Vec<u8> = match data_type {
        DataType::U16 | DataType::I16 => (raw as u16).to_be_bytes().to_vec(),
        DataType::U32 | DataType::I32 => (raw as u32).to_be_bytes().to_vec(),
        DataType::U64 | DataType::I64 => (raw as u64).to_be_bytes().to_vec(),
        DataType::F32 => (raw as f32).to_be_bytes().to_vec(),
        DataType::F64 => (raw as f64).to_be_bytes().to_vec(),
        DataType::Bool | DataType::String => unreachable!("not a number type"),
    };
    bytes
        .chunks(2)
        .map(|p| u16::from_be_bytes([p[0], p[1]]))
        .collect()
}

/// Fills every register and bit between a profile's first and last address with zeros, so
/// reads that span unused registers succeed as they do on the real devices.
fn fill_span(sim: &SimulatorHandle, profile: &Profile) {
    for function in [
        Function::Coil,
        Function::DiscreteInput,
        Function::InputRegister,
        Function::HoldingRegister,
    ] {
        let of_function = profile
            .registers
            .iter()
            .filter(|e| e.register.function == function);
        let start = of_function.clone().map(|e| e.register.address).min();
        let end = of_function.map(|e| e.register.end()).max();
        if let (Some(start), Some(end)) = (start, end) {
            let count = usize::try_from(end - u32::from(start)).expect("small");
            sim.set_words(UNIT, function, start, &vec![0; count]);
        }
    }
}

/// Picks a raw integer whose scaled value lies inside the metric's valid range.
#[allow(clippy::cast_possible_truncation)]
fn raw_inside_range(register: &profile::Register, seed: i64) -> i64 {
    let min = register.valid_min.unwrap_or(0.0);
    let max = register.valid_max.unwrap_or(min + 1000.0);
    let target = min + (max - min) * (0.3 + 0.01 * (seed % 20) as f64);
    ((target - register.offset) / register.scale).round() as i64
}

#[tokio::test]
async fn shipped_profiles_decode_exactly() {
    let set = ProfileSet::load_dir(Path::new("device-profiles")).expect("shipped profiles load");
    let mut modbus_profiles = 0;
    for name in set.names().cloned().collect::<Vec<_>>() {
        let profile = Arc::new(set.get(&name).expect("listed").clone());
        if profile.registers.is_empty() {
            continue;
        }
        modbus_profiles += 1;
        let (address, sim) = simulator().await;
        fill_span(&sim, &profile);
        let mut expected = Vec::new();
        for (seed, entry) in (0i64..).zip(&profile.registers) {
            let register = &entry.register;
            if register.is_bool() {
                let on = seed % 2 == 0;
                sim.set_value(UNIT, register, &Decoded::Bool(on))
                    .expect("bit stored");
                expected.push((entry.metric.to_string(), Value::Bool(on)));
            } else if let Some((first, last)) = register.bits {
                // A packed field shares its word with other metrics, so it is stored with
                // the other bits kept.
                let raw = seed % (1 << (last - first + 1));
                #[allow(clippy::cast_precision_loss)]
                let value = raw as f64 * register.scale + register.offset;
                sim.set_value(UNIT, register, &Decoded::Number(value))
                    .expect("field stored");
                expected.push((entry.metric.to_string(), Value::Number(value)));
            } else {
                assert_eq!(
                    register.order,
                    profile::ByteOrder::ABCD,
                    "{name}: the test encodes ABCD only"
                );
                let raw = raw_inside_range(register, seed);
                sim.set_words(
                    UNIT,
                    register.function,
                    register.address,
                    &abcd_words(register.data_type, raw),
                );
                #[allow(clippy::cast_precision_loss)]
                let value = raw as f64 * register.scale + register.offset;
                expected.push((entry.metric.to_string(), Value::Number(value)));
            }
        }
        let mut harness = Harness::start(vec![device("meter", &profile, fast_config(address))]);
        let count = expected.len();
        let (readings, _) = harness.collect_until(|r, _| r.len() >= count).await;
        for (metric, value) in expected {
            match value {
                Value::Number(n) => {
                    assert_close(&format!("{name}.{metric}"), value_of(&readings, &metric), n);
                }
                Value::Bool(_) => {
                    assert_eq!(value_of(&readings, &metric), Some(value), "{name}.{metric}");
                }
            }
        }
        assert!(
            readings
                .iter()
                .all(|r| r.source == stonelion::model::Source::Modbus)
        );
        harness.stop().await;
        sim.shutdown();
    }
    assert!(
        modbus_profiles >= 6,
        "expected at least six Modbus profiles, found {modbus_profiles}"
    );
}

const ALL_TYPES: &str = r#"
name = "all-types"

[[metrics]]
name = "f32_abcd"
modbus = { function = "holding_register", address = 0, type = "f32", order = "ABCD" }
[[metrics]]
name = "f32_cdab"
modbus = { function = "holding_register", address = 2, type = "f32", order = "CDAB" }
[[metrics]]
name = "f32_badc"
modbus = { function = "holding_register", address = 4, type = "f32", order = "BADC" }
[[metrics]]
name = "f32_dcba"
modbus = { function = "holding_register", address = 6, type = "f32", order = "DCBA" }
[[metrics]]
name = "f64_cdab"
modbus = { function = "holding_register", address = 8, type = "f64", order = "CDAB" }
[[metrics]]
name = "i16_negative"
modbus = { register = 40013, type = "i16" }
[[metrics]]
name = "u32_big"
modbus = { register = 40014, type = "u32" }
[[metrics]]
name = "i32_negative"
modbus = { register = 40016, type = "i32", order = "CDAB" }
[[metrics]]
name = "u64_counter"
modbus = { register = 40018, type = "u64" }
[[metrics]]
name = "i64_negative"
modbus = { register = 40022, type = "i64" }
[[metrics]]
name = "scaled_temperature"
modbus = { register = 30001, type = "i16", scale = 0.1, offset = -40 }
[[metrics]]
name = "status_bit3"
kind = "bool"
modbus = { register = 30002, bit = 3 }
[[metrics]]
name = "status_bit15"
kind = "bool"
modbus = { register = 30002, bit = 15 }
[[metrics]]
name = "relay"
kind = "bool"
modbus = { register = 5 }
[[metrics]]
name = "door_open"
kind = "bool"
modbus = { register = 10003 }
[[metrics]]
name = "serial_number"
modbus = { register = 40031, type = "string", count = 4 }
[[metrics]]
name = "sentinel"
modbus = { register = 40040, type = "u16", no_value = [65535] }
[[metrics]]
name = "out_of_range"
modbus = { register = 40041, type = "u16", valid_max = 100 }
"#;

#[tokio::test]
async fn every_type_and_order_decodes() {
    let profile = Arc::new(profile::parse(ALL_TYPES, None).expect("test profile parses"));
    let (address, sim) = simulator().await;
    // 123.456f32 is 0x42F6E979; -1.5f64 is 0xBFF8_0000_0000_0000.
    let holding: &[(u16, &[u16])] = &[
        (0, &[0x42F6, 0xE979]),
        (2, &[0xE979, 0x42F6]),
        (4, &[0xF642, 0x79E9]),
        (6, &[0x79E9, 0xF642]),
        (8, &[0x0000, 0x0000, 0x0000, 0xBFF8]),
        (12, &[0xFF38]),
        (13, &[0xFFFF, 0xFFFE]),
        (15, &[0x1DC0, 0xFFFE]),
        (17, &[0x0000, 0x0002, 0x540B, 0xE400]),
        (21, &[0xFFFF, 0xFFFF, 0xFFFF, 0xFFFB]),
        (30, &[0x534E, 0x2D34, 0x3200, 0x0000]),
        (39, &[0xFFFF, 0x0065]),
    ];
    // The read spans unused registers between the values, which must exist.
    sim.set_words(UNIT, Function::HoldingRegister, 0, &[0; 41]);
    for (start, words) in holding {
        sim.set_words(UNIT, Function::HoldingRegister, *start, words);
    }
    sim.set_words(
        UNIT,
        Function::InputRegister,
        0,
        &[655, 0b1000_0000_0000_1000],
    );
    sim.with_bank(UNIT, |bank| {
        bank.coils.insert(4, true);
        bank.discrete_inputs.insert(2, true);
    });

    let mut config = fast_config(address);
    config.poll_interval = Some(Duration::from_secs(3600));
    let mut harness = Harness::start(vec![device("all", &profile, config)]);
    let (readings, _) = harness.collect_until(|r, _| r.len() >= 15).await;
    for metric in ["f32_abcd", "f32_cdab", "f32_badc", "f32_dcba"] {
        let Some(Value::Number(n)) = value_of(&readings, metric) else {
            panic!("{metric} missing")
        };
        assert!((n - 123.456).abs() < 1e-4, "{metric}: {n}");
    }
    assert_close("f64_cdab", value_of(&readings, "f64_cdab"), -1.5);
    assert_close("i16_negative", value_of(&readings, "i16_negative"), -200.0);
    assert_close("u32_big", value_of(&readings, "u32_big"), 4_294_967_294.0);
    assert_close(
        "i32_negative",
        value_of(&readings, "i32_negative"),
        -123_456.0,
    );
    assert_close(
        "u64_counter",
        value_of(&readings, "u64_counter"),
        10_000_000_000.0,
    );
    assert_close("i64_negative", value_of(&readings, "i64_negative"), -5.0);
    assert_close(
        "scaled_temperature",
        value_of(&readings, "scaled_temperature"),
        25.5,
    );
    assert_eq!(value_of(&readings, "status_bit3"), Some(Value::Bool(true)));
    assert_eq!(value_of(&readings, "status_bit15"), Some(Value::Bool(true)));
    assert_eq!(value_of(&readings, "relay"), Some(Value::Bool(true)));
    assert_eq!(value_of(&readings, "door_open"), Some(Value::Bool(true)));
    assert_eq!(
        value_of(&readings, "sentinel"),
        None,
        "a no-value sentinel is never stored"
    );
    assert_eq!(
        value_of(&readings, "out_of_range"),
        None,
        "an out-of-range value is never stored"
    );
    assert_eq!(
        value_of(&readings, "serial_number"),
        None,
        "text is not a time-series reading"
    );
    let texts = harness.poller.texts.lock().expect("lock").clone();
    let text = texts
        .get(&DeviceId::new("all"))
        .and_then(|t| t.get(&"serial_number".into()))
        .cloned();
    assert_eq!(text.as_deref(), Some("SN-42"));
    assert_eq!(
        harness
            .poller
            .metrics
            .bad_values
            .get_or_create(&bad("all", "sentinel", "no_value"))
            .get(),
        1
    );
    assert_eq!(
        harness
            .poller
            .metrics
            .bad_values
            .get_or_create(&bad("all", "out_of_range", "out_of_range"))
            .get(),
        1
    );
    harness.stop().await;
}

fn bad(device: &str, metric: &str, reason: &str) -> stonelion::modbus::metrics::BadValueLabels {
    stonelion::modbus::metrics::BadValueLabels {
        device: device.into(),
        metric: metric.into(),
        reason: reason.into(),
    }
}

async fn requests_for_one_poll(
    profile: &Arc<Profile>,
    coalesce: bool,
) -> Vec<stonelion::modbus::simulator::RequestRecord> {
    let (address, sim) = simulator().await;
    fill_span(&sim, profile);
    let mut config = fast_config(address);
    config.poll_interval = Some(Duration::from_secs(3600));
    config.coalesce = coalesce;
    let mut harness = Harness::start(vec![device("meter", profile, config)]);
    // Readings go out once per poll, after every block was read.
    harness.collect_until(|r, _| !r.is_empty()).await;
    harness.stop().await;
    sim.requests()
}

#[tokio::test]
async fn coalescing_issues_expected_requests() {
    let profile = Arc::new(
        profile::load_file(Path::new("device-profiles/chint-dtsu666.toml")).expect("loads"),
    );
    let requests = requests_for_one_poll(&profile, true).await;
    let shape: Vec<(u16, u16)> = requests.iter().map(|r| (r.address, r.count)).collect();
    // 0x2006..0x2013 in one read; power factor and frequency are too far apart to join
    // (gaps above max_gap 8); the two energy registers 0x401E and 0x4028 are 8 apart.
    assert_eq!(
        shape,
        [(0x2006, 14), (0x202A, 2), (0x2044, 2), (0x401E, 12)]
    );

    let single = requests_for_one_poll(&profile, false).await;
    assert_eq!(single.len(), profile.registers.len());
}

#[tokio::test]
async fn dead_device_goes_offline_other_keeps_interval() {
    let profile =
        Arc::new(profile::load_file(Path::new("device-profiles/xy-md02.toml")).expect("loads"));
    let (dead_address, dead) = simulator().await;
    let (live_address, live) = simulator().await;
    for sim in [&dead, &live] {
        sim.set_words(UNIT, Function::InputRegister, 1, &[215, 550]);
    }
    dead.set_behaviour(UNIT, Behaviour::Silent);
    let mut dead_config = fast_config(dead_address);
    dead_config.retries = 1;
    dead_config.offline_after_failures = 3;
    let interval = Duration::from_millis(100);
    let live_config = fast_config(live_address);
    let mut harness = Harness::start(vec![
        device("dead", &profile, dead_config),
        device("live", &profile, live_config),
    ]);

    let offline = |l: &[(DeviceId, bool, LivenessCause)]| {
        l.iter()
            .any(|(d, online, _)| d.as_str() == "dead" && !online)
    };
    let (readings, liveness) = harness.collect_until(|_, l| offline(l)).await;
    let (_, _, cause) = liveness
        .iter()
        .find(|(d, online, _)| d.as_str() == "dead" && !online)
        .expect("offline");
    assert_eq!(*cause, LivenessCause::PollFailures(3));
    assert!(
        readings.iter().all(|r| r.device.as_str() == "live"),
        "no reading from the dead device"
    );

    // Three failed polls of two timed-out attempts each take at least 1.2 s, in which the
    // live device kept polling every 100 ms.
    let mut times: Vec<i64> = readings
        .iter()
        .filter(|r| r.metric.as_str() == "temperature_c")
        .map(|r| r.ts.0)
        .collect();
    times.dedup();
    assert!(
        times.len() >= 8,
        "live device polled only {} times",
        times.len()
    );
    let max_gap = times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    assert!(
        max_gap < 3 * i64::try_from(interval.as_millis()).expect("small"),
        "live device gap {max_gap} ms"
    );
    assert!(harness.poller.metrics.error_count("dead", "timeout") >= 6);
    assert_eq!(harness.poller.metrics.error_count("live", "timeout"), 0);

    dead.set_behaviour(UNIT, Behaviour::Normal);
    let back = |l: &[(DeviceId, bool, LivenessCause)]| {
        l.iter()
            .any(|(d, online, _)| d.as_str() == "dead" && *online)
    };
    let (readings, liveness) = harness
        .collect_until(|r, l| back(l) && r.iter().any(|r| r.device.as_str() == "dead"))
        .await;
    let back_online = liveness
        .iter()
        .find(|(d, online, _)| d.as_str() == "dead" && *online)
        .expect("online again");
    assert_eq!(back_online.2, LivenessCause::Reading);
    assert_close(
        "dead temperature",
        readings
            .iter()
            .find(|r| r.device.as_str() == "dead")
            .map(|r| r.value),
        21.5,
    );
    harness.stop().await;
}

#[tokio::test]
async fn exception_is_counted_and_not_stored() {
    let text = r#"
name = "partial"
[[metrics]]
name = "present"
modbus = { register = 40001 }
[[metrics]]
name = "missing"
modbus = { register = 40101 }
"#;
    let profile = Arc::new(profile::parse(text, None).expect("parses"));
    let (address, sim) = simulator().await;
    sim.set_words(UNIT, Function::HoldingRegister, 0, &[42]);
    let mut harness = Harness::start(vec![device("partial", &profile, fast_config(address))]);
    let (readings, liveness) = harness.collect_until(|r, _| r.len() >= 3).await;
    assert!(readings.iter().all(|r| r.metric.as_str() == "present"));
    assert_eq!(value_of(&readings, "present"), Some(Value::Number(42.0)));
    assert!(
        liveness.is_empty(),
        "a device with one good read per poll stays online"
    );
    assert!(
        harness
            .poller
            .metrics
            .error_count("partial", "exception_illegal_data_address")
            >= 3
    );
    let reported = (
        "partial".to_owned(),
        "missing".to_owned(),
        "exception_illegal_data_address".to_owned(),
    );
    assert!(
        harness.bad.contains(&reported),
        "the failed metric is reported bad: {:?}",
        harness.bad
    );
    assert!(
        harness.bad.iter().all(|(_, metric, _)| metric == "missing"),
        "{:?}",
        harness.bad
    );
    harness.stop().await;
}

#[tokio::test]
async fn late_reply_is_never_misattributed() {
    let (address, sim) = simulator().await;
    sim.set_words(UNIT, Function::HoldingRegister, 0, &[111]);
    sim.set_words(UNIT, Function::HoldingRegister, 100, &[222]);
    let first = ReadBlock {
        function: Function::HoldingRegister,
        address: 0,
        count: 1,
        metrics: vec![0],
    };
    let second = ReadBlock {
        function: Function::HoldingRegister,
        address: 100,
        count: 1,
        metrics: vec![1],
    };
    let mut connection = Connection::new(Link::Tcp(address.to_string()));

    sim.set_behaviour(UNIT, Behaviour::Delay(Duration::from_millis(300)));
    let timed_out = connection
        .read(UNIT, &first, Duration::from_millis(100))
        .await;
    assert!(
        matches!(timed_out, Err(ReadError::Timeout)),
        "{timed_out:?}"
    );
    sim.set_behaviour(UNIT, Behaviour::Normal);
    // The reply to the first request arrives 200 ms from now on the old connection; the
    // next read must get its own response, not that one.
    let next = connection
        .read(UNIT, &second, Duration::from_millis(1000))
        .await
        .expect("second read");
    assert_eq!(next, Reply::Words(vec![222]));
    let again = connection
        .read(UNIT, &first, Duration::from_millis(1000))
        .await
        .expect("third read");
    assert_eq!(again, Reply::Words(vec![111]));
}

#[tokio::test]
async fn late_replies_through_the_poller_keep_values_apart() {
    let text = r#"
name = "two-blocks"
[[metrics]]
name = "low"
modbus = { register = 40001 }
[[metrics]]
name = "high"
modbus = { register = 40101 }
"#;
    let profile = Arc::new(profile::parse(text, None).expect("parses"));
    let (address, sim) = simulator().await;
    sim.set_words(UNIT, Function::HoldingRegister, 0, &[111]);
    sim.set_words(UNIT, Function::HoldingRegister, 100, &[222]);
    sim.set_behaviour(UNIT, Behaviour::Delay(Duration::from_millis(150)));
    let mut config = fast_config(address);
    config.timeout = Duration::from_millis(100);
    config.poll_interval = Some(Duration::from_millis(50));
    let mut harness = Harness::start(vec![device("slow", &profile, config)]);
    let deadline = Instant::now() + DEADLINE;
    while harness.poller.metrics.error_count("slow", "timeout") < 4 {
        assert!(Instant::now() < deadline, "no timeouts seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sim.set_behaviour(UNIT, Behaviour::Normal);
    let (readings, _) = harness.collect_until(|r, _| r.len() >= 10).await;
    for reading in &readings {
        let expected = if reading.metric.as_str() == "low" {
            111.0
        } else {
            222.0
        };
        assert_eq!(reading.value, Value::Number(expected), "{reading:?}");
    }
    harness.stop().await;
}

#[tokio::test]
async fn rtu_over_tcp_polls_units_behind_gateway() {
    let profile =
        Arc::new(profile::load_file(Path::new("device-profiles/xy-md02.toml")).expect("loads"));
    let mut first = RegisterBank::default();
    first.set_words(Function::InputRegister, 1, &[215, 400]);
    let mut second = RegisterBank::default();
    second.set_words(Function::InputRegister, 1, &[0xFF9C, 900]);
    let units = BTreeMap::from([(3, first), (4, second)]);
    let (address, gateway) = modbus::spawn_rtu_over_tcp_simulator(loopback(), units)
        .await
        .expect("binds");
    let config = |unit| {
        let mut config = ModbusDeviceConfig::rtu_over_tcp(address.to_string(), unit);
        config.poll_interval = Some(Duration::from_millis(100));
        config.bus_pause = Duration::from_millis(5);
        config
    };
    let mut harness = Harness::start(vec![
        device("th-3", &profile, config(3)),
        device("th-4", &profile, config(4)),
    ]);
    let (readings, _) = harness
        .collect_until(|r, _| {
            r.iter().any(|r| r.device.as_str() == "th-3")
                && r.iter().any(|r| r.device.as_str() == "th-4")
        })
        .await;
    let of = |device: &str, metric: &str| {
        readings
            .iter()
            .find(|r| r.device.as_str() == device && r.metric.as_str() == metric)
            .map(|r| r.value)
    };
    assert_close("th-3 temperature", of("th-3", "temperature_c"), 21.5);
    assert_close("th-3 humidity", of("th-3", "humidity_pct"), 40.0);
    assert_close("th-4 temperature", of("th-4", "temperature_c"), -10.0);
    assert_close("th-4 humidity", of("th-4", "humidity_pct"), 90.0);
    let units: Vec<u8> = gateway.requests().iter().map(|r| r.unit_id).collect();
    assert!(units.contains(&3), "{units:?}");
    assert!(units.contains(&4), "{units:?}");
    harness.stop().await;
}

#[tokio::test]
async fn report_on_change_skips_unchanged_values() {
    let profile =
        Arc::new(profile::load_file(Path::new("device-profiles/xy-md02.toml")).expect("loads"));
    let (address, sim) = simulator().await;
    sim.set_words(UNIT, Function::InputRegister, 1, &[215, 400]);
    let mut config = fast_config(address);
    config.poll_interval = Some(Duration::from_millis(30));
    config.report_deadband = Some(1.0);
    let mut harness = Harness::start(vec![device("th", &profile, config)]);
    let (first, _) = harness.collect_until(|r, _| r.len() >= 2).await;
    assert_eq!(first.len(), 2);
    let deadline = Instant::now() + DEADLINE;
    while sim.request_count() < 6 {
        assert!(Instant::now() < deadline, "poller stopped polling");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A move of 0.5 °C is inside the deadband: evaluated, not stored.
    sim.set_words(UNIT, Function::InputRegister, 1, &[220]);
    let stored = harness
        .collect_unstored_until(|u| u.iter().any(|r| r.value == Value::Number(22.0)))
        .await;
    assert!(
        stored.is_empty(),
        "a move inside the deadband is not stored: {stored:?}"
    );
    // 3 °C is past it.
    sim.set_words(UNIT, Function::InputRegister, 1, &[245]);
    let (changed, _) = harness.collect_until(|r, _| !r.is_empty()).await;
    assert_eq!(
        changed.len(),
        1,
        "only the changed metric is stored: {changed:?}"
    );
    assert_close("temperature", Some(changed[0].value), 24.5);
    let humidity_unstored = harness
        .unstored
        .iter()
        .filter(|r| r.metric.as_str() == "humidity_pct")
        .count();
    assert!(
        humidity_unstored >= 3,
        "unchanged humidity still goes to the rules: {humidity_unstored}"
    );
    harness.stop().await;
}

#[tokio::test]
async fn exceptions_only_keep_device_offline() {
    let text = r#"
name = "missing-register"
[[metrics]]
name = "level"
modbus = { register = 40101 }
"#;
    let profile = Arc::new(profile::parse(text, None).expect("parses"));
    let (address, sim) = simulator().await;
    let mut config = fast_config(address);
    config.offline_after_failures = 2;
    config.max_backoff = Duration::from_millis(200);
    let mut harness = Harness::start(vec![device("exceptions", &profile, config)]);
    let offline = |l: &[(DeviceId, bool, LivenessCause)]| l.iter().any(|(_, online, _)| !online);
    let (readings, liveness) = harness.collect_until(|_, l| offline(l)).await;
    assert!(readings.is_empty(), "{readings:?}");
    assert_eq!(
        liveness,
        [(
            DeviceId::new("exceptions"),
            false,
            LivenessCause::PollFailures(2)
        )]
    );
    assert!(
        harness
            .poller
            .metrics
            .error_count("exceptions", "exception_illegal_data_address")
            >= 2
    );

    // More exceptions must not bring it back; a good read does.
    let before = harness
        .poller
        .metrics
        .error_count("exceptions", "exception_illegal_data_address");
    let deadline = Instant::now() + DEADLINE;
    while harness
        .poller
        .metrics
        .error_count("exceptions", "exception_illegal_data_address")
        < before + 2
    {
        assert!(
            Instant::now() < deadline,
            "poller stopped polling the offline device"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sim.set_words(UNIT, Function::HoldingRegister, 100, &[7]);
    let (readings, liveness) = harness.collect_until(|r, _| !r.is_empty()).await;
    assert_eq!(
        liveness,
        [(DeviceId::new("exceptions"), true, LivenessCause::Reading)]
    );
    assert_eq!(readings[0].value, Value::Number(7.0));
    harness.stop().await;
}

#[tokio::test]
async fn bus_pause_separates_every_request() {
    let text = r#"
name = "two-blocks"
[[metrics]]
name = "low"
modbus = { register = 40001 }
[[metrics]]
name = "high"
modbus = { register = 40101 }
"#;
    let profile = Arc::new(profile::parse(text, None).expect("parses"));
    let mut bank = RegisterBank::default();
    bank.set_words(Function::HoldingRegister, 0, &[1]);
    bank.set_words(Function::HoldingRegister, 100, &[2]);
    let units = BTreeMap::from([(3, bank.clone()), (4, bank.clone()), (5, bank)]);
    let (address, gateway) = modbus::spawn_rtu_over_tcp_simulator(loopback(), units)
        .await
        .expect("binds");
    let pause = Duration::from_millis(40);
    let config = |unit| {
        let mut config = ModbusDeviceConfig::rtu_over_tcp(address.to_string(), unit);
        // Shorter than three devices' requests with pauses, so devices are always due.
        config.poll_interval = Some(Duration::from_millis(20));
        config.bus_pause = pause;
        config
    };
    let devices = vec![
        device("u3", &profile, config(3)),
        device("u4", &profile, config(4)),
        device("u5", &profile, config(5)),
    ];
    let harness = Harness::start(devices);
    let deadline = Instant::now() + DEADLINE;
    while gateway.request_count() < 12 {
        assert!(
            Instant::now() < deadline,
            "only {} requests",
            gateway.request_count()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    harness.stop().await;
    let requests = gateway.requests();
    let units: Vec<u8> = requests.iter().map(|r| r.unit_id).collect();
    assert!(
        units.windows(2).any(|w| w[0] != w[1]),
        "requests to different units follow each other: {units:?}"
    );
    for pair in requests.windows(2) {
        let gap = pair[1].received.duration_since(pair[0].received);
        assert!(
            gap >= pause,
            "unit {} then unit {}: gap {gap:?} is under the pause {pause:?}",
            pair[0].unit_id,
            pair[1].unit_id
        );
    }
}

/// A server polling a Honeywell Midas simulator with a deadband wider than the distance
/// between the reading and the CO level 1 threshold (35 ppm).
const MIDAS_SERVER: &str = r#"
[ingest]
stale_after = "1h"

[[sites]]
id = "plant-a"
name = "Plant A"
kind = "enterprise"

[[devices]]
id = "co-1"
site = "plant-a"
profile = "honeywell-midas"

[devices.modbus]
transport = "tcp"
address = "SIMULATOR"
unit_id = 1
poll_interval = "50ms"
timeout = "500ms"
report_deadband = 10
report_max_interval = "1h"
"#;

fn f32_words(value: f32) -> [u16; 2] {
    let bits = value.to_bits();
    [(bits >> 16) as u16, (bits & 0xFFFF) as u16]
}

async fn stored_gas_ppm(http: SocketAddr) -> Vec<serde_json::Value> {
    let query = "/query?db=stonelion&q=SELECT%20gas_ppm%20FROM%20%22honeywell-midas%22";
    let body = support::get_json(http, query).await;
    body["results"][0]["series"][0]["values"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadband_does_not_delay_alarm() {
    let (address, sim) = simulator().await;
    sim.set_words(UNIT, Function::HoldingRegister, 0, &[0; 17]);
    sim.set_words(UNIT, Function::HoldingRegister, 2, &f32_words(33.0));
    sim.set_words(UNIT, Function::HoldingRegister, 7, &[25, 5000]);
    sim.set_words(UNIT, Function::HoldingRegister, 16, &[1]);
    let data = tempfile::tempdir().expect("temporary directory");
    let config = MIDAS_SERVER.replace("SIMULATOR", &address.to_string());
    let server = support::start_server(&config, "http://127.0.0.1:9/unused", data.path()).await;
    let http = server.http_addr;

    let device = support::wait_for("the first reading in the API", DEADLINE, || async {
        let device = support::get_json(http, "/api/v1/devices/co-1").await;
        (device["latest"]["gas_ppm"]["value"] == serde_json::json!(33.0)).then_some(device)
    })
    .await;
    assert_eq!(device["online"], serde_json::json!(true));
    assert_eq!(
        device["latest"]["alarm_status"]["value"],
        serde_json::json!(1.0)
    );
    assert_eq!(
        device["latest"]["alarm_status"]["label"], "alarm 1 active",
        "code label: {device}"
    );
    assert!(
        device["latest"]["temperature_c"].get("label").is_none(),
        "no codes, no label: {device}"
    );
    assert_eq!(
        device["bad"],
        serde_json::json!({}),
        "every metric read well: {device}"
    );
    support::wait_for("the first value stored", DEADLINE, || async {
        (!stored_gas_ppm(http).await.is_empty()).then_some(())
    })
    .await;
    assert!(
        support::alarms_of(http, "co-1").await.is_empty(),
        "33 ppm is below level 1"
    );

    // 36 ppm crosses level 1 by 1 ppm, inside the 10 ppm deadband: raised at once, not stored.
    sim.set_words(UNIT, Function::HoldingRegister, 2, &f32_words(36.0));
    let alarms = support::wait_for("the level 1 alarm", DEADLINE, || async {
        let alarms = support::alarms_of(http, "co-1").await;
        (!alarms.is_empty()).then_some(alarms)
    })
    .await;
    assert_eq!(alarms[0]["level"], 1);
    assert_eq!(alarms[0]["value"], 36.0);
    let device = support::get_json(http, "/api/v1/devices/co-1").await;
    assert_eq!(
        device["latest"]["gas_ppm"]["value"],
        serde_json::json!(36.0),
        "the API shows the value the rule saw"
    );
    let stored = stored_gas_ppm(http).await;
    assert_eq!(
        stored.len(),
        1,
        "only the first value is stored: {stored:?}"
    );

    // An out-of-range temperature shows as bad until a good reading replaces it.
    sim.set_words(UNIT, Function::HoldingRegister, 7, &[200]);
    let bad = support::wait_for("the bad temperature", DEADLINE, || async {
        let device = support::get_json(http, "/api/v1/devices/co-1").await;
        device["bad"].get("temperature_c").cloned()
    })
    .await;
    assert_eq!(bad["reason"], "out_of_range");
    assert!(
        bad["at"].as_str().is_some_and(|at| at.ends_with('Z')),
        "{bad}"
    );
    let listed = support::get_json(http, "/api/v1/devices").await;
    assert_eq!(
        listed["devices"][0]["bad"]["temperature_c"]["reason"], "out_of_range",
        "{listed}"
    );
    sim.set_words(UNIT, Function::HoldingRegister, 7, &[26]);
    support::wait_for("the bad temperature cleared", DEADLINE, || async {
        let device = support::get_json(http, "/api/v1/devices/co-1").await;
        (device["bad"] == serde_json::json!({})).then_some(())
    })
    .await;
    server.shutdown().await;
}

/// Arrival gaps at one Modbus TCP gateway that answers each request after `delay`, with
/// three unit ids behind it polled under `limit` requests in flight.
async fn gateway_arrival_gaps(limit: usize, delay: Duration) -> Vec<Duration> {
    let mut bank = RegisterBank::default();
    bank.set_words(Function::HoldingRegister, 0, &[1]);
    let units = BTreeMap::from([(1, bank.clone()), (2, bank.clone()), (3, bank)]);
    let (address, sim) = modbus::spawn_simulator(loopback(), units)
        .await
        .expect("simulator binds");
    for unit in 1..=3 {
        sim.set_behaviour(unit, Behaviour::Delay(delay));
    }
    let text = "name = \"one\"\n[[metrics]]\nname = \"level\"\nmodbus = { register = 40001 }\n";
    let profile = Arc::new(profile::parse(text, None).expect("parses"));
    let devices = (1..=3)
        .map(|unit| {
            let mut config = ModbusDeviceConfig::tcp(address.to_string(), unit);
            config.poll_interval = Some(Duration::from_millis(10));
            config.timeout = Duration::from_secs(2);
            config.max_concurrent_requests = limit;
            device(&format!("unit-{unit}"), &profile, config)
        })
        .collect();
    let harness = Harness::start(devices);
    let deadline = Instant::now() + DEADLINE;
    while sim.request_count() < 12 {
        assert!(
            Instant::now() < deadline,
            "only {} requests",
            sim.request_count()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    harness.stop().await;
    let requests = sim.requests();
    requests
        .windows(2)
        .map(|pair| pair[1].received.duration_since(pair[0].received))
        .collect()
}

#[tokio::test]
async fn gateway_limit_caps_requests_in_flight() {
    let delay = Duration::from_millis(60);
    // With one request in flight, the next arrives only after the previous reply left.
    let serial = gateway_arrival_gaps(1, delay).await;
    assert!(
        serial.iter().all(|gap| *gap >= delay),
        "limit 1 let requests overlap: {serial:?}"
    );
    // The same devices with a limit of 3 overlap, so the check above can fail.
    let parallel = gateway_arrival_gaps(3, delay).await;
    assert!(
        parallel.iter().any(|gap| *gap < delay / 2),
        "limit 3 never overlapped: {parallel:?}"
    );
}
