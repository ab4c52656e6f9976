//! A real OpenTelemetry Collector as a host process on loopback: the `otelcol-k8s` that `e2e/build.sh`
//! builds (OTLP receiver, file exporter), writing every span it accepts to a JSON file.

use std::process::{Child, Command, Stdio};

use super::agents::{free_port, tail};

/// The collector binary: `$CROSSTRACE_OTELCOL`, else the one `e2e/build.sh otelcol` builds (once, cached).
fn binary() -> String {
    if let Ok(path) = std::env::var("CROSSTRACE_OTELCOL") {
        return path;
    }
    let out = Command::new("bash").arg(super::repo("e2e/build.sh")).arg("otelcol").output().expect("run e2e/build.sh");
    assert!(out.status.success(), "e2e/build.sh otelcol failed: {}", String::from_utf8_lossy(&out.stderr));
    format!("{}/otelcol-k8s", String::from_utf8_lossy(&out.stdout).trim())
}

/// A running collector, stopped (by its PID) when dropped.
pub struct Otelcol {
    /// Behind a lock so that a test can stop it while its log is borrowed for failure messages.
    child: std::sync::Mutex<Child>,
    pub grpc_port: u16,
    pub http_port: u16,
    dir: std::path::PathBuf,
}

impl Otelcol {
    /// Starts a collector with OTLP on free loopback ports and waits until it listens.
    pub async fn start() -> Self {
        let (grpc_port, http_port) = (free_port(), free_port());
        let dir = std::env::temp_dir().join(format!("crosstrace-otelcol-{}-{grpc_port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let spans = dir.join("spans.json");
        let config = format!(
            "receivers:\n  otlp:\n    protocols:\n      grpc: {{endpoint: \"127.0.0.1:{grpc_port}\"}}\n      http: {{endpoint: \"127.0.0.1:{http_port}\"}}\n\
             exporters:\n  file: {{path: \"{}\", flush_interval: 100ms}}\n\
             service:\n  telemetry: {{metrics: {{level: none}}}}\n  pipelines:\n    traces: {{receivers: [otlp], exporters: [file]}}\n",
            spans.display()
        );
        let config_path = dir.join("config.yaml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.join("otelcol.log")).unwrap();
        let child = Command::new(binary())
            .arg(format!("--config={}", config_path.display()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start otelcol-k8s");
        let collector = Self { child: std::sync::Mutex::new(child), grpc_port, http_port, dir };
        super::eventually_with(
            "the collector to listen",
            || collector.log(),
            || async {
                let grpc = tokio::net::TcpStream::connect(("127.0.0.1", grpc_port)).await.ok()?;
                let http = tokio::net::TcpStream::connect(("127.0.0.1", http_port)).await.ok()?;
                drop((grpc, http));
                Some(())
            },
        )
        .await;
        collector
    }

    /// `host:port` of its OTLP/gRPC receiver.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.grpc_port)
    }

    /// Every span the collector wrote so far (its file exporter writes one OTLP/JSON `TracesData` per line).
    pub fn spans(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.dir.join("spans.json")).unwrap_or_default();
        let mut spans = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let Ok(data) = serde_json::from_str::<serde_json::Value>(line) else { continue };
            for resource in data["resourceSpans"].as_array().into_iter().flatten() {
                for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                    spans.extend(scope["spans"].as_array().into_iter().flatten().cloned());
                }
            }
        }
        spans
    }

    /// The collector's own log (the last lines), for failure messages.
    pub fn log(&self) -> String {
        tail(&std::fs::read_to_string(self.dir.join("otelcol.log")).unwrap_or_default(), 30)
    }

    /// Stops the collector now (by its PID), as a collector going away would.
    pub fn stop(&self) {
        super::stop(&mut self.child.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

impl Drop for Otelcol {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
