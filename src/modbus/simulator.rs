//! A Modbus TCP (or RTU-over-TCP) device simulator for the demo and tests, built on
//! tokio-modbus's server.
//!
//! Its registers can be changed while it runs, and each unit can be set to stop responding
//! or to respond late, so tests can exercise timeouts and reconnects on loopback.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_modbus::server::Service;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_util::sync::CancellationToken;

use super::decode::{self, Decoded};
use crate::profile::{Function, Register};

/// The four object tables of one simulated unit. A read of an address not present gets the
/// exception "illegal data address", as from real devices.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegisterBank {
    pub coils: BTreeMap<u16, bool>,
    pub discrete_inputs: BTreeMap<u16, bool>,
    pub input_registers: BTreeMap<u16, u16>,
    pub holding_registers: BTreeMap<u16, u16>,
}

impl RegisterBank {
    /// Sets consecutive registers of a register table from `address` on.
    pub fn set_words(&mut self, function: Function, address: u16, words: &[u16]) {
        let table = match function {
            Function::InputRegister => &mut self.input_registers,
            Function::HoldingRegister => &mut self.holding_registers,
            Function::Coil | Function::DiscreteInput => {
                for (offset, word) in (0u16..).zip(words) {
                    self.set_bit(function, address + offset, *word != 0);
                }
                return;
            }
        };
        for (offset, word) in (0u16..).zip(words) {
            table.insert(address + offset, *word);
        }
    }

    /// Sets a coil or discrete input, or a whole register to 0 or 1.
    pub fn set_bit(&mut self, function: Function, address: u16, on: bool) {
        match function {
            Function::Coil => {
                self.coils.insert(address, on);
            }
            Function::DiscreteInput => {
                self.discrete_inputs.insert(address, on);
            }
            Function::InputRegister | Function::HoldingRegister => {
                self.table(function).insert(address, u16::from(on));
            }
        }
    }

    /// Stores `value` the way a device would hold it for `register`.
    pub fn set_value(&mut self, register: &Register, value: &Decoded) -> Result<(), String> {
        match (register.function.is_bit(), register.bit, value) {
            (true, _, Decoded::Bool(on)) => self.set_bit(register.function, register.address, *on),
            (false, Some(bit), Decoded::Bool(on)) => {
                let table = self.table(register.function);
                let word = table.get(&register.address).copied().unwrap_or(0);
                table.insert(register.address, decode::set_bit(word, bit, *on));
            }
            (false, None, value) => {
                if let Some((first, last)) = register.bits {
                    return self.set_field(register, (first, last), value);
                }
                let words = decode::encode_words(register, value)?;
                self.set_words(register.function, register.address, &words);
            }
            (_, _, value) => {
                return Err(format!(
                    "cannot store {value:?} in a {}",
                    register.function.as_str()
                ));
            }
        }
        Ok(())
    }

    /// Stores `value` in the packed field `bits` of a register, keeping the other bits.
    fn set_field(
        &mut self,
        register: &Register,
        (first, last): (u8, u8),
        value: &Decoded,
    ) -> Result<(), String> {
        // Fields are defined on the register value after the byte order is undone.
        let swap = |word: u16| {
            if register.order.swaps_bytes() {
                word.swap_bytes()
            } else {
                word
            }
        };
        let encoded = decode::encode_words(register, value)?;
        let field = swap(encoded.first().copied().unwrap_or(0));
        let table = self.table(register.function);
        let word = swap(table.get(&register.address).copied().unwrap_or(0));
        let word = decode::set_field(word, first, last, field)?;
        table.insert(register.address, swap(word));
        Ok(())
    }

    fn table(&mut self, function: Function) -> &mut BTreeMap<u16, u16> {
        if function == Function::InputRegister {
            &mut self.input_registers
        } else {
            &mut self.holding_registers
        }
    }

    fn read_bits(
        table: &BTreeMap<u16, bool>,
        address: u16,
        count: u16,
    ) -> Result<Vec<bool>, ExceptionCode> {
        if count == 0 || count > 2000 {
            return Err(ExceptionCode::IllegalDataValue);
        }
        (0..count)
            .map(|i| {
                address
                    .checked_add(i)
                    .and_then(|a| table.get(&a).copied())
                    .ok_or(ExceptionCode::IllegalDataAddress)
            })
            .collect()
    }

    fn read_words(
        table: &BTreeMap<u16, u16>,
        address: u16,
        count: u16,
    ) -> Result<Vec<u16>, ExceptionCode> {
        if count == 0 || count > 125 {
            return Err(ExceptionCode::IllegalDataValue);
        }
        (0..count)
            .map(|i| {
                address
                    .checked_add(i)
                    .and_then(|a| table.get(&a).copied())
                    .ok_or(ExceptionCode::IllegalDataAddress)
            })
            .collect()
    }
}

/// How a simulated unit responds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Behaviour {
    #[default]
    Normal,
    /// Reads no request and sends nothing, like a powered-off device behind a gateway.
    Silent,
    /// Responds to every request after this delay.
    Delay(Duration),
}

/// One read request as the simulator received it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    pub unit_id: u8,
    pub function: Function,
    pub address: u16,
    pub count: u16,
    /// When the simulator decoded the request.
    pub received: tokio::time::Instant,
}

#[derive(Default)]
struct Unit {
    bank: RegisterBank,
    behaviour: Behaviour,
}

#[derive(Default)]
struct State {
    units: BTreeMap<u8, Unit>,
    requests: Vec<RequestRecord>,
}

/// Frame format the simulator speaks on its TCP socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// Modbus TCP with the MBAP header.
    Tcp,
    /// RTU frames with CRC, as a serial-to-Ethernet gateway passes them through.
    Rtu,
}

/// Controls a running simulator. Cloning gives another handle to the same simulator.
#[derive(Clone)]
pub struct SimulatorHandle {
    state: Arc<Mutex<State>>,
    shutdown: CancellationToken,
}

impl SimulatorHandle {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `change` on the registers of `unit_id`, creating the unit if needed.
    pub fn with_bank<T>(&self, unit_id: u8, change: impl FnOnce(&mut RegisterBank) -> T) -> T {
        change(&mut self.lock().units.entry(unit_id).or_default().bank)
    }

    /// Sets consecutive registers of `unit_id`.
    pub fn set_words(&self, unit_id: u8, function: Function, address: u16, words: &[u16]) {
        self.with_bank(unit_id, |bank| bank.set_words(function, address, words));
    }

    /// Stores a metric value as the device would hold it.
    pub fn set_value(
        &self,
        unit_id: u8,
        register: &Register,
        value: &Decoded,
    ) -> Result<(), String> {
        self.with_bank(unit_id, |bank| bank.set_value(register, value))
    }

    pub fn set_behaviour(&self, unit_id: u8, behaviour: Behaviour) {
        self.lock().units.entry(unit_id).or_default().behaviour = behaviour;
    }

    /// Returns every read request received so far, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.lock().requests.clone()
    }

    pub fn request_count(&self) -> usize {
        self.lock().requests.len()
    }

    pub fn clear_requests(&self) {
        self.lock().requests.clear();
    }

    /// Stops accepting connections and closes the open ones.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }
}

struct SimulatorService {
    state: Arc<Mutex<State>>,
}

type ServiceFuture = Pin<Box<dyn Future<Output = Result<Option<Response>, ExceptionCode>> + Send>>;

impl Service for SimulatorService {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = ServiceFuture;

    fn call(&self, request: Self::Request) -> Self::Future {
        let (behaviour, result) = answer(&self.state, request.slave, &request.request);
        Box::pin(async move {
            match behaviour {
                None | Some(Behaviour::Silent) => return Ok(None),
                Some(Behaviour::Delay(delay)) => tokio::time::sleep(delay).await,
                Some(Behaviour::Normal) => {}
            }
            result.map(Some)
        })
    }
}

/// Computes the answer at arrival time, so a delayed reply carries the values of the moment
/// the request came in. `None` means the unit does not exist and stays silent.
fn answer(
    state: &Mutex<State>,
    unit_id: u8,
    request: &Request<'_>,
) -> (Option<Behaviour>, Result<Response, ExceptionCode>) {
    let mut state = state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let received = tokio::time::Instant::now();
    let record = |function, address, count| RequestRecord {
        unit_id,
        function,
        address,
        count,
        received,
    };
    let (record, response) = {
        let Some(unit) = state.units.get(&unit_id) else {
            return (None, Err(ExceptionCode::GatewayTargetDevice));
        };
        if unit.behaviour == Behaviour::Silent {
            return (
                Some(Behaviour::Silent),
                Err(ExceptionCode::GatewayTargetDevice),
            );
        }
        let bank = &unit.bank;
        match *request {
            Request::ReadCoils(a, n) => (
                Some(record(Function::Coil, a, n)),
                RegisterBank::read_bits(&bank.coils, a, n).map(Response::ReadCoils),
            ),
            Request::ReadDiscreteInputs(a, n) => (
                Some(record(Function::DiscreteInput, a, n)),
                RegisterBank::read_bits(&bank.discrete_inputs, a, n)
                    .map(Response::ReadDiscreteInputs),
            ),
            Request::ReadInputRegisters(a, n) => (
                Some(record(Function::InputRegister, a, n)),
                RegisterBank::read_words(&bank.input_registers, a, n)
                    .map(Response::ReadInputRegisters),
            ),
            Request::ReadHoldingRegisters(a, n) => (
                Some(record(Function::HoldingRegister, a, n)),
                RegisterBank::read_words(&bank.holding_registers, a, n)
                    .map(Response::ReadHoldingRegisters),
            ),
            _ => (None, Err(ExceptionCode::IllegalFunction)),
        }
    };
    let behaviour = state.units.get(&unit_id).map(|u| u.behaviour);
    if let Some(record) = record {
        state.requests.push(record);
    }
    (behaviour, response)
}

/// Starts a Modbus TCP simulator on `listen` (use port 0 for an ephemeral port) serving
/// `units`, keyed by unit id. Returns the bound address and a handle.
pub async fn spawn_simulator(
    listen: SocketAddr,
    units: BTreeMap<u8, RegisterBank>,
) -> io::Result<(SocketAddr, SimulatorHandle)> {
    spawn_with_framing(listen, units, Framing::Tcp).await
}

/// Starts a simulator that speaks RTU framing over TCP, like a serial-to-Ethernet gateway
/// with RS485 devices `units` behind it.
pub async fn spawn_rtu_over_tcp_simulator(
    listen: SocketAddr,
    units: BTreeMap<u8, RegisterBank>,
) -> io::Result<(SocketAddr, SimulatorHandle)> {
    spawn_with_framing(listen, units, Framing::Rtu).await
}

async fn spawn_with_framing(
    listen: SocketAddr,
    units: BTreeMap<u8, RegisterBank>,
    framing: Framing,
) -> io::Result<(SocketAddr, SimulatorHandle)> {
    let listener = TcpListener::bind(listen).await?;
    let bound = listener.local_addr()?;
    let units = units
        .into_iter()
        .map(|(id, bank)| {
            (
                id,
                Unit {
                    bank,
                    behaviour: Behaviour::Normal,
                },
            )
        })
        .collect();
    let state = Arc::new(Mutex::new(State {
        units,
        requests: Vec::new(),
    }));
    let handle = SimulatorHandle {
        state: Arc::clone(&state),
        shutdown: CancellationToken::new(),
    };
    let shutdown = handle.shutdown.clone();
    let new_service = move |_peer: SocketAddr| {
        Ok(Some(SimulatorService {
            state: Arc::clone(&state),
        }))
    };
    match framing {
        Framing::Tcp => {
            let server = tokio_modbus::server::tcp::Server::new(listener);
            tokio::spawn(async move {
                let on_connected = |stream, peer| {
                    let service = tokio_modbus::server::tcp::accept_tcp_connection(
                        stream,
                        peer,
                        &new_service,
                    );
                    async move { service }
                };
                let on_error =
                    |error| tracing::debug!(%error, "modbus simulator connection failed");
                if let Err(error) = server
                    .serve_until(&on_connected, on_error, shutdown.cancelled_owned())
                    .await
                {
                    tracing::warn!(%error, "modbus simulator stopped");
                }
            });
        }
        Framing::Rtu => {
            let server = tokio_modbus::server::rtu_over_tcp::Server::new(listener);
            tokio::spawn(async move {
                let on_connected = |stream, peer| {
                    let service = tokio_modbus::server::rtu_over_tcp::accept_tcp_connection(
                        stream,
                        peer,
                        &new_service,
                    );
                    async move { service }
                };
                let on_error =
                    |error| tracing::debug!(%error, "modbus simulator connection failed");
                if let Err(error) = server
                    .serve_until(&on_connected, on_error, shutdown.cancelled_owned())
                    .await
                {
                    tracing::warn!(%error, "modbus simulator stopped");
                }
            });
        }
    }
    Ok((bound, handle))
}
