//! A QMP client: JSON lines over a Unix socket (greeting, `qmp_capabilities`, then
//! commands; asynchronous events are skipped).

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use crate::error::VmmError;

/// Time one command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A connected QMP session.
#[derive(Debug)]
pub(crate) struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connects to `path`, retrying until `deadline` (QEMU creates the socket as it starts).
    pub(crate) async fn connect(path: &Path, deadline: Instant) -> Result<Self, VmmError> {
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => {
                    return Err(VmmError::io(format!(
                        "connecting to QMP at {}",
                        path.display()
                    ))(e));
                }
            }
        };
        let (r, w) = stream.into_split();
        let mut qmp = Self {
            reader: BufReader::new(r),
            writer: w,
        };
        qmp.read().await?; // greeting
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    async fn read(&mut self) -> Result<Value, VmmError> {
        let mut line = String::new();
        let n = tokio::time::timeout(COMMAND_TIMEOUT, self.reader.read_line(&mut line))
            .await
            .map_err(|_| VmmError::Backend("QMP did not answer in time".into()))?
            .map_err(VmmError::io("reading QMP"))?;
        if n == 0 {
            return Err(VmmError::Backend("QMP closed the connection".into()));
        }
        serde_json::from_str(&line)
            .map_err(|e| VmmError::Backend(format!("QMP sent bad JSON: {e}")))
    }

    /// Runs one command; returns its `return` value or fails with QEMU's error.
    pub(crate) async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, VmmError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(b'\n');
        self.writer
            .write_all(&bytes)
            .await
            .map_err(VmmError::io("writing QMP"))?;
        loop {
            let v = self.read().await?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(VmmError::Backend(format!(
                    "QMP {command}: {}",
                    e["desc"].as_str().unwrap_or("error")
                )));
            }
            // An event: keep reading.
        }
    }

    /// Polls `query-migrate` until the migration completes (or fails).
    pub(crate) async fn wait_migration(&mut self) -> Result<(), VmmError> {
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let r = self.execute("query-migrate", None).await?;
            match r["status"].as_str() {
                Some("completed") => return Ok(()),
                Some("failed") | Some("cancelled") => {
                    return Err(VmmError::Backend(format!(
                        "migration {}: {}",
                        r["status"],
                        r["error-desc"].as_str().unwrap_or("no detail")
                    )));
                }
                _ if Instant::now() > deadline => {
                    return Err(VmmError::Backend("migration did not finish in time".into()));
                }
                _ => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        }
    }
}
