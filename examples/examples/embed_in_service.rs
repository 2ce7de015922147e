//! Embed Phalanx in your own tokio service: train in the background while an
//! HTTP endpoint reports progress, then serves the result.
//!
//! cargo run --release -p phalanx-examples --example embed_in_service -- [PORT]
//! curl http://127.0.0.1:PORT/progress    # while training
//! curl http://127.0.0.1:PORT/summary     # once done
//!
//! The service stops by itself a few requests after training finished (at
//! once when no port was given), or on Ctrl-C.

use std::sync::Arc;

use phalanx::{JobConfig, PreparedJob, Progress};
use phalanx_actors::data::DatasetSource;
use phalanx_actors::model::ModelKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{watch, Mutex};

/// Requests served after training finished before the example exits.
const REQUESTS_AFTER_DONE: usize = 3;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let port: u16 = std::env::args().nth(1).map(|p| p.parse()).transpose()?.unwrap_or(0);
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    println!("serving on http://{}/progress and /summary", listener.local_addr()?);

    let config = JobConfig {
        model: ModelKind::Mlp.into(),
        dataset: DatasetSource::Winequality,
        trainers: 2,
        ..Default::default()
    };
    let job = Arc::new(PreparedJob::new(config)?);
    let (progress_tx, progress_rx) = watch::channel(Progress::default());
    let summary = Arc::new(Mutex::new(None::<String>));

    let (done_tx, mut done_rx) = watch::channel(false);
    let trainer = {
        let (job, summary) = (job.clone(), summary.clone());
        tokio::spawn(async move {
            let dir = std::env::temp_dir().join(format!("phalanx-service-{}", std::process::id()));
            let report = phalanx::job::run(&job, &dir, false, |p| {
                let _ = progress_tx.send(p.clone());
            })
            .await?;
            let s = phalanx::Summary::new(&job, &report);
            *summary.lock().await = Some(serde_json::to_string_pretty(&s)?);
            println!("training done: {} {:.4}, model_sha256 {}", s.metric.name, s.metric.value, s.model_sha256);
            let _ = std::fs::remove_dir_all(&dir);
            let _ = done_tx.send(true);
            anyhow::Ok(())
        })
    };

    let mut served_after_done = 0;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            accepted = listener.accept() => {
                let (mut sock, _) = accepted?;
                let mut buf = [0u8; 1024];
                let n = sock.read(&mut buf).await?;
                let request = String::from_utf8_lossy(&buf[..n]);
                let path = request.split_whitespace().nth(1).unwrap_or("/");
                let done = summary.lock().await.clone();
                let (status, body) = match path {
                    "/progress" => {
                        let p = progress_rx.borrow().clone();
                        ("200 OK", format!(r#"{{"step":{},"total_steps":{},"loss":{},"faults":{}}}"#, p.step, p.total_steps, p.loss, p.faults))
                    }
                    "/summary" => match &done {
                        Some(s) => ("200 OK", s.clone()),
                        None => ("503 Service Unavailable", r#"{"error":"still training"}"#.to_string()),
                    },
                    _ => ("404 Not Found", r#"{"error":"try /progress or /summary"}"#.to_string()),
                };
                let response = format!("HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                sock.write_all(response.as_bytes()).await?;
                if done.is_some() {
                    served_after_done += 1;
                    if served_after_done >= REQUESTS_AFTER_DONE {
                        break;
                    }
                }
            }
            // With no fixed port nobody is expected to query us: stop when trained.
            _ = done_rx.changed(), if port == 0 => break,
        }
    }
    trainer.await??;
    Ok(())
}
