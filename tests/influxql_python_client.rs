//! Runs the Python `influxdb` client (an InfluxDB 1.x client from PyPI) against Stonelion:
//! writes go through the line-protocol `/write` route into an in-memory store, and
//! queries through `/query`. The pytest file is `tests/python/test_influxdb_client.py`.

#[path = "influxql_support.rs"]
mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use stonelion::ingest::{IngestHandle, IngestMessage, WriteFailure};
use stonelion::metrics::SharedRegistry;
use stonelion::storage::TimeSeriesStore;
use support::{MemStore, seed_demo, serve};

/// Stores the points of every write, as the pipeline does for points of unknown devices.
fn spawn_store_writer(store: Arc<MemStore>) -> IngestHandle {
    let (handle, mut receiver) = IngestHandle::channel(64);
    tokio::spawn(async move {
        while let Some(message) = receiver.recv().await {
            if let IngestMessage::Points { points, done } = message {
                let outcome = store.write(points).map_err(|e| WriteFailure::Storage(e.to_string()));
                if let Some(done) = done {
                    let _ = done.send(outcome);
                }
            }
        }
    });
    handle
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_influxdb_client_reads_and_writes() {
    let store = MemStore::new();
    seed_demo(store.as_ref());
    let ingest = spawn_store_writer(Arc::clone(&store));
    let registry = SharedRegistry::new();
    let router = stonelion::api::influxql::router(store)
        .merge(stonelion::ingest::line_protocol::router(ingest, &registry));
    let addr = serve(router).await;

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Debian's interpreter is the one `.ci/install-deps` installs `influxdb` and pytest for.
    let python = std::env::var("STONELION_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".to_owned());
    let mut command = tokio::process::Command::new(&python);
    command
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/python/test_influxdb_client.py"])
        .current_dir(root)
        .env("STONELION_HOST", addr.ip().to_string())
        .env("STONELION_PORT", addr.port().to_string())
        .kill_on_drop(true);
    let run = tokio::time::timeout(Duration::from_secs(120), command.output());
    let output = run
        .await
        .expect("pytest finished within 120 s")
        .expect("python3 starts: run .ci/install-deps, or set STONELION_PYTHON to a Python with influxdb and pytest");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "pytest failed ({})\n{stdout}\n{stderr}", output.status);
    assert!(stdout.contains("passed"), "pytest ran no test:\n{stdout}");
}
