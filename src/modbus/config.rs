//! Per-device Modbus settings, embedded as `modbus` in a device's config entry.

use std::time::Duration;

use serde::Deserialize;

/// How the poller reaches a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// Modbus TCP (MBAP framing) to `address`.
    Tcp,
    /// Modbus RTU on the serial port `serial_port`.
    Rtu,
    /// Modbus RTU frames over a TCP connection to `address`, as serial-to-Ethernet gateways
    /// and 4G DTUs in transparent mode expect.
    RtuOverTcp,
}

/// Parity bit of a serial line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    #[default]
    None,
    Even,
    Odd,
}

/// Modbus settings of one polled device.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusDeviceConfig {
    /// `tcp`, `rtu` or `rtu_over_tcp`.
    pub transport: Transport,
    /// `host:port` of the device or gateway, for `tcp` and `rtu_over_tcp`.
    #[serde(default)]
    pub address: Option<String>,
    /// Serial port device, such as `/dev/ttyUSB0`, for `rtu`.
    #[serde(default)]
    pub serial_port: Option<String>,
    /// Serial line speed in bit/s, for `rtu`; defaults to 9600.
    #[serde(default)]
    pub baud_rate: Option<u32>,
    /// Serial parity, `none`, `even` or `odd`, for `rtu`; defaults to `none`.
    #[serde(default)]
    pub parity: Option<Parity>,
    /// Serial data bits, 5 to 8, for `rtu`; defaults to 8.
    #[serde(default)]
    pub data_bits: Option<u8>,
    /// Serial stop bits, 1 or 2, for `rtu`; defaults to 1.
    #[serde(default)]
    pub stop_bits: Option<u8>,
    /// Modbus unit (slave) id, 1 to 247 (TCP also allows 0 and 255).
    #[serde(default = "default_unit_id")]
    pub unit_id: u8,
    /// Time between polls, such as `"1s"`; overrides the profile's default (5 s if neither).
    #[serde(default, with = "humantime_serde")]
    pub poll_interval: Option<Duration>,
    /// How long to wait for each reply before the request counts as failed.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Extra attempts for a failed read within one poll.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Unused registers (or bits) the poller may read and discard to merge two ranges into
    /// one request.
    #[serde(default = "default_max_gap")]
    pub max_gap: u16,
    /// Most registers the device accepts in one read, 1 to 125; defaults to the profile's
    /// value or 125.
    #[serde(default)]
    pub max_registers_per_read: Option<u16>,
    /// Most coils or discrete inputs the device accepts in one read, 1 to 2000.
    #[serde(default = "default_max_bits")]
    pub max_bits_per_read: u16,
    /// Whether to merge metrics into as few reads as possible; `false` reads each metric
    /// on its own, for devices that reject reads spanning several values.
    #[serde(default = "default_true")]
    pub coalesce: bool,
    /// Pause between two requests on a shared serial bus or RTU-over-TCP gateway, so slow
    /// devices see the bus idle before the next frame.
    #[serde(default = "default_bus_pause", with = "humantime_serde")]
    pub bus_pause: Duration,
    /// Requests in flight at once to one `host:port` for `tcp`; the smallest value among
    /// the devices behind one address applies.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent_requests: usize,
    /// Failed polls in a row after which the device is reported offline.
    #[serde(default = "default_offline_after")]
    pub offline_after_failures: u32,
    /// Longest wait between polls of an offline device; the wait doubles from
    /// `poll_interval` up to this, with random jitter.
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Report a numeric metric only when it moved more than this since the last reported
    /// value, in the metric's unit; unset reports every poll. Booleans report on change.
    #[serde(default)]
    pub report_deadband: Option<f64>,
    /// With `report_deadband`, the longest time between two reports of an unchanged value.
    #[serde(default = "default_report_max_interval", with = "humantime_serde")]
    pub report_max_interval: Duration,
}

fn default_unit_id() -> u8 {
    1
}
fn default_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_retries() -> u32 {
    1
}
fn default_max_gap() -> u16 {
    8
}
fn default_max_bits() -> u16 {
    2000
}
fn default_true() -> bool {
    true
}
fn default_bus_pause() -> Duration {
    Duration::from_millis(20)
}
fn default_max_concurrent() -> usize {
    1
}
fn default_offline_after() -> u32 {
    3
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(60)
}
fn default_report_max_interval() -> Duration {
    Duration::from_secs(60)
}

/// Poll interval when neither the device nor its profile sets one.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(5);

impl ModbusDeviceConfig {
    /// A TCP device at `address` with every other setting at its default.
    pub fn tcp(address: impl Into<String>, unit_id: u8) -> Self {
        Self::with_transport(Transport::Tcp, Some(address.into()), None, unit_id)
    }

    /// An RTU device behind an RTU-over-TCP gateway at `address`.
    pub fn rtu_over_tcp(address: impl Into<String>, unit_id: u8) -> Self {
        Self::with_transport(Transport::RtuOverTcp, Some(address.into()), None, unit_id)
    }

    /// An RTU device on the serial port `path`.
    pub fn rtu(path: impl Into<String>, unit_id: u8) -> Self {
        Self::with_transport(Transport::Rtu, None, Some(path.into()), unit_id)
    }

    fn with_transport(
        transport: Transport,
        address: Option<String>,
        serial_port: Option<String>,
        unit_id: u8,
    ) -> Self {
        Self {
            transport,
            address,
            serial_port,
            baud_rate: None,
            parity: None,
            data_bits: None,
            stop_bits: None,
            unit_id,
            poll_interval: None,
            timeout: default_timeout(),
            retries: default_retries(),
            max_gap: default_max_gap(),
            max_registers_per_read: None,
            max_bits_per_read: default_max_bits(),
            coalesce: true,
            bus_pause: default_bus_pause(),
            max_concurrent_requests: default_max_concurrent(),
            offline_after_failures: default_offline_after(),
            max_backoff: default_max_backoff(),
            report_deadband: None,
            report_max_interval: default_report_max_interval(),
        }
    }

    pub fn baud_rate(&self) -> u32 {
        self.baud_rate.unwrap_or(9600)
    }

    pub fn parity(&self) -> Parity {
        self.parity.unwrap_or_default()
    }

    pub fn data_bits(&self) -> u8 {
        self.data_bits.unwrap_or(8)
    }

    pub fn stop_bits(&self) -> u8 {
        self.stop_bits.unwrap_or(1)
    }

    /// Checks the settings, returning (key, message) pairs whose message says the fix.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut push = |key: &str, message: String| problems.push((key.to_owned(), message));
        self.validate_link(&mut push);
        let unit_ok = match self.transport {
            Transport::Tcp => true,
            Transport::Rtu | Transport::RtuOverTcp => (1..=247).contains(&self.unit_id),
        };
        if !unit_ok {
            push(
                "unit_id",
                format!(
                    "unit_id {} is invalid on a serial bus; write 1 to 247",
                    self.unit_id
                ),
            );
        }
        if self.timeout.is_zero() {
            push(
                "timeout",
                "timeout must be longer than 0; write a duration such as \"1s\"".to_owned(),
            );
        }
        if let Some(interval) = self.poll_interval
            && interval < Duration::from_millis(10)
        {
            push(
                "poll_interval",
                format!("poll_interval {interval:?} is too short; write at least \"10ms\""),
            );
        }
        if self.retries > 10 {
            push(
                "retries",
                format!("retries {} is too many; write 0 to 10", self.retries),
            );
        }
        if self.max_gap > 124 {
            push(
                "max_gap",
                format!("max_gap {} is invalid; write 0 to 124", self.max_gap),
            );
        }
        if let Some(max) = self.max_registers_per_read
            && !(1..=125).contains(&max)
        {
            push(
                "max_registers_per_read",
                format!("max_registers_per_read {max} is invalid; write 1 to 125"),
            );
        }
        if !(1..=2000).contains(&self.max_bits_per_read) {
            push(
                "max_bits_per_read",
                format!(
                    "max_bits_per_read {} is invalid; write 1 to 2000",
                    self.max_bits_per_read
                ),
            );
        }
        if self.max_concurrent_requests == 0 {
            push(
                "max_concurrent_requests",
                "max_concurrent_requests must be at least 1".to_owned(),
            );
        }
        if self.offline_after_failures == 0 {
            push(
                "offline_after_failures",
                "offline_after_failures must be at least 1".to_owned(),
            );
        }
        if self
            .report_deadband
            .is_some_and(|d| !d.is_finite() || d < 0.0)
        {
            push(
                "report_deadband",
                "report_deadband must be a number of 0 or more".to_owned(),
            );
        }
        problems
    }

    fn validate_link(&self, push: &mut impl FnMut(&str, String)) {
        let serial_keys = [
            ("serial_port", self.serial_port.is_some()),
            ("baud_rate", self.baud_rate.is_some()),
            ("parity", self.parity.is_some()),
            ("data_bits", self.data_bits.is_some()),
            ("stop_bits", self.stop_bits.is_some()),
        ];
        match self.transport {
            Transport::Tcp | Transport::RtuOverTcp => {
                match self.address.as_deref() {
                    None => push(
                        "address",
                        "missing `address`; write host:port, such as \"192.0.2.10:502\"".to_owned(),
                    ),
                    Some(address) if !is_host_port(address) => push(
                        "address",
                        format!(
                            "address `{address}` is not host:port; write it such as \"192.0.2.10:502\""
                        ),
                    ),
                    Some(_) => {}
                }
                for (key, set) in serial_keys {
                    if set {
                        push(
                            key,
                            format!("`{key}` applies to transport rtu only; remove it"),
                        );
                    }
                }
            }
            Transport::Rtu => {
                if self.serial_port.as_deref().is_none_or(str::is_empty) {
                    push(
                        "serial_port",
                        "missing `serial_port`; write the device path, such as \"/dev/ttyUSB0\""
                            .to_owned(),
                    );
                }
                if self.address.is_some() {
                    push(
                        "address",
                        "`address` applies to tcp and rtu_over_tcp; remove it or change transport"
                            .to_owned(),
                    );
                }
                if self.baud_rate == Some(0) {
                    push(
                        "baud_rate",
                        "baud_rate must be greater than 0, such as 9600".to_owned(),
                    );
                }
                if !(5..=8).contains(&self.data_bits()) {
                    push(
                        "data_bits",
                        format!("data_bits {} is invalid; write 5 to 8", self.data_bits()),
                    );
                }
                if !(1..=2).contains(&self.stop_bits()) {
                    push(
                        "stop_bits",
                        format!("stop_bits {} is invalid; write 1 or 2", self.stop_bits()),
                    );
                }
            }
        }
    }
}

fn is_host_port(address: &str) -> bool {
    match address.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses_with_durations() {
        let config: ModbusDeviceConfig = toml::from_str(
            "transport = \"rtu\"\nserial_port = \"/dev/ttyUSB0\"\nbaud_rate = 19200\nparity = \"even\"\n\
             unit_id = 7\npoll_interval = \"2s\"\ntimeout = \"300ms\"\nbus_pause = \"50ms\"\n",
        )
        .expect("parses");
        assert_eq!(config.poll_interval, Some(Duration::from_secs(2)));
        assert_eq!(config.timeout, Duration::from_millis(300));
        assert_eq!(config.parity(), Parity::Even);
        assert!(config.validate().is_empty(), "{:?}", config.validate());
    }

    #[test]
    fn unknown_key_is_rejected() {
        let result: Result<ModbusDeviceConfig, _> =
            toml::from_str("transport = \"tcp\"\nadress = \"x:1\"\n");
        assert!(result.is_err());
    }

    #[test]
    fn validate_names_keys_and_fixes() {
        let mut config = ModbusDeviceConfig::tcp("no-port", 1);
        config.baud_rate = Some(9600);
        config.max_registers_per_read = Some(200);
        let keys: Vec<String> = config.validate().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["address", "baud_rate", "max_registers_per_read"]);
    }
}
