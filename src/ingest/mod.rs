//! Ingestion: every source (embedded MQTT broker, Modbus poller, HTTP line-protocol writes)
//! turns its input into readings or points and hands them to the pipeline through an
//! [`IngestHandle`].

pub mod auth;
pub mod directory;
pub mod guard;
pub mod line_protocol;
pub mod login;
pub mod mqtt;
pub mod payload;
pub mod reject;
pub mod takeover;
pub(crate) mod unique_json;

use tokio::sync::{mpsc, oneshot};

use crate::model::{DeviceId, MetricName, Reading};
use crate::storage::Point;

/// Why a device changed its liveness.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LivenessCause {
    /// The device or its MQTT last will published to `status/{site}/{device}`.
    StatusMessage,
    /// No reading arrived within the device's staleness timeout.
    Stale,
    /// The poller failed to read the device this many times in a row.
    PollFailures(u32),
    /// A reading arrived from a device marked offline.
    Reading,
}

/// A message to the pipeline task.
#[derive(Debug)]
pub enum IngestMessage {
    /// Validated readings of known devices.
    Readings(Vec<Reading>),
    /// Validated readings that update latest values and liveness and go to the rules, but
    /// are not stored, such as polled values that report-on-change holds back.
    UnstoredReadings(Vec<Reading>),
    /// Points written over HTTP. Points whose measurement and tags map to a known device
    /// become readings; the rest are stored as they are. `done` receives the outcome
    /// once the points were handed to storage.
    Points {
        points: Vec<Point>,
        done: Option<oneshot::Sender<Result<(), WriteFailure>>>,
    },
    /// Metrics of a polled device whose latest read failed or returned an invalid value,
    /// each with the reason, such as `timeout` or `out_of_range`. A later reading of the
    /// metric clears it.
    BadReadings {
        device: DeviceId,
        bad: Vec<(MetricName, String)>,
    },
    /// A device went offline or came back.
    Liveness {
        device: DeviceId,
        online: bool,
        cause: LivenessCause,
    },
}

/// Why written points were not all stored.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WriteFailure {
    /// The client sent points that conflict with stored data, such as a boolean for a
    /// number series; the other points were stored.
    #[error("{0}")]
    Conflict(String),
    /// Points failed the checks of a configured device or named a measurement that only
    /// the server writes; the other points were stored.
    #[error("{0}")]
    Rejected(String),
    /// Points needed new series beyond the engine's `[storage] max_series`. The points of
    /// existing series were stored.
    #[error("{0}")]
    SeriesLimit(String),
    /// Storage failed; the client may retry.
    #[error("{0}")]
    Storage(String),
}

/// Error returned when the pipeline has shut down.
#[derive(Debug, thiserror::Error)]
#[error("the ingest pipeline is shut down")]
pub struct PipelineClosed;

/// A cloneable handle that sources use to feed the pipeline.
///
/// The channel is bounded, so a slow pipeline slows its sources down instead of letting
/// memory grow.
#[derive(Clone, Debug)]
pub struct IngestHandle {
    tx: mpsc::Sender<IngestMessage>,
}

impl IngestHandle {
    /// Creates a handle and the receiver that the pipeline task drains.
    pub fn channel(capacity: usize) -> (IngestHandle, mpsc::Receiver<IngestMessage>) {
        let (tx, rx) = mpsc::channel(capacity);
        (IngestHandle { tx }, rx)
    }

    /// Sends readings of known devices into the pipeline.
    pub async fn submit(&self, readings: Vec<Reading>) -> Result<(), PipelineClosed> {
        if readings.is_empty() {
            return Ok(());
        }
        self.send(IngestMessage::Readings(readings)).await
    }

    /// Sends readings that the rules and liveness see but storage does not keep.
    pub async fn submit_unstored(&self, readings: Vec<Reading>) -> Result<(), PipelineClosed> {
        if readings.is_empty() {
            return Ok(());
        }
        self.send(IngestMessage::UnstoredReadings(readings)).await
    }

    /// Reports metrics whose latest read failed, with the reason of each.
    pub async fn bad_readings(
        &self,
        device: DeviceId,
        bad: Vec<(MetricName, String)>,
    ) -> Result<(), PipelineClosed> {
        if bad.is_empty() {
            return Ok(());
        }
        self.send(IngestMessage::BadReadings { device, bad }).await
    }

    /// Sends points and waits until the pipeline has handed them to storage.
    pub async fn write_points(
        &self,
        points: Vec<Point>,
    ) -> Result<Result<(), WriteFailure>, PipelineClosed> {
        let (done, wait) = oneshot::channel();
        self.send(IngestMessage::Points {
            points,
            done: Some(done),
        })
        .await?;
        wait.await.map_err(|_| PipelineClosed)
    }

    /// Reports that a device went offline (`online == false`) or came back.
    pub async fn liveness(
        &self,
        device: DeviceId,
        online: bool,
        cause: LivenessCause,
    ) -> Result<(), PipelineClosed> {
        self.send(IngestMessage::Liveness {
            device,
            online,
            cause,
        })
        .await
    }

    async fn send(&self, message: IngestMessage) -> Result<(), PipelineClosed> {
        self.tx.send(message).await.map_err(|_| PipelineClosed)
    }
}
