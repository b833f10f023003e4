//! Connections to Modbus devices and single read requests with a timeout.
//!
//! tokio-modbus 0.17 has no timeout of its own, so every connect and read here is wrapped in
//! `tokio::time::timeout`. After a timeout the connection is dropped, because a late reply
//! would otherwise be read as the response to the next request.

use std::fmt;
use std::io;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_modbus::client::{Context, Reader};
use tokio_modbus::slave::SlaveContext;
use tokio_modbus::{ExceptionCode, Slave};

use super::config::{ModbusDeviceConfig, Parity, Transport};
use super::plan::ReadBlock;
use crate::profile::Function;

/// Target of a connection. Devices with the same link share one connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Link {
    Tcp(String),
    RtuOverTcp(String),
    Serial(SerialSettings),
}

/// Settings of a serial line.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SerialSettings {
    pub path: String,
    pub baud_rate: u32,
    pub parity: Parity,
    pub data_bits: u8,
    pub stop_bits: u8,
}

impl Link {
    /// The link a device config describes; `validate` must have passed.
    pub fn of(config: &ModbusDeviceConfig) -> Link {
        let address = config.address.clone().unwrap_or_default();
        match config.transport {
            Transport::Tcp => Link::Tcp(address),
            Transport::RtuOverTcp => Link::RtuOverTcp(address),
            Transport::Rtu => Link::Serial(SerialSettings {
                path: config.serial_port.clone().unwrap_or_default(),
                baud_rate: config.baud_rate(),
                parity: config.parity(),
                data_bits: config.data_bits(),
                stop_bits: config.stop_bits(),
            }),
        }
    }
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Link::Tcp(address) => write!(f, "tcp://{address}"),
            Link::RtuOverTcp(address) => write!(f, "rtu-over-tcp://{address}"),
            Link::Serial(serial) => write!(f, "{}", serial.path),
        }
    }
}

/// The data of one successful read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Words(Vec<u16>),
    Bits(Vec<bool>),
}

/// Reason a read failed. Exceptions come from a device that responded, and the other
/// variants mean no usable response arrived.
#[derive(Debug)]
pub enum ReadError {
    Connect(io::Error),
    Timeout,
    Transport(io::Error),
    /// The reply did not match the request (transaction id, unit or function code).
    Protocol(String),
    Exception(ExceptionCode),
    /// The reply carried a different number of values than requested.
    Short {
        requested: u16,
        got: usize,
    },
}

impl ReadError {
    /// A label for metrics.
    pub fn reason(&self) -> String {
        match self {
            ReadError::Connect(_) => "connect".to_owned(),
            ReadError::Timeout => "timeout".to_owned(),
            ReadError::Transport(_) => "transport".to_owned(),
            ReadError::Protocol(_) => "protocol".to_owned(),
            ReadError::Exception(code) => format!("exception_{}", exception_name(*code)),
            ReadError::Short { .. } => "short_reply".to_owned(),
        }
    }

    /// Whether the connection must be dropped before the next request.
    pub fn poisons_connection(&self) -> bool {
        !matches!(self, ReadError::Exception(_))
    }

    /// Whether another attempt within the same poll could succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ReadError::Exception(code) => {
                matches!(
                    code,
                    ExceptionCode::ServerDeviceBusy | ExceptionCode::Acknowledge
                )
            }
            _ => true,
        }
    }
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Connect(e) => write!(f, "connect failed: {e}"),
            ReadError::Timeout => f.write_str("no reply within the timeout"),
            ReadError::Transport(e) => write!(f, "transport error: {e}"),
            ReadError::Protocol(e) => write!(f, "reply does not match the request: {e}"),
            ReadError::Exception(code) => {
                write!(f, "device exception {:#04x} ({code})", u8::from(*code))
            }
            ReadError::Short { requested, got } => {
                write!(f, "reply has {got} values where {requested} were requested")
            }
        }
    }
}

/// A snake_case name of a Modbus exception code.
pub fn exception_name(code: ExceptionCode) -> String {
    match code {
        ExceptionCode::IllegalFunction => "illegal_function".to_owned(),
        ExceptionCode::IllegalDataAddress => "illegal_data_address".to_owned(),
        ExceptionCode::IllegalDataValue => "illegal_data_value".to_owned(),
        ExceptionCode::ServerDeviceFailure => "server_device_failure".to_owned(),
        ExceptionCode::Acknowledge => "acknowledge".to_owned(),
        ExceptionCode::ServerDeviceBusy => "server_device_busy".to_owned(),
        ExceptionCode::MemoryParityError => "memory_parity_error".to_owned(),
        ExceptionCode::GatewayPathUnavailable => "gateway_path_unavailable".to_owned(),
        ExceptionCode::GatewayTargetDevice => "gateway_target_device".to_owned(),
        ExceptionCode::Custom(code) => format!("code_{code}"),
    }
}

/// A connection to one link that reconnects on demand.
pub struct Connection {
    link: Link,
    context: Option<Context>,
    /// Quiet time on the link between the end of one request and the start of the next.
    pause: Duration,
    last_request_end: Option<tokio::time::Instant>,
}

impl Connection {
    pub fn new(link: Link) -> Self {
        Self::with_pause(link, Duration::ZERO)
    }

    /// A connection that keeps `pause` between any two requests it sends, whichever unit
    /// they address, as a shared RS485 bus needs.
    pub fn with_pause(link: Link, pause: Duration) -> Self {
        Self {
            link,
            context: None,
            pause,
            last_request_end: None,
        }
    }

    pub fn link(&self) -> &Link {
        &self.link
    }

    /// Drops the connection, so the next read connects afresh.
    pub fn reset(&mut self) {
        self.context = None;
    }

    /// Reads `block` from unit `unit_id`, connecting first if needed. Any error other than
    /// a device exception drops the connection.
    pub async fn read(
        &mut self,
        unit_id: u8,
        block: &ReadBlock,
        timeout: Duration,
    ) -> Result<Reply, ReadError> {
        if let Some(end) = self.last_request_end {
            tokio::time::sleep_until(end + self.pause).await;
        }
        let outcome = self.read_now(unit_id, block, timeout).await;
        self.last_request_end = Some(tokio::time::Instant::now());
        outcome
    }

    async fn read_now(
        &mut self,
        unit_id: u8,
        block: &ReadBlock,
        timeout: Duration,
    ) -> Result<Reply, ReadError> {
        if self.context.is_none() {
            let context = tokio::time::timeout(timeout, connect(&self.link))
                .await
                .map_err(|_| {
                    ReadError::Connect(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))
                })?
                .map_err(ReadError::Connect)?;
            self.context = Some(context);
        }
        let context = self.context.as_mut().expect("connected above");
        context.set_slave(Slave(unit_id));
        let result = tokio::time::timeout(timeout, read_block(context, block)).await;
        let outcome = match result {
            Err(_) => Err(ReadError::Timeout),
            Ok(outcome) => outcome,
        };
        if outcome.as_ref().is_err_and(ReadError::poisons_connection) {
            self.reset();
        }
        outcome
    }
}

async fn connect(link: &Link) -> io::Result<Context> {
    match link {
        Link::Tcp(address) => {
            let stream = TcpStream::connect(address.as_str()).await?;
            stream.set_nodelay(true)?;
            Ok(tokio_modbus::client::tcp::attach(stream))
        }
        Link::RtuOverTcp(address) => {
            let stream = TcpStream::connect(address.as_str()).await?;
            stream.set_nodelay(true)?;
            Ok(tokio_modbus::client::rtu::attach(stream))
        }
        Link::Serial(serial) => {
            let stream = open_serial(serial)?;
            Ok(tokio_modbus::client::rtu::attach(stream))
        }
    }
}

fn open_serial(serial: &SerialSettings) -> io::Result<tokio_serial::SerialStream> {
    use tokio_serial::SerialPortBuilderExt;

    let parity = match serial.parity {
        Parity::None => tokio_serial::Parity::None,
        Parity::Even => tokio_serial::Parity::Even,
        Parity::Odd => tokio_serial::Parity::Odd,
    };
    let data_bits = match serial.data_bits {
        5 => tokio_serial::DataBits::Five,
        6 => tokio_serial::DataBits::Six,
        7 => tokio_serial::DataBits::Seven,
        _ => tokio_serial::DataBits::Eight,
    };
    let stop_bits = if serial.stop_bits == 2 {
        tokio_serial::StopBits::Two
    } else {
        tokio_serial::StopBits::One
    };
    tokio_serial::new(serial.path.as_str(), serial.baud_rate)
        .parity(parity)
        .data_bits(data_bits)
        .stop_bits(stop_bits)
        .open_native_async()
        .map_err(io::Error::from)
}

async fn read_block(context: &mut Context, block: &ReadBlock) -> Result<Reply, ReadError> {
    let (address, count) = (block.address, block.count);
    let result = match block.function {
        Function::Coil => context
            .read_coils(address, count)
            .await
            .map(|r| r.map(Reply::Bits)),
        Function::DiscreteInput => context
            .read_discrete_inputs(address, count)
            .await
            .map(|r| r.map(Reply::Bits)),
        Function::HoldingRegister => context
            .read_holding_registers(address, count)
            .await
            .map(|r| r.map(Reply::Words)),
        Function::InputRegister => context
            .read_input_registers(address, count)
            .await
            .map(|r| r.map(Reply::Words)),
    };
    let reply = match result {
        Ok(Ok(reply)) => reply,
        Ok(Err(code)) => return Err(ReadError::Exception(code)),
        Err(tokio_modbus::Error::Transport(e)) => return Err(ReadError::Transport(e)),
        Err(tokio_modbus::Error::Protocol(e)) => return Err(ReadError::Protocol(e.to_string())),
    };
    // tokio-modbus checks the reply's length only in debug builds, so check it here.
    let got = match &reply {
        Reply::Words(words) => words.len(),
        Reply::Bits(bits) => bits.len(),
    };
    if got != usize::from(count) {
        return Err(ReadError::Short {
            requested: count,
            got,
        });
    }
    Ok(reply)
}
