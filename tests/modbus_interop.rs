//! The poller against a device written by someone else: a pymodbus server over Modbus TCP,
//! and the same server speaking RTU on one end of a socat pseudo-terminal pair.
//!
//! Needs Debian's `python3-pymodbus` (3.0) and `socat`. A missing peer fails the test.
//! `PYMODBUS_PYTHON` names the interpreter that has pymodbus; it defaults to the Debian one.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use stonelion::clock::SystemClock;
use stonelion::ingest::{IngestHandle, IngestMessage};
use stonelion::metrics::SharedRegistry;
use stonelion::modbus::{self, ModbusDeviceConfig, PolledDevice};
use stonelion::model::{DeviceId, Reading, SiteId, Value};
use stonelion::profile::{self, Profile};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(20);

/// A pymodbus 3.0 server for unit 7. Values are encoded by pymodbus's own payload builder.
const SERVER: &str = r#"
import asyncio, sys
from pymodbus.server.async_io import ModbusTcpServer, ModbusSerialServer
from pymodbus.datastore import ModbusSlaveContext, ModbusServerContext, ModbusSequentialDataBlock
from pymodbus.payload import BinaryPayloadBuilder
from pymodbus.constants import Endian
from pymodbus.transaction import ModbusRtuFramer

def regs(wordorder, add):
    builder = BinaryPayloadBuilder(byteorder=Endian.Big, wordorder=wordorder)
    add(builder)
    return builder.to_registers()

hr = (regs(Endian.Big, lambda b: b.add_32bit_float(123.456))
      + regs(Endian.Little, lambda b: b.add_32bit_float(-7.25))
      + regs(Endian.Big, lambda b: b.add_32bit_int(-123456))
      + regs(Endian.Big, lambda b: b.add_64bit_uint(9876543210))
      + regs(Endian.Big, lambda b: b.add_16bit_int(-200))
      + regs(Endian.Big, lambda b: b.add_string("PYMB-42\0")))
store = ModbusSlaveContext(
    hr=ModbusSequentialDataBlock(0, hr),
    ir=ModbusSequentialDataBlock(0, [4321]),
    co=ModbusSequentialDataBlock(0, [True, False, True]),
    di=ModbusSequentialDataBlock(0, [False, True]),
    zero_mode=True,
)
context = ModbusServerContext(slaves={7: store}, single=False)

async def main():
    if sys.argv[1] == "tcp":
        server = ModbusTcpServer(context, address=("127.0.0.1", 0))
        task = asyncio.create_task(server.serve_forever())
        await server.serving
        print("PORT", server.server.sockets[0].getsockname()[1], flush=True)
        await task
    else:
        server = ModbusSerialServer(context, framer=ModbusRtuFramer, port=sys.argv[2], baudrate=9600)
        await server.start()
        print("READY", flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"#;

const PROFILE: &str = r#"
name = "pymodbus-device"
[[metrics]]
name = "f32_abcd"
modbus = { register = 40001, type = "f32" }
[[metrics]]
name = "f32_cdab"
modbus = { register = 40003, type = "f32", order = "CDAB" }
[[metrics]]
name = "i32_negative"
modbus = { register = 40005, type = "i32" }
[[metrics]]
name = "u64_counter"
modbus = { register = 40007, type = "u64" }
[[metrics]]
name = "i16_negative"
modbus = { register = 40011, type = "i16" }
[[metrics]]
name = "label"
modbus = { register = 40012, type = "string", count = 4 }
[[metrics]]
name = "scaled"
modbus = { register = 30001, type = "u16", scale = 0.1 }
[[metrics]]
name = "coil_0"
kind = "bool"
modbus = { register = 1 }
[[metrics]]
name = "coil_1"
kind = "bool"
modbus = { register = 2 }
[[metrics]]
name = "input_1"
kind = "bool"
modbus = { register = 10002 }
"#;

fn python() -> String {
    std::env::var("PYMODBUS_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".to_owned())
}

/// Starts the pymodbus server and waits for its first output line.
async fn start_pymodbus(args: &[&str]) -> (Child, String) {
    let mut child = Command::new(python())
        .arg("-c")
        .arg(SERVER)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e}; install python3-pymodbus or set PYMODBUS_PYTHON",
                python()
            )
        });
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("pymodbus server starts in time")
        .expect("read pymodbus output")
        .unwrap_or_else(|| {
            panic!(
                "pymodbus server exited; is python3-pymodbus 3.0 installed for {}?",
                python()
            )
        });
    (child, line)
}

async fn poll_readings(
    profile: Arc<Profile>,
    config: ModbusDeviceConfig,
    wanted: usize,
) -> (Vec<Reading>, modbus::TextValues) {
    let (ingest, mut rx) = IngestHandle::channel(1024);
    let shutdown = CancellationToken::new();
    let device = PolledDevice {
        id: DeviceId::new("peer"),
        site: SiteId::new("site-1"),
        profile,
        config,
    };
    let poller = modbus::start(
        vec![device],
        ingest,
        &SharedRegistry::new(),
        shutdown.clone(),
        Arc::new(SystemClock),
    );
    let deadline = Instant::now() + DEADLINE;
    let mut readings = Vec::new();
    while readings.len() < wanted {
        let message = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no readings from the peer in time; got {readings:?}"))
            .expect("channel open");
        if let IngestMessage::Readings(batch) = message {
            readings.extend(batch);
        }
    }
    shutdown.cancel();
    poller.task.await.expect("poller stops");
    (readings, poller.texts)
}

fn assert_peer_values(readings: &[Reading], texts: &modbus::TextValues) {
    let value = |metric: &str| {
        readings
            .iter()
            .find(|r| r.metric.as_str() == metric)
            .map(|r| r.value)
    };
    let number = |metric: &str| match value(metric) {
        Some(Value::Number(n)) => n,
        other => panic!("{metric}: expected a number, got {other:?}"),
    };
    assert!(
        (number("f32_abcd") - 123.456).abs() < 1e-4,
        "f32_abcd {}",
        number("f32_abcd")
    );
    assert!(
        (number("f32_cdab") + 7.25).abs() < 1e-9,
        "f32_cdab {}",
        number("f32_cdab")
    );
    assert_eq!(number("i32_negative"), -123_456.0);
    assert_eq!(number("u64_counter"), 9_876_543_210.0);
    assert_eq!(number("i16_negative"), -200.0);
    assert!(
        (number("scaled") - 432.1).abs() < 1e-9,
        "scaled {}",
        number("scaled")
    );
    assert_eq!(value("coil_0"), Some(Value::Bool(true)));
    assert_eq!(value("coil_1"), Some(Value::Bool(false)));
    assert_eq!(value("input_1"), Some(Value::Bool(true)));
    let texts = texts.lock().expect("lock");
    let label = texts
        .get(&DeviceId::new("peer"))
        .and_then(|t| t.get(&"label".into()));
    assert_eq!(label.map(String::as_str), Some("PYMB-42"));
}

#[tokio::test]
async fn pymodbus_tcp_server_decodes() {
    let (_server, line) = start_pymodbus(&["tcp"]).await;
    let port: u16 = line
        .strip_prefix("PORT ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected output `{line}`"));
    let profile = Arc::new(profile::parse(PROFILE, None).expect("profile parses"));
    let mut config = ModbusDeviceConfig::tcp(format!("127.0.0.1:{port}"), 7);
    config.poll_interval = Some(Duration::from_millis(200));
    let (readings, texts) = poll_readings(profile, config, 9).await;
    assert_peer_values(&readings, &texts);
}

#[tokio::test]
async fn pymodbus_rtu_over_pty_decodes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (ours, theirs) = (dir.path().join("poller"), dir.path().join("device"));
    let _socat = Command::new("socat")
        .arg(format!("pty,raw,echo=0,link={}", ours.display()))
        .arg(format!("pty,raw,echo=0,link={}", theirs.display()))
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start socat: {e}; install the socat package"));
    wait_for_path(&ours).await;
    wait_for_path(&theirs).await;

    let device_port = theirs.to_str().expect("utf-8 path").to_owned();
    let (_server, line) = start_pymodbus(&["rtu", &device_port]).await;
    assert_eq!(line.trim(), "READY");
    let profile = Arc::new(profile::parse(PROFILE, None).expect("profile parses"));
    let mut config = ModbusDeviceConfig::rtu(ours.to_str().expect("utf-8 path"), 7);
    config.baud_rate = Some(9600);
    config.poll_interval = Some(Duration::from_millis(300));
    config.timeout = Duration::from_millis(1000);
    let (readings, texts) = poll_readings(profile, config, 9).await;
    assert_peer_values(&readings, &texts);
}

async fn wait_for_path(path: &Path) {
    let deadline = Instant::now() + DEADLINE;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "socat did not create {}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
