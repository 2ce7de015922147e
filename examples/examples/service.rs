//! A web service that embeds a Phalanx node: jobs are submitted, watched,
//! cancelled and used over HTTP, while the node trains with its peers.
//!
//! ```text
//! cargo run --release -p phalanx -- certs --dir certs --nodes 3
//! cargo run --release -p phalanx -- node --id 1 --listen 127.0.0.1:7001 --certs certs --seeds 127.0.0.1:7000,127.0.0.1:7002 &
//! cargo run --release -p phalanx -- node --id 2 --listen 127.0.0.1:7002 --certs certs --seeds 127.0.0.1:7000,127.0.0.1:7001 &
//! cargo run --release -p phalanx-examples --example service -- --id 0 --listen 127.0.0.1:7000 \
//!     --certs certs --seeds 127.0.0.1:7001,127.0.0.1:7002 --http 127.0.0.1:8080 --out out
//! curl -X POST 127.0.0.1:8080/jobs -d '{"model": "mlp", "dataset": "winequality", "trainers": 3}'
//! curl 127.0.0.1:8080/jobs/1            # state and progress
//! curl -N 127.0.0.1:8080/jobs/1/events  # server-sent events
//! curl -X POST 127.0.0.1:8080/predict -d '{"job": 1, "rows": [[7.4, 0.7, 0, 1.9, 0.076, 11, 34, 0.9978, 3.51, 0.56, 9.4]]}'
//! curl 127.0.0.1:8080/metrics
//! ```
//!
//! | route | what |
//! |---|---|
//! | `POST /jobs` | a job spec as JSON (the fields of a job TOML file; unknown fields are refused by name) → `{"id": N}` once a majority of the cluster holds it |
//! | `GET /jobs` | every job the cluster's registry holds |
//! | `GET /jobs/{id}` | its state (`queued`, `running`, `finished`, `failed`, `cancelled`), last step and loss, `model_sha256` when finished |
//! | `GET /jobs/{id}/events` | its events as server-sent events (JSON) |
//! | `DELETE /jobs/{id}` | cancel it |
//! | `POST /predict` | `{"job": N, "rows": [[f32, …], …]}` → predictions of a finished job's model (raw features, in the model's feature order) |
//! | `GET /metrics` | the node's Prometheus metrics |
//! | `GET /healthz` | `{"node": ID, "status": "ok"}` |
//!
//! The service prints `serving on http://ADDR` once it listens, and stops on
//! SIGTERM or Ctrl-C (the node shuts down gracefully).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use phalanx::cluster::registry::{JobId, JobState};
use phalanx::{JobConfig, Node, NodeEventKind, NodeHandle};
use serde_json::{json, Value};
use tokio_stream::StreamExt;

/// Events buffered per server-sent-events client (a slow client waits, the node does not).
const EVENTS_BUFFERED: usize = 256;

/// Last step and loss per job, from the node's events.
type Progress = Arc<Mutex<BTreeMap<JobId, (u64, f64)>>>;

#[derive(Clone)]
struct App {
    node: NodeHandle,
    progress: Progress,
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, Json(json!({ "error": message.to_string() }))).into_response()
}

async fn submit(State(app): State<App>, body: String) -> Response {
    let spec: JobConfig = match serde_json::from_str(&body) {
        Ok(spec) => spec,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("job spec: {e}")),
    };
    match app.node.submit(spec).await {
        Ok(job) => (StatusCode::ACCEPTED, Json(json!({ "id": job.id() }))).into_response(),
        Err(phalanx::Error::Submit(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

fn describe(entry: &phalanx::cluster::registry::JobEntry, progress: &Progress) -> Value {
    let (step, loss) = progress.lock().map(|p| p.get(&entry.id).copied()).ok().flatten().unzip();
    let mut v = json!({
        "id": entry.id,
        "state": entry.state.name(),
        "model": entry.spec.model.to_string(),
        "dataset": entry.spec.dataset.to_string(),
        "step": step,
        "loss": loss,
    });
    match &entry.state {
        JobState::Finished { model_sha256, summary } => {
            v["model_sha256"] = json!(model_sha256);
            v["summary"] = json!(summary);
        }
        JobState::Failed { error } => v["error"] = json!(error),
        _ => {}
    }
    v
}

async fn list(State(app): State<App>) -> Response {
    match app.node.jobs().await {
        Ok(jobs) => Json(jobs.iter().map(|j| describe(j, &app.progress)).collect::<Vec<_>>()).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn show(State(app): State<App>, Path(id): Path<JobId>) -> Response {
    match app.node.jobs().await {
        Ok(jobs) => match jobs.iter().find(|j| j.id == id) {
            Some(j) => Json(describe(j, &app.progress)).into_response(),
            None => error(StatusCode::NOT_FOUND, format!("no job {id}")),
        },
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

/// The job's state now, then its events as they come; the stream ends with the job.
async fn events(State(app): State<App>, Path(id): Path<JobId>) -> Response {
    // Subscribed before the state is read, so nothing falls in between.
    let mut live = app.node.events().filter(move |e| phalanx::node::job_of(&e.kind) == Some(id));
    let entry = match app.node.jobs().await {
        Ok(jobs) => jobs.into_iter().find(|j| j.id == id),
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e),
    };
    let Some(entry) = entry else { return error(StatusCode::NOT_FOUND, format!("no job {id}")) };
    let mut now = describe(&entry, &app.progress);
    now["event"] = json!("job_state");
    let (tx, rx) = tokio::sync::mpsc::channel::<Value>(EVENTS_BUFFERED);
    let over = entry.state.is_over();
    tokio::spawn(async move {
        if tx.send(now).await.is_err() || over {
            return;
        }
        while let Some(e) = live.next().await {
            let ends =
                matches!(&e.kind, NodeEventKind::JobState { state, .. } if state != "queued" && state != "running");
            // A client that went away ends the forwarding.
            if tx.send(serde_json::to_value(&e).unwrap_or_default()).await.is_err() || ends {
                return;
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx)
        .map(|v| Ok::<_, Infallible>(Event::default().data(v.to_string())));
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

async fn cancel(State(app): State<App>, Path(id): Path<JobId>) -> Response {
    match app.node.cancel(id).await {
        Ok(()) => (StatusCode::ACCEPTED, Json(json!({ "id": id, "cancelling": true }))).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn predict(State(app): State<App>, Json(request): Json<Value>) -> Response {
    let Some(id) = request["job"].as_u64() else {
        return error(StatusCode::BAD_REQUEST, "`job`: a job id is required");
    };
    let Some(rows) = request["rows"].as_array() else {
        return error(StatusCode::BAD_REQUEST, "`rows`: a list of rows of numbers is required");
    };
    let jobs = match app.node.jobs().await {
        Ok(jobs) => jobs,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e),
    };
    let Some(JobState::Finished { summary: Some(summary), .. }) = jobs.iter().find(|j| j.id == id).map(|j| &j.state)
    else {
        return error(StatusCode::CONFLICT, format!("job {id} has no finished model (yet)"));
    };
    let path = PathBuf::from(summary).with_file_name("model.safetensors");
    let model = match phalanx::predict::TrainedModel::load(&path) {
        Ok(m) => m,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let width = model.feature_names.len();
    let mut values = Vec::with_capacity(rows.len() * width);
    for (i, row) in rows.iter().enumerate() {
        let cells: Option<Vec<f32>> =
            row.as_array().map(|r| r.iter().filter_map(|c| c.as_f64().map(|v| v as f32)).collect());
        match cells {
            Some(cells) if cells.len() == width => values.extend(cells),
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("row {i}: expected {width} numbers ({})", model.feature_names.join(", ")),
                )
            }
        }
    }
    let rows = match ndarray::Array2::from_shape_vec((rows.len(), width), values) {
        Ok(rows) => rows,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match model.predict(&rows) {
        Ok(p) => Json(json!({ "job": id, "predictions": p.iter().map(|p| p.to_string()).collect::<Vec<_>>() }))
            .into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

async fn metrics(State(app): State<App>) -> Response {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.node.metrics().encode()).into_response()
}

async fn healthz(State(app): State<App>) -> Json<Value> {
    Json(json!({ "node": app.node.id(), "status": "ok" }))
}

/// `--flag value` pairs.
fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let need = |name: &str| flag(&args, name).ok_or_else(|| anyhow::anyhow!("missing {name}"));
    let id: u32 = need("--id")?.parse()?;
    let listen: SocketAddr = need("--listen")?.parse()?;
    let http: SocketAddr = flag(&args, "--http").unwrap_or_else(|| "127.0.0.1:0".into()).parse()?;
    let seeds: Vec<SocketAddr> = flag(&args, "--seeds")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let mut builder = Node::builder().id(id).listen(listen).certs_dir(need("--certs")?).seeds(seeds);
    if let Some(dir) = flag(&args, "--data-dir") {
        builder = builder.data_dir(dir);
    }
    if let Some(dir) = flag(&args, "--out") {
        builder = builder.out(dir);
    }
    let node = builder.start().await?;
    let progress: Progress = Arc::default();
    {
        let (mut events, progress) = (node.events(), progress.clone());
        tokio::spawn(async move {
            while let Some(e) = events.next().await {
                // `step` where this node coordinates the job, `progress` relayed elsewhere.
                if let NodeEventKind::Step { job, step, loss, .. } | NodeEventKind::Progress { job, step, loss, .. } =
                    e.kind
                {
                    if let Ok(mut p) = progress.lock() {
                        p.insert(job, (step, loss));
                    }
                }
            }
        });
    }
    let app = Router::new()
        .route("/jobs", post(submit).get(list))
        .route("/jobs/{id}", get(show).delete(cancel))
        .route("/jobs/{id}/events", get(events))
        .route("/predict", post(predict))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(App { node: node.clone(), progress });
    let listener = tokio::net::TcpListener::bind(http).await?;
    println!("serving on http://{}", listener.local_addr()?);
    eprintln!("node {id} listening on {}", node.local_addr());
    axum::serve(listener, app).with_graceful_shutdown(stop_signal()).await?;
    node.shutdown().await?;
    Ok(())
}

/// SIGTERM or Ctrl-C.
async fn stop_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
