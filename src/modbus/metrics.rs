//! Prometheus metrics of the Modbus poller, labelled per device.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabels {
    pub device: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub device: String,
    /// `timeout`, `transport`, `protocol`, `short_reply`, `connect` or `exception_<name>`.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BadValueLabels {
    pub device: String,
    pub metric: String,
    /// `no_value`, `out_of_range`, `not_finite`, `invalid_text` or `short_reply`.
    pub reason: String,
}

/// Counters and gauges of the poller.
#[derive(Clone, Debug, Default)]
pub struct ModbusMetrics {
    pub requests: Family<DeviceLabels, Counter>,
    pub request_errors: Family<ErrorLabels, Counter>,
    pub bad_values: Family<BadValueLabels, Counter>,
    pub readings: Family<DeviceLabels, Counter>,
    pub online: Family<DeviceLabels, Gauge>,
}

impl ModbusMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "modbus_requests",
            "Modbus read requests sent, per device",
            metrics.requests.clone(),
        );
        registry.register(
            "modbus_request_errors",
            "Modbus reads that failed, per device and reason (timeouts, transport errors, exceptions)",
            metrics.request_errors.clone(),
        );
        registry.register(
            "modbus_bad_values",
            "Decoded values rejected as bad (no-value marker, out of range), per device and metric",
            metrics.bad_values.clone(),
        );
        registry.register(
            "modbus_readings",
            "Good readings handed to the pipeline, per device",
            metrics.readings.clone(),
        );
        registry.register(
            "modbus_device_online",
            "1 while a polled device answers, 0 once it is offline",
            metrics.online.clone(),
        );
        metrics
    }

    pub fn count_error(&self, device: &str, reason: &str) {
        self.request_errors
            .get_or_create(&ErrorLabels {
                device: device.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn count_bad_value(&self, device: &str, metric: &str, reason: &str) {
        let labels = BadValueLabels {
            device: device.to_owned(),
            metric: metric.to_owned(),
            reason: reason.to_owned(),
        };
        self.bad_values.get_or_create(&labels).inc();
    }

    /// The error count of one device and reason, for tests and the status API.
    pub fn error_count(&self, device: &str, reason: &str) -> u64 {
        self.request_errors
            .get_or_create(&ErrorLabels {
                device: device.to_owned(),
                reason: reason.to_owned(),
            })
            .get()
    }

    pub fn request_count(&self, device: &str) -> u64 {
        self.requests
            .get_or_create(&DeviceLabels {
                device: device.to_owned(),
            })
            .get()
    }
}
