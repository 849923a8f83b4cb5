//! This process's place in a data-parallel run: one rank of a c10d process group, configured
//! as torchrun and Slurm configure theirs (the environment), or the launcher of this node's
//! ranks (`--nproc-per-node N`), which starts them as copies of its own command and ends as
//! soon as one of them fails, naming it.

use std::ffi::OsString;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cnclip_torch_ext::c10d::{ProcessGroup, Store};

/// torchrun's default rendezvous port.
const DEFAULT_PORT: u16 = 29500;

/// One rank of a run of several processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rank {
    pub rank: usize,
    pub world: usize,
    /// The rank among this machine's (its device: `--devices` entry `local_rank` mod their count).
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// The store at the master is torchrun's agent's (`TORCHELASTIC_USE_AGENT_STORE`): every
    /// rank connects to it, and the keys of each attempt (`TORCHELASTIC_RESTART_COUNT`) go
    /// under a prefix of their own.
    pub agent_store: bool,
    /// Keys of this attempt of the run go under it.
    pub prefix: String,
}

/// The process group and the store its ranks met at (kept to pass word between ranks).
pub struct Joined {
    pub rank: Rank,
    pub store: Store,
    pub group: std::sync::Arc<ProcessGroup>,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn number<T: std::str::FromStr>(name: &str, value: &str) -> Result<T> {
    value.trim().parse().map_err(|_| anyhow::anyhow!("{name}={value:?} is not a number"))
}

impl Rank {
    /// From the environment: torchrun's `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, or a Slurm step's
    /// `SLURM_PROCID`, `SLURM_STEP_NUM_TASKS`, `SLURM_LOCALID` (srun sets the step's; the batch
    /// script itself, outside srun, is not a rank); with `MASTER_ADDR` (127.0.0.1 unless set)
    /// and `MASTER_PORT` (29500). `None` when neither names a world of more than one rank.
    ///
    /// # Errors
    /// A variable that is not a number, or a rank not below the world size.
    pub fn from_env() -> Result<Option<Rank>> {
        let (rank, world, local) = if let (Some(rank), Some(world)) = (var("RANK"), var("WORLD_SIZE")) {
            (number("RANK", &rank)?, number("WORLD_SIZE", &world)?, var("LOCAL_RANK"))
        } else if let (Some(rank), Some(world)) = (var("SLURM_PROCID"), var("SLURM_STEP_NUM_TASKS")) {
            (number("SLURM_PROCID", &rank)?, number("SLURM_STEP_NUM_TASKS", &world)?, var("SLURM_LOCALID"))
        } else {
            return Ok(None);
        };
        let world: usize = world;
        if world <= 1 {
            return Ok(None);
        }
        let rank: usize = rank;
        if rank >= world {
            bail!("rank {rank} is not below the world size {world}");
        }
        let local_rank = match local {
            Some(local) => number("LOCAL_RANK", &local)?,
            None => rank,
        };
        let master_port = match var("MASTER_PORT") {
            Some(port) => number("MASTER_PORT", &port)?,
            None => DEFAULT_PORT,
        };
        let master_addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let agent_store = var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let prefix = format!("cnclip/{}", var("TORCHELASTIC_RESTART_COUNT").unwrap_or_else(|| "0".into()));
        Ok(Some(Rank { rank, world, local_rank, master_addr, master_port, agent_store, prefix }))
    }

    /// Meets the other ranks: rank 0 serves the store at `MASTER_ADDR:MASTER_PORT`, the others
    /// connect to it; then all join the Gloo group. `timeout` bounds the meeting and, later,
    /// every collective (a rank gone fails the others within it).
    ///
    /// # Errors
    /// The store cannot be served or reached, or not every rank came within `timeout`.
    pub fn join(self, timeout: Duration) -> Result<Joined> {
        let place = format!("rank {} of {} at {}:{}", self.rank, self.world, self.master_addr, self.master_port);
        let store = if self.rank == 0 && !self.agent_store {
            Store::server(&self.master_addr, self.master_port, self.world, timeout)
        } else {
            Store::client(&self.master_addr, self.master_port, self.world, timeout)
        }
        .with_context(|| place.clone())?;
        let prefix = format!("{}/gloo", self.prefix);
        let group = ProcessGroup::gloo_under(&store, Some(&prefix), self.rank, self.world, timeout, None)
            .with_context(|| place.clone())?;
        Ok(Joined { rank: self, store, group: std::sync::Arc::new(group) })
    }
}

/// `--nproc-per-node N` in a process that is not a rank yet: runs this command `n` times as
/// the local ranks of node `NODE_RANK` of `NNODES` (torchrun's variables; 0 and 1 unless set),
/// with `RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT` set, and waits for
/// them. When one fails, the others are stopped (SIGTERM, then SIGKILL after 10 s) and the
/// error names it; a signal to the launcher stops them all.
///
/// # Errors
/// A rank could not be started or did not succeed.
pub fn launch(n: usize) -> Result<()> {
    let number_of =
        |name: &str, default: usize| -> Result<usize> { var(name).map_or(Ok(default), |v| number(name, &v)) };
    let (nnodes, node_rank) = (number_of("NNODES", 1)?, number_of("NODE_RANK", 0)?);
    if node_rank >= nnodes {
        bail!("NODE_RANK={node_rank} is not below NNODES={nnodes}");
    }
    let world = n * nnodes;
    let exe = std::env::current_exe().context("finding this program to start the ranks")?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
    let port = var("MASTER_PORT").unwrap_or_else(|| DEFAULT_PORT.to_string());
    let mut children: Vec<(usize, Child)> = Vec::with_capacity(n);
    for local in 0..n {
        let rank = node_rank * n + local;
        let mut command = Command::new(&exe);
        // SAFETY: prctl(2) between fork and exec, async-signal-safe: the rank gets SIGTERM when
        // the launcher dies, however it dies (no orphaned ranks holding devices).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = command
            .args(&args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", &addr)
            .env("MASTER_PORT", &port)
            .spawn();
        match child {
            Ok(child) => children.push((rank, child)),
            Err(e) => {
                stop(&mut children);
                return Err(e).with_context(|| format!("starting rank {rank}"));
            }
        }
    }
    let mut running = children.len();
    while running > 0 {
        if let Some(signal) = cnclip_operators::signals::interrupted() {
            stop(&mut children);
            return Err(cnclip_operators::signals::Stopped(signal).into());
        }
        running = 0;
        let mut failed = Vec::new();
        for (rank, child) in &mut children {
            let waited = match child.try_wait() {
                Ok(waited) => waited,
                Err(e) => {
                    let rank = *rank;
                    stop(&mut children);
                    return Err(e).with_context(|| format!("waiting for rank {rank}"));
                }
            };
            match waited {
                None => running += 1,
                Some(status) if status.success() => {}
                Some(status) => failed.push((*rank, child.id(), status)),
            }
        }
        // A rank killed by a signal is the cause; the ranks that then failed their next
        // exchange with it are the effect.
        use std::os::unix::process::ExitStatusExt;
        failed.sort_by_key(|(rank, _, status)| (status.signal().is_none(), *rank));
        if let Some(&(rank, pid, status)) = failed.first() {
            stop(&mut children);
            bail!("rank {rank} of {world} (pid {pid}) {}: the other ranks were stopped", describe(status));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// "exited with status 3", "was killed by signal 9".
fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        _ => status.to_string(),
    }
}

/// Stops the ranks still running: SIGTERM (they stop as on a Ctrl-C), SIGKILL after 10 s.
fn stop(children: &mut [(usize, Child)]) {
    for (_, child) in children.iter_mut() {
        if matches!(child.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on a child of ours that has not been waited for (its pid is ours
            // to signal until then).
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for (_, child) in children.iter_mut() {
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_read_as_a_user_would_say_them() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(describe(ExitStatus::from_raw(3 << 8)), "exited with status 3");
        assert_eq!(describe(ExitStatus::from_raw(9)), "was killed by signal 9");
    }
}
