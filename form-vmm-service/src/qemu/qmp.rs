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

    /// Runs `getfd` with `fd` attached (SCM_RIGHTS), so QEMU can use it as `name`.
    pub(crate) async fn send_fd(
        &mut self,
        name: &str,
        fd: std::os::fd::RawFd,
    ) -> Result<(), VmmError> {
        use std::io::IoSlice;
        use std::os::fd::AsRawFd;

        use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
        let msg = format!(
            "{}\n",
            json!({ "execute": "getfd", "arguments": { "fdname": name } })
        );
        let sock = self.writer.as_ref().as_raw_fd();
        let fds = [fd];
        loop {
            self.writer
                .writable()
                .await
                .map_err(VmmError::io("waiting for QMP"))?;
            match sendmsg::<()>(
                sock,
                &[IoSlice::new(msg.as_bytes())],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::empty(),
                None,
            ) {
                Ok(n) if n == msg.len() => break,
                Ok(n) => {
                    return Err(VmmError::Backend(format!(
                        "QMP getfd: sent {n} of {} bytes",
                        msg.len()
                    )));
                }
                Err(nix::errno::Errno::EAGAIN) => continue,
                Err(e) => return Err(VmmError::io("sending a file descriptor to QEMU")(e.into())),
            }
        }
        loop {
            let v = self.read().await?;
            if v.get("return").is_some() {
                return Ok(());
            }
            if let Some(e) = v.get("error") {
                return Err(VmmError::Backend(format!(
                    "QMP getfd: {}",
                    e["desc"].as_str().unwrap_or("error")
                )));
            }
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
