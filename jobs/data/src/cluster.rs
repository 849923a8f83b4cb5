//! `cnclip cluster scheduler` and `cnclip cluster executor`: a Ballista (distributed
//! DataFusion) cluster for the SQL jobs — Ballista's own scheduler and executor, from the
//! `ballista-scheduler` / `ballista-executor` crates of our DataFusion release, with cnclip's
//! vector UDFs (`dot`, `cosine_similarity`) registered on both: the scheduler decodes the
//! client's logical plans by function name, each executor decodes the physical plans of its
//! tasks the same way. `cnclip sql --cluster df://HOST:PORT`, `evaluation --engine sql
//! --cluster …` and `zeroshot-evaluation --engine sql --cluster …` submit their queries here.
//!
//! Tables are Parquet paths the client registers; every executor must read them at the same
//! path (a shared file system). The processes print one line when they listen (the scheduler's
//! with its bound port, so `--bind HOST:0` works) and stop on SIGINT/SIGTERM.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ballista_core::config::TaskSchedulingPolicy;
use ballista_core::registry::BallistaFunctionRegistry;
use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;
use ballista_scheduler::scheduler_process::{create_scheduler, start_grpc_service_with_listener};
use datafusion::execution::FunctionRegistry;
use datafusion_proto::protobuf::{LogicalPlanNode, PhysicalPlanNode};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Run a Ballista scheduler (clients connect with `--cluster df://HOST:PORT`).
    Scheduler(SchedulerArgs),
    /// Run a Ballista executor that registers with a scheduler.
    Executor(ExecutorArgs),
}

#[derive(clap::Args)]
pub struct SchedulerArgs {
    /// Address to listen on (port 0: any free port, printed).
    #[arg(long, default_value = "0.0.0.0:50050")]
    bind: String,
    /// An executor silent this long is removed and its tasks run again elsewhere.
    #[arg(long, default_value_t = 180)]
    executor_timeout_seconds: u64,
    /// Times a task may fail (an executor lost mid-task included) before its query fails.
    #[arg(long, default_value_t = 4)]
    task_max_failures: usize,
}

#[derive(clap::Args)]
pub struct ExecutorArgs {
    /// The scheduler, `HOST:PORT`.
    #[arg(long)]
    scheduler: String,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    bind_host: String,
    /// The address the scheduler and other executors reach this one at (default: the bind
    /// address, or 127.0.0.1 when that is 0.0.0.0).
    #[arg(long)]
    external_host: Option<String>,
    /// Arrow Flight port for results and shuffles (0: a free one).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// gRPC port (0: a free one).
    #[arg(long, default_value_t = 0)]
    grpc_port: u16,
    /// Tasks run at once (default: one per core).
    #[arg(long)]
    concurrent_tasks: Option<usize>,
    /// Where shuffle files go (default: a temporary directory).
    #[arg(long)]
    work_dir: Option<String>,
    /// Seconds between heartbeats to the scheduler (below the scheduler's executor timeout).
    #[arg(long, default_value_t = 60)]
    heartbeat_interval_seconds: u64,
    /// Stop (exit 1) when the scheduler has not accepted a connection for this many seconds:
    /// an executor whose scheduler is gone would otherwise run on idle, unnoticed. 0: never.
    #[arg(long, default_value_t = 120)]
    scheduler_timeout_seconds: u64,
}

pub fn run(command: Command) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Ballista's own binaries use deep stacks for recursive plan (de)serialisation.
        .thread_stack_size(32 << 20)
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        match command {
            Command::Scheduler(args) => scheduler(args).await,
            Command::Executor(args) => executor(args).await,
        }
    })
}

/// The session every query is planned in on the scheduler: Ballista's default with our UDFs.
fn session_state(
    config: datafusion::prelude::SessionConfig,
) -> datafusion::common::Result<datafusion::execution::SessionState> {
    let state = ballista_core::utils::default_session_builder(config)?;
    // Tables in object stores are planned through cnclip's stores (listing a prefix).
    let mut state = datafusion::execution::SessionStateBuilder::new_from_existing(state)
        .with_runtime_env(crate::stores::runtime()?)
        .build();
    for udf in crate::sql::udfs() {
        state.register_udf(Arc::new(udf))?;
    }
    Ok(state)
}

async fn scheduler(args: SchedulerArgs) -> Result<()> {
    let address: SocketAddr = args.bind.parse().with_context(|| format!("--bind {}: not HOST:PORT", args.bind))?;
    let listener =
        tokio::net::TcpListener::bind(address).await.with_context(|| format!("--bind {}: cannot listen", args.bind))?;
    let bound = listener.local_addr()?;
    let config = SchedulerConfig {
        bind_host: bound.ip().to_string(),
        bind_port: bound.port(),
        external_host: if bound.ip().is_unspecified() { "localhost".into() } else { bound.ip().to_string() },
        scheduling_policy: TaskSchedulingPolicy::PullStaged,
        executor_timeout_seconds: args.executor_timeout_seconds,
        no_executors_grace_period_seconds: args.executor_timeout_seconds,
        expire_dead_executor_interval_seconds: args.executor_timeout_seconds.clamp(1, 15),
        task_max_failures: args.task_max_failures,
        ..SchedulerConfig::default()
    }
    .with_override_session_builder(Arc::new(session_state));
    let config = Arc::new(config);
    let cluster = BallistaCluster::new_from_config(&config).await.context("starting the scheduler")?;
    let scheduler = create_scheduler::<LogicalPlanNode, PhysicalPlanNode>(cluster, config)
        .await
        .context("starting the scheduler")?;
    println!("cnclip cluster scheduler: listening on {bound} (clients: --cluster df://{bound})");
    let served = start_grpc_service_with_listener(listener, scheduler);
    tokio::select! {
        result = served => result.context("the scheduler stopped")?,
        () = stopped() => eprintln!("cnclip cluster scheduler: stopping"),
    }
    Ok(())
}

async fn executor(args: ExecutorArgs) -> Result<()> {
    let Some((host, port)) = args.scheduler.rsplit_once(':') else {
        bail!("--scheduler {}: use HOST:PORT", args.scheduler);
    };
    let scheduler_port: u16 = port.parse().with_context(|| format!("--scheduler {}: bad port", args.scheduler))?;
    let free = |port: u16, what: &str| -> Result<u16> {
        if port != 0 {
            return Ok(port);
        }
        let listener = TcpListener::bind((args.bind_host.as_str(), 0))
            .with_context(|| format!("finding a free {what} port on {}", args.bind_host))?;
        Ok(listener.local_addr()?.port())
    };
    let port = free(args.port, "flight")?;
    let grpc_port = free(args.grpc_port, "gRPC")?;
    // Ballista's default registry lacks the nested (array) functions its scheduler plans with
    // (`array_position`, `unnest`'s helpers, …): the scheduler's whole set, then ours.
    let mut registry = BallistaFunctionRegistry::default();
    for udf in ballista_core::extension::ballista_scalar_functions() {
        registry.scalar_functions.insert(udf.name().to_string(), udf);
    }
    for udf in crate::sql::udfs() {
        registry.scalar_functions.insert(udf.name().to_string(), Arc::new(udf));
    }
    let external_host = args
        .external_host
        .clone()
        .unwrap_or_else(|| if args.bind_host == "0.0.0.0" { "127.0.0.1".to_string() } else { args.bind_host.clone() });
    let defaults = ExecutorProcessConfig::default();
    let config = ExecutorProcessConfig {
        bind_host: args.bind_host.clone(),
        external_host: Some(external_host.clone()),
        port,
        grpc_port,
        scheduler_host: host.to_string(),
        scheduler_port,
        vcores: args.concurrent_tasks.unwrap_or(defaults.vcores),
        task_scheduling_policy: TaskSchedulingPolicy::PullStaged,
        work_dir: args.work_dir.clone(),
        executor_heartbeat_interval_seconds: args.heartbeat_interval_seconds,
        override_function_registry: Some(Arc::new(registry)),
        // Executors read tables in object stores directly, through cnclip's stores; spill files
        // go where Ballista's default puts them (the work directory, or the system's temporary one).
        override_runtime_producer: Some({
            let spill = args.work_dir.clone().unwrap_or_else(|| std::env::temp_dir().display().to_string());
            Arc::new(move |_: &datafusion::prelude::SessionConfig| {
                datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
                    .with_temp_file_path(spill.clone())
                    .with_object_store_registry(Arc::new(crate::stores::Stores::default()))
                    .build_arc()
            })
        }),
        ..defaults
    };
    println!(
        "cnclip cluster executor {}: flight {external_host}:{port}, gRPC {grpc_port}, scheduler {}, {} tasks at once",
        config.executor_id, args.scheduler, config.vcores
    );
    let served = start_executor_process(Arc::new(config));
    tokio::select! {
        result = served => result.context("the executor stopped")?,
        () = stopped() => eprintln!("cnclip cluster executor: stopping"),
        gone = scheduler_gone(&args.scheduler, args.scheduler_timeout_seconds) => return Err(gone),
    }
    Ok(())
}

/// Resolves (with the error to stop on) once the scheduler at `address` has refused or not
/// answered every connection for `timeout` seconds; never when `timeout` is 0. Checked every
/// few seconds with a plain TCP connect: cheap, and independent of Ballista's heartbeat, which
/// only logs its failures.
async fn scheduler_gone(address: &str, timeout: u64) -> anyhow::Error {
    if timeout == 0 {
        return std::future::pending().await;
    }
    let every = Duration::from_secs(timeout.clamp(1, 5));
    let mut last_seen = std::time::Instant::now();
    loop {
        tokio::time::sleep(every).await;
        let reached = tokio::time::timeout(every, tokio::net::TcpStream::connect(address)).await;
        if matches!(reached, Ok(Ok(_))) {
            last_seen = std::time::Instant::now();
        } else if last_seen.elapsed() >= Duration::from_secs(timeout) {
            return anyhow::anyhow!(
                "the scheduler at {address} has not answered for {} s (--scheduler-timeout-seconds): stopping; start \
                 the executor again once the scheduler is back",
                last_seen.elapsed().as_secs()
            );
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn stopped() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}
